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

"""qemu-img: the only place imagebackend runs it.

:class:`QemuImg` offers one typed method per qemu-img command.  Every
command gets ``-f`` for its input, so qemu-img never guesses a format, and
every machine-readable answer is read from ``--output json``, never from
human text.  Results are the dataclasses of
:mod:`imagebackend.qemu.results` (import them from there).

Commands run through an injectable :class:`imagebackend.qemu.runner.Runner`
by :class:`imagebackend.qemu.running.Command`: failures become
:class:`imagebackend.exception.QemuImgError` (or a subclass) with the
useful line of qemu-img's standard error, and long commands report their
progress as a percentage.  The ``[qemu_img]`` options and the process
limits they set are :mod:`imagebackend.qemu.options`.  Creating an
overlay template (:mod:`imagebackend.cache.templates`) starts exactly one
process: no version probe, no ``info``; the overlays copied from it start
none.
"""

import os
import re
import threading
import typing

from oslo_config import cfg

from imagebackend.common import fileio
from imagebackend.common import sparseio
from imagebackend import exception
from imagebackend.qemu import options as qemu_options
from imagebackend.qemu import results
from imagebackend.qemu import runner
from imagebackend.qemu import running
from imagebackend.qemu import sizes

CHECK_OK, CHECK_CORRUPTIONS, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 2, 3, 63
_CHECK_CODES = (CHECK_OK, CHECK_CORRUPTIONS, CHECK_LEAKS, CHECK_UNSUPPORTED)
_FMT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
_VERSIONS: dict[str, tuple[int, int, int]] = {}


