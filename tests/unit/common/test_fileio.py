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

import errno
import json
import os
import time
from unittest import mock

import pytest

from imagebackend.common import fileio
from imagebackend.common import sparseio
from tests import fakes

MiB = 1024 * 1024


def test_sparse_writer_leaves_zero_blocks_as_holes(tmp_path):
    path = tmp_path / "out"
    data = b"x" * MiB + bytes(8 * MiB) + b"y" * 1000 + bytes(3 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = sparseio.SparseWriter(fd)
        for i in range(0, len(data), 3 * MiB + 7):
            writer.write(data[i:i + 3 * MiB + 7])
        assert writer.finish() == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert os.stat(path).st_blocks * 512 < 3 * MiB


def test_sparse_writer_holes_do_not_depend_on_chunking(tmp_path):
    block = sparseio.ZERO_BLOCK
    data = (bytes(3 * block) + b"d" * 10 + bytes(5 * block - 10)
            + b"e" * block + bytes(4 * block))
    for size in (len(data), block, 100 * 1024 + 3, 4097):
        path = tmp_path / ("out-%d" % size)
        with fileio.new_file(str(path)) as fd:
            writer = sparseio.SparseWriter(fd)
            for i in range(0, len(data), size):
                writer.write(data[i:i + size])
            assert writer.finish() == len(data)
        assert path.read_bytes() == data
        # At most the two blocks holding data are written, however the
        # stream is cut.
        assert os.stat(path).st_blocks * 512 <= 2 * block, size


def test_sparse_copy_copies_data_and_keeps_holes(tmp_path):
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(b"a" * MiB)
        f.seek(40 * MiB)
        f.write(b"b" * 12345)
    dst = tmp_path / "dst"
    with fileio.new_file(str(dst)) as fd:
        assert sparseio.sparse_copy(str(src), fd) == 64 * MiB
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 16


def test_new_file_removes_the_file_on_error(tmp_path):
    path = tmp_path / "f"
    written = []
    with pytest.raises(RuntimeError, match="boom"):
        with fileio.new_file(str(path)) as fd:
            written.append(os.write(fd, b"half"))
            assert path.read_bytes() == b"half"
            raise RuntimeError("boom")
    assert written == [4]
    assert not path.exists()


def test_new_file_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link"
    os.symlink(victim, link)
    with pytest.raises(FileExistsError):
        with fileio.new_file(str(link)):
            pass
    assert victim.read_text() == "keep"
    assert os.path.islink(link)


def test_write_json_atomic_round_trips(tmp_path):
    path = str(tmp_path / "r.json")
    fileio.write_json_atomic(path, {"a": 1})
    assert fileio.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]
    (tmp_path / "bad.json").write_text("{not json")
    assert fileio.read_json(str(tmp_path / "bad.json")) is None
    assert fileio.read_json(str(tmp_path / "missing.json")) is None


@pytest.fixture(autouse=True)
def _fresh_direct_io_answers():
    sparseio._DIRECT_IO.clear()
    yield
    sparseio._DIRECT_IO.clear()


def test_direct_io_is_probed_once_per_directory(tmp_path):
    with mock.patch.object(sparseio, "_probe_direct_io",
                           return_value=True) as probe:
        assert sparseio.direct_io_supported(str(tmp_path))
        assert sparseio.direct_io_supported(str(tmp_path) + "/")
        assert sparseio.direct_io_supported(str(tmp_path / "."))
    probe.assert_called_once_with(str(tmp_path))


def test_an_undecided_probe_is_not_remembered(tmp_path):
    with mock.patch.object(sparseio, "_probe_direct_io",
                           side_effect=[None, True]) as probe:
        assert not sparseio.direct_io_supported(str(tmp_path))
        assert sparseio.direct_io_supported(str(tmp_path))
    assert probe.call_count == 2


def test_a_filesystem_refusing_o_direct_answers_false(tmp_path):
    with mock.patch.object(os, "open", side_effect=OSError(errno.EINVAL,
                                                           "Invalid")):
        assert not sparseio.direct_io_supported(str(tmp_path))
    assert sparseio._DIRECT_IO == {str(tmp_path): False}


def test_a_failed_aligned_write_answers_false_and_leaves_no_file(tmp_path):
    with mock.patch.object(os, "write", side_effect=OSError(errno.EINVAL,
                                                            "Invalid")):
        assert sparseio._probe_direct_io(str(tmp_path)) is False
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_cannot_tell(tmp_path):
    assert sparseio._probe_direct_io(str(tmp_path / "missing")) is None


# --- data regions ------------------------------------------------------------

