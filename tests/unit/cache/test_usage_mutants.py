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

"""In-use tracking, exactly: the header fields read and their bounds, how
the header is opened, the names that resolve into ``_base``, ``json:``
depth, hard links, the registry's shapes, and the directory walk.
"""

import errno
import json
import os
import threading
import time
from unittest import mock

import pytest

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import usage as cache_usage
from imagebackend.disk import chain as disk_chain
from imagebackend import exception
from tests import fakes
from tests.unit.cache import test_usage

MiB = 1024 * 1024
CID = test_usage.CID
Tree = test_usage.Tree
overlay = test_usage.overlay
record = test_usage.record


def header(version=3, offset=20, length=None, name=b"base"):
    """A qcow2 header of exactly 20 bytes, then ``name`` at 20."""
    head = bytearray(fakes.qcow2_header(MiB)[:20])
    head[4:8] = version.to_bytes(4, "big")
    head[8:16] = offset.to_bytes(8, "big")
    head[16:20] = (len(name) if length is None else length).to_bytes(
        4, "big")
    return bytes(head) + name


def parse(data):
    return cache_usage.parse_backing_file(
        lambda n, off: data[off:off + n])


# -- the header -----------------------------------------------------------

def test_a_header_of_exactly_twenty_bytes_is_read():
    assert parse(header()) == "base"
    assert parse(header()[:19]) is None
    # Even one whose fields, cut short, would name bytes inside it.
    assert parse(header(offset=4, length=260)[:19]) is None


@pytest.mark.parametrize("version", [0, 1, 4, (1 << 24) | 3, (1 << 8) | 3])
def test_only_versions_two_and_three_are_read(version):
    assert parse(header(version=version)) is None


def test_every_byte_of_the_offset_and_length_counts():
    assert parse(header(offset=(1 << 56) | 20)) is None
    assert parse(header(length=(1 << 24) | 4)) is None
    assert parse(header(offset=0)) is None
    assert parse(header(length=0)) is None


def test_the_longest_name_qemu_takes_is_read():
    name = b"n" * cache_usage.MAX_BACKING_NAME
    assert parse(header(name=name)) == name.decode()
    assert parse(header(name=name + b"n")) is None


def test_a_name_that_is_not_utf8_is_kept_byte_for_byte():
    assert parse(header(name=b"ba\xffse")) == "ba\udcffse"


