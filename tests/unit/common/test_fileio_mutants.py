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

"""The exact behaviour of the file primitives: flags, modes, names, limits
and what each leaves on disk after a failure."""

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import re
import threading
from unittest import mock

import pytest

from imagebackend.common import fileio
from tests import fakes


@pytest.fixture
def umask():
    """Run with a umask that would strip group/other read bits."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def cloexec(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


@pytest.fixture
def synced():
    """(path, close-on-exec) of every descriptor fsynced or fdatasynced."""
    seen = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def record(real):
        def call(fd):
            seen.append((os.readlink("/proc/self/fd/%d" % fd), cloexec(fd)))
            return real(fd)
        return call

    with mock.patch.object(os, "fsync", side_effect=record(real_fsync)), \
            mock.patch.object(os, "fdatasync",
                              side_effect=record(real_fdatasync)):
        yield seen


# -- fsync helpers ------------------------------------------------------------

def test_fsync_dir_syncs_the_directory_and_refuses_a_file(tmp_path, synced):
    fileio.fsync_dir(str(tmp_path))
    assert [p for p, _ in synced] == [str(tmp_path)]
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(NotADirectoryError):
        fileio.fsync_dir(str(tmp_path / "f"))


@pytest.mark.parametrize("func", [fileio.fsync_path, fileio.fdatasync_path])
def test_fsync_path_syncs_the_file_never_through_a_symlink(tmp_path, synced,
                                                           func):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    func(str(path))
    assert synced == [(str(path), True)]
    os.symlink(str(path), str(tmp_path / "link"))
    with pytest.raises(OSError) as err:
        func(str(tmp_path / "link"))
    assert err.value.errno == errno.ELOOP
    assert len(synced) == 1


def test_fdatasync_path_does_not_fsync(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with mock.patch.object(os, "fsync") as fsync, \
            mock.patch.object(os, "fdatasync") as fdatasync:
        fileio.fdatasync_path(str(path))
    fsync.assert_not_called()
    fdatasync.assert_called_once()


# -- directories --------------------------------------------------------------

def test_ensure_dir_creates_parents_with_the_mode(tmp_path):
    old = os.umask(0)
    try:
        fileio.ensure_dir(str(tmp_path / "a" / "b"))
        fileio.ensure_dir(str(tmp_path / "c"), mode=0o700)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a" / "b").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "c").st_mode & 0o777 == 0o700
    fileio.ensure_dir(str(tmp_path / "a" / "b"))        # exists: fine


def test_ensure_dir_refuses_a_symlink_to_a_directory(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "link"))
    with pytest.raises(NotADirectoryError) as err:
        fileio.ensure_dir(str(tmp_path / "link"))
    assert err.value.errno == errno.ENOTDIR
    assert err.value.strerror == "not a directory (or a symlink)"
    assert err.value.filename == str(tmp_path / "link")


def test_make_dirs_uses_the_mode_and_undoes_a_failure(tmp_path):
    real = os.mkdir
    made = []

    def mkdir(path, mode=0o777):
        if path.endswith("c"):
            raise OSError(errno.ENOSPC, "No space left on device")
        made.append(mode)
        return real(path, mode)

    with mock.patch.object(os, "mkdir", side_effect=mkdir):
        with pytest.raises(OSError) as err:
            fileio.make_dirs(str(tmp_path / "a" / "b" / "c"))
    assert err.value.errno == errno.ENOSPC
    assert made == [0o755, 0o755]
    assert os.listdir(tmp_path) == []


def test_make_dirs_leaves_a_directory_made_meanwhile_to_its_maker(tmp_path):
    real = os.mkdir

    def mkdir(path, mode=0o777):
        if path == str(tmp_path / "a"):
            real(path, mode)            # another process, just before us
            raise FileExistsError(errno.EEXIST, "File exists", path)
        return real(path, mode)

    with mock.patch.object(os, "mkdir", side_effect=mkdir):
        made = fileio.make_dirs(str(tmp_path / "a" / "b"))
    assert made == [str(tmp_path / "a" / "b")]
    assert os.path.isdir(tmp_path / "a" / "b")


def test_make_dirs_refuses_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError) as err:
        fileio.make_dirs(str(tmp_path / "f"))
    assert err.value.errno == errno.ENOTDIR
    assert err.value.strerror == "not a directory (or a symlink)"
    assert err.value.filename == str(tmp_path / "f")


def test_make_dirs_of_the_root_makes_nothing():
    assert fileio.make_dirs("/") == []


def test_make_dirs_climbs_no_higher_than_the_root(tmp_path):
    real = os.path.lexists

    def lexists(path):
        # As if nothing existed at all, the root included.
        return False if path.startswith("/") else real(path)

    with mock.patch.object(os.path, "lexists", side_effect=lexists), \
            mock.patch.object(os, "mkdir", side_effect=FileExistsError(
                errno.EEXIST, "File exists")) as mkdir:
        with pytest.raises(FileNotFoundError):
            fileio.make_dirs(str(tmp_path / "x"))
    tried = [c.args[0] for c in mkdir.call_args_list]
    assert tried[0] == "/" and tried[-1] == str(tmp_path / "x")
    assert len(tried) == len(tmp_path.parts) + 1


def test_remove_made_dirs_goes_on_past_one_already_gone(tmp_path):
    (tmp_path / "a").mkdir()
    made = [str(tmp_path / "a"), str(tmp_path / "a" / "b")]
    fileio.remove_made_dirs(made)
    assert os.listdir(tmp_path) == []


def test_remove_made_dirs_stops_at_the_first_not_empty(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "keep").write_bytes(b"")
    made = [str(tmp_path / "a"), str(tmp_path / "a" / "b"),
            str(tmp_path / "a" / "b" / "c")]
    with mock.patch.object(os, "rmdir", wraps=os.rmdir) as rmdir:
        fileio.remove_made_dirs(made)
    assert [c.args[0] for c in rmdir.call_args_list] == made[:0:-1]
    assert os.listdir(tmp_path / "a" / "b") == ["keep"]


# -- removing -----------------------------------------------------------------

def test_remove_quietly_says_whether_it_removed(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    assert fileio.remove_quietly(str(tmp_path / "f")) is True
    assert fileio.remove_quietly(str(tmp_path / "f")) is False
    assert not (tmp_path / "f").exists()


def test_remove_if_same_removes_only_that_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"1")
    st = os.lstat(path)
    os.rename(path, tmp_path / "kept")     # its inode stays in use
    path.write_bytes(b"2")
    other = os.lstat(path)
    assert fileio.remove_if_same(str(path), st) is False
    assert path.read_bytes() == b"2"
    assert fileio.remove_if_same(str(path), other) is True
    assert not path.exists()
    assert fileio.remove_if_same(str(path), other) is False


def test_remove_regular_removes_only_a_regular_file(tmp_path, caplog):
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "d").mkdir()
    os.mkfifo(str(tmp_path / "p"))
    for name in ("f", "d", "p", "missing"):
        fileio.remove_regular(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["d", "p"]
    assert caplog.records == []


def test_remove_regular_logs_what_it_cannot_remove(tmp_path, caplog):
    (tmp_path / "f").write_bytes(b"")
    path = str(tmp_path / "f" / "under-a-file")
    with caplog.at_level(logging.WARNING, logger=fileio.__name__):
        fileio.remove_regular(path)
    assert [r.getMessage() for r in caplog.records] == [
        "Could not remove partial file %s: [Errno 20] Not a directory: %r"
        % (path, path)]


# -- JSON records -------------------------------------------------------------

def test_write_json_atomic_writes_sorted_indented_json(tmp_path, synced,
                                                       umask):
    path = str(tmp_path / "r.json")
    fileio.write_json_atomic(path, {"b": 2, "a": [1]})
    with open(path) as f:
        assert f.read() == '{\n "a": [\n  1\n ],\n "b": 2\n}\n'
    assert os.stat(path).st_mode & 0o777 == 0o644
    names = [p for p, _ in synced]
    assert len(names) == 2
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/\.[^/]*\.json\.tmp",
                        names[0])
    assert names[1] == str(tmp_path)
    assert os.listdir(tmp_path) == ["r.json"]


def test_a_record_that_need_not_be_durable_is_not_fsynced(tmp_path, synced):
    path = str(tmp_path / "r.json")
    fileio.write_json_atomic(path, {"a": 1}, durable=False)
    assert synced == []
    assert fileio.read_json(path) == {"a": 1}


def test_the_temporary_record_is_hidden_beside_the_final_one(tmp_path):
    renamed = []
    real = os.rename

    def rename(src, dst):
        renamed.append((src, dst))
        return real(src, dst)

    path = str(tmp_path / "r.json")
    with mock.patch.object(os, "rename", side_effect=rename):
        fileio.write_json_atomic(path, {"a": 1})
    [(src, dst)] = renamed
    assert dst == path
    assert os.path.dirname(src) == str(tmp_path)
    assert os.path.basename(src).startswith(".")
    assert src.endswith(".json.tmp")


def test_a_record_that_cannot_be_renamed_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.mkdir()                        # a directory is in the way
    with pytest.raises(OSError):
        fileio.write_json_atomic(str(path), {"a": 1})
    assert os.listdir(tmp_path) == ["r.json"]
    assert os.listdir(path) == []


@pytest.mark.parametrize("content,expected", [
    (b"", None), (b"[1, 2]", None), (b"7", None), (b"{\"a\": 1}", {"a": 1}),
    (b"{not json", None)])
def test_read_json_returns_only_objects(tmp_path, content, expected):
    (tmp_path / "r.json").write_bytes(content)
    assert fileio.read_json(str(tmp_path / "r.json")) == expected


def test_read_json_reads_at_most_its_limit(tmp_path):
    path = str(tmp_path / "r.json")
    record = b'{"a": "' + b"x" * (1024 * 1024 - 9) + b'"}'
    assert len(record) == 1024 * 1024
    with open(path, "wb") as f:
        f.write(record)
    assert fileio.read_json(path) == {"a": "x" * (1024 * 1024 - 9)}
    with open(path, "wb") as f:
        f.write(record + b" ")
    assert fileio.read_json(path) is None
    with open(path, "wb") as f:
        f.write(b'{"a": 12}')
    assert fileio.read_json(path, limit=9) == {"a": 12}
    assert fileio.read_json(path, limit=8) is None


def test_read_json_limits_bytes_not_characters(tmp_path):
    path = str(tmp_path / "r.json")
    with open(path, "wb") as f:
        f.write('{"a":"\u00e9"}'.encode())      # 10 bytes, 9 characters
    assert fileio.read_json(path, limit=10) == {"a": "\u00e9"}
    assert fileio.read_json(path, limit=9) is None


def test_read_json_never_reads_more_than_one_byte_past_its_limit(tmp_path):
    path = str(tmp_path / "r.json")
    with open(path, "wb") as f:
        f.write(b" " * 100)
    sizes = []
    real = os.read

    def read(fd, size):
        sizes.append(size)
        return real(fd, size)
    with mock.patch.object(os, "read", side_effect=read):
        assert fileio.read_json(path, limit=10) is None
    assert sizes == [11]


def test_read_json_never_follows_a_symlink(tmp_path, caplog):
    target = tmp_path / "target.json"
    target.write_bytes(b'{"a": 1}')
    link = str(tmp_path / "r.json")
    os.symlink(str(target), link)
    with caplog.at_level(logging.WARNING, logger=fileio.__name__):
        assert fileio.read_json(link) is None
    assert [r.getMessage() for r in caplog.records] == [
        "Ignoring record %s: it is a symlink, which is never followed"
        % link]


def test_read_json_warns_of_an_unreadable_record(tmp_path, caplog):
    (tmp_path / "f").write_bytes(b"")
    path = str(tmp_path / "f" / "r.json")
    with caplog.at_level(logging.WARNING, logger=fileio.__name__):
        assert fileio.read_json(path) is None
    assert [r.getMessage() for r in caplog.records] == [
        "Ignoring unreadable metadata record %s: [Errno 20] Not a "
        "directory: %r" % (path, path)]


def test_read_json_warns_of_a_record_that_is_not_json(tmp_path, caplog):
    path = str(tmp_path / "r.json")
    with open(path, "wb") as f:
        f.write(b'{"a": 12}')
    with caplog.at_level(logging.WARNING, logger=fileio.__name__):
        assert fileio.read_json(path, limit=8) is None
    assert [r.getMessage() for r in caplog.records] == [
        "Ignoring unreadable metadata record %s: larger than 8 bytes"
        % path]


def test_read_json_missing_is_quietly_none(tmp_path, caplog):
    assert fileio.read_json(str(tmp_path / "missing.json")) is None
    assert caplog.records == []


def test_read_json_never_blocks_on_a_fifo(tmp_path, caplog):
    path = str(tmp_path / "r.json")
    os.mkfifo(path)
    got = []
    reader = threading.Thread(target=lambda: got.append(
        fileio.read_json(path)), daemon=True)
    with caplog.at_level(logging.WARNING, logger=fileio.__name__):
        reader.start()
        reader.join(10)
        blocked = reader.is_alive()
        if blocked:                     # release it before failing
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
    assert not blocked
    assert got == [None]
    assert [r.getMessage() for r in caplog.records] == [
        "Ignoring metadata record %s: not a regular file" % path]


def test_read_json_closes_its_descriptor(tmp_path):
    path = str(tmp_path / "r.json")
    with open(path, "wb") as f:
        f.write(b'{"a": 1}')
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        fileio.read_json(path)
    assert set(os.listdir("/proc/self/fd")) == before


# -- new files ----------------------------------------------------------------

def test_new_file_has_its_mode_whatever_the_umask(tmp_path, umask):
    with fileio.new_file(str(tmp_path / "a")) as fd:
        assert cloexec(fd)
        os.write(fd, b"data")
    with fileio.new_file(str(tmp_path / "b"), mode=0o600):
        pass
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b").st_mode & 0o777 == 0o600
    assert (tmp_path / "a").read_bytes() == b"data"


def test_new_file_never_opens_an_existing_file(tmp_path):
    (tmp_path / "a").write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        with fileio.new_file(str(tmp_path / "a")):
            pass
    assert (tmp_path / "a").read_bytes() == b"theirs"


def test_new_file_closes_its_descriptor(tmp_path):
    with fileio.new_file(str(tmp_path / "a")) as fd:
        pass
    with pytest.raises(OSError) as err:
        os.fstat(fd)
    assert err.value.errno == errno.EBADF


def test_temp_beside_names_exactly(tmp_path, umask):
    path = fileio.temp_beside(str(tmp_path / "base"))
    assert re.fullmatch(r"\.base\.[0-9a-f]{16}\.tmp", os.path.basename(path))
    assert os.path.dirname(path) == str(tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o644
    other = fileio.temp_beside(str(tmp_path / "x"), mode=0o600)
    assert os.stat(other).st_mode & 0o777 == 0o600


def test_temp_beside_keeps_a_long_name_at_exactly_name_max(tmp_path):
    path = fileio.temp_beside(str(tmp_path / ("d" * 300)))
    name = os.path.basename(path)
    assert len(name) == 255
    assert name == "." + "d" * (255 - 1 - 21) + name[-21:]


def test_temp_beside_keeps_bytes_that_are_not_utf8(tmp_path):
    final = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")
    path = fileio.temp_beside(final)
    # The undecodable byte is dropped, never an error.
    assert re.fullmatch(r"\.caf\.[0-9a-f]{16}\.tmp", os.path.basename(path))


def test_temp_beside_never_cuts_a_character_in_half(tmp_path):
    path = fileio.temp_beside(str(tmp_path / ("\u00e9" * 200)))
    name = os.path.basename(path)
    # 233 bytes of room hold 116 two-byte characters and half of one.
    assert name[1:-21] == "\u00e9" * 116
    assert len(name.encode()) == 254


def test_temp_beside_removes_a_file_it_cannot_set_up(tmp_path):
    with mock.patch.object(os, "fchmod",
                           side_effect=OSError(errno.EIO, "I/O error")):
        with pytest.raises(OSError) as err:
            fileio.temp_beside(str(tmp_path / "base"))
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == []


def test_temp_beside_never_follows_a_symlink(tmp_path):
    with mock.patch("secrets.token_hex", return_value="0" * 16):
        os.symlink(str(tmp_path / "victim"),
                   str(tmp_path / (".base.%s.tmp" % ("0" * 16))))
        with pytest.raises(FileExistsError):
            fileio.temp_beside(str(tmp_path / "base"))
    assert not (tmp_path / "victim").exists()


# -- publishing ---------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK])
def test_publish_renames_where_there_are_no_hard_links(tmp_path, code):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")

    def no_links(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    with mock.patch.object(os, "link", side_effect=no_links):
        fileio.publish(str(tmp), str(final))
    assert final.read_bytes() == b"mine"
    assert os.listdir(tmp_path) == ["final"]


def test_publish_raises_other_link_errors(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    with mock.patch.object(os, "link", side_effect=OSError(
            errno.EIO, "I/O error")):
        with pytest.raises(OSError) as err:
            fileio.publish(str(tmp), str(final))
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == [".t"]


def test_publish_links_a_symlink_itself(tmp_path):
    (tmp_path / "target").write_bytes(b"t")
    os.symlink("target", str(tmp_path / ".t"))
    fileio.publish(str(tmp_path / ".t"), str(tmp_path / "final"))
    assert os.readlink(tmp_path / "final") == "target"


def test_publish_makes_the_directory_durable(tmp_path, synced):
    tmp = tmp_path / ".t"
    tmp.write_bytes(b"mine")
    fileio.publish(str(tmp), str(tmp_path / "final"))
    assert [p for p, _ in synced] == [str(tmp_path)]


def test_publish_undoes_its_name_if_the_temp_cannot_be_removed(tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    real = os.unlink

    def unlink(path):
        if path == str(tmp):
            raise OSError(errno.EIO, "I/O error")
        return real(path)

    with mock.patch.object(os, "unlink", side_effect=unlink):
        with pytest.raises(OSError) as err:
            fileio.publish(str(tmp), str(final))
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == [".t"]


def test_publish_without_links_undoes_a_rename_it_cannot_make_durable(
        tmp_path):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    with mock.patch.object(os, "link", side_effect=OSError(
            errno.EPERM, "no")), \
            mock.patch.object(fileio, "fsync_dir", side_effect=OSError(
                errno.EIO, "I/O error")):
        with pytest.raises(OSError) as err:
            fileio.publish(str(tmp), str(final))
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == []


def test_publish_fd_with_a_name_in_the_current_directory(tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    try:
        assert fileio.publish_fd(fd, "s.part", "final") is True
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["final"]


def test_publish_fd_links_by_descriptor_into_its_directory(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    seen = []
    real = os.link

    def link(src, dst, *, dst_dir_fd):
        seen.append((src, dst, cloexec(dst_dir_fd),
                     os.readlink("/proc/self/fd/%d" % dst_dir_fd)))
        return real(src, dst, dst_dir_fd=dst_dir_fd)

    try:
        with mock.patch.object(os, "link", side_effect=link):
            assert fileio.publish_fd(fd, path, str(tmp_path / "f")) is True
    finally:
        os.close(fd)
    assert seen == [("/proc/self/fd/%d" % fd, "f", True, str(tmp_path))]


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.EXDEV, errno.EMLINK,
                                  errno.ENOENT, errno.EACCES])
def test_publish_fd_renames_where_it_cannot_link_by_descriptor(tmp_path,
                                                               code):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    try:
        with mock.patch.object(os, "link",
                               side_effect=OSError(code, "no link")):
            assert fileio.publish_fd(fd, path, str(tmp_path / "f")) is True
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["f"]


def test_publish_fd_raises_other_link_errors(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    try:
        with mock.patch.object(os, "link",
                               side_effect=OSError(errno.EIO, "I/O error")):
            with pytest.raises(OSError) as err:
                fileio.publish_fd(fd, path, str(tmp_path / "f"))
    finally:
        os.close(fd)
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == ["s.part"]


def test_publish_fd_says_which_scratch_was_replaced(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"checked")
    os.unlink(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT))
    try:
        with mock.patch.object(os, "link",
                               side_effect=OSError(errno.EPERM, "no")):
            with pytest.raises(OSError) as err:
                fileio.publish_fd(fd, path, str(tmp_path / "f"))
    finally:
        os.close(fd)
    assert err.value.errno == errno.ESTALE
    assert err.value.strerror == "scratch file was replaced"
    assert err.value.filename == path
    assert isinstance(err.value.__cause__, OSError)


def test_publish_fd_closes_its_directory(tmp_path):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    before = set(os.listdir("/proc/self/fd"))
    try:
        fileio.publish_fd(fd, path, str(tmp_path / "f"))
        path, fd2 = fakes.open_scratch(tmp_path, "t.part", b"mine")
        before.add(str(fd2))
        fileio.publish_fd(fd2, path, str(tmp_path / "f"))
        os.close(fd2)
        before.discard(str(fd2))
    finally:
        os.close(fd)
    before.discard(str(fd))
    after = set(os.listdir("/proc/self/fd")) - {str(fd)}
    assert after == before


# -- renameat2 ----------------------------------------------------------------

def test_renameat2_never_replaces(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"a")
    dst.write_bytes(b"b")
    with pytest.raises(FileExistsError) as err:
        fileio.renameat2_noreplace(str(src), str(dst))
    assert err.value.errno == errno.EEXIST
    assert err.value.strerror == os.strerror(errno.EEXIST)
    assert err.value.filename == str(dst)
    assert (src.read_bytes(), dst.read_bytes()) == (b"a", b"b")
    dst.unlink()
    fileio.renameat2_noreplace(str(src), str(dst))
    assert os.listdir(tmp_path) == ["b"] and dst.read_bytes() == b"a"


def test_renameat2_takes_names_relative_to_the_current_directory(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").write_bytes(b"a")
    fileio.renameat2_noreplace("a", "b")
    assert os.listdir(tmp_path) == ["b"]


def test_renameat2_missing_is_enosys(tmp_path):
    with mock.patch.object(fileio, "_renameat2", return_value=None):
        with pytest.raises(OSError) as err:
            fileio.renameat2_noreplace("a", str(tmp_path / "b"))
    assert err.value.errno == errno.ENOSYS
    assert err.value.strerror == "renameat2 is not available"
    assert err.value.filename == str(tmp_path / "b")


def test_a_c_library_without_renameat2_is_told_apart(monkeypatch):
    monkeypatch.setattr(fileio, "load_libc", lambda: object())
    assert fileio._renameat2() is None


def test_renameat2_is_declared_with_its_c_types():
    func = fileio._renameat2()
    assert func.restype is ctypes.c_int
    assert func.argtypes == [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                             ctypes.c_char_p, ctypes.c_uint]


def failing_renameat2(code):
    def renameat2(*args):
        ctypes.set_errno(code)
        return -1
    return renameat2


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS,
                                  errno.EOPNOTSUPP])
def test_rename_noreplace_falls_back_to_a_look_then_rename(tmp_path, code):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"a")
    dst.write_bytes(b"b")
    with mock.patch.object(fileio, "_renameat2",
                           return_value=failing_renameat2(code)):
        with pytest.raises(FileExistsError) as err:
            fileio.rename_noreplace(str(src), str(dst))
        assert err.value.errno == errno.EEXIST
        assert err.value.strerror == os.strerror(errno.EEXIST)
        assert err.value.filename == str(dst)
        dst.unlink()
        fileio.rename_noreplace(str(src), str(dst))
    assert os.listdir(tmp_path) == ["b"] and dst.read_bytes() == b"a"


def test_rename_noreplace_raises_other_errors_without_renaming(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"a")
    with mock.patch.object(fileio, "_renameat2",
                           return_value=failing_renameat2(errno.EIO)):
        with pytest.raises(OSError) as err:
            fileio.rename_noreplace(str(src), str(dst))
    assert err.value.errno == errno.EIO
    assert err.value.strerror == os.strerror(errno.EIO)
    assert os.listdir(tmp_path) == ["a"]


def test_rename_noreplace_renames_atomically_where_it_can(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"a")
    with mock.patch.object(os, "rename") as rename:
        fileio.rename_noreplace(str(src), str(dst))
    rename.assert_not_called()
    assert os.listdir(tmp_path) == ["b"]


def test_the_c_library_is_loaded_once_with_errno(monkeypatch):
    monkeypatch.setattr(fileio, "_libc", None)
    libc = fileio.load_libc()
    assert fileio.load_libc() is libc
    assert libc._name == ctypes.util.find_library("c")
    # Offsets past 4 GiB reach fallocate as 64-bit numbers.
    assert libc.fallocate.argtypes == [ctypes.c_int, ctypes.c_int,
                                       ctypes.c_int64, ctypes.c_int64]
    libc.renameat2(-100, b"/nonexistent/a", -100, b"/nonexistent/b", 1)
    assert ctypes.get_errno() == errno.ENOENT


# -- what is logged for debugging ---------------------------------------------

def debug_messages(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == fileio.__name__]


def test_publish_without_links_says_why_it_renames(tmp_path, caplog):
    tmp, final = tmp_path / ".t", tmp_path / "final"
    tmp.write_bytes(b"mine")
    with mock.patch.object(os, "link", side_effect=OSError(
            errno.EPERM, "Operation not permitted")), \
            caplog.at_level(logging.DEBUG, logger=fileio.__name__):
        fileio.publish(str(tmp), str(final))
    assert debug_messages(caplog) == [
        "No hard link for %s ([Errno 1] Operation not permitted); renaming "
        "instead" % final]


def test_publish_fd_without_links_says_why_it_renames(tmp_path, caplog):
    path, fd = fakes.open_scratch(tmp_path, "s.part", b"mine")
    try:
        with mock.patch.object(os, "link", side_effect=OSError(
                errno.EXDEV, "Invalid cross-device link")), \
                caplog.at_level(logging.DEBUG, logger=fileio.__name__):
            fileio.publish_fd(fd, path, str(tmp_path / "f"))
    finally:
        os.close(fd)
    assert debug_messages(caplog) == [
        "Cannot hard-link into %s ([Errno 18] Invalid cross-device link); "
        "renaming without replacing instead" % tmp_path]


def test_remove_made_dirs_says_which_it_leaves(tmp_path, caplog):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_bytes(b"")
    with caplog.at_level(logging.DEBUG, logger=fileio.__name__):
        fileio.remove_made_dirs([str(tmp_path / "a")])
    assert debug_messages(caplog) == [
        "Leaving directory %s: [Errno 39] Directory not empty: %r"
        % (tmp_path / "a", str(tmp_path / "a"))]
