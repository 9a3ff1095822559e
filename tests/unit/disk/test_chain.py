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

"""Where formats come from (the caller, the cache's records, never a
header), which files may be in a backing chain, and where nothing may be
written -- on real files, without qemu-img."""

import hashlib
import json
import os

import pytest

from imagebackend.cache import disk_records
from imagebackend.disk import chain as disk_chain
from imagebackend.disk import trust as disk_trust
from imagebackend import exception
from tests import fakes

CID = "a" * 40
OTHER_CID = "b" * 40


@pytest.fixture
def paths(tmp_path):
    instances = tmp_path / "instances"
    (instances / "_base").mkdir(parents=True)
    (instances / "locks").mkdir()
    (instances / "vm").mkdir()
    return disk_trust.cache_paths(fakes.conf(tmp_path))


def write(path, data=b"data"):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def write_json(path, data):
    return write(path, json.dumps(data).encode())


def register(paths, disk, cid=CID, tied=True, **record):
    """Record ``disk`` as the registry does: tied to the file there now
    (its device and inode) unless ``tied`` is false.
    """
    directory = os.path.join(paths.base_dir, ".disks", cid)
    os.makedirs(directory, exist_ok=True)
    key = hashlib.sha1(disk.encode()).hexdigest()
    data = {"disk": disk, "base": "x", "state": "done", "created_at": 1,
            "format": "qcow2"}
    if tied and os.path.exists(disk):
        st = os.stat(disk)
        data.update(dev=st.st_dev, ino=st.st_ino)
    return write_json(os.path.join(directory, key + ".json"),
                      dict(data, **record))


def disk(paths, name="disk", data=None):
    return write(os.path.join(paths.instances_path, "vm", name),
                 data or fakes.qcow2_header(1024 * 1024))


def base(paths, name=CID, fmt="raw", record=True):
    path = write(os.path.join(paths.base_dir, name))
    if record:
        write_json(os.path.join(paths.base_dir, name.split("_")[0] + ".json"),
                   {"format": fmt})
    return path


class Records(disk_records.DiskRecords):
    """The cache's records, in the directories ``paths`` names."""

    def __init__(self, paths):
        super().__init__(conf=None)
        self._paths = paths

    @property
    def paths(self):
        return self._paths


def known(paths, path, given=None, records=Records):
    return disk_trust.known_format(records(paths), path, given,
                                   flag="--input-format")


# --- the cache's directories -------------------------------------------------

def test_cache_paths_are_those_of_the_cache(tmp_path):
    conf = fakes.conf(tmp_path, base_dir_name="cache")
    conf.set_override("disk_dirs", ["/srv/disks"], group="image_cache")
    paths = disk_trust.cache_paths(conf)
    instances = str(tmp_path / "instances")
    assert paths == disk_trust.CachePaths(
        instances, os.path.join(instances, "cache"),
        os.path.join(instances, "locks"), ("/srv/disks",))
    conf.set_override("lock_path", "/run/ib-locks", group="oslo_concurrency")
    assert disk_trust.cache_paths(conf).lock_dir == "/run/ib-locks"


# --- the registry ------------------------------------------------------------

def test_a_registered_disk_has_the_recorded_format(paths):
    qcow2_disk, raw_disk = disk(paths, "a"), disk(paths, "b")
    register(paths, qcow2_disk)
    register(paths, raw_disk, format="raw")
    assert known(paths, qcow2_disk) == "qcow2"
    assert known(paths, raw_disk) == "raw"
    # By real path too, when named through a symlink.
    link = os.path.join(paths.instances_path, "link")
    os.symlink(raw_disk, link)
    assert known(paths, link) == "raw"


def test_a_record_of_another_disk_does_not_count(paths):
    path = disk(paths)
    record = register(paths, path)
    with open(record) as f:
        data = json.load(f)
    data["disk"] = path + "-other"
    write_json(record, data)
    with pytest.raises(exception.DiskFormatUnknown):
        known(paths, path)


def test_a_record_not_tied_to_the_file_there_gives_no_format(paths):
    # A file put at a recorded path by anything else (or a record of an
    # earlier disk at that path) lends it no format.
    path = disk(paths)
    register(paths, path, tied=False, format="qcow2")
    with pytest.raises(exception.DiskFormatUnknown) as err:
        known(paths, path)
    assert "--input-format" in str(err.value)
    os.unlink(path)
    path = disk(paths)
    register(paths, path, cid=OTHER_CID, ino=1, dev=1, format="qcow2")
    with pytest.raises(exception.DiskFormatUnknown):
        known(paths, path)


