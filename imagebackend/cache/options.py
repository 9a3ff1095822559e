# Licensed under the Apache License, Version 2.0 (the "License"); you may
# not use this file except in compliance with the License. You may obtain
# a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
# WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
# License for the specific language governing permissions and limitations
# under the License.

"""The base-image cache's options, declared apart from the code that
reads them so that a configuration can be built without importing the
cache (the command line's ``disk info`` reads no cache code but
:mod:`imagebackend.cache.disk_records`):

* ``[imagebackend]`` (:data:`OPTIONS`): where the cache lives and how long
  its locks are waited for (read by :mod:`imagebackend.cache.store`),
  whether bases are converted to raw and may be reused by a source's hash
  (:mod:`imagebackend.cache.fetch`);
* ``[image_cache]`` (:data:`IMAGE_CACHE_OPTIONS`): where else disks live
  (:mod:`imagebackend.cache.usage`) and when unused bases are removed
  (:mod:`imagebackend.cache.prune`).

:func:`imagebackend.opts.register_opts` registers them.
"""

from oslo_config import cfg

IMAGE_CACHE_GROUP = "image_cache"

#: the ``[imagebackend]`` options of the store: the cache's place and its
#: locks.
STORE_OPTIONS = [
    cfg.StrOpt("instances_path",
               default="/var/lib/imagebackend/instances",
               help="Directory under which instance disks and the shared "
                    "base-image cache live. The cache is the subdirectory "
                    "named by base_dir_name; inter-process locks go to a "
                    "'locks' subdirectory unless [oslo_concurrency] "
                    "lock_path is set. Disks anywhere under it keep the "
                    "bases they use from being pruned. Default: "
                    "/var/lib/imagebackend/instances."),
    cfg.StrOpt("base_dir_name",
               default="_base",
               help="Name of the base-image cache directory inside "
                    "instances_path: a plain name (no '/', not '.' or "
                    "'..'), checked before anything is created. Several "
                    "compute hosts may share it over a filesystem with "
                    "working POSIX locks; they must "
                    "then also share one lock directory (the default "
                    "'locks' beside it, or one [oslo_concurrency] lock_path "
                    "on that shared filesystem), or they download and "
                    "convert each image in duplicate. The cache records "
                    "which lock directory each host uses in "
                    "<base_dir_name>/.lock-dirs/ and refuses to start with "
                    "a different one. Default: _base."),
    cfg.IntOpt("lock_wait_timeout",
               default=600, min=0,
               help="Longest wait, in seconds, for one of the cache's "
                    "locks without progress from its holder: an image "
                    "being downloaded and converted by another request "
                    "(the wait goes on while the holder's scratch file in "
                    "the cache keeps changing), a sized base being built, "
                    "or a base being pruned. A waiter logs a warning every "
                    "30 seconds naming the holder (host, pid and command, "
                    "recorded in the lock file), and when the time is up "
                    "the request fails with an error naming the image and "
                    "the holder. Raise it if a sound holder can go that "
                    "long without writing (a very slow image service). "
                    "0 waits without limit (not "
                    "recommended: a stuck process then blocks every "
                    "request for its image). Default: 600."),
]

#: the ``[imagebackend]`` options of the miss path.
FETCH_OPTIONS = [
    cfg.BoolOpt("force_raw_images",
                default=True,
                help="Convert every non-raw image to raw when it is "
                     "cached. Raw bases cost disk space but make instance "
                     "disks faster and let the raw backend copy them "
                     "without qemu-img. When false, a base keeps the "
                     "format it was downloaded in. Default: true."),
    cfg.BoolOpt("reuse_by_source_hash",
                default=True,
                help="Do not download an image whose strong hash recorded "
                     "by the image source (Glance's os_hash_algo sha256, "
                     "sha384 or sha512 and its os_hash_value) equals the "
                     "verified download hash of a base already cached: "
                     "link that base under the image's own name instead. "
                     "An md5 checksum never counts. Turn this off where "
                     "image owners can set those hashes themselves (a "
                     "Glance that accepts locations added with their own "
                     "validation_data): identical bytes are then still "
                     "shared, but only after a download and a byte-for-"
                     "byte comparison. Default: true."),
]

#: every ``[imagebackend]`` option of the cache.
OPTIONS = STORE_OPTIONS + FETCH_OPTIONS

#: the ``[image_cache]`` option of in-use tracking.
USAGE_OPTIONS = [
    cfg.ListOpt("disk_dirs",
                default=[],
                help="More directories holding instance disks, beside "
                     "[imagebackend] instances_path, which is always "
                     "searched. A cached base used as the backing file of "
                     "any qcow2 file under these directories (searched "
                     "recursively, symlinks not followed) is never removed "
                     "by 'imagebackend cache prune' or by invalidation. "
                     "Disks the library created are also recorded in the "
                     "cache itself, so list a directory here only for disks "
                     "made by other tools. Default: empty."),
]

#: the ``[image_cache]`` options of pruning.
PRUNE_OPTIONS = [
    cfg.IntOpt("remove_unused_original_minimum_age_seconds",
               default=86400, min=0,
               help="Age, in seconds since its last use, at which "
                    "'imagebackend cache prune' removes an original base "
                    "(a cached image) that no disk uses. Stale bases "
                    "(superseded by a changed image, or invalidated) are "
                    "removed as soon as nothing uses them, whatever this "
                    "age; max_size and min_free_space may remove unused "
                    "bases sooner. Files moved aside by 'cache verify "
                    "--repair' are removed at this age too. 0 removes "
                    "every unused base. Default: 86400 (one day)."),
    cfg.IntOpt("remove_unused_resized_minimum_age_seconds",
               default=3600, min=0,
               help="Age, in seconds since its last use, at which "
                    "'imagebackend cache prune' removes a sized base (made "
                    "by the cached-base backend, '<base>_<size>') that no "
                    "disk uses. Sized bases are cheap to remake from their "
                    "original, hence the shorter default. Default: 3600 "
                    "(one hour)."),
    cfg.StrOpt("max_size",
               default="0",
               help="Largest size the base-image cache may take on disk "
                    "(allocated bytes of bases, sized bases and scratch "
                    "files): bytes, or a number with a K, M, G or T suffix "
                    "(1024-based). When pruning finds the cache larger, it "
                    "removes bases no disk uses, least recently used "
                    "first, whatever their age, until the cache fits. "
                    "Bases in use are never removed, so the cache may stay "
                    "above this size. 0 means no limit. Default: 0."),
    cfg.StrOpt("min_free_space",
               default="0",
               help="Free space pruning keeps on the filesystem holding "
                    "the cache: bytes, a number with a K, M, G or T suffix "
                    "(1024-based), or a percentage of the filesystem's "
                    "size such as '10%'. When less is free, pruning "
                    "removes bases no disk uses, least recently used "
                    "first, whatever their age, until enough is free or "
                    "nothing unused remains. Works together with "
                    "max_size: both are met when possible. 0 means no "
                    "minimum. Default: 0."),
]

#: every ``[image_cache]`` option.
IMAGE_CACHE_OPTIONS = USAGE_OPTIONS + PRUNE_OPTIONS
