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

"""The library's exception hierarchy.

Every error a caller can see is an :class:`ImageBackendException`.  Where a
builtin exception means the same thing, the subclass inherits it too, so a
caller may catch either (``except ValueError`` catches
:class:`InvalidImageSize`).  Third-party errors are never raised to callers:
they are wrapped in one of these with the original chained as ``__cause__``.

Each class carries a message template, ``msg_fmt``, filled from the keyword
arguments given to the constructor; the arguments stay available, exactly
as given, as attributes (``exc.image_id``) and in ``exc.kwargs``.  The
message shows each text argument through
``textutils.printable`` (escaped, on one line, bounded), so
an image id, a server's error body or a file name can never forge a line
of output or rewrite a terminal.
"""

import os

from imagebackend import textutils


class _Shown(textutils.Escaped):
    """An argument made printable; ``%r`` quotes it without escaping it a
    second time.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return textutils.quote(self)


def _shown(value):
    """``value`` as it may appear in a message: text escaped and bounded
    (a library error's message is escaped already), other values
    (numbers, None, lists: their repr escapes) as they are.
    """
    if isinstance(value, ImageBackendException):
        value = value.message
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, (str, bytes, bytearray, BaseException)):
        return _Shown(textutils.printable(value, textutils.MESSAGE_LIMIT))
    return value


class ImageBackendException(Exception):
    """The root of every error raised by imagebackend."""

    msg_fmt = "An unknown imagebackend error occurred."

    def __init__(self, message: str | None = None, **kwargs) -> None:
        self.kwargs = kwargs
        self._given_message = message
        for key, value in kwargs.items():
            setattr(self, key, value)
        if message is None:
            shown = {key: _shown(value) for key, value in kwargs.items()}
            try:
                message = self.msg_fmt % shown
            except (KeyError, TypeError, ValueError):
                # A template that cannot be filled must not hide the error
                # it describes: fall back to the raw template and the args.
                message = "%s (%s)" % (self.msg_fmt, shown)
            # Our template, with every argument escaped.
            message = textutils.Escaped(message)
        else:
            message = textutils.printable(message, textutils.MESSAGE_LIMIT)
        self.message = message
        super().__init__(message)

    @property
    def exact_message(self) -> str:
        """The message with the arguments exactly as given (not escaped,
        not bounded): for machine-readable output such as JSON, never for
        a terminal or a log.
        """
        if self._given_message is not None:
            return self._given_message
        try:
            return self.msg_fmt % self.kwargs
        except (KeyError, TypeError, ValueError):
            return self.message


# --- configuration --------------------------------------------------------

class ConfigurationError(ImageBackendException, ValueError):
    msg_fmt = "Invalid configuration: %(reason)s"


class BackendNotFound(ConfigurationError):
    msg_fmt = ("Unknown image backend %(name)r; set [imagebackend] "
               "images_type to one of: %(choices)s.")


class ConfigFileError(ConfigurationError):
    """A config file is missing or cannot be parsed (``reason`` is
    oslo.config's message, which names it).
    """

    msg_fmt = ("Invalid configuration: %(reason)s; check the files given "
               "with --config-file and --config-dir.")


class SourceNotFound(ConfigurationError):
    msg_fmt = ("Unknown image source %(name)r; set [imagebackend] "
               "image_source to one of: %(choices)s.")


# --- requests -------------------------------------------------------------

class InvalidImageId(ImageBackendException, ValueError):
    msg_fmt = "Invalid image id %(image_id)r: %(reason)s"


class InvalidImageSize(ImageBackendException, ValueError):
    msg_fmt = ("Image %(image_id)s: %(reason)s")


class DiskSmallerThanImage(InvalidImageSize):
    """The disk asked for is smaller than the image's virtual size (found
    from the source's record, the image's header, or the cached base).
    """

    msg_fmt = ("Image %(image_id)s: its virtual size is %(virtual_size)d "
               "bytes, larger than the requested disk of "
               "%(requested_size)d bytes; request a disk of at least "
               "%(virtual_size)d bytes (a larger flavor).")


class InvalidSize(ImageBackendException, ValueError):
    msg_fmt = ("Invalid size %(value)r: %(reason)s. Give a number of bytes "
               "or a number with a K, M, G or T suffix (1024-based).")


class TargetExists(ImageBackendException, FileExistsError):
    msg_fmt = ("Target %(path)s already exists; remove it or choose another "
               "path (imagebackend never overwrites a disk).")


class InvalidTarget(ImageBackendException, ValueError):
    msg_fmt = "Invalid target %(path)s: %(reason)s"


# --- image sources --------------------------------------------------------

class ImageSourceError(ImageBackendException):
    msg_fmt = "Image %(image_id)s: the image source failed: %(reason)s"


class ImageNotFound(ImageSourceError, LookupError):
    msg_fmt = "Image %(image_id)s was not found in %(source)s%(hint)s."

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault("hint", "")
        super().__init__(message, **kwargs)


class ImageNotAuthorized(ImageSourceError, PermissionError):
    msg_fmt = ("Image %(image_id)s: not authorized by %(source)s: "
               "%(reason)s")


class ImageNotActive(ImageSourceError):
    msg_fmt = ("Image %(image_id)s is not active (status %(status)s); wait "
               "for the upload to finish or choose an active image.")


class ImageUnsupported(ImageSourceError, ValueError):
    msg_fmt = "Image %(image_id)s cannot be used: %(reason)s"


class ImageSourceUnavailable(ImageSourceError, ConnectionError):
    msg_fmt = ("Image %(image_id)s: %(source)s is unreachable after "
               "%(attempts)s attempt(s): %(reason)s")


class ImageDownloadError(ImageSourceError, IOError):
    msg_fmt = ("Image %(image_id)s: download failed: %(reason)s. Nothing was "
               "cached; retry, and if it persists check the image in "
               "%(source)s.")


class ImageChecksumMismatch(ImageDownloadError):
    msg_fmt = ("Image %(image_id)s: the downloaded bytes do not match the "
               "%(algo)s recorded by %(source)s (expected %(expected)s, got "
               "%(actual)s). Nothing was cached; the stored image may be "
               "corrupt or tampered with.")


# --- untrusted images (format inspection and policy) ---------------------

class UnsafeImage(ImageBackendException, ValueError):
    """An image refused by the safety policy.  ``rule`` names the rule."""

    rule = "unsafe-image"
    msg_fmt = ("Image %(image_id)s was refused (%(rule)s): %(reason)s")

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault("rule", self.rule)
        super().__init__(message, **kwargs)


class InvalidImageFormat(UnsafeImage):
    rule = "invalid-format"


class BackingFileRefused(UnsafeImage):
    rule = "backing-file"


class DataFileRefused(UnsafeImage):
    rule = "data-file"


class VMDKSubformatRefused(UnsafeImage):
    rule = "vmdk-subformat"


class UnsupportedFormat(UnsafeImage):
    rule = "unsupported-format"


class UnsupportedFeature(UnsafeImage):
    rule = "unsupported-feature"


class FormatMismatch(UnsafeImage):
    rule = "format-mismatch"


class AmbiguousFormat(UnsafeImage):
    rule = "ambiguous-format"


class ImageTooLarge(UnsafeImage):
    rule = "virtual-size"


class EncryptedImageRefused(UnsafeImage):
    rule = "encrypted"


# --- qemu-img -------------------------------------------------------------

class QemuImgError(ImageBackendException):
    msg_fmt = ("qemu-img %(operation)s failed on %(path)s (exit code "
               "%(exit_code)s): %(stderr)s")


class QemuImgNotFound(QemuImgError, FileNotFoundError):
    msg_fmt = ("qemu-img was not found (%(reason)s). Install it: "
               "apt-get install qemu-utils (Debian/Ubuntu) or "
               "dnf install qemu-img (Fedora/RHEL), or set [qemu_img] "
               "binary to its path.")


class QemuImgLimitExceeded(QemuImgError):
    msg_fmt = ("qemu-img %(operation)s on %(path)s exceeded its %(limit)s "
               "limit and was stopped; the image is likely malicious or "
               "corrupt. Raise [qemu_img] %(option)s only if you trust it.")


class QemuImgInvalidRequest(ImageBackendException, ValueError):
    msg_fmt = ("qemu-img %(operation)s of %(path)s was not run: %(reason)s")


class OperationCancelled(ImageBackendException):
    msg_fmt = "%(operation)s of %(path)s was cancelled; nothing was kept."


# --- cache and disks ------------------------------------------------------

class CacheError(ImageBackendException):
    msg_fmt = "Image cache %(path)s: %(reason)s"


class UnsafeCachePath(CacheError):
    msg_fmt = ("Refusing to use %(path)s: %(reason)s. Remove it by hand after "
               "checking how it got there.")


class DiskOperationError(ImageBackendException):
    msg_fmt = "Disk %(path)s: %(reason)s"


class UnsupportedDiskOperation(DiskOperationError):
    msg_fmt = ("Disk %(path)s: %(operation)s is not supported for %(fmt)s "
               "disks%(hint)s.")

    def __init__(self, message=None, **kwargs):
        kwargs.setdefault("hint", "")
        super().__init__(message, **kwargs)


class DiskNotFound(DiskOperationError, FileNotFoundError):
    msg_fmt = "Disk %(path)s does not exist; check the path."


class InvalidDiskRequest(DiskOperationError, ValueError):
    """A request about a disk that cannot be carried out as asked."""


class SnapshotNotFound(DiskOperationError, LookupError):
    msg_fmt = ("Disk %(path)s has no snapshot %(name)r (its snapshots: "
               "%(names)s); list them with 'imagebackend disk snapshot "
               "list'.")


class ConfigValueError(ConfigurationError):
    """An option whose value cannot be read: a ``$reference`` to no option,
    or a value of the wrong type.
    """

    msg_fmt = ("Invalid configuration: option [%(group)s] %(option)s%(where)s"
               ": %(reason)s; correct it%(fix_where)s.")

    def __init__(self, message=None, **kwargs):
        files = kwargs.get("files") or []
        kwargs.setdefault("where", " (set in %s)" % ", ".join(files)
                          if files else " (not from a config file)")
        kwargs.setdefault("fix_where", " there" if files else
                          " by setting it in a config file")
        super().__init__(message, **kwargs)


class DiskFormatUnknown(DiskOperationError, ValueError):
    msg_fmt = ("Disk %(path)s: %(reason)s; give its format explicitly with "
               "%(flag)s qcow2 or %(flag)s raw.")


class CachePathRefused(DiskOperationError, PermissionError):
    msg_fmt = ("Refusing to write %(path)s: it is in %(where)s, where only "
               "the cache writes; choose a path outside it.")


class QemuImgOutputTooLarge(QemuImgLimitExceeded):
    msg_fmt = ("qemu-img %(operation)s of %(path)s tried to write more than "
               "%(size)d bytes, more than the image's checked virtual size, "
               "and was stopped; the image is corrupt or crafted to lie "
               "about its size. Upload a sound copy of the image.")


class ImageLimitExceeded(UnsafeImage):
    rule = "resource-limit"


class CorruptImageRefused(UnsafeImage):
    rule = "corrupt-image"
    msg_fmt = ("Image %(image_id)s was refused (%(rule)s): qemu-img check "
               "found %(detail)s in its %(fmt)s metadata, so it is corrupt "
               "or crafted (a converted copy could be far larger than the "
               "image or read the wrong data). Nothing was cached; upload a "
               "sound copy of the image.")


class CachePublishConflict(CacheError):
    msg_fmt = ("Image cache %(path)s: image %(image_id)s could not be "
               "published: %(reason)s. Nothing was replaced; retry.")


class LockWaitTimeout(CacheError, TimeoutError):
    msg_fmt = ("Image cache %(path)s: gave up waiting for the lock on "
               "%(what)s after %(waited)d s; it is held by %(holder)s. If "
               "that process is stuck, stop it; if it is only slow, raise "
               "[imagebackend] lock_wait_timeout (now %(timeout)d s).")


class LockFileError(CacheError):
    msg_fmt = ("Lock directory %(path)s: cannot create lock file %(name)s "
               "(%(reason)s). Free space or inodes on that filesystem, or "
               "set [oslo_concurrency] lock_path to a directory that has "
               "room.")


class SplitLockDirectory(ConfigurationError):
    msg_fmt = ("The image cache %(base_dir)s is shared with a configuration "
               "that locks in another directory: %(other)s (host %(host)s), "
               "while this one locks in %(lock_dir)s. Every user of one "
               "cache directory must keep its lock files in one directory "
               "they all share: set [oslo_concurrency] lock_path to the same "
               "shared directory everywhere (by default it is the 'locks' "
               "directory beside the cache, which is shared when "
               "instances_path is). If %(other)s is no longer used, remove "
               "%(marker)s.")


class DiskNotCreated(QemuImgError):
    """qemu-img failed while making an instance disk under its temporary
    name; ``path`` is the disk the caller asked for.
    """

    msg_fmt = ("Disk %(path)s was not created: qemu-img %(operation)s "
               "failed (exit code %(exit_code)s): %(stderr)s. Nothing was "
               "kept; fix the cause above (the size, the free space, the "
               "directory's permissions) and try again.")


# --- Ceph RBD ---------------------------------------------------------------

class RbdError(ImageBackendException):
    """A Ceph RBD operation of the ``rbd`` backend failed."""

    msg_fmt = "Ceph RBD %(what)s failed: %(reason)s"


class RbdUnavailable(RbdError, ConnectionError):
    msg_fmt = ("Ceph RBD %(what)s failed: the cluster did not answer "
               "(%(reason)s). Nothing half-made was kept under a final "
               "name. Check that the cluster runs and that [rbd] ceph_conf "
               "(%(conf)s) and [rbd] user reach it, or raise [rbd] "
               "connect_timeout.")


class RbdBindingsMissing(ConfigurationError):
    msg_fmt = ("The rbd backend needs Ceph's Python bindings, which cannot "
               "be imported (%(reason)s): install the Debian packages "
               "python3-rados and python3-rbd (not on PyPI), and in a "
               "virtualenv make them visible with tools/ceph-bindings.sh.")
