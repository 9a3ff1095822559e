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

"""Files without a name until they are complete, and waits that overlap
other work, on real files.
"""

import errno
import os
import signal
import stat
import threading

import pytest

from imagebackend.common import fileio


def test_an_unnamed_file_is_nowhere_until_linked(tmp_path):
    old = os.umask(0o077)
    try:
        made = fileio.Unnamed.make(str(tmp_path))
    finally:
        os.umask(old)
    try:
        os.write(made.fd, b"data")
        assert os.listdir(tmp_path) == []
        assert made.name is None
        made.link("disk")
        made.sync_name()
        assert made.name == "disk"
    finally:
        made.close()
    assert os.listdir(tmp_path) == ["disk"]
    assert (tmp_path / "disk").read_bytes() == b"data"
    assert stat.S_IMODE(os.lstat(tmp_path / "disk").st_mode) == 0o644
    assert made.directory == str(tmp_path)


def test_an_unnamed_file_closed_before_its_link_leaves_nothing(tmp_path):
    made = fileio.Unnamed.make(str(tmp_path), mode=0o600)
    os.write(made.fd, b"data")
    assert stat.S_IMODE(os.fstat(made.fd).st_mode) == 0o600
    made.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(OSError):
        os.fstat(made.fd)
    with pytest.raises(OSError):
        os.fstat(made.dir_fd)


def test_a_link_never_replaces_a_name(tmp_path):
    (tmp_path / "disk").write_bytes(b"someone else's")
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        os.write(made.fd, b"mine")
        with pytest.raises(FileExistsError):
            made.link("disk")
        assert made.name is None
    finally:
        made.close()
    assert (tmp_path / "disk").read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["disk"]


def test_a_symlink_in_place_of_the_name_is_not_followed(tmp_path):
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "disk"))
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        with pytest.raises(FileExistsError):
            made.link("disk")
    finally:
        made.close()
    assert not os.path.lexists(tmp_path / "elsewhere")


def test_a_name_that_cannot_be_synced_is_removed(tmp_path, monkeypatch):
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        made.link("disk")
        other = tmp_path / "other"
        other.write_bytes(b"x")

        def fails(fd):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, "fsync", fails)
        with pytest.raises(OSError) as err:
            made.sync_name()
        monkeypatch.undo()
    finally:
        made.close()
    assert err.value.errno == errno.EIO
    assert os.listdir(tmp_path) == ["other"]


def test_a_name_replaced_meanwhile_is_not_removed(tmp_path, monkeypatch):
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        made.link("disk")
        os.unlink(tmp_path / "disk")
        (tmp_path / "disk").write_bytes(b"another file")

        def fails(fd):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, "fsync", fails)
        with pytest.raises(OSError):
            made.sync_name()
        monkeypatch.undo()
    finally:
        made.close()
    assert (tmp_path / "disk").read_bytes() == b"another file"


def test_the_name_is_synced_through_the_directory(tmp_path, monkeypatch):
    made = fileio.Unnamed.make(str(tmp_path))
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(
        os.fstat(fd)), real(fd)))
    try:
        made.link("disk")
        assert synced == []
        made.sync_name()
    finally:
        made.close()
    [st] = synced
    assert os.path.samestat(st, os.stat(tmp_path))


@pytest.mark.parametrize("error", [errno.EOPNOTSUPP, errno.EISDIR,
                                   errno.EINVAL])
def test_no_unnamed_files_on_this_filesystem(tmp_path, monkeypatch, error):
    real = os.open

    def refuses(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(error, os.strerror(error))
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refuses)
    before = set(os.listdir("/proc/self/fd"))
    assert fileio.Unnamed.make(str(tmp_path)) is None
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before    # nothing open


def test_other_errors_of_an_unnamed_file_are_raised(tmp_path, monkeypatch):
    real = os.open

    def full(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", full)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as err:
        fileio.Unnamed.make(str(tmp_path))
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert set(os.listdir("/proc/self/fd")) == before
    with pytest.raises(FileNotFoundError):
        fileio.Unnamed.make(str(tmp_path / "missing"))


def test_a_failed_chmod_closes_the_unnamed_file(tmp_path, monkeypatch):
    def fails(fd, mode):
        raise OSError(errno.EPERM, "not permitted")
    monkeypatch.setattr(os, "fchmod", fails)
    before = set(os.listdir("/proc/self/fd"))
    old = os.umask(0o077)
    try:
        with pytest.raises(OSError):
            fileio.Unnamed.make(str(tmp_path))
    finally:
        os.umask(old)
    monkeypatch.undo()
    assert set(os.listdir("/proc/self/fd")) == before
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, mode, changed", [(0o022, 0o644, False),
                                                  (0o077, 0o644, True),
                                                  (0o022, 0o666, True),
                                                  (0o022, 0o600, False),
                                                  (0o000, 0o666, False)])