def open_half_sparse(tmp_path, data):
    """A 1 MiB file, holes but for ``data`` at 512 KiB, opened for reading.
    """
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(1024 * 1024)
        f.seek(512 * 1024)
        f.write(data)
    return os.open(path, os.O_RDONLY)


def test_data_extents_stop_at_the_size_asked_for(tmp_path):
    fd = open_half_sparse(tmp_path, b"x" * 4096)
    try:
        assert list(sparseio.data_extents(fd, 1024 * 1024)) == [
            (512 * 1024, 4096)]
        assert list(sparseio.data_extents(fd, 512 * 1024 + 10)) == [
            (512 * 1024, 10)]
        assert list(sparseio.data_extents(fd, 4096)) == []
    finally:
        os.close(fd)


def test_data_extents_without_hole_support_is_all_data():
    error = OSError(errno.EINVAL, "SEEK_DATA not supported")
    with mock.patch.object(os, "lseek", autospec=True, side_effect=error):
        assert list(sparseio.data_extents(3, 100)) == [(0, 100)]


def test_read_regions_reads_data_and_reports_holes(tmp_path):
    fd = open_half_sparse(tmp_path, b"x" * 8192)
    try:
        regions = list(sparseio.read_regions(fd, 1024 * 1024, 4096))
    finally:
        os.close(fd)
    assert regions == [(512 * 1024, None), (4096, b"x" * 4096),
                       (4096, b"x" * 4096), (512 * 1024 - 8192, None)]


