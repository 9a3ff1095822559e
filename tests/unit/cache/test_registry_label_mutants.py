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

"""The done label of a registry record, exactly: what is logged when it
cannot be set, and that it is never read through a symlink.
"""

import errno
import logging
import os

from imagebackend.cache import registry as cache_registry


def test_a_label_that_cannot_be_set_is_logged_with_the_record(
        tmp_path, monkeypatch, caplog):
    path = str(tmp_path / "r.json")
    with open(path, "w") as f:
        f.write("{}")

    def unsupported(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(os, "setxattr", unsupported)
    with caplog.at_level(logging.DEBUG, logger=cache_registry.__name__):
        assert cache_registry._label_done(path) is False
    assert [r.getMessage() for r in caplog.records] == [
        "Cannot label registry record %s done: [Errno %d] Operation not "
        "supported" % (path, errno.EOPNOTSUPP)]


def test_a_label_is_set_on_the_record_itself(tmp_path):
    path = str(tmp_path / "r.json")
    with open(path, "w") as f:
        f.write("{}")
    assert cache_registry._label_done(path) is True
    assert os.getxattr(path, cache_registry.STATE_XATTR) == b"done"


def test_the_label_of_a_file_a_symlink_points_at_is_not_read(tmp_path):
    target = tmp_path / "target.json"
    target.write_bytes(b"{}")
    os.setxattr(target, cache_registry.STATE_XATTR, b"done")
    link = tmp_path / "r.json"
    os.symlink(target, link)
    assert cache_registry._labelled_done(str(target)) is True
    assert cache_registry._labelled_done(str(link)) is False


def test_a_record_without_a_label_is_not_labelled_done(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"{}")
    assert cache_registry._labelled_done(str(path)) is False
    assert cache_registry._labelled_done(str(tmp_path / "gone")) is False
