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

"""The Ceph side of the ``rbd`` backend: one connection, reading images,
cloning and removing them (importing a base: :mod:`rbd_import`).

The only module that loads Ceph's Python bindings (Debian's
``python3-rados`` and ``python3-rbd``), and only when a connection is
made, so the rest of the library imports without them.

Every image appears complete or not at all: a base is written under a
temporary name, snapshotted and protected, then renamed; a disk is cloned
under a temporary name, resized, then renamed.  A rename never replaces an
image (librbd refuses an existing name).
"""

import atexit
import calendar
import contextlib
import errno
import importlib
import json
import logging
import uuid

from imagebackend import exception

LOG = logging.getLogger(__name__)

#: the snapshot of a base that disks are cloned from.
SNAP = "snap"
#: the metadata keys of a base (``rbd image-meta``) start with this.
META_PREFIX = "imagebackend."
#: the part of a temporary image name between the final name and a token.
TEMP_MARK = ".tmp-"
#: errors that mean the cluster did not answer.
_UNREACHABLE = frozenset((errno.ETIMEDOUT, errno.ENOTCONN, errno.ESHUTDOWN,
                          errno.ECONNREFUSED, errno.EINTR))


def bindings():
    """The ``(rados, rbd)`` modules.

    :raises imagebackend.exception.RbdBindingsMissing: not installed.
    """
    try:
        return (importlib.import_module("rados"),
                importlib.import_module("rbd"))
    except ImportError as exc:
        raise exception.RbdBindingsMissing(reason=str(exc)) from exc


