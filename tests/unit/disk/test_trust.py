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

"""imagebackend.disk.trust on real directories: which cache directory a
path is in (by real path, through symlinks and hard links), the name a
path has in ``_base``, where a format comes from, and the exact messages
that name the file and the fix."""

import os

import pytest

from imagebackend.disk import trust as disk_trust
from imagebackend import exception
from tests import fakes

CID = "a" * 40
BACKING = ", ".join(disk_trust.BACKING_FORMATS)


def write(path, data=b"data"):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


class Stub:
    """FormatRecords with fixed answers (``base`` for every path, or a
    path -> BaseRecord map), recording what was asked.
    """

    def __init__(self, paths=None, base=None, disk=None):
        self.paths = paths
        self.base = base
        self.disk = disk
        self.asked = []

    def base_record(self, path):
        self.asked.append(("base_record", path))
        if isinstance(self.base, dict):
            return self.base.get(path)
        return self.base

    def disk_format(self, path):
        self.asked.append(("disk_format", path))
        return self.disk


def known(records, path="/d/x", given=None, **kwargs):
    return disk_trust.known_format(records, path, given,
                                   flag=kwargs.pop("flag", "--input-format"),
                                   **kwargs)


# --- the cache's directories -------------------------------------------------

def test_cache_paths_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = fakes.conf(tmp_path)
    conf.set_override("instances_path", "relative", group="imagebackend")
    instances = str(tmp_path / "relative")
    assert disk_trust.cache_paths(conf) == disk_trust.CachePaths(
        instances, os.path.join(instances, "_base"),
        os.path.join(instances, "locks"), ())
    conf.set_override("lock_path", "rel-locks", group="oslo_concurrency")
    conf.set_override("disk_dirs", ["d1", "/abs/d2"], group="image_cache")
    paths = disk_trust.cache_paths(conf)
    assert paths.lock_dir == str(tmp_path / "rel-locks")
    assert paths.disk_dirs == (str(tmp_path / "d1"), "/abs/d2")


def test_no_records_trusts_nothing(paths, tmp_path):
    conf = fakes.conf(tmp_path)
    records = disk_trust.NoRecords(conf)
    assert records.conf is conf
    assert records.paths == paths
    base = write(os.path.join(paths.base_dir, CID))
    assert records.base_record(base) == disk_trust.BaseRecord(None, None)
    assert records.base_record(write(tmp_path / "out")) is None
    assert records.disk_format(base) is None
    assert records.disk_format(str(tmp_path / "out")) is None


def test_a_base_record_has_no_record_name_by_default():
    assert disk_trust.BaseRecord("raw").record is None
    assert disk_trust.BaseRecord("raw", "x.json").record == "x.json"


# --- where a file is ---------------------------------------------------------

@pytest.mark.parametrize("path,root,expected", [
    ("/a/b", "/a/b", True),
    ("/a/b/c", "/a/b", True),
    ("/a/b/c/d", "/a/b", True),
    ("/a/bc", "/a/b", False),
    ("/a", "/a/b", False),
    ("/x/b", "/a/b", False),
])
def test_inside(path, root, expected):
    assert disk_trust.inside(path, root) is expected


def test_cache_area_names_the_directory(paths, tmp_path):
    cache = "the image cache %s" % paths.base_dir
    locks = "the lock directory %s" % paths.lock_dir
    base = write(os.path.join(paths.base_dir, CID))
    os.symlink(paths.base_dir, tmp_path / "cache-link")
    os.symlink(base, tmp_path / "base-link")
    os.symlink(paths.lock_dir, tmp_path / "locks-link")
    os.symlink(os.path.join(paths.lock_dir, "x"), tmp_path / "lock-link")
    assert disk_trust.cache_area(paths, base) == cache
    assert disk_trust.cache_area(paths, paths.base_dir) == cache
    assert disk_trust.cache_area(
        paths, os.path.join(paths.base_dir, ".disks", "x", "y")) == cache
    assert disk_trust.cache_area(paths, str(tmp_path / "cache-link" / "new")
                                 ) == cache
    assert disk_trust.cache_area(paths, str(tmp_path / "base-link")) == cache
    assert disk_trust.cache_area(paths, os.path.join(paths.lock_dir, "x")
                                 ) == locks
    assert disk_trust.cache_area(paths, str(tmp_path / "locks-link" / "x")
                                 ) == locks
    assert disk_trust.cache_area(paths, str(tmp_path / "lock-link")) == locks
    assert disk_trust.cache_area(
        paths, os.path.join(paths.instances_path, "vm", "d")) is None
    assert disk_trust.cache_area(paths, paths.instances_path) is None