class QemuImg:
    """Typed access to qemu-img.

    :param conf: a ConfigOpts carrying the ``[qemu_img]`` options (they are
        registered on it); ``None`` uses the defaults.
    :param execute: a ``qemu.runner.Runner`` (or an object with
        its ``execute`` and ``stream`` methods), or a function with the
        signature of :func:`oslo_concurrency.processutils.execute`;
        ``None`` runs commands directly.
    :param binary: the qemu-img program to run; ``None`` takes
        ``[qemu_img] binary``.
    """

    def __init__(self, conf: cfg.ConfigOpts | None = None,
                 execute=None, binary: str | None = None) -> None:
        if conf is None:
            conf = cfg.ConfigOpts()
        qemu_options.register_opts(conf)
        self.conf = conf
        if execute is None or callable(execute):
            execute = runner.Runner(execute)
        self.runner = execute
        self.binary = binary or conf.qemu_img.binary
        self._cmd = running.Command(self.runner, self.binary)
        self._version = None

    # --- creating and changing images -------------------------------------

    def create(self, path: str, fmt: str, size: int | str | None = None, *,
               backing_file: str | None = None,
               backing_fmt: str | None = None,
               options: dict | None = None,
               preallocation: str | None = None) -> None:
        """Create image ``path`` (an existing file is replaced).

        :param size: the virtual size in bytes (or a size string, see
            :func:`imagebackend.qemu.sizes.parse_size`); ``None`` takes the
            backing file's size.
        :param backing_file: make a copy-on-write overlay over this image.
        :param backing_fmt: the backing file's format; required with
            ``backing_file``.
        :param options: more ``-o`` options for the format, such as
            ``{"cluster_size": 65536}``.
        :param preallocation: ``off``, ``metadata``, ``falloc`` or ``full``.
        :raises exception.QemuImgInvalidRequest: a bad combination of
            arguments; nothing was run.
        :raises exception.QemuImgError: qemu-img failed.
        """
        _check_fmt("create", path, fmt)
        opts = dict(options or {})
        extra = {"backing_file": backing_file, "backing_fmt": backing_fmt,
                 "preallocation": preallocation}
        for key, value in extra.items():
            if value is not None:
                if key in opts:
                    raise _invalid("create", path, "%s is given twice" % key)
                opts[key] = value
        if opts.get("backing_file") is not None:
            _check_fmt("create", path, opts.get("backing_fmt"), "backing_fmt")
        elif opts.get("backing_fmt") is not None:
            raise _invalid("create", path, "backing_fmt without backing_file")
        elif size is None:
            raise _invalid("create", path, "a size is needed without a "
                           "backing file")
        args = ["create", "-f", fmt]
        if opts:
            args += ["-o", _format_options("create", path, opts)]
        args.append(path)
        if size is not None:
            args.append(str(sizes.parse_size(size)))
        self._cmd.run("create", path, args)

    def convert(self, source: str, source_fmt: str, target: str,
                target_fmt: str, *, target_cache: str | None = None,
                source_cache: str | None = None,
                sparse_size: int | None = None, compress: bool = False,
                parallel: int | None = None, out_of_order: bool = False,
                rate_limit: int | None = None, options: dict | None = None,
                progress: typing.Callable[[float], None] | None = None,
                cancel: threading.Event | None = None,
                durable: bool = True, limits: bool = False,
                max_output_size: int | None = None) -> None:
        """Convert ``source`` into a new image ``target``.

        The target is durable when this returns: it is written with
        ``O_DIRECT`` (cache mode ``none``) where its directory supports
        that, and otherwise with ``writeback`` followed by an fsync of the
        file and its directory.  Written through the page cache, its data
        is sent to disk during the conversion (see
        ``sparseio.Writeback``), so the fsync at the end
        has little left to do.  On any failure or cancellation the target
        file is removed.

        :param target_cache: a qemu cache mode for the target; ``None``
            chooses as described above.
        :param source_cache: a qemu cache mode for the source (``-T``).
        :param sparse_size: bytes of zeros that make a hole (``-S``).
        :param compress: compress the target (qcow2 targets only).
        :param parallel: coroutines qemu-img runs in parallel (``-m``).
        :param out_of_order: allow out-of-order writes (``-W``).
        :param rate_limit: bytes per second qemu-img may write (``-r``).
        :param options: ``-o`` options for the target format.
        :param progress: called with the percentage done (0.0 to 100.0);
            the last call is 100.0 when the conversion succeeded.
        :param cancel: set it from another thread to stop the conversion.
        :param durable: ``False`` leaves the final fsync of the target and
            its directory to the caller, who may overlap it with other
            work (pair it with a ``target_cache`` that does not flush,
            such as ``unsafe``).
        :param limits: run under the ``[qemu_img] convert_*`` CPU-time and
            address-space limits, as any conversion of a user's image must
            (the CPU time is scaled by ``max_output_size``).
        :param max_output_size: the virtual size the source was checked to
            have; qemu-img may not write a file larger than that (plus
            :data:`imagebackend.qemu.options.CONVERT_OUTPUT_SLACK`), so a
            source that lies about its size fails instead of filling the
            disk.
        :raises exception.OperationCancelled: ``cancel`` was set.
        :raises exception.QemuImgInvalidRequest: a bad combination of
            arguments; nothing was run.
        :raises exception.QemuImgLimitExceeded: a limit was hit.
        :raises exception.QemuImgError: qemu-img failed.
        :raises exception.DiskOperationError: the target could not be
            flushed to disk.
        """
        _check_fmt("convert", source, source_fmt)
        _check_fmt("convert", source, target_fmt, "target format")
        if compress and target_fmt != "qcow2":
            raise _invalid("convert", source, "compression needs a qcow2 "
                           "target, not %s" % target_fmt)
        if target_cache is None:
            directory = os.path.dirname(os.path.abspath(target))
            target_cache = ("none" if sparseio.direct_io_supported(directory)
                            else "writeback")
        args = ["convert", "-f", source_fmt, "-O", target_fmt,
                "-t", target_cache]
        if source_cache is not None:
            args += ["-T", source_cache]
        flags = [("-S", sparse_size), ("-m", parallel), ("-r", rate_limit)]
        args += [arg for flag, value in flags if value is not None
                 for arg in (flag, str(value))]
        if compress:
            args.append("-c")
        if out_of_order:
            args.append("-W")
        if options:
            args += ["-o", _format_options("convert", source, options)]
        through_page_cache = target_cache not in running.DURABLE_CACHES
        run_limits = qemu_options.convert_limits(self.conf, limits,
                                                 max_output_size)
        try:
            with running.written_back(target, through_page_cache):
                self._cmd.run_long(
                    "convert", "Conversion", source, args + [source, target],
                    progress, cancel,
                    finish=(lambda: running.flush(target, through_page_cache))
                    if durable else None, limits=run_limits)
        except BaseException:
            # Not oslo's fileutils.delete_if_exists: the target may be a
            # device node, which a failed conversion must not unlink.
            fileio.remove_regular(target)
            raise

    def resize(self, path: str, fmt: str, size: int | str, *,
               shrink: bool = False,
               preallocation: str | None = None) -> None:
        """Set the virtual size of ``path`` to ``size`` bytes.

        :param shrink: allow a smaller size (data past it is lost).
        :param preallocation: how to allocate the new space (``off``,
            ``metadata``, ``falloc``, ``full``).
        :raises exception.QemuImgError: qemu-img failed, for example when
            shrinking without ``shrink``.
        """
        _check_fmt("resize", path, fmt)
        args = ["resize", "-f", fmt]
        if shrink:
            args.append("--shrink")
        if preallocation is not None:
            args.append("--preallocation=%s" % preallocation)
        args += [path, str(sizes.parse_size(size))]
        self._cmd.run("resize", path, args)

    def rebase(self, path: str, fmt: str, backing_file: str | None,
               backing_fmt: str | None, unsafe: bool = False, *,
               progress: typing.Callable[[float], None] | None = None,
               cancel: threading.Event | None = None) -> None:
        """Make ``backing_file`` the backing file of ``path``.

        A cancelled rebase leaves ``path`` on its old backing file (qemu-img
        rewrites the reference last); clusters it had already copied into
        ``path`` hold what the guest saw there, so its content is intact.

        :param backing_file: the new backing file; ``None`` removes it
            (with ``unsafe=False`` its data is copied in first).
        :param unsafe: only rewrite the reference, copying no data (for a
            backing file that moved or was renamed).
        :param progress: called with the percentage done (0.0 to 100.0).
        :param cancel: set it from another thread to stop the rebase.
        :raises exception.OperationCancelled: ``cancel`` was set.
        :raises exception.QemuImgError: qemu-img failed.
        """
        _check_fmt("rebase", path, fmt)
        args = ["rebase", "-f", fmt]
        if unsafe:
            args.append("-u")
        args += ["-b", backing_file or ""]
        if backing_file:
            _check_fmt("rebase", path, backing_fmt, "backing_fmt")
            args += ["-F", backing_fmt]
        self._cmd.run_long("rebase", "Rebase", path, args + [path],
                           progress, cancel)

    def commit(self, path: str, fmt: str, *, base: str | None = None,
               drop: bool = False,
               progress: typing.Callable[[float], None] | None = None,
               cancel: threading.Event | None = None) -> None:
        """Write the changes held in overlay ``path`` into its backing file.

        The changes go into ``base`` instead when it is given (an image
        further down the chain).  A cancelled commit leaves ``path`` as it
        was, and the backing file with part of the changes written.

        :param drop: leave the overlay as it is instead of emptying it
            (``-d``).
        :param progress: called with the percentage done (0.0 to 100.0).
        :param cancel: set it from another thread to stop the commit.
        :raises exception.OperationCancelled: ``cancel`` was set.
        :raises exception.QemuImgError: qemu-img failed.
        """
        _check_fmt("commit", path, fmt)
        args = ["commit", "-f", fmt]
        if base is not None:
            args += ["-b", base]
        if drop:
            args.append("-d")
        self._cmd.run_long("commit", "Commit", path, args + [path],
                           progress, cancel)

    def amend(self, path: str, fmt: str, options: dict) -> None:
        """Change format options of an existing image (``-o``)."""
        _check_fmt("amend", path, fmt)
        if not options:
            raise _invalid("amend", path, "no options to change")
        self._cmd.run("amend", path, ["amend", "-f", fmt, "-o",
                                      _format_options("amend", path, options),
                                      path])

    # --- snapshots ---------------------------------------------------------

    def snapshot_create(self, path: str, fmt: str, name: str) -> None:
        """Create internal snapshot ``name`` of image ``path``."""
        self._snapshot("-c", path, fmt, name)

    def snapshot_apply(self, path: str, fmt: str, name: str) -> None:
        """Revert image ``path`` to snapshot ``name`` (a name or an id)."""
        self._snapshot("-a", path, fmt, name)

    def snapshot_delete(self, path: str, fmt: str, name: str) -> None:
        """Delete snapshot ``name`` (a name or an id) of image ``path``."""
        self._snapshot("-d", path, fmt, name)

    def snapshot_list(self, path: str, fmt: str
                      ) -> list[results.Snapshot]:
        """The internal snapshots of ``path``, read from ``info``."""
        return self.info(path, fmt).snapshots

    def _snapshot(self, flag, path, fmt, name):
        # "qemu-img snapshot" has no -f; --image-opts names the driver.
        _check_fmt("snapshot", path, fmt)
        if not name:
            raise _invalid("snapshot", path, "a snapshot needs a name")
        self._cmd.run("snapshot", path, ["snapshot", "--image-opts", flag,
                                         name, _image_opts(fmt, path)])

    # --- reading images ----------------------------------------------------

    def info(self, path: str, fmt: str, *, backing_chain: bool = False,
             force_share: bool = False, limits: bool = True
             ) -> results.ImageInfo:
        """Read what qemu-img knows about ``path``.

        :param backing_chain: also read every backing file; the result's
            ``chain`` is then the whole chain, this image first.
        :param force_share: read an image another process has open
            (``-U``).
        :param limits: run under the ``[qemu_img] info_*_limit`` process
            limits, as any image from a user must be.
        :returns: an :class:`ImageInfo`.
        :raises exception.QemuImgLimitExceeded: a limit was hit.
        :raises exception.QemuImgError: qemu-img failed.
        """
        _check_fmt("info", path, fmt)
        args = ["info", "-f", fmt, "--output=json"]
        if backing_chain:
            args.append("--backing-chain")
        if force_share:
            args.append("-U")
        result = self._cmd.run("info", path, args + [path],
                               limits=(qemu_options.info_limits(self.conf)
                                       if limits else None))
        return self._cmd.parse("info", path, result,
                               results.ImageInfo.from_qemu, backing_chain)

    def check(self, path: str, fmt: str, repair: str | None = None, *,
              limits: bool = True) -> results.CheckResult:
        """Check (and with ``repair``, fix) the consistency of ``path``.

        :param repair: ``None``, ``"leaks"`` or ``"all"``.
        :param limits: run under the ``[qemu_img] info_*_limit`` process
            limits, as any image from a user must be.
        :returns: a :class:`CheckResult`; for a format without checks its
            ``supported`` is False.  Corruptions and leaks are results,
            not exceptions.
        :raises exception.QemuImgLimitExceeded: a limit was hit.
        :raises exception.QemuImgError: the check could not complete.
        """
        _check_fmt("check", path, fmt)
        refusal = results.repair_refusal(repair)
        if refusal:
            raise _invalid("check", path, refusal)
        args = ["check", "-f", fmt, "--output=json"]
        if repair:
            args += ["-r", repair]
        result = self._cmd.run("check", path, args + [path],
                               ok_codes=_CHECK_CODES,
                               limits=(qemu_options.info_limits(self.conf)
                                       if limits else None))
        if result.exit_code == CHECK_UNSUPPORTED:
            return results.CheckResult(filename=path, format=fmt,
                                       supported=False,
                                       exit_code=CHECK_UNSUPPORTED)
        return self._cmd.parse("check", path, result,
                               results.CheckResult.from_qemu,
                               result.exit_code)

    def compare(self, path1: str, fmt1: str, path2: str, fmt2: str, *,
                strict: bool = False) -> bool:
        """Whether two images have the same guest-visible content.

        :param strict: also fail when the sizes or allocation differ.
        """
        _check_fmt("compare", path1, fmt1)
        _check_fmt("compare", path2, fmt2)
        args = ["compare", "-f", fmt1, "-F", fmt2] + (["-s"] if strict
                                                      else [])
        result = self._cmd.run("compare", path1, args + [path1, path2],
                               ok_codes=(0, 1))
        return result.exit_code == 0

    def measure(self, path: str | None, fmt: str | None, target_fmt: str,
                *, size: int | None = None, options: dict | None = None
                ) -> results.Measurement:
        """Bytes an image in ``target_fmt`` would need.

        It measures a conversion of ``path``, or with ``path`` None a new
        image of ``size`` bytes.
        """
        _check_fmt("measure", path, target_fmt, "target format")
        args = ["measure", "--output=json", "-O", target_fmt]
        if options:
            args += ["-o", _format_options("measure", path, options)]
        if path is None:
            args += ["--size", str(sizes.parse_size(size))]
        else:
            _check_fmt("measure", path, fmt)
            args += ["-f", fmt, path]
        return self._cmd.parse("measure", path,
                               self._cmd.run("measure", path, args),
                               results.Measurement.from_qemu)

    def map(self, path: str, fmt: str, *, force_share: bool = False
            ) -> list[results.MapEntry]:
        """The allocation map of ``path``.

        :returns: :class:`MapEntry` ranges saying which hold data, which
            read as zeros, and at which depth of the chain.
        """
        _check_fmt("map", path, fmt)
        args = ["map", "-f", fmt, "--output=json"] + (
            ["-U"] if force_share else [])
        return self._cmd.parse("map", path,
                               self._cmd.run("map", path, args + [path]),
                               results.MapEntry.list_from_qemu)

    # --- the program itself ------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """qemu-img's version, asked once per binary and remembered."""
        if self._version is None:
            if self.binary not in _VERSIONS:
                out = self._cmd.run("--version", self.binary,
                                    ["--version"]).stdout
                match = _VERSION_RE.search(out)
                if not match:
                    raise running.bad_output("--version", self.binary,
                                             out[:80])
                _VERSIONS[self.binary] = tuple(int(part or 0)
                                               for part in match.groups())
            self._version = _VERSIONS[self.binary]
        return self._version

    def supported_formats(self) -> list[str]:
        """The formats this qemu-img was built with (from ``-h``)."""
        out = self._cmd.run("-h", self.binary, ["-h"], ok_codes=(0, 1)).stdout
        for line in out.splitlines():
            if line.startswith("Supported formats:"):
                return line.split(":", 1)[1].split()
        raise running.bad_output("-h", self.binary,
                                 "no 'Supported formats' line")

    def create_options_help(self, fmt: str) -> list[results.CreateOption]:
        """The ``-o`` options ``create`` accepts for ``fmt``."""
        _check_fmt("create", fmt, fmt)
        out = self._cmd.run("create", fmt,
                            ["create", "-f", fmt, "-o", "help"]).stdout
        return results.CreateOption.parse_help(out)


def _format_options(operation, path, options):
    try:
        return results.format_options(options)
    except ValueError as exc:
        raise _invalid(operation, path, str(exc)) from exc


def _image_opts(fmt, path):
    return "driver=%s,file.filename=%s" % (fmt, path.replace(",", ",,"))


def _check_fmt(operation, path, fmt, what="format"):
    if not isinstance(fmt, str) or not _FMT_RE.match(fmt):
        raise _invalid(operation, path, "invalid %s %r" % (what, fmt))


def _invalid(operation, path, reason):
    return exception.QemuImgInvalidRequest(operation=operation, path=path,
                                           reason=reason)