def test_the_header_is_opened_without_following_or_blocking(tmp_path):
    path = overlay(str(tmp_path / "disk"), "b")
    with mock.patch.object(cache_usage.os, "open",
                           wraps=os.open) as opened:
        assert cache_usage.read_backing_file(path) == "b"
    opened.assert_called_once_with(
        path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    os.symlink(path, str(tmp_path / "link"))
    with pytest.raises(OSError) as err:
        cache_usage.read_backing_file(str(tmp_path / "link"))
    assert err.value.errno == errno.ELOOP


def test_a_fifo_without_a_writer_never_blocks_the_reader(tmp_path):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    found = []
    thread = threading.Thread(
        target=lambda: found.append(cache_usage.read_backing_file(fifo)),
        daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        # Release the reader before failing.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
    assert found == [None]


def test_the_file_descriptor_is_closed(tmp_path):
    path = overlay(str(tmp_path / "disk"), "b")
    with mock.patch.object(cache_usage.os, "close",
                           wraps=os.close) as closed:
        cache_usage.read_backing_file(path)
        cache_usage.read_backing_file(str(tmp_path), None)
    assert closed.call_count == 2


# -- Usage ------------------------------------------------------------------

def test_a_disk_is_added_once_per_base():
    usage = cache_usage.Usage()
    usage.add("b1", "/d1")
    usage.add("b1", "/d1")
    usage.add("b1", "/d2")
    usage.add("b2", "/d1")
    assert usage.users == {"b1": ["/d1", "/d2"], "b2": ["/d1"]}
    assert usage.of("b1") == ["/d1", "/d2"]
    assert usage.of("b3") == []


# -- Chains: what a backing name resolves to ---------------------------------

def test_chains_know_only_regular_base_files(tmp_path):
    t = Tree(tmp_path)
    os.mkdir(t.base(CID + "-5"))
    os.symlink(t.base(), t.base(CID + "-6"))
    chains = cache_usage.Chains(t.base_dir)
    disk = os.path.join(t.instances, "vm", "disk")
    assert chains.resolve(disk, t.base()) == {CID}
    assert chains.resolve(disk, t.base(CID + "_1048576")) == {CID + "_1048576"}
    for name in (CID + "-5", CID + "-6", CID + ".part", "unknown"):
        assert chains.resolve(disk, t.base(name)) == set(), name


def test_chains_of_a_missing_cache_know_no_base(tmp_path):
    chains = cache_usage.Chains(str(tmp_path / "nothing"))
    assert chains.resolve("/d", str(tmp_path / "nothing" / CID)) == set()
    assert chains.unreadable == []


def test_a_base_spelled_through_a_symlinked_cache_path_is_resolved(
        tmp_path):
    t = Tree(tmp_path)
    link = os.path.join(t.root, "cache-link")
    os.symlink(t.base_dir, link)
    # The scanner is given the cache by the symlink's name...
    chains = cache_usage.Chains(link)
    assert chains.resolve("/d", os.path.join(link, CID)) == {CID}
    # ... and a disk names it by its real one.
    assert chains.resolve("/d", t.base()) == {CID}
    # A relative base_dir is made absolute.
    os.chdir(t.instances)
    try:
        chains = cache_usage.Chains("_base")
    finally:
        os.chdir("/")
    assert chains.base_dir == t.base_dir
    assert chains.resolve("/d", t.base()) == {CID}


def test_json_specifications_count_every_filename(tmp_path):
    t = Tree(tmp_path)
    chains = cache_usage.Chains(t.base_dir)
    spec = {"driver": "qcow2",
            "file": {"driver": "file", "filename": t.base()},
            "backing": [{"filename": "file:" + t.base(CID + "-2")},
                        {"filename": 7}]}
    assert chains.resolve("/d", "json:" + json.dumps(spec)) == {
        CID, CID + "-2"}
    assert chains.resolve("/d", "json:{not json") == set()
    assert chains.resolve("/d", "json" + json.dumps(spec)) == set()


def test_a_filename_nested_deeper_than_a_chain_is_ignored():
    def nested(depth, in_list=False):
        spec = {"filename": "x"}
        for _ in range(depth):
            spec = [spec] if in_list else {"file": spec}
        return spec
    limit = disk_chain.MAX_CHAIN
    assert list(cache_usage._filenames(nested(limit))) == ["x"]
    assert list(cache_usage._filenames(nested(limit + 1))) == []
    assert list(cache_usage._filenames(nested(limit, True))) == ["x"]
    assert list(cache_usage._filenames(nested(limit + 1, True))) == []
    assert list(cache_usage._filenames({"filename": {"filename": "y"}})) == [
        "y"]


def test_a_protocol_is_no_use_but_a_file_prefix_is(tmp_path):
    t = Tree(tmp_path)
    chains = cache_usage.Chains(t.base_dir)
    disk = os.path.join(t.instances, "vm", "disk")
    assert chains.resolve(disk, "file:../_base/" + CID) == {CID}
    assert chains.resolve(disk, "file:../../_base/" + CID) == set()
    assert chains.resolve(disk, "file://" + t.base()) == {CID}
    assert chains.resolve(disk, t.base()) == {CID}
    assert chains.resolve(disk, "http://x" + t.base()) == set()
    # A protocol name that would normalise into _base is still none.
    assert chains.resolve(disk, "nbd://../../_base/" + CID) == set()
    assert chains.resolve(disk, "nbd:/../../_base/" + CID) == {CID}


def test_a_disk_that_is_a_base_uses_it(tmp_path):
    t = Tree(tmp_path)
    link = os.path.join(t.instances, "vm", "disk")
    os.makedirs(os.path.dirname(link))
    os.link(t.base(CID + "-2"), link)
    with mock.patch.object(cache_usage, "read_backing_file",
                           autospec=True) as read:
        assert t.scanner().scan().users == {CID + "-2": [link]}
    read.assert_not_called()


def test_each_file_is_read_once_per_scan(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    chains = cache_usage.Chains(t.base_dir)
    st = os.lstat(disk)
    with mock.patch.object(cache_usage, "read_backing_file",
                           wraps=cache_usage.read_backing_file) as read:
        assert chains.bases_of(disk, st) == {CID}
        assert chains.bases_of(disk, st) == {CID}
    read.assert_called_once_with(disk, st)


def test_a_disk_replaced_since_it_was_found_is_not_read(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    other = overlay(os.path.join(t.instances, "vm", "other"), t.base())
    chains = cache_usage.Chains(t.base_dir)
    assert chains.bases_of(disk, os.lstat(other)) == set()
    assert chains.unreadable == []


def test_a_header_that_cannot_be_read_is_unreadable_and_one_gone_is_not(
        tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    st = os.lstat(disk)
    chains = cache_usage.Chains(t.base_dir)
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=PermissionError(13, "denied")):
        assert chains.bases_of(disk, st) == set()
    assert chains.unreadable == [disk]
    os.unlink(disk)
    chains = cache_usage.Chains(t.base_dir)
    assert chains.bases_of(disk, st) == set()
    assert chains.unreadable == []


# -- the scan -----------------------------------------------------------------

def test_an_unreadable_disk_blocks_pruning_through_the_scan(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    before = time.time()
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=PermissionError(13, "denied")):
        usage = t.scanner().scan()
    assert usage.users == {}
    assert usage.unreadable == [disk]
    assert before <= usage.scanned_at <= time.time()


def test_hard_links_of_one_disk_are_one_user(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    os.link(disk, os.path.join(t.instances, "vm", "disk.link"))
    users = t.scanner().scan().of(CID)
    assert len(users) == 1
    assert users[0] in (disk, os.path.join(t.instances, "vm", "disk.link"))


def test_a_registered_disk_found_by_the_walk_too_is_read_once(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    record(t, disk, format="qcow2")
    with mock.patch.object(cache_usage, "read_backing_file",
                           wraps=cache_usage.read_backing_file) as read:
        assert t.scanner().scan().users == {CID: [disk]}
    assert read.call_count == 1


def test_the_cache_and_lock_directories_are_never_walked(tmp_path):
    t = Tree(tmp_path)
    overlay(os.path.join(t.locks, "sub", "disk"), t.base())
    overlay(os.path.join(t.base_dir, "sub", "disk"), t.base())
    vm = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    assert t.scanner().scan().users == {CID: [vm]}


def test_relative_roots_and_skips_are_made_absolute(tmp_path, monkeypatch):
    t = Tree(tmp_path)
    overlay(os.path.join(t.locks, "disk"), t.base())
    vm = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    monkeypatch.chdir(t.root)
    scanner = cache_usage.UsageScanner(
        "instances/_base", ["instances"], ["instances/_base",
                                           "instances/locks"])
    assert scanner.base_dir == t.base_dir
    assert scanner.roots == [t.instances]
    assert scanner.skip == {t.base_dir, t.locks}
    assert scanner.scan().users == {CID: [vm]}


def test_only_a_missing_configured_directory_is_unreadable(tmp_path):
    t = Tree(tmp_path)
    missing = os.path.join(t.root, "unmounted")
    scanner = cache_usage.UsageScanner(
        t.base_dir, [os.path.join(t.root, "no-instances"), missing],
        [t.base_dir, t.locks])
    usage = scanner.scan()
    assert usage.unreadable == [missing]


def test_a_directory_that_cannot_be_searched_is_unreadable(tmp_path):
    t = Tree(tmp_path)
    vm = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    closed = os.path.join(t.instances, "closed")
    os.mkdir(closed)
    scandir = os.scandir

    def refuse(path):
        if path == closed:
            raise PermissionError(13, "denied", path)
        return scandir(path)
    with mock.patch.object(cache_usage.os, "scandir", side_effect=refuse):
        usage = t.scanner().scan()
    assert usage.users == {CID: [vm]}
    assert usage.unreadable == [closed]


def test_files_shorter_than_a_header_are_not_read(tmp_path):
    t = Tree(tmp_path)
    short = os.path.join(t.instances, "short")
    with open(short, "wb") as f:
        f.write(b"QFI\xfb" + bytes(15))
    exact = os.path.join(t.instances, "exact")
    with open(exact, "wb") as f:
        f.write(b"QFI\xfb" + bytes(16))
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           return_value=None) as read:
        t.scanner().scan()
    assert [c.args[0] for c in read.call_args_list] == [exact]


# -- the registry's records ---------------------------------------------------

def test_users_of_counts_only_the_images_own_records(tmp_path):
    t = Tree(tmp_path)
    scanner = t.scanner()
    disk = overlay(os.path.join(t.root, "vm", "disk"), t.base())
    scanner.registry.add("b" * 40, "img", disk, t.base())
    assert scanner.users_of("b" * 40, CID) == [disk]
    assert scanner.users_of(CID, CID) == []


def test_users_of_names_a_registry_it_cannot_trust(tmp_path):
    t = Tree(tmp_path)
    elsewhere = os.path.join(t.root, "elsewhere")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, os.path.join(t.base_dir, ".disks"))
    scanner = t.scanner()
    assert scanner.users_of(CID, CID) == [
        scanner.registry.directory + " (unreadable)"]
    assert scanner.raw_disks() == set()


def test_raw_disks_are_the_existing_regular_files_recorded_raw(tmp_path):
    t = Tree(tmp_path)
    raw = os.path.join(t.root, "raw")
    with open(raw, "wb") as f:
        f.write(b"\0" * 4096)
    record(t, raw, format="raw")
    qcow2 = overlay(os.path.join(t.root, "qcow2"), t.base())
    record(t, qcow2, format="qcow2")
    record(t, os.path.join(t.root, "gone"), format="raw")
    os.symlink(raw, os.path.join(t.root, "link"))
    record(t, os.path.join(t.root, "link"), format="raw")
    os.mkdir(os.path.join(t.root, "dir"))
    record(t, os.path.join(t.root, "dir"), format="raw")
    record(t, "nul\0byte", format="raw")
    st = os.lstat(raw)
    assert t.scanner().raw_disks() == {(st.st_dev, st.st_ino)}


def test_a_record_without_a_format_is_a_qcow2_disk(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.root, "vm", "disk"), t.base(CID + "-2"))
    path = record(t, disk)
    with open(path) as f:
        data = json.load(f)
    assert "format" not in data
    assert t.scanner().scan().users == {CID + "-2": [disk]}


def test_a_temp_file_that_is_not_a_regular_file_is_no_create(tmp_path):
    t = Tree(tmp_path)
    disk = os.path.join(t.root, "vm", "disk")
    os.makedirs(disk + ".tmp")
    record(t, disk, format="qcow2", tmp=disk + ".tmp")
    assert t.scanner().scan().users == {}


@pytest.mark.parametrize("base, expected", [
    ("/anywhere/" + CID, {CID}),
    (CID + "-2", {CID + "-2"}),
    ("/x/" + CID + "_1048576", {CID + "_1048576"}),
    ("/x/" + CID + ".part", set()),
    ("/x/" + CID + ".json", set()),
    ("/x/garbage", set()),
    (None, set()),
])
def test_the_base_a_record_names(tmp_path, base, expected):
    t = Tree(tmp_path)
    assert t.scanner()._recorded_base({"base": base}) == expected


def test_an_unreadable_registered_disk_uses_only_a_base_it_names(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.root, "vm", "disk"), t.base())
    record(t, disk, format="qcow2", base="/x/garbage")
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=PermissionError(13, "denied")):
        usage = t.scanner().scan()
    assert (usage.users, usage.unreadable) == ({}, [])


def test_a_record_of_this_host_whose_disk_is_gone_is_no_use(tmp_path):
    t = Tree(tmp_path)
    scanner = t.scanner()
    record(t, "/gone/disk", format="qcow2", host=scanner.registry.host)
    record(t, "/gone/elsewhere", format="qcow2", host="other")
    assert scanner.scan().users == {CID: ["other:/gone/elsewhere"]}
    record(t, "/gone/raw", format="raw", host="other")
    assert scanner.scan().users == {CID: ["other:/gone/elsewhere"]}


# -- what the operator is told ------------------------------------------------

def warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == cache_usage.__name__ and r.levelname == "WARNING"]


