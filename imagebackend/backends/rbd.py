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

"""rbd: instance disks as Ceph RBD copy-on-write clones of one base per
cluster.

The base of an image is imported once into ``[rbd] base_pool`` as
``<cache_id>`` (``<cache_id>-<N>`` for generation N), raw, sparse, with a
protected snapshot ``snap``; every disk is a clone of that snapshot in
``[rbd] pool``.  The import runs under a lock object in the base pool, so
of all the hosts sharing the cluster one imports and the others find the
base and download nothing.  Ceph itself tracks which bases have clones.
"""

import contextlib
import itertools
import os
import socket
import tempfile
import time

from imagebackend.backends import base
from imagebackend.backends import options as backends_options
from imagebackend.backends import rbd_bases
from imagebackend.backends import rbd_cluster
from imagebackend.backends import rbd_disk
from imagebackend.backends import rbd_import
from imagebackend.cache import lookup as cache_lookup
from imagebackend.common import digest
from imagebackend import exception

GROUP = backends_options.RBD_GROUP


class RbdBackend(base.ImageBackend):
    """Disks are RBD clones in ``[rbd] pool`` of a base imported once per
    cluster into ``[rbd] base_pool``.

    :param modules: the ``(rados, rbd)`` modules; by default Ceph's
        bindings, imported on first use.
    """

    name = "rbd"
    disk_format = "raw"
    OPTIONS = [(GROUP, backends_options.RBD_OPTIONS)]

    def __init__(self, conf, source=None, qemu=None, modules=None):
        super().__init__(conf, source=source, qemu=qemu)
        self._modules = modules
        self._conn = None
        self._monitors = None

    @property
    def pool(self) -> str:
        return self.conf.rbd.pool

    @property
    def base_pool(self) -> str:
        return self.conf.rbd.base_pool or self.conf.rbd.pool

    @contextlib.contextmanager
    def session(self):
        """The backend's connection (made once); one that stopped
        answering is closed, and the next call connects again.
        """
        if self._conn is None:
            self._conn = rbd_cluster.Connection(
                self.conf.rbd.ceph_conf, self.conf.rbd.user,
                self.conf.rbd.connect_timeout, modules=self._modules)
        try:
            yield self._conn
        except exception.RbdUnavailable:
            self.close()
            raise

    def close(self) -> None:
        """Close the connection to the cluster, if one is open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- hooks ---------------------------------------------------------------

    def normalize_target(self, target) -> str:
        """``NAME`` or ``<pool>/NAME`` (the pool must be ``[rbd] pool``)
        as ``<pool>/NAME``.
        """
        return rbd_disk.normalize(target, self.pool)

    def claim_target(self, target):
        pool, name = target.split("/", 1)
        with self.session() as conn:
            if conn.exists(pool, name):
                raise exception.TargetExists(path=target)
        return []

    def fetch_base(self, image_id, size, progress, timings):
        start = time.monotonic()
        meta = self.source.get_meta(image_id)
        timings["lookup"] = time.monotonic() - start
        cid = digest.cache_id(image_id)
        with self.session() as conn:
            entry = self._glance_snapshot(conn, meta)
            if entry is not None:
                return entry, True
            entry, free = self._find(conn, meta, cid)
            if entry is not None:
                return entry, True
            with rbd_import.lock(conn, self.base_pool, cid,
                                 self.conf.imagebackend.lock_wait_timeout
                                 ) as renew:
                entry, free = self._find(conn, meta, cid)
                if entry is not None:       # another host imported it
                    return entry, True
                return self._import(conn, meta, free, size, progress,
                                    timings, renew), False

    def _glance_snapshot(self, conn, meta):
        """The entry of Glance's own snapshot of a raw image it keeps in
        this cluster (its ``direct_url`` is ``rbd://<fsid>/<pool>/<image>/
        <snap>`` with this cluster's fsid, the snapshot exists and is
        protected), else None.  Such a disk needs no download and no
        import.
        """
        parts = rbd_disk.parse_rbd_url(meta.extra.get("direct_url"))
        if parts is None or meta.disk_format != "raw":
            return None
        fsid, pool, image, snap = parts
        if fsid != conn.fsid():
            return None
        size = conn.snapshot_size(pool, image, snap)
        if size is None:
            return None
        return cache_lookup.CacheEntry(
            image_id=meta.image_id, cache_id=image,
            path="%s/%s@%s" % (pool, image, snap), format="raw",
            virtual_size=size, record={"glance": meta.extra["direct_url"]})

    def _find(self, conn, meta, cid):
        """``(entry, None)`` for the newest base of the image whose
        content is the source's, else ``(None, first free name)``.
        """
        for generation in itertools.count(1):
            stem = cid if generation == 1 else "%s-%d" % (cid, generation)
            info = conn.base_info(self.base_pool, stem)
            if info is None:
                if conn.exists(self.base_pool, stem):
                    continue        # not a base of ours: never used
                return None, stem
            if info.get("image_id") != meta.image_id or info.get("stale"):
                continue
            recorded = info.get("identity") or None
            if recorded is not None and meta.identity_deferred \
                    and meta.identity is None:
                meta = self.source.resolve_identity(meta)
            if (recorded is None or meta.identity is None
                    or recorded == meta.identity):
                return self._entry(stem, generation, info), None
        raise AssertionError("unreachable")

    def _entry(self, stem, generation, info):
        return cache_lookup.CacheEntry(
            image_id=info["image_id"], cache_id=stem,
            path="%s/%s@%s" % (self.base_pool, stem, rbd_cluster.SNAP),
            format="raw", virtual_size=int(info["virtual_size"]),
            record=info, generation=generation)

    def _import(self, conn, meta, stem, size, progress, timings, renew):
        """Fetch the image through the host's cache (download, checksum,
        inspection, conversion) and import it as base ``stem``.
        """
        def progress_and_renew(stage, done, total):
            renew()
            if progress is not None:
                progress(stage, done, total)

        local, _ = self.cache.get(meta.image_id, requested_size=size,
                                  progress=progress_and_renew,
                                  timings=timings)
        start = time.monotonic()
        info = {"image_id": meta.image_id,
                "identity": local.record.get("identity") or "",
                "virtual_size": str(local.virtual_size),
                "source_format": local.format,
                "imported_at": "%.0f" % time.time(),
                "imported_by": socket.gethostname()}
        with contextlib.ExitStack() as stack:
            path = local.path
            if local.format != "raw":
                scratch = stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=".rbd-import-", dir=self.cache.instances_path))
                path = os.path.join(scratch, "raw")
                self.qemu.convert(local.path, local.format, path, "raw")
            imported = rbd_import.import_base(
                conn, self.base_pool, stem, path, local.virtual_size, info,
                renew)
        timings["import"] = time.monotonic() - start
        if not imported:
            entry, _ = self._find(conn, meta, digest.cache_id(meta.image_id))
            if entry is None:
                raise exception.RbdError(
                    what="importing image %s" % meta.image_id,
                    reason="%s/%s appeared meanwhile with other content; "
                           "try again" % (self.base_pool, stem))
            return entry
        generation = int(stem.rsplit("-", 1)[1]) if "-" in stem else 1
        return self._entry(stem, generation, info)

    def make_disk(self, entry, base_path, base_format, target, size, made):
        pool, name = target.split("/", 1)
        parent_pool, _, rest = entry.path.partition("/")
        parent_image, _, snap = rest.partition("@")
        with self.session() as conn:
            conn.clone((parent_pool, parent_image, snap), pool, name, size,
                       {"image_id": entry.image_id,
                        "created_at": "%.0f" % time.time()})
            if "glance" not in entry.record:
                # Its age for prune: the time of its last clone.
                conn.set_meta(self.base_pool, entry.cache_id,
                              {"last_used": "%.0f" % time.time()})
            if self._monitors is None:
                self._monitors = conn.monitors()

    def create_disk(self, base_path, base_format, target, size):
        raise NotImplementedError("rbd disks are made by make_disk")

    def new_disk(self, **fields):
        return rbd_disk.RbdDisk(monitors=list(self._monitors or []),
                                auth_username=self.conf.rbd.user,
                                secret_uuid=self.conf.rbd.secret_uuid,
                                **fields)

    # -- the bases as a cache; removing disks -------------------------------

    def list_bases(self) -> list[dict]:
        """The bases in ``[rbd] base_pool`` as ``cache list`` rows."""
        with self.session() as conn:
            return rbd_bases.rows(conn, self.base_pool)

    def prune_bases(self, dry_run: bool = False) -> dict:
        """Remove the bases without clones unused for ``[image_cache]
        remove_unused_original_minimum_age_seconds`` (or stale), and old
        temporary images; see :func:`imagebackend.backends.rbd_bases.prune`.
        """
        with self.session() as conn:
            return rbd_bases.prune(
                conn, self.base_pool, self.pool,
                self.conf.image_cache
                .remove_unused_original_minimum_age_seconds, dry_run)

    def invalidate_bases(self, image_id: str) -> dict:
        """Mark the bases of ``image_id`` stale; remove those without
        clones (see :func:`imagebackend.backends.rbd_bases.invalidate`).
        """
        with self.session() as conn:
            return rbd_bases.invalidate(conn, self.base_pool, image_id)

    def verify_bases(self, image_ids: list[str] | None = None,
                     repair: bool = False) -> list[dict]:
        """Read the bases back against their recorded digests (see
        :func:`imagebackend.backends.rbd_bases.verify`).
        """
        with self.session() as conn:
            return rbd_bases.verify(conn, self.base_pool, image_ids, repair)

    def delete_disk(self, target: str) -> dict:
        """Remove the clone ``target`` (``NAME`` or ``<pool>/NAME``) if it
        is a clone of a base of this library; anything else is never
        removed.
        """
        target = self.normalize_target(target)
        pool, name = target.split("/", 1)
        with self.session() as conn:
            meta, parent = conn.disk_info(pool, name)
            if not meta.get("image_id") or parent is None:
                raise exception.DiskOperationError(
                    path=target,
                    reason="it is not a clone this library made (no "
                           "imagebackend.image_id in its metadata, or no "
                           "parent), so it is not removed; remove it with "
                           "'rbd rm' if it is yours")
            conn.remove(pool, name)
        return {"path": target, "image_id": meta["image_id"],
                "backend": self.name}