def test_read_regions_stops_when_a_read_finds_the_end(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"y" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        # The file shrinks after its extents were found.
        with mock.patch.object(sparseio, "data_extents", autospec=True,
                               return_value=[(0, 20000)]):
            regions = list(sparseio.read_regions(fd, 30000, 4096))
    finally:
        os.close(fd)
    assert b"".join(data for _, data in regions) == b"y" * 10000
    assert all(data is not None for _, data in regions)


@pytest.mark.parametrize("data, expected", [
    (b"", True), (bytes(200000), True), (bytes(199999) + b"\x01", False),
    (b"\x01" + bytes(10), False), (memoryview(bytes(70000)), True),
])
def test_all_zeros(data, expected):
    assert sparseio.all_zeros(data) is expected


def _flushed_paths(calls):
    """A fake fdatasync recording the path of each descriptor it gets."""
    real = os.fdatasync

    def fdatasync(fd):
        calls.append(os.readlink("/proc/self/fd/%d" % fd))
        real(fd)
    return fdatasync


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_writeback_flushes_a_descriptor_while_it_is_written(tmp_path):
    path = str(tmp_path / "f")
    calls = []
    with mock.patch.object(os, "fdatasync", side_effect=_flushed_paths(
            calls)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            with sparseio.Writeback(fd=fd, batch=0, interval=0.001):
                os.write(fd, b"x" * 4096)
                _wait_for(lambda: len(calls) >= 2)
        finally:
            os.close(fd)
        count = len(calls)
        time.sleep(0.05)
    assert set(calls) == {path}
    assert len(calls) == count          # the thread stopped with the block


def test_writeback_flushes_once_per_batch_of_new_data(tmp_path):
    path = str(tmp_path / "f")
    calls = []
    block = os.urandom(64 * 1024)
    with mock.patch.object(os, "fdatasync", side_effect=_flushed_paths(
            calls)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            with sparseio.Writeback(fd=fd, batch=len(block) * 4,
                                    interval=0.001):
                time.sleep(0.05)
                assert calls == []              # nothing new: no flush
                for i in range(3):
                    os.write(fd, block)
                time.sleep(0.05)
                assert calls == []              # not a whole batch yet
                for i in range(5):
                    os.write(fd, block)
                _wait_for(lambda: calls)
                time.sleep(0.05)
                assert len(calls) <= 2          # 8 blocks: two batches
        finally:
            os.close(fd)


def test_writeback_opens_a_path_once_another_process_creates_it(tmp_path):
    path = str(tmp_path / "later")
    calls = []
    with mock.patch.object(os, "fdatasync", side_effect=_flushed_paths(
            calls)):
        with sparseio.Writeback(path=path, batch=0, interval=0.001):
            time.sleep(0.02)
            assert calls == []
            with open(path, "wb") as f:
                f.write(b"data")
            _wait_for(lambda: calls)
    assert set(calls) == {path}


@pytest.mark.parametrize("code,raised", [(errno.EIO, True),
                                         (errno.ENOSPC, True),
                                         (errno.EINVAL, False)])
def test_writeback_raises_a_write_error_when_the_block_ends(tmp_path, code,
                                                            raised):
    fd = os.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT)
    failed = []

    def fdatasync(fd):
        failed.append(fd)
        raise OSError(code, os.strerror(code))
    try:
        with mock.patch.object(os, "fdatasync", side_effect=fdatasync):
            writeback = sparseio.Writeback(fd=fd, batch=0, interval=0.001)
            if raised:
                with pytest.raises(OSError) as info:
                    with writeback:
                        _wait_for(lambda: failed)
                assert info.value.errno == code
            else:
                with writeback:
                    _wait_for(lambda: failed)
            assert len(failed) == 1     # no flush after the first error
    finally:
        os.close(fd)


def test_writeback_does_not_hide_the_error_that_ended_the_block(tmp_path):
    fd = os.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT)
    try:
        with mock.patch.object(os, "fdatasync",
                               side_effect=OSError(errno.EIO, "I/O error")):
            with pytest.raises(KeyError):
                with sparseio.Writeback(fd=fd, batch=0,
                                        interval=0.001) as wb:
                    _wait_for(lambda: wb._error is not None)
                    raise KeyError("the writer's own error")
    finally:
        os.close(fd)


def test_writeback_wants_exactly_one_of_fd_and_path():
    for kwargs in ({}, {"fd": 3, "path": "/x"}):
        with pytest.raises(ValueError):
            sparseio.Writeback(**kwargs)


def test_all_zeros_knows_views_of_the_hole_buffer_without_looking():
    view = memoryview(sparseio.HOLE)[100:300000]
    copy = bytes(view)
    # With a comparison block that is not zeros, only the shortcut can
    # answer True.
    ones = b"\x01" * sparseio.ZERO_BLOCK
    with mock.patch.object(sparseio, "_ZEROS", ones):
        assert sparseio.all_zeros(view)
        assert sparseio.all_zeros(view[7:])
        assert not sparseio.all_zeros(copy)
    assert sparseio.all_zeros(copy)


# -- temp names, no-replace publish, made directories -------------------------

def test_temp_beside_is_hidden_unique_and_within_name_max(tmp_path):
    final = str(tmp_path / ("d" * 255))
    paths = {fileio.temp_beside(final) for _ in range(20)}
    assert len(paths) == 20
    for path in paths:
        name = os.path.basename(path)
        assert name.startswith(".d") and name.endswith(".tmp")
        assert len(name.encode()) <= 255
        assert os.path.dirname(path) == str(tmp_path)
        assert os.stat(path).st_size == 0
        assert os.stat(path).st_mode & 0o777 == 0o644


def test_publish_names_the_file_and_removes_the_temp(tmp_path):
    tmp = tmp_path / ".t"
    tmp.write_bytes(b"mine")
    fileio.publish(str(tmp), str(tmp_path / "final"))
    assert (tmp_path / "final").read_bytes() == b"mine"
    assert not tmp.exists()


def test_publish_never_replaces_an_existing_name(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    final.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        fileio.publish(str(tmp), str(final))
    assert final.read_bytes() == b"theirs"
    assert tmp.read_bytes() == b"mine"
    # A dangling symlink is a name too, and is not followed.
    final.unlink()
    os.symlink(str(tmp_path / "nowhere"), str(final))
    with pytest.raises(FileExistsError):
        fileio.publish(str(tmp), str(final))
    assert not (tmp_path / "nowhere").exists()


def _no_links(*args, **kwargs):
    raise OSError(errno.EPERM, "Operation not permitted")


def test_without_hard_links_publish_renames_without_replacing(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    final.write_bytes(b"theirs")
    with mock.patch("os.link", side_effect=_no_links):
        with pytest.raises(FileExistsError):
            fileio.publish(str(tmp), str(final))
        assert final.read_bytes() == b"theirs"
        final.unlink()
        fileio.publish(str(tmp), str(final))
    assert final.read_bytes() == b"mine" and not tmp.exists()


def test_without_renameat2_publish_looks_before_renaming(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    final.write_bytes(b"theirs")
    with mock.patch("os.link", side_effect=_no_links), \
            mock.patch.object(fileio, "_renameat2", return_value=None):
        with pytest.raises(FileExistsError):
            fileio.publish(str(tmp), str(final))
        assert final.read_bytes() == b"theirs"
        final.unlink()
        fileio.publish(str(tmp), str(final))
    assert final.read_bytes() == b"mine"


def test_publish_undoes_its_name_if_it_cannot_be_made_durable(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    with mock.patch.object(fileio, "fsync_dir",
                           side_effect=OSError(errno.EIO, "I/O error")):
        with pytest.raises(OSError):
            fileio.publish(str(tmp), str(final))
    assert not final.exists()


def test_publish_fd_links_the_open_file_and_never_replaces(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"x" * 4096)
    final = str(tmp_path / "final")
    try:
        assert fileio.publish_fd(fd, path, final) is True
        assert not os.path.exists(path)
        assert os.path.samestat(os.fstat(fd), os.stat(final))
        other, fd2 = fakes.open_scratch(tmp_path, "o.part", b"other")
        assert fileio.publish_fd(fd2, other, final) is False
        os.close(fd2)
    finally:
        os.close(fd)
    with open(final, "rb") as f:
        assert f.read() == b"x" * 4096
    assert os.path.exists(other)        # left for its owner to remove


@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP])
def test_publish_fd_without_hard_links_renames_without_replacing(tmp_path,
                                                                 code):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"x" * 4096)
    final = str(tmp_path / "final")

    def no_links(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    try:
        with mock.patch.object(os, "link", side_effect=no_links):
            assert fileio.publish_fd(fd, path, final) is True
            other, fd2 = fakes.open_scratch(tmp_path, "o.part", b"other")
            assert fileio.publish_fd(fd2, other, final) is False
            os.close(fd2)
    finally:
        os.close(fd)
    with open(final, "rb") as f:
        assert f.read() == b"x" * 4096


def test_publish_fd_never_looks_before_renaming(tmp_path):
    """Without hard links and without renameat2 it fails rather than
    rename after a look another host could race.
    """
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"x")
    final = str(tmp_path / "final")
    try:
        with mock.patch("os.link", side_effect=_no_links), \
                mock.patch.object(fileio, "_renameat2", return_value=None):
            with pytest.raises(OSError) as err:
                fileio.publish_fd(fd, path, final)
    finally:
        os.close(fd)
    assert err.value.errno == errno.ENOSYS
    assert not os.path.exists(final) and os.path.exists(path)


def test_publish_fd_refuses_a_scratch_replaced_under_its_name(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"checked")
    os.unlink(path)
    _, fd2 = fakes.open_scratch(tmp_path, "s.part", b"swapped")
    os.close(fd2)
    final = str(tmp_path / "final")
    try:
        with mock.patch("os.link", side_effect=_no_links):
            with pytest.raises(OSError) as err:
                fileio.publish_fd(fd, path, final)
    finally:
        os.close(fd)
    assert err.value.errno == errno.ESTALE
    assert not os.path.exists(final)


def test_make_dirs_reports_and_undoes_only_what_it_made(tmp_path):
    (tmp_path / "old").mkdir()
    made = fileio.make_dirs(str(tmp_path / "old" / "a" / "b"))
    assert made == [str(tmp_path / "old" / "a"),
                    str(tmp_path / "old" / "a" / "b")]
    assert fileio.make_dirs(str(tmp_path / "old" / "a" / "b")) == []
    (tmp_path / "old" / "a" / "someone-elses").write_bytes(b"")
    fileio.remove_made_dirs(made)
    assert os.listdir(tmp_path / "old" / "a") == ["someone-elses"]
    (tmp_path / "old" / "a" / "someone-elses").unlink()
    fileio.remove_made_dirs(made)
    assert os.listdir(tmp_path / "old") == []


def test_make_dirs_refuses_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    with pytest.raises(NotADirectoryError):
        fileio.make_dirs(str(tmp_path / "link"))


# -- real_path ----------------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    """Directories, links to them, a dangling link, a loop and a file."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "f").write_bytes(b"")
    os.symlink(tmp_path / "a", tmp_path / "link")
    os.symlink("a/b", tmp_path / "relative")
    os.symlink(tmp_path / "cache" / "new", tmp_path / "dangling")
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    return tmp_path


@pytest.mark.parametrize("rel", [
    "", "a", "a/b", "link", "link/b", "link/b/x/y", "relative",
    "relative/x", "link/../a", "a//b", "a/b/", "dangling", "dangling/x",
    "f", "f/x", "loop1", "loop1/x", "missing", "missing/x/y",
    "a/missing/../b"])
def test_real_path_is_what_realpath_says(tree, rel):
    path = os.path.join(str(tree), rel)
    assert fileio.real_path(path) == os.path.realpath(path)


@pytest.mark.parametrize("path", ["/", "/nonexistent/x", "relative/x", ""])
def test_real_path_of_paths_outside_a_tree(path):
    assert fileio.real_path(path) == os.path.realpath(path)


def test_real_path_asks_the_kernel_once_for_what_exists(tree, monkeypatch):
    monkeypatch.setattr(os.path, "realpath", None)      # never used
    assert fileio.real_path(str(tree / "link" / "b" / "x" / "y")) == str(
        tree / "a" / "b" / "x" / "y")


@pytest.mark.parametrize("answer", [OSError(errno.ENOENT, "no /proc"),
                                    "(unreachable)/a", "/a (deleted)"])
def test_real_path_falls_back_where_proc_cannot_tell(tree, monkeypatch,
                                                     answer):
    real = os.readlink

    def readlink(path, *args, **kwargs):
        if not path.startswith("/proc/self/fd/"):
            return real(path, *args, **kwargs)
        if isinstance(answer, OSError):
            raise answer
        return answer
    monkeypatch.setattr(os, "readlink", readlink)
    assert fileio.real_path(str(tree / "link" / "b")) == str(
        tree / "a" / "b")


def test_real_path_of_a_directory_it_cannot_open(tree, monkeypatch):
    real = os.open

    def refused(path, flags, *args, **kwargs):
        if flags & os.O_PATH:
            raise PermissionError(errno.EACCES, "denied")
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refused)
    assert fileio.real_path(str(tree / "link" / "b")) == str(
        tree / "a" / "b")


def test_real_path_closes_what_it_opens(tree):
    before = set(os.listdir("/proc/self/fd"))
    fileio.real_path(str(tree / "link" / "b" / "x"))
    assert set(os.listdir("/proc/self/fd")) == before


# -- read_json without touching the access time -------------------------------

def test_read_json_leaves_the_access_time(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}')
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))   # atime < mtime
    assert fileio.read_json(str(path)) == {"a": 1}
    assert os.stat(path).st_atime_ns == 1_000_000_000