def test_a_cache_reached_through_a_symlinked_root(paths, tmp_path):
    # The configured _base is itself a symlink to the real directory.
    real = tmp_path / "real-base"
    real.mkdir()
    os.rmdir(paths.base_dir)
    os.symlink(real, paths.base_dir)
    where = "the image cache %s" % paths.base_dir
    assert disk_trust.cache_area(paths, str(real / "new")) == where


def test_refuse_cache_write_message(paths, tmp_path):
    path = os.path.join(paths.lock_dir, "new")
    with pytest.raises(exception.CachePathRefused) as err:
        disk_trust.refuse_cache_write(paths, path)
    assert str(err.value) == (
        "Refusing to write %s: it is in the lock directory %s, where only "
        "the cache writes; choose a path outside it." % (path,
                                                         paths.lock_dir))
    assert err.value.kwargs == {"path": path, "where": "the lock directory "
                                + paths.lock_dir}
    disk_trust.refuse_cache_write(paths, str(tmp_path / "elsewhere"))
    disk_trust.refuse_cache_write(paths, write(tmp_path / "file"))


def test_a_hard_link_into_the_cache_is_refused(paths, tmp_path):
    # Other files in _base come first or last in the listing alike.
    for name in ("0" * 40, "f" * 40, CID + ".json"):
        write(os.path.join(paths.base_dir, name), name.encode())
    base = write(os.path.join(paths.base_dir, CID))
    link = str(tmp_path / "link")
    os.link(base, link)
    with pytest.raises(exception.CachePathRefused) as err:
        disk_trust.refuse_cache_write(paths, link)
    assert str(err.value) == (
        "Refusing to write %s: it is in the image cache %s (it is a hard "
        "link to %s), where only the cache writes; choose a path outside "
        "it." % (link, paths.base_dir, base))
    # Through a symlink to the link, as qemu-img would follow it.
    os.symlink(link, tmp_path / "symlink")
    with pytest.raises(exception.CachePathRefused):
        disk_trust.refuse_cache_write(paths, str(tmp_path / "symlink"))


def test_hard_links_outside_the_cache_are_allowed(paths, tmp_path):
    write(os.path.join(paths.base_dir, CID))
    outside = write(tmp_path / "a")
    os.link(outside, tmp_path / "b")
    # A symlink in _base to it does not make it a file of the cache.
    os.symlink(outside, os.path.join(paths.base_dir, "f" * 40))
    assert os.stat(outside).st_nlink == 2
    disk_trust.refuse_cache_write(paths, outside)


def test_only_regular_files_are_matched_as_hard_links(paths, tmp_path):
    # A fifo linked into _base holds no data of the cache.
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    os.link(fifo, os.path.join(paths.base_dir, CID))
    assert disk_trust.cache_area(paths, fifo) is None
    disk_trust.refuse_cache_write(paths, fifo)


def test_a_hard_link_check_survives_a_vanishing_entry(paths, tmp_path,
                                                      monkeypatch):
    base = write(os.path.join(paths.base_dir, CID))
    link = str(tmp_path / "link")
    os.link(base, link)
    real_scandir = os.scandir

    class Gone:
        path = os.path.join(paths.base_dir, "gone")

        def stat(self, follow_symlinks=True):
            raise FileNotFoundError(2, "No such file or directory")

    def scandir(directory):
        with real_scandir(directory) as entries:
            return [Gone()] + list(entries)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(exception.CachePathRefused) as err:
        disk_trust.refuse_cache_write(paths, link)
    assert "hard link to %s" % base in str(err.value)


