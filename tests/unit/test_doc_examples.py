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

"""The README's and the documentation's examples run as written.

Every ``.. code-block:: python`` of README.rst and doc/source/*.rst is run
with the real library and the real qemu-img, the only change being the
host paths an example names (``/etc/imagebackend/imagebackend.conf``,
``/srv/instances``...), which point into a temporary directory holding a
config file and a local image source.  A block that defines ``test_*``
functions (the fixture example) has them called as a test would.  Every
``.. code-block:: ini`` sets only options the library has, in the right
group.
"""

import functools
import glob
import os
import subprocess
import types

from docutils import core as docutils_core
from docutils import nodes
import fixtures
from keystoneauth1 import session as ks_session
import pytest

from imagebackend import opts

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_INSTANCES = opts.new_conf([]).imagebackend.instances_path
PAGES = [os.path.join(ROOT, "README.rst")] + sorted(
    glob.glob(os.path.join(ROOT, "doc", "source", "*.rst")))


@functools.lru_cache(maxsize=None)
def _literal_blocks(path):
    """(classes, text) of every literal block of the page ``path``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ".. code-block::" not in text:
        return ()
    doctree = docutils_core.publish_doctree(text, settings_overrides={
        "report_level": 5, "halt_level": 5, "file_insertion_enabled": False})
    return tuple((tuple(node.get("classes", [])), node.astext())
                 for node in doctree.findall(nodes.literal_block))


def code_blocks(path, language):
    """The text of each ``.. code-block:: <language>`` in ``path``."""
    return [text for classes, text in _literal_blocks(path)
            if language in classes]


def examples(language):
    found = []
    for page in PAGES:
        for index, block in enumerate(code_blocks(page, language)):
            found.append(pytest.param(
                block, id="%s-%d" % (os.path.relpath(page, ROOT), index)))
    return found


@pytest.fixture
def host(tmp_path):
    """A temporary host: a config file, an instances path, images."""
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    str(images / "cirros.qcow2"), "64M"], check=True)
    guest = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(guest),
                    "32M"], check=True)
    instances = tmp_path / "instances"
    config = tmp_path / "imagebackend.conf"
    config.write_text(
        "[imagebackend]\ninstances_path = %s\n"
        "[oslo_concurrency]\nlock_path = %s\n"
        "[local_source]\npath = %s\n"
        "[glance]\napi_servers = http://127.0.0.1:9\n" % (
            instances, tmp_path / "locks", images))
    return types.SimpleNamespace(root=tmp_path, config=str(config),
                                 instances=str(instances), guest=str(guest))


def _localise(block, host):
    """The example with its host paths moved into the temporary host."""
    for path, local in (
            ("/etc/imagebackend/imagebackend.conf", host.config),
            ("/etc/nova/imagebackend.conf", host.config),
            ("/srv/instances", host.instances),
            ("/path/to/file", host.guest)):
        block = block.replace(path, local)
    return block


class _Nova:
    """The few of a compute service's options an example reads."""

    def __init__(self, host):
        self.instances_path = host.instances
        self.force_raw_images = True
        self.preallocate_images = "none"
        self.image_cache = types.SimpleNamespace(
            subdirectory_name="_base",
            remove_unused_original_minimum_age_seconds=86400,
            remove_unused_resized_minimum_age_seconds=3600)
        self.oslo_concurrency = types.SimpleNamespace(
            lock_path=os.path.join(str(host.root), "locks"))


class _TestCase(fixtures.TestWithFixtures):
    def runTest(self):  # noqa: N802 - unittest's name
        pass


def test_the_pages_have_examples():
    # The README and the library page each show runnable Python.
    assert code_blocks(PAGES[0], "python")
    assert code_blocks(os.path.join(ROOT, "doc", "source", "library.rst"),
                       "python")


@pytest.mark.parametrize("block", examples("python"))
def test_python_example_runs(block, host):
    existed = os.path.exists(DEFAULT_INSTANCES)
    namespace = {"__name__": "doc_example", "CONF": _Nova(host),
                 "my_session": ks_session.Session()}
    code = compile(_localise(block, host), "<example>", "exec")
    exec(code, namespace)  # noqa: S102 - the project's own documentation
    tests = [value for name, value in sorted(namespace.items())
             if name.startswith("test_") and callable(value)]
    for test in tests:
        case = _TestCase()
        case.setUp()
        try:
            test(case)
        finally:
            case.doCleanups()
    # The example worked in the temporary host: its disks are there, and
    # nothing was made under the library's default paths.
    if "/srv/instances" in block:
        assert os.listdir(host.instances)
    assert not os.path.exists(DEFAULT_INSTANCES) or existed


def _known_options():
    known = {}
    for group, options in opts.list_opts():
        name = getattr(group, "name", group) or "DEFAULT"
        known.setdefault(name, set()).update(o.dest for o in options)
        known[name].update(o.name for o in options)
    known.setdefault("oslo_concurrency", set()).update(
        {"lock_path", "disable_process_locking"})
    return known


@pytest.mark.parametrize("block", examples("ini"))
def test_ini_example_sets_only_real_options(block):
    import configparser
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(block)
    known = _known_options()
    for section in parser.sections():
        assert section in known, "unknown group [%s]" % section
        for key in parser[section]:
            if key in parser.defaults():
                continue
            assert key in known[section], "unknown option [%s] %s" % (
                section, key)