def test_the_mode_is_changed_only_when_the_umask_left_another(
        tmp_path, monkeypatch, umask, mode, changed):
    calls = []
    real = os.fchmod
    monkeypatch.setattr(os, "fchmod",
                        lambda fd, m: (calls.append(m), real(fd, m)))
    old = os.umask(umask)
    try:
        made = fileio.Unnamed.make(str(tmp_path), mode)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.fstat(made.fd).st_mode) == mode
    finally:
        made.close()
    assert calls == ([mode] if changed else [])


def test_background_returns_what_the_function_returns():
    started, release = threading.Event(), threading.Event()

    def work(a, b):
        started.set()
        release.wait(10)
        return a + b
    job = fileio.Background(work, 2, 3)
    assert started.wait(10)     # running while the caller goes on
    release.set()
    assert job.wait() == 5
    assert job.wait() == 5      # waiting again returns it again


def test_background_raises_what_the_function_raises():
    def fails():
        raise OSError(errno.ENOSPC, "No space left on device")
    job = fileio.Background(fails)
    with pytest.raises(OSError) as err:
        job.wait()
    assert err.value.errno == errno.ENOSPC


def test_background_returns_none_from_a_function_returning_none():
    assert fileio.Background(lambda: None).wait() is None


def test_background_threads_are_kept_for_the_next_call():
    first = fileio.Background(threading.get_ident)
    ident = first.wait()
    assert ident != threading.get_ident()
    # The thread is idle once wait() returns: the next call takes it.
    assert fileio.Background(threading.get_ident).wait() == ident


def test_background_calls_at_the_same_time_run_in_threads_of_their_own():
    release = threading.Event()
    running = []

    def work():
        running.append(threading.get_ident())
        release.wait(10)
        return threading.get_ident()
    jobs = [fileio.Background(work) for _ in range(3)]
    for _ in range(1000):
        if len(running) == 3:
            break
        threading.Event().wait(0.01)
    release.set()
    idents = [job.wait() for job in jobs]
    assert len(set(idents)) == 3
    assert sorted(running) == sorted(idents)


def test_at_most_so_many_background_threads_wait(monkeypatch):
    monkeypatch.setattr(fileio, "IDLE_THREADS", 2)
    monkeypatch.setattr(fileio._Worker, "idle", [])
    release = threading.Event()
    jobs = [fileio.Background(release.wait, 10) for _ in range(4)]
    release.set()
    assert [job.wait() for job in jobs] == [True] * 4
    # Each thread chose to wait or to end before its call was done.
    assert len(fileio._Worker.idle) == 2


def test_a_background_thread_whose_function_raised_is_used_again():
    def fails():
        raise ValueError(threading.get_ident())
    with pytest.raises(ValueError) as err:
        fileio.Background(fails).wait()
    assert fileio.Background(threading.get_ident).wait() == (
        err.value.args[0])


def test_a_forked_child_starts_background_threads_of_its_own():
    fileio.Background(int).wait()          # one idle thread here
    assert fileio._Worker.idle
    pid = os.fork()
    if pid == 0:        # the child: the parent's threads are not here
        try:
            signal.alarm(10)
            ok = (fileio._Worker.idle == []
                  and fileio.Background(lambda: 7).wait() == 7)
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fileio._Worker.idle          # the parent keeps its own


def test_the_unnamed_file_is_made_in_its_directory_not_here(tmp_path,
                                                            monkeypatch):
    # The working directory on another filesystem: a file made there
    # could not be linked into tmp_path (which may itself be on a tmpfs).
    elsewhere = [d for d in ("/dev/shm", "/", "/run")
                 if os.stat(d).st_dev != os.stat(tmp_path).st_dev]
    assert elsewhere, "no other filesystem to work in"
    monkeypatch.chdir(elsewhere[0])
    made = fileio.Unnamed.make(str(tmp_path))
    try:
        assert os.fstat(made.fd).st_dev == os.stat(tmp_path).st_dev
        made.link("disk")
    finally:
        made.close()
    assert os.listdir(tmp_path) == ["disk"]


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_a_directory_that_is_not_one_is_refused_at_once(tmp_path, kind):
    """Put in place of the target's directory meanwhile, a file or a FIFO
    is refused at once (opening a FIFO to read would wait for a writer).
    """
    path = str(tmp_path / "dir")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        open(path, "w").close()
    outcome = []

    def make():
        try:
            fileio.Unnamed.make(path)
            outcome.append("made")
        except OSError as exc:
            outcome.append(exc.errno)
    worker = threading.Thread(target=make, daemon=True)
    worker.start()
    worker.join(5)
    waited = worker.is_alive()
    if waited:
        # Release the reader the FIFO holds, so no thread is left behind.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not waited
    assert outcome == [errno.ENOTDIR]