def test_read_json_of_a_file_owned_by_another_reads_it(tmp_path,
                                                       monkeypatch):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}')
    real = os.open
    flags = []

    def not_owner(p, f, *args, **kwargs):
        flags.append(f)
        if f & os.O_NOATIME:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(p, f, *args, **kwargs)
    monkeypatch.setattr(os, "open", not_owner)
    assert fileio.read_json(str(path)) == {"a": 1}
    assert [bool(f & os.O_NOATIME) for f in flags] == [True, False]
    assert all(f & os.O_NOFOLLOW and f & os.O_NONBLOCK for f in flags)


def test_read_json_of_an_unreadable_file_is_none(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}')
    calls = []

    def denied(p, f, *args, **kwargs):
        calls.append(f)
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(os, "open", denied)
    assert fileio.read_json(str(path)) is None
    assert len(calls) == 1      # not asked again without O_NOATIME


class _Shrunk:
    """An os.fstat result that says the file is smaller than it is (it
    grew after the look).
    """

    def __init__(self, st, size):
        self._st, self.st_size = st, size

    def __getattr__(self, name):
        return getattr(self._st, name)


@pytest.mark.parametrize("seen", [0, 1, 10, 40])
def test_read_json_reads_a_record_that_grew_since_its_size_was_seen(
        tmp_path, monkeypatch, seen):
    path = tmp_path / "r.json"
    body = {"a": "x" * 100}
    path.write_text(json.dumps(body))
    real = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: _Shrunk(real(fd), seen))
    assert fileio.read_json(str(path)) == body


