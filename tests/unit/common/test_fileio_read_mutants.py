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

"""read_json's limit when a record grew after its size was seen, and
real_path on a FIFO, exactly.
"""

import os

from imagebackend.common import fileio
from tests.unit.common import test_fileio


def test_a_record_that_grew_past_its_limit_is_refused_not_cut(
        tmp_path, monkeypatch):
    # Cut one byte short it would be valid JSON.
    path = tmp_path / "r.json"
    path.write_text('{"a": 1} ')
    real = os.fstat
    monkeypatch.setattr(os, "fstat",
                        lambda fd: test_fileio._Shrunk(real(fd), 2))
    assert fileio.read_json(str(path), limit=8) is None
    assert fileio.read_json(str(path), limit=9) == {"a": 1}


def test_real_path_of_a_fifo_does_not_wait_for_a_writer(tmp_path):
    # Opened to read, a FIFO would block until a writer came.
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    assert fileio.real_path(fifo) == os.path.realpath(fifo)
    assert fileio.real_path(os.path.join(fifo, "x")) == os.path.realpath(
        os.path.join(fifo, "x"))


def test_a_record_that_grew_is_read_no_further_than_its_limit(
        tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_bytes(b" " * (300 * 1024))
    real_fstat, real_read = os.fstat, os.read
    read = []
    monkeypatch.setattr(os, "fstat",
                        lambda fd: test_fileio._Shrunk(real_fstat(fd), 0))
    monkeypatch.setattr(os, "read", lambda fd, n: (
        lambda data: (read.append(len(data)), data)[1])(real_read(fd, n)))
    assert fileio.read_json(str(path), limit=100 * 1024) is None
    assert sum(read) == 100 * 1024 + 1