@pytest.mark.parametrize("where", ["record", "cid", "disks"])
def test_the_registry_is_never_read_through_a_symlink(paths, tmp_path,
                                                      where):
    path = disk(paths)
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    key = hashlib.sha1(path.encode()).hexdigest() + ".json"
    planted = elsewhere / key
    write_json(planted, {"disk": path, "format": "qcow2"})
    disks_dir = os.path.join(paths.base_dir, ".disks")
    if where == "disks":
        os.symlink(elsewhere.parent, disks_dir)
        os.rename(elsewhere, elsewhere.parent / CID)
    else:
        os.makedirs(os.path.join(disks_dir, CID if where == "record"
                                 else OTHER_CID))
        if where == "record":
            os.symlink(planted, os.path.join(disks_dir, CID, key))
        else:
            os.symlink(elsewhere, os.path.join(disks_dir, CID))
    with pytest.raises(exception.DiskFormatUnknown):
        known(paths, path)


# --- bases -------------------------------------------------------------------

def test_a_base_has_its_record_format(paths):
    path = base(paths, fmt="qcow2")
    assert known(paths, path) == "qcow2"
    assert known(paths, path, "qcow2") == "qcow2"
    with pytest.raises(exception.InvalidDiskRequest):
        known(paths, path, "raw")


def test_a_sized_base_has_its_own_record_or_its_base_format(paths):
    base(paths, fmt="raw")
    sized = base(paths, CID + "_1048576", record=False)
    assert known(paths, sized) == "raw"
    write_json(sized + ".json", {"format": "qcow2"})
    assert known(paths, sized) == "qcow2"
    generation = base(paths, CID + "-3", fmt="vmdk")
    assert known(paths, generation) == "vmdk"


def test_a_symlinked_record_is_not_a_record(paths, tmp_path):
    path = base(paths, record=False)
    planted = write_json(tmp_path / "planted.json", {"format": "qcow2"})
    os.symlink(planted, path + ".json")
    with pytest.raises(exception.DiskFormatUnknown) as err:
        known(paths, path)
    assert "no valid record" in str(err.value)


@pytest.mark.parametrize("name", [CID + ".part", CID + ".json",
                                  CID + ".converted", "stray",
                                  ".disks/%s/x.json" % CID])
