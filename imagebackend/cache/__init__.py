#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

"""The base-image cache: ``<instances_path>/<base_dir_name>``.

Its files are named and laid out as :mod:`imagebackend.cache.layout`
describes (``cache_id = sha1(image_id)``; a *stem* names one generation).

Generations: every use compares the source's current identity of the image
(a content hash, or a hash plus an update time) with the record of the
newest usable generation.  When they differ, the image is fetched again
and published under a new generation number, and the older generations
are marked stale in their records.  A published base is never modified,
and never removed while a disk uses it, so existing overlays go on reading
exactly the bytes they were made from.  A stale base is never used for a
new disk; ``cache prune`` removes it once nothing uses it.  A generation
number is never used twice: it is claimed (an exclusive create of
``.generations/<cache_id>/<N>``, fsynced) before anything of it is
written, and the claims are never removed, so a disk left naming a pruned
generation can never find other bytes under that name.

Trust comes from records: a base is used only while its record is valid
(readable without following a symlink, the fields and types the cache
writes, a checksum to verify it against).  A base whose record is
missing or invalid is never re-recorded from its own bytes: it is marked
stale and the image fetched again as a new generation; ``cache verify``
reports it unverifiable.  A raw base is never inspected again (its bytes
are guest data and may look like any format); a non-raw base recorded
under an older inspection policy is inspected again with its recorded
format, and one the policy now refuses is marked stale, never moved.

Correctness never depends on the locks, which only save duplicate work
(two hosts may share ``_base`` while locking in different directories):
every attempt writes scratch files of its own (``<hex>`` is random), only
ever removes its own, and publishes a base, a sized base or a record with a
no-replace link of a file whose size and digest it just checked (see
:mod:`imagebackend.cache.publish`); a name taken meanwhile is adopted if it
holds the same bytes, and never replaced.  Scratch nobody has modified for
:data:`imagebackend.cache.layout.SCRATCH_MINIMUM_AGE` seconds is left over
from a crash, and only ``cache prune`` removes it.
The last-used time of a base is the modification time of its metadata
record, refreshed with ``utime`` on every use (a use never rewrites it);
that of a sized base is its own modification time.  No symlink is followed
in ``_base``: records, ``.disks``, ``.sources`` and ``.generations`` are
opened with ``O_NOFOLLOW`` or checked with ``lstat`` and refused.

:class:`ImageCache` is a facade over collaborators it owns, each given
only the paths and locks (:class:`~imagebackend.cache.store.Store`), the
source, the qemu-img runner, option values or callbacks it needs, and none
of them knows the facade: the miss path
(:class:`~imagebackend.cache.fetch.Fetcher`, with
:mod:`~imagebackend.cache.download` and
:mod:`~imagebackend.cache.reinspect`), :mod:`~imagebackend.cache.lookup`,
:class:`~imagebackend.cache.sized.SizedBases`, the usage scanner and its
:class:`~imagebackend.cache.registry.Registry` of disks,
:class:`~imagebackend.cache.remove.Remover`,
:class:`~imagebackend.cache.prune.Pruner`,
:class:`~imagebackend.cache.verify.Verifier` and
:mod:`~imagebackend.cache.prefetch`.  What they return is in
:mod:`~imagebackend.cache.results`.
"""

import importlib
import typing

from oslo_config import cfg

from imagebackend.cache import options as cache_options
from imagebackend.common import lock_path

#: the ``[imagebackend]`` options of the cache: where it lives and how
#: long its locks are waited for, and whether bases are converted to raw.
OPTIONS = cache_options.OPTIONS

#: the ``[image_cache]`` options: in-use tracking, pruning.
IMAGE_CACHE_OPTIONS = cache_options.IMAGE_CACHE_OPTIONS
IMAGE_CACHE_GROUP = cache_options.IMAGE_CACHE_GROUP

# The package imports nothing else: its modules are imported one by one
# (the command line's "disk info" needs only disk_records, its "cache
# list" no fetch, prune or verify code), and ImageCache, with all of its
# collaborators, when it is first asked for.
_FACADE = frozenset({"ImageCache"})


def __getattr__(name: str) -> typing.Any:
    if name in _FACADE:
        from imagebackend.cache import facade

        value = getattr(facade, name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        # A module of the package (``imagebackend.cache.results``), as
        # reachable without an import of its own as when the package
        # imported them all.
        try:
            return importlib.import_module("%s.%s" % (__name__, name))
        except ModuleNotFoundError as exc:
            if exc.name != "%s.%s" % (__name__, name):
                raise
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FACADE)


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register the cache's ``[image_cache]`` options, and make sure
    oslo.concurrency's ``[oslo_concurrency]`` ones are registered too; this
    module's ``[imagebackend]`` options (:data:`OPTIONS`) are registered
    by :func:`imagebackend.opts.register_opts`.
    """
    conf.register_opts(IMAGE_CACHE_OPTIONS, group=IMAGE_CACHE_GROUP)
    lock_path.register_opts(conf)
