import errno
import os
from unittest import mock

import pytest

from imagebackend import fileutils

MiB = 1024 * 1024


def test_sparse_writer_leaves_zero_blocks_as_holes(tmp_path):
    path = tmp_path / "out"
    data = b"x" * MiB + bytes(8 * MiB) + b"y" * 1000 + bytes(3 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        writer = fileutils.SparseWriter(fd)
        for i in range(0, len(data), 3 * MiB + 7):
            writer.write(data[i:i + 3 * MiB + 7])
        assert writer.finish() == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    assert os.stat(path).st_blocks * 512 < 3 * MiB


def test_sparse_writer_holes_do_not_depend_on_chunking(tmp_path):
    block = fileutils.ZERO_BLOCK
    data = (bytes(3 * block) + b"d" * 10 + bytes(5 * block - 10)
            + b"e" * block + bytes(4 * block))
    for size in (len(data), block, 100 * 1024 + 3, 4097):
        path = tmp_path / ("out-%d" % size)
        with fileutils.new_file(str(path)) as fd:
            writer = fileutils.SparseWriter(fd)
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
    with fileutils.new_file(str(dst)) as fd:
        assert fileutils.sparse_copy(str(src), fd) == 64 * MiB
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 16


def test_new_file_removes_the_file_on_error(tmp_path):
    path = tmp_path / "f"
    try:
        with fileutils.new_file(str(path)) as fd:
            os.write(fd, b"half")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not path.exists()


def test_new_file_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link"
    os.symlink(victim, link)
    try:
        with fileutils.new_file(str(link)):
            pass
    except FileExistsError:
        pass
    else:
        raise AssertionError("a symlink was opened for writing")
    assert victim.read_text() == "keep"


def test_write_json_atomic_round_trips(tmp_path):
    path = str(tmp_path / "r.json")
    fileutils.write_json_atomic(path, {"a": 1})
    assert fileutils.read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]
    (tmp_path / "bad.json").write_text("{not json")
    assert fileutils.read_json(str(tmp_path / "bad.json")) is None
    assert fileutils.read_json(str(tmp_path / "missing.json")) is None


@pytest.fixture(autouse=True)
def _fresh_direct_io_answers():
    fileutils._DIRECT_IO.clear()
    yield
    fileutils._DIRECT_IO.clear()


def test_direct_io_is_probed_once_per_directory(tmp_path):
    with mock.patch.object(fileutils, "_probe_direct_io",
                           return_value=True) as probe:
        assert fileutils.direct_io_supported(str(tmp_path))
        assert fileutils.direct_io_supported(str(tmp_path) + "/")
        assert fileutils.direct_io_supported(str(tmp_path / "."))
    probe.assert_called_once_with(str(tmp_path))


def test_an_undecided_probe_is_not_remembered(tmp_path):
    with mock.patch.object(fileutils, "_probe_direct_io",
                           side_effect=[None, True]) as probe:
        assert not fileutils.direct_io_supported(str(tmp_path))
        assert fileutils.direct_io_supported(str(tmp_path))
    assert probe.call_count == 2


def test_a_filesystem_refusing_o_direct_answers_false(tmp_path):
    with mock.patch.object(os, "open", side_effect=OSError(errno.EINVAL,
                                                           "Invalid")):
        assert not fileutils.direct_io_supported(str(tmp_path))
    assert fileutils._DIRECT_IO == {str(tmp_path): False}


def test_a_failed_aligned_write_answers_false_and_leaves_no_file(tmp_path):
    with mock.patch.object(os, "write", side_effect=OSError(errno.EINVAL,
                                                            "Invalid")):
        assert fileutils._probe_direct_io(str(tmp_path)) is False
    assert os.listdir(tmp_path) == []


def test_a_missing_directory_cannot_tell(tmp_path):
    assert fileutils._probe_direct_io(str(tmp_path / "missing")) is None


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
        assert list(fileutils.data_extents(fd, 1024 * 1024)) == [
            (512 * 1024, 4096)]
        assert list(fileutils.data_extents(fd, 512 * 1024 + 10)) == [
            (512 * 1024, 10)]
        assert list(fileutils.data_extents(fd, 4096)) == []
    finally:
        os.close(fd)


def test_data_extents_without_hole_support_is_all_data():
    error = OSError(errno.EINVAL, "SEEK_DATA not supported")
    with mock.patch.object(os, "lseek", autospec=True, side_effect=error):
        assert list(fileutils.data_extents(3, 100)) == [(0, 100)]


def test_read_regions_reads_data_and_reports_holes(tmp_path):
    fd = open_half_sparse(tmp_path, b"x" * 8192)
    try:
        regions = list(fileutils.read_regions(fd, 1024 * 1024, 4096))
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
        with mock.patch.object(fileutils, "data_extents", autospec=True,
                               return_value=[(0, 20000)]):
            regions = list(fileutils.read_regions(fd, 30000, 4096))
    finally:
        os.close(fd)
    assert b"".join(data for _, data in regions) == b"y" * 10000
    assert all(data is not None for _, data in regions)


@pytest.mark.parametrize("data, expected", [
    (b"", True), (bytes(200000), True), (bytes(199999) + b"\x01", False),
    (b"\x01" + bytes(10), False), (memoryview(bytes(70000)), True),
])
def test_all_zeros(data, expected):
    assert fileutils.all_zeros(data) is expected
