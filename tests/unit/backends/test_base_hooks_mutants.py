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

"""``delete_disk`` of the file backends, exactly: the error a caller gets
for a missing disk, for a file the library did not make and for a disk
that cannot be removed, and the line logged for a removal.
"""

import errno
import logging
import os
from unittest import mock

import pytest

from imagebackend.backends import base
from imagebackend.common import fileio
from imagebackend import exception
from tests.unit.backends import test_backends

SIZE = 4 * 1024 * 1024
qemu = test_backends.qemu
load = test_backends.load


def test_a_missing_disk_names_its_path(tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    target = str(tmp_path / "vm" / "nothing")
    with pytest.raises(exception.DiskNotFound) as err:
        backend.delete_disk(target)
    assert err.value.kwargs == {"path": target}
    assert str(err.value) == ("Disk %s does not exist; check the path."
                              % target)


def test_a_file_not_made_here_is_refused_saying_why_and_what_to_do(
        tmp_path, qemu):
    backend = load(tmp_path, qemu, "qcow2")
    stranger = tmp_path / "other"
    stranger.write_bytes(b"not ours")
    with pytest.raises(exception.DiskOperationError) as err:
        backend.delete_disk(str(stranger))
    assert type(err.value) is exception.DiskOperationError
    assert err.value.kwargs["path"] == str(stranger)
    assert str(err.value) == (
        "Disk %s: no record of the image cache says this library made it, "
        "so it is not removed; remove it yourself if it is yours"
        % stranger)
    assert stranger.read_bytes() == b"not ours"


@pytest.mark.parametrize("name", ["qcow2", "raw", "cached-base"])
def test_a_removal_is_logged_naming_backend_disk_and_image(tmp_path, qemu,
                                                           caplog, name):
    backend = load(tmp_path, qemu, name)
    target = str(tmp_path / "vm" / "disk")
    backend.create_image("img", target, SIZE)
    caplog.set_level(logging.INFO, logger=base.__name__)
    caplog.clear()
    backend.delete_disk(target)
    assert [r.getMessage() for r in caplog.records
            if r.name == base.__name__] == [
        "Deleted %s disk %s of image img" % (name, target)]


@pytest.mark.parametrize("step, error", [
    ("unlink", errno.EACCES), ("unlink", errno.EROFS),
    ("unlink", errno.EINVAL), ("fsync_dir", errno.EIO)])
def test_a_disk_that_cannot_be_removed_says_so_and_keeps_its_record(
        tmp_path, qemu, step, error):
    backend = load(tmp_path, qemu, "qcow2")
    target = str(tmp_path / "vm" / "disk")
    backend.create_image("img", target, SIZE)
    [record] = list(backend.cache.scanner.registry.records())
    owner = os if step == "unlink" else fileio
    with mock.patch.object(owner, step,
                           side_effect=OSError(error, os.strerror(error))):
        with pytest.raises(exception.DiskOperationError) as err:
            backend.delete_disk(target)
    assert type(err.value) is exception.DiskOperationError
    assert err.value.kwargs["path"] == target
    assert str(err.value) == (
        "Disk %s: it could not be removed (%s); it keeps its record of "
        "the image cache, so delete it again once that is fixed"
        % (target, os.strerror(error)))
    assert isinstance(err.value.__cause__, OSError)
    assert list(backend.cache.scanner.registry.records()) == [record]
    if step == "unlink":
        assert os.path.exists(target)