def temp_name(final: str) -> str:
    """A new temporary name for image ``final``."""
    return "%s%s%s" % (final, TEMP_MARK, uuid.uuid4().hex[:12])


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary image name (see
    :func:`temp_name`).
    """
    return TEMP_MARK in name


class Connection:
    """A connection to one cluster.

    :param ceph_conf: the cluster's ceph.conf.
    :param user: the cephx user (without ``client.``), or None for the
        cluster's default.
    :param timeout: seconds for connecting and for every monitor and OSD
        operation: a stopped cluster is an error after that, not a hang.
    :param modules: the ``(rados, rbd)`` modules (tests pass fakes).
    """

    def __init__(self, ceph_conf: str, user: str | None, timeout: int,
                 modules=None) -> None:
        self.rados, self.rbd = modules or bindings()
        self.ceph_conf = ceph_conf
        self._ioctxs: dict = {}
        seconds = str(timeout)
        self.client = self.rados.Rados(
            conffile=ceph_conf, rados_id=user,
            conf={"rados_osd_op_timeout": seconds,
                  "rados_mon_op_timeout": seconds,
                  "client_mount_timeout": seconds})
        with self.errors("connection to the cluster"):
            self.client.connect(timeout=timeout)
        # A client still connected when the interpreter finalizes can
        # crash the process as it exits (librados' threads outlive the
        # objects they use): close it first if nobody did.
        atexit.register(self.close)
        self._open = True

    def close(self) -> None:
        """Close the pools and the connection (once; later calls do
        nothing).
        """
        if not getattr(self, "_open", False):
            return
        self._open = False
        atexit.unregister(self.close)
        for ioctx in self._ioctxs.values():
            ioctx.close()
        self._ioctxs.clear()
        self.client.shutdown()

    @contextlib.contextmanager
    def errors(self, what: str):
        """Turn a binding's error (or an operating-system error reading
        the file being imported, or of an asynchronous write) during
        ``what`` into the library's own:
        :class:`imagebackend.exception.RbdUnavailable` for a timeout or a
        lost connection, :class:`imagebackend.exception.RbdError` else.
        """
        try:
            yield
        except exception.ImageBackendException:
            raise
        except (self.rados.Error, self.rbd.Error, OSError) as exc:
            reason = "%s: %s" % (type(exc).__name__, exc)
            if _unreachable(exc):
                raise exception.RbdUnavailable(
                    what=what, reason=reason, conf=self.ceph_conf) from exc
            raise exception.RbdError(what=what, reason=reason) from exc

    def ioctx(self, pool: str):
        """An I/O context on ``pool`` (opened once)."""
        if pool not in self._ioctxs:
            with self.errors("opening pool %s" % pool):
                self._ioctxs[pool] = self.client.open_ioctx(pool)
        return self._ioctxs[pool]

    def fsid(self) -> str:
        with self.errors("reading the cluster's fsid"):
            return self.client.get_fsid()

    def monitors(self) -> list[str]:
        """The monitors' ``host:port`` addresses (``mon dump``), for a
        libvirt network disk.
        """
        with self.errors("listing the monitors"):
            ret, out, err = self.client.mon_command(
                json.dumps({"prefix": "mon dump", "format": "json"}), b"")
        if ret:
            raise exception.RbdError(what="listing the monitors",
                                     reason=err or "error %d" % ret)
        found = []
        for mon in json.loads(out).get("mons", []):
            addr = str(mon.get("addr", "")).split("/")[0]
            if addr:
                found.append(addr)
        return found

    def exists(self, pool: str, name: str) -> bool:
        with self.errors("looking up %s/%s" % (pool, name)):
            try:
                self.rbd.Image(self.ioctx(pool), name, read_only=True).close()
            except self.rbd.ImageNotFound:
                return False
        return True

    def base_info(self, pool: str, name: str) -> dict | None:
        """The metadata of base ``pool/name`` (keys without the prefix),
        with ``size``, ``children`` and ``protected``; None if it does not
        exist or has no protected snapshot (not a base this library made).
        """
        what = "reading base %s/%s" % (pool, name)
        with self.errors(what):
            try:
                image = self.rbd.Image(self.ioctx(pool), name, read_only=True)
            except self.rbd.ImageNotFound:
                return None
            try:
                snaps = [snap["name"] for snap in image.list_snaps()]
                if SNAP not in snaps or not image.is_protected_snap(SNAP):
                    return None
                info = {key[len(META_PREFIX):]: value
                        for key, value in image.metadata_list()
                        if key.startswith(META_PREFIX)}
                info["size"] = image.size()
                image.set_snap(SNAP)
                info["children"] = ["%s/%s" % child
                                    for child in image.list_children()]
                return info
            finally:
                image.close()

    def images(self, pool: str) -> list[str]:
        with self.errors("listing pool %s" % pool):
            return sorted(self.rbd.RBD().list(self.ioctx(pool)))

    def set_meta(self, pool: str, name: str, items: dict) -> None:
        """Set metadata ``items`` (keys without the prefix) of image
        ``pool/name``.
        """
        with self.errors("updating the record of %s/%s" % (pool, name)):
            with self.rbd.Image(self.ioctx(pool), name) as image:
                for key, value in sorted(items.items()):
                    image.metadata_set(META_PREFIX + key, str(value))

    def snapshot_size(self, pool: str, name: str, snap: str) -> int | None:
        """The size of protected snapshot ``pool/name@snap``, or None if
        there is no such protected snapshot.
        """
        with self.errors("reading %s/%s@%s" % (pool, name, snap)):
            try:
                image = self.rbd.Image(self.ioctx(pool), name, read_only=True)
            except (self.rbd.ImageNotFound, self.rados.ObjectNotFound):
                return None
            try:
                if snap not in [s["name"] for s in image.list_snaps()]:
                    return None
                if not image.is_protected_snap(snap):
                    return None
                image.set_snap(snap)
                return image.size()
            finally:
                image.close()

    def disk_info(self, pool: str, name: str) -> tuple[dict, str | None]:
        """The metadata of image ``pool/name`` (keys without the prefix)
        and the ``<pool>/<image>@<snap>`` it is a clone of (None if it is
        no clone).

        :raises imagebackend.exception.DiskNotFound: no such image.
        """
        with self.errors("reading %s/%s" % (pool, name)):
            try:
                image = self.rbd.Image(self.ioctx(pool), name, read_only=True)
            except self.rbd.ImageNotFound as exc:
                raise exception.DiskNotFound(
                    path="%s/%s" % (pool, name)) from exc
            try:
                meta = {key[len(META_PREFIX):]: value
                        for key, value in image.metadata_list()
                        if key.startswith(META_PREFIX)}
                try:
                    parent = "%s/%s@%s" % image.parent_info()
                except self.rbd.ImageNotFound:
                    parent = None
                return meta, parent
            finally:
                image.close()

    def created(self, pool: str, name: str) -> float:
        """When image ``pool/name`` was created (seconds since the
        epoch).
        """
        with self.errors("reading %s/%s" % (pool, name)):
            with self.rbd.Image(self.ioctx(pool), name,
                                read_only=True) as image:
                stamp = image.create_timestamp()
        if stamp.tzinfo is None:
            return calendar.timegm(stamp.timetuple()) + stamp.microsecond / 1e6
        return stamp.timestamp()

    def clone(self, parent: tuple[str, str, str], pool: str, name: str,
              size: int, meta: dict[str, str]) -> None:
        """Clone snapshot ``parent`` (pool, image, snapshot) as
        ``pool/name``, ``size`` bytes, with ``meta`` as its metadata (what
        makes it a disk of this library): under a temporary name, resized,
        then renamed.

        :raises imagebackend.exception.TargetExists: ``pool/name`` exists.
        :raises imagebackend.exception.RbdError: it failed (the temporary
            clone is removed if the cluster still answers).
        """
        ioctx = self.ioctx(pool)
        tmp = temp_name(name)
        parent_pool, parent_image, snap = parent
        with self.errors("cloning %s/%s@%s as %s/%s"
                         % (parent_pool, parent_image, snap, pool, tmp)):
            self.rbd.RBD().clone(self.ioctx(parent_pool), parent_image, snap,
                                 ioctx, tmp,
                                 features=self.rbd.RBD_FEATURE_LAYERING)
        try:
            with self.errors("resizing %s/%s" % (pool, tmp)):
                with self.rbd.Image(ioctx, tmp) as image:
                    if image.size() != size:
                        image.resize(size)
                    for key, value in sorted(meta.items()):
                        image.metadata_set(META_PREFIX + key, str(value))
            try:
                with self.errors("renaming %s/%s to %s" % (pool, tmp, name)):
                    self.rbd.RBD().rename(ioctx, tmp, name)
            except exception.RbdError as exc:
                if isinstance(exc.__cause__, self.rbd.ImageExists):
                    raise exception.TargetExists(
                        path="%s/%s" % (pool, name)) from exc
                raise
        except BaseException:
            self.remove_quietly(pool, tmp)
            raise

    def remove(self, pool: str, name: str) -> None:
        """Remove image ``pool/name`` (not a base: it has no snapshot).

        :raises imagebackend.exception.DiskNotFound: it does not exist.
        :raises imagebackend.exception.RbdError: it could not be removed
            (it has snapshots, or a client has it open).
        """
        with self.errors("removing %s/%s" % (pool, name)):
            try:
                self.rbd.RBD().remove(self.ioctx(pool), name)
            except self.rbd.ImageNotFound as exc:
                raise exception.DiskNotFound(
                    path="%s/%s" % (pool, name)) from exc

    def remove_base(self, pool: str, name: str) -> bool:
        """Unprotect and remove base ``pool/name`` unless it has clones.

        :returns: False when it has clones (it is left as it is).
        """
        with self.errors("removing base %s/%s" % (pool, name)):
            ioctx = self.ioctx(pool)
            with self.rbd.Image(ioctx, name) as image:
                image.set_snap(SNAP)
                if list(image.list_children()):
                    return False
                image.set_snap(None)
                try:
                    if image.is_protected_snap(SNAP):
                        # librbd refuses while a clone exists: a clone made
                        # since the check above keeps the base.
                        image.unprotect_snap(SNAP)
                except self.rbd.ImageBusy:
                    return False
                image.remove_snap(SNAP)
            self.rbd.RBD().remove(ioctx, name)
        return True

    def remove_quietly(self, pool: str, name: str) -> None:
        """Remove this call's temporary image ``pool/name`` and its
        snapshot, logging (not raising) a failure: a cluster that stopped
        answering keeps it under its temporary name, never a final one.
        """
        try:
            with self.errors("removing %s/%s" % (pool, name)):
                ioctx = self.ioctx(pool)
                try:
                    with self.rbd.Image(ioctx, name) as image:
                        for snap in list(image.list_snaps()):
                            if image.is_protected_snap(snap["name"]):
                                image.unprotect_snap(snap["name"])
                            image.remove_snap(snap["name"])
                except self.rbd.ImageNotFound:
                    return
                self.rbd.RBD().remove(ioctx, name)
        except exception.RbdError as exc:
            LOG.warning("Could not remove the temporary image %s/%s: %s",
                        pool, name, exc)


def _unreachable(exc) -> bool:
    """Whether a binding error means the cluster did not answer."""
    errno_value = getattr(exc, "errno", None)
    if errno_value is not None and abs(errno_value) in _UNREACHABLE:
        return True
    return type(exc).__name__ in ("TimedOut", "InterruptedOrTimeoutError",
                                  "ConnectionShutdown")
