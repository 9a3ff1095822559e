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

"""The command line's parser is built without the library: the choices it
writes out must be the library's, and ``import imagebackend`` must still
reach everything it reached when it loaded it eagerly.  (What a command
really imports: tests/functional/test_cli_startup.py.)
"""

import argparse
import configparser
import os
import subprocess
import sys

import pytest

import imagebackend
from imagebackend.cmd import disk as disk_cmd
from imagebackend.cmd import main
from imagebackend.disk import operations as disk_ops
from imagebackend.disk import trust as disk_trust
from imagebackend.qemu import results as qemu_results

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def test_the_written_out_choices_are_the_librarys():
    assert disk_cmd.DISK_FORMATS == disk_trust.DISK_FORMATS
    assert disk_cmd.BACKING_FORMATS == disk_trust.BACKING_FORMATS
    assert disk_cmd.REPAIR_MODES == qemu_results.REPAIR_MODES
    assert disk_cmd.EXTRACT_FORMATS == disk_ops.EXTRACT_FORMATS


def test_the_backends_named_in_the_help_are_the_entry_points():
    # setup.cfg is read rather than the installed metadata, which may
    # predate a backend added since the package was installed.
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    declared = {line.split("=")[0].strip() for line in
                parser["entry_points"]["imagebackend.backends"].splitlines()
                if line.strip()}
    assert set(disk_cmd.BACKENDS) == declared


def _fresh(code):
    """Run ``code`` in a new interpreter (this one has the library
    loaded already) and return what it printed.
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, check=True,
                          capture_output=True, text=True).stdout.split()


def test_import_imagebackend_loads_nothing_else():
    loaded = _fresh("import sys, imagebackend; print(' '.join(sorted(m for "
                    "m in sys.modules if m.startswith(('imagebackend.', "
                    "'oslo', 'stevedore', 'pbr')))))")
    assert loaded == []


def test_the_subpackages_are_reached_as_attributes():
    found = _fresh("import imagebackend; print(imagebackend.opts.__name__, "
                   "imagebackend.cache.ImageCache.__name__, "
                   "imagebackend.exception.__name__)")
    assert found == ["imagebackend.opts", "ImageCache",
                     "imagebackend.exception"]


def test_the_version_and_load_backend_are_there():
    assert imagebackend.__version__ == subprocess.run(
        [sys.executable, "-c", "import pbr.version; print(pbr.version."
         "VersionInfo('imagebackend').version_string())"],
        check=True, capture_output=True, text=True).stdout.strip()
    assert "load_backend" in dir(imagebackend)
    assert "opts" in dir(imagebackend)
    with pytest.raises(AttributeError, match="no_such_thing"):
        imagebackend.no_such_thing


@pytest.mark.parametrize("argv", [
    ["cache", "list"],
    ["--config-file", "a.conf", "cache", "prune", "--dry-run", "-f", "json"],
    ["cache", "invalidate", "img"],
    ["cache", "verify", "a", "b", "--repair"],
    ["cache", "prefetch", "a", "--parallel", "2"],
    ["disk", "create", "img", "/d", "--size", "1G", "--backend", "raw"],
    ["disk", "delete", "/d"],
    ["-v", "disk", "info", "/d", "--input-format", "qcow2"],
    ["disk", "check", "/d", "--repair", "leaks"],
    ["disk", "snapshot", "list", "/d"],
    ["disk", "snapshot", "apply", "/d", "s1"],
    ["disk", "rebase", "/d", "/b", "--backing-format", "raw", "--unsafe"],
    ["disk", "extract", "/d", "/o", "-O", "raw", "--upload", "n"],
    ["disk", "resize", "/d", "2G", "--shrink"],
])
def test_the_lazy_parser_parses_as_the_whole_tree(argv):
    # The command line adds a command's arguments only when it is used;
    # what it parses must not depend on that.
    lazy = main.build_parser(lazy=True).parse_args(argv)
    assert vars(lazy) == vars(main.build_parser().parse_args(argv))


def _subcommands(parser):
    return [a for a in parser._actions
            if isinstance(a, argparse._SubParsersAction)][0]


def _made(subcommands):
    """The names whose parser was made (the map holds None for others)."""
    return {name for name, command in dict.items(subcommands.choices)
            if command is not None}


def test_the_lazy_parser_makes_only_the_parsers_of_the_command_used():
    parser = main.build_parser(lazy=True)
    parser.parse_args(["disk", "info", "/d"])
    groups = _subcommands(parser)
    # Every name is a choice; only the group used has a parser.
    assert list(groups.choices) == ["disk", "cache"]
    assert _made(groups) == {"disk"}
    commands = _subcommands(groups.choices["disk"])
    assert "resize" in commands.choices
    assert _made(commands) == {"info"}
    # The command's own parser was filled in.
    assert len(commands.choices["info"]._actions) > 1     # more than -h
    # The eager parser (documentation, tests that walk it) makes them all.
    eager = _subcommands(main.build_parser())
    assert _made(eager) == {"disk", "cache"}
    assert _made(_subcommands(eager.choices["disk"])) == set(
        _subcommands(eager.choices["disk"]).choices)


def test_building_the_configuration_loads_no_cache_or_backend_code():
    loaded = _fresh("import sys, imagebackend.opts as o; "
                    "o.new_conf([], image_sources=[]); "
                    "print(' '.join(sorted(m for m in sys.modules if "
                    "m.startswith(('imagebackend.cache', "
                    "'imagebackend.backends', 'imagebackend.sources.', "
                    "'oslo_concurrency.processutils', "
                    "'oslo_utils.strutils')))))")
    assert loaded == ["imagebackend.backends", "imagebackend.backends.options",
                      "imagebackend.cache", "imagebackend.cache.options"]


def test_the_cache_package_loads_its_facade_when_it_is_asked_for():
    loaded = _fresh("import sys, imagebackend.cache as c; "
                    "print('imagebackend.cache.facade' in sys.modules, "
                    "c.ImageCache.__module__, "
                    "'imagebackend.cache.facade' in sys.modules, "
                    "'ImageCache' in dir(c))")
    assert loaded == ["False", "imagebackend.cache.facade", "True", "True"]


def test_the_cache_packages_modules_are_reached_as_attributes():
    found = _fresh("import imagebackend.cache as c; "
                   "print(c.results.CachedBase.__name__, "
                   "c.store.Store.__name__, hasattr(c, 'no_such_module'))")
    assert found == ["CachedBase", "Store", "False"]


def test_a_lazy_command_name_is_refused_twice_as_argparse_refuses_it():
    commands = _subcommands(main.build_parser(lazy=True))
    with pytest.raises(argparse.ArgumentError) as err:
        commands.add_parser("disk", help="again")
    assert "conflicting subparser: disk" in str(err.value)


def test_a_lazy_command_is_made_by_any_lookup():
    groups = _subcommands(main.build_parser(lazy=True))
    assert groups.choices.get("nope") is None
    assert _made(groups) == set()
    cache = groups.choices.get("cache")
    assert isinstance(cache, argparse.ArgumentParser)
    assert cache.prog == "imagebackend cache"
    assert _made(groups) == {"cache"}
