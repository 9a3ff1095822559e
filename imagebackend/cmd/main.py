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

"""``imagebackend``: make instance disks and look after the image cache.

Each command module adds its group of commands with
``add_commands(subparsers)``, each command's parser with a function that
adds its arguments (called only for the command used); a command is a
function ``run(args, conf)`` returning data that
:mod:`imagebackend.cmd.output` prints as text or, with ``-f json``, as JSON.

Whatever goes wrong ends in one line on stderr (``imagebackend: error:
...``) and a non-zero exit status; ``--debug`` adds the traceback.  Text
that others chose (image ids, server messages, file names) is escaped
wherever it is shown: in results, error messages and log lines.

Start-up is kept short (scripts and tests run the command many times):
the parser is built from the command modules alone, which import what a
command does only when it runs, so ``--help`` and a command that makes
no disk load no cache, backend, image source or configuration code.
"""

import argparse
import logging
import os
import signal
import sys

from imagebackend.cmd import cache as cache_cmd
from imagebackend.cmd import disk as disk_cmd
from imagebackend.cmd import output
from imagebackend import exception
from imagebackend import textutils

COMMAND_MODULES = (disk_cmd, cache_cmd)

#: the exit status when the reader of the output went away (``... | head
#: -1``): that of a process killed by SIGPIPE, as a shell reports it.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
#: the exit status after Ctrl-C, as a shell reports SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: disks are made of sectors of this many bytes.
SECTOR_SIZE = 512
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its error messages (which quote the arguments they
    refuse, some of them raw) shown escaped, on one line.

    A parser may be given ``build``, a function called with the parser
    that adds its arguments and subcommands: at once here, when the
    parser is used in :class:`_LazyParser`.
    """

    #: whether ``build`` waits for the parser to be used.
    LAZY = False

    def __init__(self, *args, build=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._build = build
        if not self.LAZY:
            self._complete()

    def _complete(self) -> None:
        build, self._build = self._build, None
        if build is not None:
            build(self)

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, "%s: error: %s\n" % (
            self.prog, textutils.printable(message,
                                           textutils.MESSAGE_LIMIT)))


class _Commands(dict):
    """A subcommands action's name -> parser map whose parsers are made
    when first looked up (the names are there from the start, for
    argparse's choices and messages).
    """

    def __init__(self, parser_class) -> None:
        super().__init__()
        self._parser_class = parser_class
        self._pending: dict[str, dict] = {}

    def add(self, name: str, kwargs: dict) -> None:
        self._pending[name] = kwargs
        super().__setitem__(name, None)

    def __getitem__(self, name):
        if name in self._pending:
            super().__setitem__(name,
                                self._parser_class(**self._pending.pop(name)))
        return super().__getitem__(name)

    def get(self, name, default=None):
        return self[name] if name in self else default


class _LazyCommands(argparse._SubParsersAction):
    """argparse's subcommands action, making a command's parser only when
    the command is used: ``add_parser`` records it and returns nothing.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = self.choices = _Commands(self._parser_class)

    def add_parser(self, name, **kwargs) -> None:
        if name in self._name_parser_map:
            raise argparse.ArgumentError(self, "conflicting subparser: %s"
                                         % name)
        kwargs.setdefault("prog", "%s %s" % (self._prog_prefix, name))
        if "help" in kwargs:
            self._choices_actions.append(self._ChoicesPseudoAction(
                name, (), kwargs.pop("help")))
        self._name_parser_map.add(name, kwargs)


class _LazyParser(_ArgumentParser):
    """A parser whose arguments and subcommands are added when it parses
    or prints its usage or help, and whose subcommands' parsers are made
    when used: a command makes its own parser, its group's and the top
    level, not the parsers of the twenty other commands (making and
    filling them all cost about a twentieth of the start-up of a real
    command; making one, with argparse's translated strings looked up,
    about 0.2 ms).
    """

    LAZY = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _LazyCommands)

    def parse_known_args(self, args=None, namespace=None):
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self):
        self._complete()
        return super().format_usage()

    def format_help(self):
        self._complete()
        return super().format_help()