def test_only_bases_in_the_cache_are_images(paths, name):
    path = os.path.join(paths.base_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write(path)
    with pytest.raises(exception.DiskOperationError) as err:
        known(paths, path, "raw")
    assert "is not a base" in str(err.value)


def test_a_symlink_in_the_cache_is_never_followed(paths, tmp_path):
    target = write(tmp_path / "target")
    link = os.path.join(paths.base_dir, CID)
    os.symlink(target, link)
    write_json(link + ".json", {"format": "raw"})
    with pytest.raises(exception.DiskOperationError) as err:
        known(paths, link)
    assert "symlink" in str(err.value)


def test_lock_files_are_not_disks(paths):
    lock = write(os.path.join(paths.lock_dir, "x"))
    with pytest.raises(exception.DiskOperationError) as err:
        known(paths, lock, "raw")
    assert "lock directory" in str(err.value)


# --- backing files -----------------------------------------------------------

def check(paths, top, backing, fmt="raw", records=Records):
    disk_chain.check_backing(records(paths), top, top, backing, fmt)


def test_backing_files_may_be_in_the_instances_tree_and_disk_dirs(
        paths, tmp_path):
    top = disk(paths)
    check(paths, top, write(os.path.join(paths.instances_path, "b")))
    check(paths, top, disk(paths, "sibling"))
    check(paths, top, base(paths), "raw")
    extra = tmp_path / "extra" / "deep"
    extra.mkdir(parents=True)
    elsewhere = write(extra / "b")
    with pytest.raises(exception.DiskOperationError) as err:
        check(paths, top, elsewhere)
    assert "outside the directories" in str(err.value)
    assert "disk_dirs" in str(err.value)
    listed = disk_trust.CachePaths(paths.instances_path, paths.base_dir,
                                   paths.lock_dir, (str(tmp_path / "extra"),))
    check(listed, top, elsewhere)


def test_the_disk_own_directory_but_not_below_it(tmp_path, paths):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    top = write(outside / "top", fakes.qcow2_header(1024))
    check(paths, top, write(outside / "next-to-it"))
    with pytest.raises(exception.DiskOperationError):
        check(paths, top, write(outside / "sub" / "below-it"))


def test_a_symlink_out_of_the_allowed_directories_is_refused(paths):
    top = disk(paths)
    link = os.path.join(paths.instances_path, "vm", "passwd")
    os.symlink("/etc/passwd", link)
    with pytest.raises(exception.DiskOperationError) as err:
        check(paths, top, link)
    assert "really /etc/passwd" in str(err.value)


@pytest.mark.parametrize("fmt,recorded,found", [
    ("qcow2", "raw", "records it as raw"),
    ("raw", None, "without a valid record")])
def test_a_cached_backing_file_must_match_its_record(paths, fmt, recorded,
                                                     found):
    top = disk(paths)
    path = base(paths, fmt=recorded or "raw", record=recorded is not None)
    with pytest.raises(exception.DiskOperationError) as err:
        check(paths, top, path, fmt)
    assert found in str(err.value)


def test_cache_bookkeeping_and_locks_never_back_a_disk(paths):
    top = disk(paths)
    for path in (write(os.path.join(paths.base_dir, CID + ".part")),
                 write(os.path.join(paths.lock_dir, "x"))):
        with pytest.raises(exception.DiskOperationError) as err:
            check(paths, top, path)
        assert "is refused" in str(err.value)


def test_only_regular_files_back_a_disk(paths):
    top = disk(paths)
    directory = os.path.join(paths.instances_path, "vm", "dir")
    os.mkdir(directory)
    with pytest.raises(exception.DiskOperationError) as err:
        check(paths, top, directory)
    assert "not a regular file" in str(err.value)


# --- without the cache's records ---------------------------------------------

class Unrecorded(disk_trust.NoRecords):
    """No records, in the directories ``paths`` names."""

    def __init__(self, paths):
        super().__init__(conf=None)
        self._paths = paths

    @property
    def paths(self):
        return self._paths


no_records = Unrecorded


def test_without_records_the_paths_are_the_configured_ones(tmp_path):
    conf = fakes.conf(tmp_path)
    assert disk_trust.NoRecords(conf).paths == disk_trust.cache_paths(conf)
    assert disk_records.DiskRecords(conf).paths == \
        disk_trust.cache_paths(conf)


def test_without_records_nothing_in_the_cache_is_trusted(paths):
    qcow2_disk = disk(paths)
    register(paths, qcow2_disk)
    cached = base(paths, fmt="qcow2")
    assert known(paths, cached) == "qcow2"
    assert known(paths, qcow2_disk) == "qcow2"
    with pytest.raises(exception.DiskFormatUnknown) as err:
        known(paths, cached, records=no_records)
    assert "none of the cache's records" in str(err.value)
    with pytest.raises(exception.DiskFormatUnknown):
        known(paths, qcow2_disk, records=no_records)
    # The caller names the formats instead.
    assert known(paths, cached, "raw", records=no_records) == "raw"
    assert known(paths, qcow2_disk, "qcow2", records=no_records) == "qcow2"
    # A base backs a disk only when its record says what it is.
    check(paths, qcow2_disk, cached, "qcow2")
    with pytest.raises(exception.DiskOperationError) as err:
        check(paths, qcow2_disk, cached, "qcow2", records=no_records)
    assert "without a valid record" in str(err.value)
    # Locks are still no disks.
    lock = write(os.path.join(paths.lock_dir, "x"))
    with pytest.raises(exception.DiskOperationError) as err:
        known(paths, lock, "raw", records=no_records)
    assert "lock directory" in str(err.value)


# --- writing -----------------------------------------------------------------

def test_writes_into_the_cache_or_the_locks_are_refused(paths, tmp_path):
    os.symlink(paths.base_dir, tmp_path / "cache-link")
    for path in (os.path.join(paths.base_dir, "new"),
                 os.path.join(paths.base_dir, ".disks", CID, "x"),
                 os.path.join(paths.lock_dir, "new"),
                 str(tmp_path / "cache-link" / "new")):
        with pytest.raises(exception.CachePathRefused):
            disk_trust.refuse_cache_write(paths, path)
    disk_trust.refuse_cache_write(paths, disk(paths))
    disk_trust.refuse_cache_write(paths, str(tmp_path / "new"))
