"""``imagebackend``: make instance disks and look after the image cache.

Each command module adds its subcommands with ``add_commands(subparsers)``;
a command is a function ``run(args, conf)`` returning data that
:mod:`imagebackend.cmd.output` prints as text or, with ``-f json``, as JSON.
"""

import argparse
import logging
import sys

from imagebackend.cmd import cache as cache_cmd
from imagebackend.cmd import disk as disk_cmd
from imagebackend.cmd import output
from imagebackend import exception
from imagebackend import opts

COMMAND_MODULES = (disk_cmd, cache_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser = build_parser()
    args = parser.parse_args(argv)
    # The error itself is printed as the command's one-line result, so by
    # default only errors are logged; -v shows each step.
    level = (logging.DEBUG if args.debug else
             logging.INFO if args.verbose else logging.ERROR)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    conf_argv = []
    for path in args.config_file:
        conf_argv += ["--config-file", path]
    for path in args.config_dir:
        conf_argv += ["--config-dir", path]
    try:
        conf = opts.new_conf(conf_argv)
        result = args.func(args, conf)
    except exception.ImageBackendException as exc:
        return _fail(args, exc)
    except Exception as exc:   # noqa: B902 -- report, do not dump
        # oslo.config reports bad files with its own exceptions; anything
        # else unexpected is a bug, shown in full with --debug.
        return _fail(args, exc)
    output.emit(result, args)
    # A command may report a failure it printed (verify found corruption).
    return getattr(args, "exit_status", 0)


def _fail(args, exc) -> int:
    if args.debug:
        logging.getLogger(__name__).exception("Command failed")
    message = getattr(exc, "message", None) or str(exc) or repr(exc)
    print("imagebackend: error: %s" % message, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
