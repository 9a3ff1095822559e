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

"""The pipeline every backend shares: one template method and its hooks.

:meth:`ImageBackend.create_image` runs fetch -> convert -> cache (through
:class:`imagebackend.cache.ImageCache`), then the two hooks a backend
overrides: :meth:`ImageBackend.prepare_base` (extend: the base the disk is
made over) and :meth:`ImageBackend.create_disk` (overlay: the instance
disk itself).  Subclasses never override :meth:`create_image`.
"""

import abc
import dataclasses
import functools
import logging
import os
import time
import typing

from oslo_config import cfg

from imagebackend.backends import target as disk_target
from imagebackend import cache as image_cache
from imagebackend.cache import disk_records
from imagebackend.cache import lookup as cache_lookup
from imagebackend.common import fileio
from imagebackend.common import plugins
from imagebackend.common import progress as common_progress
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend import sources
from imagebackend.sources import base as source_base

if typing.TYPE_CHECKING:
    # Imported by the operations on existing disks and by what runs
    # qemu-img, not by every use of a backend.
    from imagebackend.disk import operations as disk_operations
    from imagebackend.qemu import img as qemu_img

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LibvirtDisk:
    """What a libvirt driver writes in a disk's ``<disk>`` element.

    The values, not a libvirt config object: the driver builds its own
    (Nova's ``LibvirtConfigGuestDisk``) from them.
    """

    #: ``<disk type=...>``: always ``file`` for these backends.
    source_type: str
    #: ``<source file=...>``: the disk's absolute path.
    source_path: str
    #: ``<driver name=...>``: ``qemu``.
    driver_name: str
    #: ``<driver type=...>``: ``qcow2`` or ``raw``.
    driver_type: str
    #: the backing files, nearest first (empty for a raw disk).
    backing_chain: tuple[str, ...]

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (the chain as a list)."""
        data = dataclasses.asdict(self)
        data["backing_chain"] = list(self.backing_chain)
        return data


@dataclasses.dataclass
class Disk:
    """An instance disk made by :meth:`ImageBackend.create_image`."""

    #: the disk's absolute path.
    path: str
    #: its format: ``qcow2`` or ``raw``.
    format: str
    #: its virtual size in bytes (the size asked for).
    virtual_size: int
    image_id: str
    #: the backend that made it (``[imagebackend] images_type``).
    backend: str
    #: the backing files, nearest first (empty for a raw disk).
    backing_chain: list[str]
    #: whether the base was already in the cache.
    cache_hit: bool
    #: seconds spent per step (``fetch``, ``convert``, ``extend``,
    #: ``overlay``...).
    timings: dict[str, float]

    @property
    def backing_file(self) -> str | None:
        """The nearest backing file, or None."""
        return self.backing_chain[0] if self.backing_chain else None

    def libvirt_disk(self) -> LibvirtDisk:
        """The values of the disk's libvirt ``<disk>`` element."""
        return LibvirtDisk(source_type="file", source_path=self.path,
                           driver_name="qemu", driver_type=self.format,
                           backing_chain=tuple(self.backing_chain))

    def to_dict(self) -> dict:
        """The fields (and ``backing_file``) as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["backing_file"] = self.backing_file
        return data


def copy_sparse_grown(base_path: str, fd: int, size: int) -> None:
    """Copy the raw file ``base_path`` into the open, empty file ``fd``
    keeping its holes, grow it to ``size`` bytes and fsync it: how every
    backend makes a raw disk or a raw sized base without qemu-img.

    :raises OSError: the copy failed (the caller removes ``fd``'s file).
    """
    sparseio.sparse_copy(base_path, fd)
    os.ftruncate(fd, size)
    os.fsync(fd)


class ImageBackend(abc.ABC):
    """Base class of backends (stevedore namespace
    ``imagebackend.backends``).

    :param conf: a ConfigOpts with the library's options registered
        (:func:`imagebackend.load_backend` does it; else
        :func:`imagebackend.opts.new_conf` or
        :func:`imagebackend.opts.register_opts`).
    :param source: the image source; by default the one named by
        ``[imagebackend] image_source``.
    :param qemu: the qemu-img runner; inject one to capture or fake
        commands.
    """

    #: the entry-point name, as in ``[imagebackend] images_type``.
    name: str = ""
    #: the format of the disks this backend makes.
    disk_format: str = ""
    OPTIONS: list[tuple[str, list[cfg.Opt]]] = []

    def __init__(self, conf: cfg.ConfigOpts,
                 source: source_base.ImageSource | None = None,
                 qemu: "qemu_img.QemuImg | None" = None) -> None:
        self.conf = conf
        self.source = source or sources.load(conf)
        # Without a runner given, the cache makes one when qemu-img first
        # runs (deleting a disk runs none), and the backend uses the same.
        self.cache = image_cache.ImageCache(conf, self.source, qemu)

    @property
    def qemu(self) -> "qemu_img.QemuImg":
        """The qemu-img runner: the one given, else the cache's."""
        return self.cache.qemu

    @functools.cached_property
    def disk_ops(self) -> "disk_operations.DiskOperations":
        """Operations on existing disks -- info, check, snapshots, rebase,
        extract, resize -- run through this backend's qemu-img runner.
        Give them the format the disk was made with
        (``backend.disk_ops.snapshot_create(disk.path, "s1",
        fmt=disk.format)``); see
        :class:`imagebackend.disk.operations.DiskOperations`.
        """
        from imagebackend.disk import operations as disk_operations

        return disk_operations.DiskOperations(
            self.conf, records=disk_records.DiskRecords(self.conf),
            qemu=self.qemu)

    # -- the template method ---------------------------------------------

    def create_image(self, image_id: str, target: str, size: int, *,
                     progress: common_progress.Progress | None = None
                     ) -> Disk:
        """Make the instance disk ``target`` of ``size`` bytes from image
        ``image_id``.

        The disk is made under a hidden temporary name in the target's
        directory, recorded in the cache's registry before it names a base,
        fsynced, and given its name only if that name is still free: the
        target appears complete or not at all, and of several concurrent
        requests for one target exactly one succeeds.

        :param image_id: the id in the image source.
        :param target: the path of the disk to create; it must not exist,
            and must not be inside the image cache or its lock directory.
            Missing parent directories are made (and removed again if the
            call fails).
        :param size: the disk's virtual size in bytes; at least the image's
            virtual size.
        :param progress: called as ``progress(stage, done, total)``, done
            and total in bytes (total None when unknown), during long
            steps (download, convert); see
            :mod:`imagebackend.common.progress`.
        :returns: a :class:`Disk` describing the result.
        :raises imagebackend.exception.InvalidImageId: the source refuses
            the id (not UTF-8 text, control characters...); nothing is
            written.
        :raises imagebackend.exception.InvalidImageSize: ``size`` is not a
            size the image or the target's filesystem allows.
        :raises imagebackend.exception.InvalidTarget: ``target`` names a
            directory or a place inside the cache.
        :raises imagebackend.exception.TargetExists: ``target`` exists, or
            another request made it first.
        :raises imagebackend.exception.ImageBackendException: any failure;
            nothing this call made is left (its temporary file, its registry
            record, the directories it created), nothing anyone else made
            is touched, and ``_base`` holds no partial file under a final
            name.
        """
        # First: an id no image can have must change nothing (not even a
        # lock file or the target's directory).
        self.source.check_id(image_id)
        target = self.normalize_target(target)
        disk_target.check_size(image_id, size)
        made = self.claim_target(target)
        try:
            return self._create(image_id, target, size, progress, made)
        except BaseException:
            fileio.remove_made_dirs(made)
            raise

    def _create(self, image_id, target, size, progress, made):
        timings: dict[str, float] = {}
        # Held shared until the disk exists and is recorded, so the cache
        # pruner never removes the base in between.
        with self.cache.use(image_id):
            entry, hit = self.fetch_base(image_id, size, progress, timings)
            if entry.virtual_size > size:
                raise exception.DiskSmallerThanImage(
                    image_id=image_id, virtual_size=entry.virtual_size,
                    requested_size=size)
            start = time.monotonic()
            with disk_target.errors(image_id, target, size):
                base_path, base_format = self.prepare_base(entry, size)
            timings["extend"] = time.monotonic() - start
            start = time.monotonic()
            self.make_disk(entry, base_path, base_format, target, size, made)
            timings["overlay"] = time.monotonic() - start
        chain = [base_path] if self.uses_backing_file else []
        LOG.info("Created %s disk %s (%d bytes) from image %s%s",
                 self.name, target, size, image_id,
                 " (cache hit)" if hit else "")
        return self.new_disk(path=target, format=self.disk_format,
                             virtual_size=size, image_id=image_id,
                             backend=self.name, backing_chain=chain,
                             cache_hit=hit, timings=timings)

    def delete_disk(self, target: str) -> dict:
        """Remove the disk ``target`` that this library made, and its
        record; a disk it did not make is never removed.

        :returns: what was removed (``path``, ``image_id``, ``backend``).
        :raises imagebackend.exception.DiskNotFound: there is no such disk.
        :raises imagebackend.exception.DiskOperationError: the library did
            not make it, or it could not be removed (it and its record are
            kept).
        """
        target = self.normalize_target(target)
        record = self.cache.disk_record(target)
        if record is None:
            if not os.path.lexists(target):
                raise exception.DiskNotFound(path=target)
            raise exception.DiskOperationError(
                path=target,
                reason="no record of the image cache says this library "
                       "made it, so it is not removed; remove it yourself "
                       "if it is yours")
        try:
            os.unlink(target)
            fileio.fsync_dir(os.path.dirname(target))
        except OSError as exc:
            raise exception.DiskOperationError(
                path=target,
                reason="it could not be removed (%s); it keeps its record "
                       "of the image cache, so delete it again once that "
                       "is fixed" % (exc.strerror or exc)) from exc
        self.cache.forget_disk(record)
        LOG.info("Deleted %s disk %s of image %s", self.name, target,
                 record["image_id"])
        return {"path": target, "image_id": record["image_id"],
                "backend": self.name}

    # -- hooks -------------------------------------------------------------

    def normalize_target(self, target) -> str:
        """The target as this backend names disks (default: an absolute
        file path; see :func:`imagebackend.backends.target.normalize`).

        :raises imagebackend.exception.InvalidTarget: it names no disk.
        """
        return disk_target.normalize(target)

    def claim_target(self, target: str) -> list[str]:
        """Check that ``target`` is free and allowed, and make what it
        needs (default: refuse a place inside the cache, make the missing
        directories).

        :returns: the directories made, removed again if the call fails.
        :raises imagebackend.exception.TargetExists: it exists.
        :raises imagebackend.exception.InvalidTarget: it is not allowed.
        """
        disk_target.check_place(target, self.cache)
        return disk_target.make_parent(target)

    def fetch_base(self, image_id: str, size: int,
                   progress: common_progress.Progress | None,
                   timings: dict[str, float]
                   ) -> tuple[cache_lookup.CacheEntry, bool]:
        """Fetch, convert and cache step: the base of ``image_id`` and
        whether it was already there (default: the host's image cache,
        :meth:`imagebackend.cache.ImageCache.get`).
        """
        return self.cache.get(image_id, requested_size=size,
                              progress=progress, timings=timings)

    def new_disk(self, **fields: typing.Any) -> Disk:
        """The result of :meth:`create_image`, from :class:`Disk`'s
        fields.
        """
        return Disk(**fields)

    def make_disk(self, entry: cache_lookup.CacheEntry, base_path: str,
                  base_format: str, target: str, size: int,
                  made: list[str]) -> None:
        """Overlay step: make and publish the disk ``target``.

        The default: intent record, disk under a temporary name (filled by
        :meth:`create_disk`), fsync, no-replace publish, then the record
        is marked done; on failure only this attempt's temporary file and
        record are removed.  A disk :meth:`copy_disk` can make is made
        without a temporary name instead (:meth:`_make_unnamed`).
        """
        backing = base_path if self.uses_backing_file else None
        with disk_target.errors(entry.image_id, target, size):
            if self._make_unnamed(entry, backing, base_path, base_format,
                                  target, size):
                return
            tmp = disk_target.new_temp(target, made)
        handle = None
        try:
            with disk_target.errors(entry.image_id, target, size):
                st = os.lstat(tmp)
                handle = self.cache.register_disk(
                    target, entry, backing, tmp=tmp,
                    disk_format=self.disk_format, st=st)
                self.create_disk(base_path, base_format, tmp, size)
                if self.conf.imagebackend.preallocate_images == "space":
                    self.preallocate(tmp, size)
                fileio.fdatasync_path(tmp)
                done = os.lstat(tmp)
                if not os.path.samestat(done, st):
                    # The hook replaced the file: tie the record to the
                    # one that is published.
                    old, handle = handle, self.cache.register_disk(
                        target, entry, backing, tmp=tmp,
                        disk_format=self.disk_format, st=done)
                    self.cache.unregister_disk(old)
                disk_target.publish(tmp, target)
        except BaseException:
            fileio.remove_quietly(tmp)
            if handle is not None:
                self.cache.unregister_disk(handle)
            raise
        self.cache.confirm_disk(handle, done)

    def _make_unnamed(self, entry, backing, base_path, base_format, target,
                      size) -> bool:
        """Make and publish the disk ``target`` as a file without a name
        until it is complete, where the filesystem has them and
        :meth:`copy_disk` fills one: the copy and its fdatasync overlap the
        syncs of the intent record, which end before the disk gets a name
        (linked without replacing anything; a crash before leaves no
        file).

        :returns: False (nothing made, nothing left) when the default way
            must make the disk.
        """
        if type(self).copy_disk is ImageBackend.copy_disk:
            return False        # the hook is not there
        try:
            unnamed = fileio.Unnamed.make(os.path.dirname(target))
        except FileNotFoundError:
            return False        # see _linked
        if unnamed is None:
            return False
        fd, handle = unnamed.fd, None
        try:
            st = os.fstat(fd)
            wait = self.cache.register_disk(
                target, entry, backing, disk_format=self.disk_format, st=st,
                fd=fd, wait=False)
        except BaseException:
            unnamed.close()
            raise
        try:
            copied = self.copy_disk(base_path, base_format, fd, size)
            if copied:
                if self.conf.imagebackend.preallocate_images == "space":
                    sparseio.preallocate(fd, size,
                                         keep_size=self.disk_format != "raw")
                os.fdatasync(fd)
            handle = wait()
            copied = copied and _linked(unnamed, target)
            if copied:
                # The record may say "done" before the name is durable: a
                # done record of a disk that is not there protects nothing
                # and is collected.
                syncing = fileio.Background(unnamed.sync_name)
                self.cache.confirm_disk(handle, st)
                syncing.wait()
        except BaseException:
            if handle is None:
                handle = _wait_quietly(wait)
            copied = False
            raise
        finally:
            unnamed.close()
            if not copied and handle is not None:
                self.cache.unregister_disk(handle)
        return copied

    def copy_disk(self, base_path: str, base_format: str, fd: int,
                  size: int) -> bool:
        """Overlay hook without a process: fill ``fd`` (a new, empty file
        without a name, open for reading and writing) with the disk
        :meth:`create_disk` would make, if that takes no process
        (default: never; a backend that does not override this hook never
        has it called).  The template method syncs and names it.

        :returns: whether ``fd`` holds the disk; if not, it must be empty
            and :meth:`create_disk` makes the disk.
        """
        return False

    #: whether disks of this backend keep a backing file.
    uses_backing_file = True

    def prepare_base(self, entry: cache_lookup.CacheEntry,
                     size: int) -> tuple[str, str]:
        """Extend hook: the base the disk is made from, and its format.

        The default is the cached base itself.
        """
        return entry.path, entry.format

    @abc.abstractmethod
    def create_disk(self, base_path: str, base_format: str, target: str,
                    size: int) -> None:
        """Overlay hook: fill ``target`` to make a disk of ``size`` bytes
        from the base.

        ``target`` is a new, empty regular file of this call's own, under a
        temporary name in the final disk's directory (write into it; a
        backing file named in it must be an absolute path).  The template
        method fsyncs it and gives it its final name; if this raises, the
        template method removes it.
        """

    def preallocate(self, target: str, size: int) -> None:
        """Reserve the disk's space (``preallocate_images = space``) in
        ``target``, the disk under its temporary name.
        """
        fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            sparseio.preallocate(fd, size,
                                 keep_size=self.disk_format != "raw")
        finally:
            os.close(fd)


def _linked(unnamed: fileio.Unnamed, target: str) -> bool:
    """Link ``unnamed`` as ``target``.

    :returns: False if its directory is gone: a concurrent call that made
        it failed and removed it (it looked empty), and the default way
        makes it again.
    :raises imagebackend.exception.TargetExists: ``target`` exists.
    """
    try:
        unnamed.link(os.path.basename(target))
    except FileExistsError as exc:
        raise exception.TargetExists(path=target) from exc
    except FileNotFoundError:
        return False
    return True


def _wait_quietly(wait):
    """The handle ``wait()`` returns, or ``None`` if it fails (the record
    is then gone already), for a caller that is failing anyway.
    """
    try:
        return wait()
    except Exception as exc:
        LOG.debug("Disk record not made durable: %s", exc)
        return None


def load(conf: cfg.ConfigOpts, name: str | None = None,
         **kwargs: typing.Any) -> ImageBackend:
    """Build the backend named ``name`` (default: ``[imagebackend]
    images_type``) from the ``imagebackend.backends`` entry points, on a
    ``conf`` whose options are registered (the implementation of
    :func:`imagebackend.load_backend`, which registers them first).

    :param kwargs: passed to the backend's constructor (``source``,
        ``qemu``).
    :raises imagebackend.exception.BackendNotFound: no such backend.
    """
    name = name or conf.imagebackend.images_type
    cls = plugins.load_class("imagebackend.backends", name,
                             exception.BackendNotFound)
    return cls(conf, **kwargs)