@pytest.mark.parametrize("extra, read", [(0, True), (1, False)])
def test_read_json_reads_at_most_its_limit_even_if_it_grew(
        tmp_path, monkeypatch, extra, read):
    path = tmp_path / "r.json"
    text = '{"a": "%s"}' % ("x" * 200)
    path.write_text(text)
    real = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: _Shrunk(real(fd), 5))
    result = fileio.read_json(str(path), limit=len(text) - 1 + (1 - extra))
    assert (result is not None) is read


def test_read_json_of_a_small_record_asks_for_small_buffers(
        tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}')
    sizes = []
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: (sizes.append(n),
                                                   real(fd, n))[1])
    assert fileio.read_json(str(path)) == {"a": 1}
    # Its size and one byte, then a block to see the end.
    assert sizes == [len('{"a": 1}') + 1, fileio._READ_BLOCK]


def test_read_json_reads_on_after_a_short_read(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    text = '{"a": "%s"}' % ("x" * 300)
    path.write_text(text)
    real = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real(fd, min(n, 7)))
    assert fileio.read_json(str(path)) == json.loads(text)
    assert fileio.read_json(str(path), limit=len(text) - 1) is None


def test_read_json_closes_the_record_when_a_read_fails(tmp_path,
                                                       monkeypatch):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}')

    def fails(fd, n):
        raise OSError(errno.EIO, "I/O error")
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "read", fails)
    assert fileio.read_json(str(path)) is None
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before