class _LogFormatter(textutils.EscapingFormatter):
    """Log messages escaped; in --debug tracebacks too, line by line, so
    an exception's message cannot send escape sequences to the terminal.
    """

    def formatException(self, ei):
        return "\n".join(textutils.printable(line, None) for line in
                         super().formatException(ei).split("\n"))


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The command line's parser.

    :param lazy: add a command's arguments only when the command is used,
        as the command line does; by default the whole tree is built (for
        the documentation, and for tests that walk it).
    """
    parser = (_LazyParser if lazy else _ArgumentParser)(
        prog="imagebackend",
        description="Turn images into instance disks through a shared, "
                    "verified base-image cache.")
    parser.add_argument("--config-file", action="append", default=[],
                        metavar="FILE",
                        help="An oslo.config file to read; may be repeated "
                             "(later files override earlier ones).")
    parser.add_argument("--config-dir", action="append", default=[],
                        metavar="DIR",
                        help="A directory of *.conf files to read after "
                             "the config files.")
    parser.add_argument("--debug", action="store_true",
                        help="Log debug messages and show tracebacks.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Log what is done, step by step.")
    groups = parser.add_subparsers(dest="group", metavar="{disk,cache}")
    groups.required = True
    for module in COMMAND_MODULES:
        module.add_commands(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``imagebackend cache list | head -1``):
        # nothing more can be said, and Python must not complain at exit
        # about the output it can no longer flush.
        _discard_output()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        # Every step removed its own scratch on the way out.
        print("imagebackend: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    parser = build_parser(lazy=True)
    args = parser.parse_args(argv)
    _check_size(parser, args)
    # Only a command that runs needs the configuration.
    from oslo_config import cfg

    from imagebackend import opts

    # The error itself is printed as the command's one-line result, so by
    # default only errors are logged; -v shows each step.
    level = (logging.DEBUG if args.debug else
             logging.INFO if args.verbose else logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    conf_argv = []
    for path in args.config_file:
        conf_argv += ["--config-file", path]
    for path in args.config_dir:
        conf_argv += ["--config-dir", path]
    conf = None
    try:
        _check_image_ids(args)
        # An image source's options are registered (and checked) when the
        # command builds the source: a command that uses none does not
        # load the Glance client for its options.
        conf = opts.new_conf(conf_argv, image_sources=[])
        result = args.func(args, conf)
        output.emit(result, args)
    except (BrokenPipeError, KeyboardInterrupt):
        raise
    except exception.ImageBackendException as exc:
        if isinstance(exc.__cause__, cfg.Error):
            exc = _config_error(conf, exc)
        return _fail(args, exc)
    except cfg.Error as exc:
        # An option read part-way through the command (those of the image
        # source are registered only when it is built): say which.
        return _fail(args, _config_error(conf, exc))
    except Exception as exc:    # report in one line, do not dump
        # oslo.config reports bad files with its own exceptions; anything
        # else unexpected is a bug, shown in full with --debug.
        return _fail(args, exc)
    # A command may report a failure it printed (verify found corruption).
    return getattr(args, "exit_status", 0)


def _check_image_ids(args) -> None:
    """Refuse an image id no source may serve, before anything is done.

    :raises imagebackend.exception.InvalidImageId: one is refused.
    """
    ids = list(getattr(args, "image_ids", None) or [])
    if getattr(args, "image_id", None) is not None:
        ids.insert(0, args.image_id)
    if not ids:
        return      # the disk operations: no image source code needed
    from imagebackend.sources import base as source_base

    for image_id in ids:
        source_base.check_image_id(image_id)


def _check_size(parser, args) -> None:
    """Refuse a disk size that is not a whole number of sectors: qemu-img
    would round it up (or refuse it, to resize), so the disk would not
    have the size asked for and reported.
    """
    size = getattr(args, "size", None)
    if not isinstance(size, int) or size % SECTOR_SIZE == 0:
        return
    up = (size // SECTOR_SIZE + 1) * SECTOR_SIZE
    down = size // SECTOR_SIZE * SECTOR_SIZE
    parser.error("size %d bytes is not a multiple of %d (disks are made of "
                 "%d-byte sectors); give %d%s" % (
                     size, SECTOR_SIZE, SECTOR_SIZE, up,
                     " or %d" % down if down else ""))


def _config_error(conf, exc):
    """The option behind oslo.config error ``exc``, when one can be found
    (as a :class:`imagebackend.exception.ConfigValueError`); else ``exc``.
    """
    from imagebackend.common import config_check

    if conf is not None:
        try:
            config_check.check_conf(conf)
        except exception.ConfigValueError as found:
            return found
    return exc


def _fail(args, exc) -> int:
    if args.debug:
        logging.getLogger(__name__).error("Command failed", exc_info=exc)
    if isinstance(exc, exception.ImageBackendException):
        message = exc.message       # escaped when it was made
    else:
        message = textutils.printable(str(exc) or repr(exc),
                                      textutils.MESSAGE_LIMIT)
    print("imagebackend: error: %s" % message, file=sys.stderr)
    return 1


def _discard_output() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not
    raise again into a closed pipe.
    """
    try:
        fileno = sys.stdout.fileno()
    except (OSError, ValueError):
        return      # not a file (a test's StringIO): nothing to flush
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