def test_no_hard_link_check_without_a_cache(paths, tmp_path):
    os.rmdir(paths.base_dir)
    outside = write(tmp_path / "a")
    os.link(outside, tmp_path / "b")
    disk_trust.refuse_cache_write(paths, outside)


# --- the name in _base -------------------------------------------------------

def test_name_in_base(paths, tmp_path):
    base = write(os.path.join(paths.base_dir, CID))
    deep = os.path.join(paths.base_dir, ".disks", "c")
    os.makedirs(deep)
    record = write(os.path.join(deep, "r.json"))
    vm = os.path.join(paths.instances_path, "vm")
    os.symlink(base, os.path.join(vm, "to-base"))
    os.symlink(record, os.path.join(vm, "to-record"))
    os.symlink(paths.base_dir, tmp_path / "cache-link")
    name = disk_trust.name_in_base
    assert name(paths, base) == CID
    assert name(paths, os.path.join(paths.base_dir, "missing")) == "missing"
    assert name(paths, str(tmp_path / "cache-link" / CID)) == CID
    assert name(paths, os.path.join(vm, "to-base")) == CID
    assert name(paths, record) == ""
    assert name(paths, os.path.join(vm, "to-record")) == ""
    assert name(paths, paths.base_dir) == ""
    assert name(paths, os.path.join(vm, "d")) is None
    assert name(paths, str(tmp_path / "x")) is None


def test_name_in_base_refuses_the_lock_directory(paths, tmp_path):
    lock = write(os.path.join(paths.lock_dir, "x"))
    os.symlink(lock, tmp_path / "to-lock")
    for path in (lock, str(tmp_path / "to-lock")):
        with pytest.raises(exception.DiskOperationError) as err:
            disk_trust.name_in_base(paths, path)
        assert str(err.value) == (
            "Disk %s: it is in the lock directory %s, which holds no disks"
            % (path, paths.lock_dir))


def test_no_record_says_which_and_what_to_do():
    assert disk_trust.no_record(disk_trust.BaseRecord(None)) == (
        "(these disk operations were given none of the cache's records, "
        "so nothing there is trusted)")
    assert disk_trust.no_record(disk_trust.BaseRecord(None, "x.json")) == (
        "(x.json); 'imagebackend cache verify' checks it")


# --- where a format comes from -----------------------------------------------

def test_a_base_without_a_record_needs_the_callers_format():
    records = Stub(base=disk_trust.BaseRecord(None, "c.json"))
    with pytest.raises(exception.DiskFormatUnknown) as err:
        known(records, "/b/c", flag="--backing-format")
    assert str(err.value) == (
        "Disk /b/c: it is in the image cache but has no valid record "
        "(c.json); 'imagebackend cache verify' checks it; give its format "
        "explicitly with --backing-format qcow2 or --backing-format raw.")
    assert records.asked == [("base_record", "/b/c")]
    # Any format the cache can hold then, whatever ``formats`` says.
    assert known(records, "/b/c", "vmdk") == "vmdk"
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        known(records, "/b/c", "nonsense")
    assert str(err.value) == (
        "Disk /b/c: this operation is not supported for nonsense disks; "
        "use one of %s." % BACKING)


def test_a_recorded_base_has_its_record_format():
    records = Stub(base=disk_trust.BaseRecord("vmdk", "c.json"))
    assert known(records, "/b/c") == "vmdk"
    assert known(records, "/b/c", "vmdk") == "vmdk"
    with pytest.raises(exception.InvalidDiskRequest) as err:
        known(records, "/b/c", "raw", flag="--backing-format")
    assert str(err.value) == (
        "Disk /b/c: the image cache records it as vmdk, not raw; leave out "
        "--backing-format")
    assert ("disk_format", "/b/c") not in records.asked


def test_a_disk_has_the_given_or_the_registry_format():
    records = Stub(disk="raw")
    assert known(records, "/d/x") == "raw"
    assert records.asked == [("base_record", "/d/x"),
                             ("disk_format", "/d/x")]
    records.asked.clear()
    assert known(records, "/d/x", "qcow2") == "qcow2"
    assert records.asked == [("base_record", "/d/x")]