def test_every_reason_a_disk_or_directory_is_skipped_is_logged(
        tmp_path, caplog):
    t = Tree(tmp_path)
    caplog.set_level("WARNING", logger=cache_usage.__name__)
    denied = PermissionError(13, "denied")
    # A disk found by the walk whose header cannot be read.
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=denied):
        t.scanner().scan()
    assert warnings(caplog) == [
        "Cannot read the header of %s: %s" % (disk, denied)]
    caplog.clear()
    # A registered disk whose header cannot be read, and a record of the
    # wrong shape.
    os.unlink(disk)
    registered = overlay(os.path.join(t.root, "elsewhere", "disk"), t.base())
    record(t, registered, format="qcow2")
    bad = record(t, "/bad/disk", format=["qcow2"])
    with mock.patch.object(cache_usage, "read_backing_file", autospec=True,
                           side_effect=denied):
        t.scanner().scan()
    assert sorted(warnings(caplog)) == sorted([
        "Cannot read the header of disk %s: %s" % (registered, denied),
        "Ignoring invalid disk record %s" % bad])
    caplog.clear()
    # A configured directory that is missing, and one that cannot be
    # searched.
    missing = os.path.join(t.root, "unmounted")
    closed = os.path.join(t.root, "closed")
    os.mkdir(closed)
    scandir = os.scandir

    def refuse(path):
        if path == closed:
            raise denied
        return scandir(path)
    os.unlink(bad)
    with mock.patch.object(cache_usage.os, "scandir", side_effect=refuse):
        t.scanner(missing, closed).scan()
    assert warnings(caplog) == [
        "Disk directory %s does not exist" % missing,
        "Cannot search %s for disks: %s" % (closed, denied)]