def test_an_unknown_disk_names_the_flag():
    with pytest.raises(exception.DiskFormatUnknown) as err:
        known(Stub(), "/d/x")
    assert str(err.value) == (
        "Disk /d/x: it is neither a base in the image cache nor a disk the "
        "library made, so nothing records its format (its header may have "
        "been written by a guest); give its format explicitly with "
        "--input-format qcow2 or --input-format raw.")


def test_formats_limit_what_a_disk_may_be():
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        known(Stub(), "/d/x", "vmdk")
    assert str(err.value) == (
        "Disk /d/x: this operation is not supported for vmdk disks; use "
        "one of qcow2, raw.")
    assert err.value.kwargs["fmt"] == "vmdk"
    with pytest.raises(exception.UnsupportedDiskOperation):
        known(Stub(disk="vmdk"), "/d/x")
    assert known(Stub(), "/d/x", "vmdk",
                 formats=disk_trust.BACKING_FORMATS) == "vmdk"


# --- opening a disk ----------------------------------------------------------

def test_open_disk_defaults_read_any_format(paths, monkeypatch):
    monkeypatch.chdir(paths.instances_path)
    raw = write(os.path.join(paths.instances_path, "vm", "d"))
    base = write(os.path.join(paths.base_dir, CID))
    records = Stub(paths, base={base: disk_trust.BaseRecord("raw", "r")})
    assert disk_trust.open_disk(records, "vm/d", "raw", "info") == (
        raw, "raw")
    assert disk_trust.open_disk(records, base, None, "info") == (base, "raw")


def test_open_disk_refuses_writes_into_the_cache(paths):
    base = write(os.path.join(paths.base_dir, CID))
    records = Stub(paths, base=disk_trust.BaseRecord("raw", "r"))
    with pytest.raises(exception.CachePathRefused):
        disk_trust.open_disk(records, base, None, "resize", write=True)
    assert records.asked == []


def test_open_disk_names_the_operation(paths):
    path = write(os.path.join(paths.instances_path, "vm", "d"))
    records = Stub(paths)
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        disk_trust.open_disk(records, path, "vmdk", "resize")
    assert str(err.value) == (
        "Disk %s: resize is not supported for vmdk disks; instance disks "
        "are qcow2 or raw." % path)
    assert isinstance(err.value.__cause__, exception.UnsupportedDiskOperation)
    with pytest.raises(exception.UnsupportedDiskOperation) as err:
        disk_trust.open_disk(records, path, "raw", "snapshot list",
                             qcow2=True)
    assert str(err.value) == (
        "Disk %s: snapshot list is not supported for raw disks; internal "
        "snapshots and backing files need a qcow2 disk (extract it to "
        "qcow2 with 'imagebackend disk extract', or use the qcow2 or "
        "cached-base backend)." % path)
    assert disk_trust.open_disk(records, path, "qcow2", "snapshot list",
                                qcow2=True) == (path, "qcow2")


def test_open_disk_refuses_what_is_not_a_disk_file(paths, tmp_path):
    records = Stub(paths)
    with pytest.raises(exception.DiskOperationError) as err:
        disk_trust.open_disk(records, str(tmp_path), "raw", "info")
    assert str(err.value) == (
        "Disk %s: it is not a disk image (not a regular file or a block "
        "device)" % tmp_path)
    under_file = os.path.join(write(tmp_path / "f"), "x")
    with pytest.raises(exception.DiskOperationError) as err:
        disk_trust.open_disk(records, under_file, "raw", "info")
    assert type(err.value) is exception.DiskOperationError
    assert str(err.value) == ("Disk %s: cannot open it: Not a directory"
                              % under_file)
    assert isinstance(err.value.__cause__, NotADirectoryError)
    missing = str(tmp_path / "missing")
    with pytest.raises(exception.DiskNotFound) as err:
        disk_trust.open_disk(records, missing, "raw", "info")
    assert str(err.value) == ("Disk %s does not exist; check the path."
                              % missing)
    assert records.asked == []