def test_a_registry_that_cannot_be_trusted_is_logged(tmp_path, caplog):
    t = Tree(tmp_path)
    caplog.set_level("WARNING", logger=cache_usage.__name__)
    elsewhere = os.path.join(t.root, "elsewhere")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, os.path.join(t.base_dir, ".disks"))
    with pytest.raises(exception.UnsafeCachePath) as err:
        cache_layout.check_private_dirs(t.base_dir)
    t.scanner().scan()
    assert warnings(caplog) == [err.value.message]
    assert os.path.join(t.base_dir, ".disks") in err.value.message


# -- an entry skipped must not end the search ---------------------------------

class Vanished:
    """A directory entry whose file is removed before it is looked at."""

    def __init__(self, directory, name):
        self.name = name
        self.path = os.path.join(directory, name)

    def stat(self, follow_symlinks=True):
        raise FileNotFoundError(errno.ENOENT, "gone", self.path)


def listing(first=(), last=None, fail=None):
    """A scandir that lists ``first`` (entries) before the real entries of
    a directory, puts the entry whose path is ``last`` after them (so the
    walk, last in first out, searches it first), and raises ``fail[path]``
    for that directory.
    """
    scandir = os.scandir
    fail = fail or {}

    def scan(path):
        if path in fail:
            raise fail[path]
        entries = sorted(scandir(path), key=lambda e: e.path == last)
        return [e for e in first if os.path.dirname(e.path) == path] \
            + entries
    return scan


@pytest.mark.parametrize("error, unreadable", [
    (FileNotFoundError(errno.ENOENT, "gone"), False),     # removed meanwhile
    (PermissionError(errno.EACCES, "denied"), True)])
def test_a_directory_the_walk_cannot_list_ends_only_its_own_search(
        tmp_path, error, unreadable):
    t = Tree(tmp_path)
    vm = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    other = os.path.join(t.instances, "other")
    os.mkdir(other)
    scan = listing(last=other, fail={other: error})
    with mock.patch.object(cache_usage.os, "scandir", side_effect=scan):
        usage = t.scanner().scan()
    assert usage.users == {CID: [vm]}
    assert usage.unreadable == ([other] if unreadable else [])


def test_a_file_removed_during_the_walk_is_skipped_not_the_rest(tmp_path):
    t = Tree(tmp_path)
    vm = os.path.join(t.instances, "vm")
    disk = overlay(os.path.join(vm, "disk"), t.base())
    scan = listing(first=[Vanished(vm, "disk.old")])
    with mock.patch.object(cache_usage.os, "scandir", side_effect=scan):
        usage = t.scanner().scan()
    assert usage.users == {CID: [disk]}
    assert usage.unreadable == []


def test_a_base_removed_while_listed_hides_no_other_base(tmp_path):
    t = Tree(tmp_path)
    disk = overlay(os.path.join(t.instances, "vm", "disk"), t.base())
    scan = listing(first=[Vanished(t.base_dir, CID + "-9")])
    with mock.patch.object(cache_usage.os, "scandir", side_effect=scan):
        chains = cache_usage.Chains(t.base_dir)
        usage = t.scanner().scan()
    assert chains.resolve(disk, t.base()) == {CID}
    assert chains.resolve(disk, t.base(CID + "-2")) == {CID + "-2"}
    assert usage.users == {CID: [disk]}


def test_a_disk_seen_before_ends_only_its_own_turn(tmp_path):
    t = Tree(tmp_path)
    # Found first by the walk (files of a directory before its
    # subdirectories), and already counted from its record.
    registered = overlay(os.path.join(t.instances, "disk"), t.base())
    record(t, registered, format="qcow2")
    later = overlay(os.path.join(t.instances, "vm", "disk"),
                    t.base(CID + "-2"))
    usage = t.scanner().scan()
    assert usage.users == {CID: [registered], CID + "-2": [later]}
