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

"""A template copied into an open file (a warm disk without a name yet):
only a template that is there and passes the check fills it; nothing
else ever happens (no process, no template made, nothing removed).
"""

import dataclasses
import os

import pytest

from imagebackend.cache import templates
from tests.unit.cache import test_templates as tt

GiB = tt.GiB
MiB = tt.MiB
c, base = tt.c, tt.base


def copy_into(c, base, size=GiB, backing=None, options=None):
    """Run copy_overlay into a new file: (result, the file's bytes)."""
    path = tt.new_target(c, "copy")
    fd = os.open(path, os.O_RDWR)
    try:
        done = templates.Templates(c.store, c.qemu).copy_overlay(
            backing or base.path, "raw", fd, size, options)
        return done, tt.read(path)
    finally:
        os.close(fd)
        os.unlink(path)


def test_a_template_fills_the_file_exactly(c, base):
    tt.make(c, base, tt.new_target(c, "first"))
    calls = c.qemu.create.call_count
    assert copy_into(c, base) == (True, tt.overlay_bytes(base.path, "raw",
                                                         GiB))
    assert c.qemu.create.call_count == calls     # no process
    # The spec's key and description are computed once per spec.
    spec = templates.spec_for(c.base_dir, base.path, "raw", GiB)
    assert spec.key is spec.key and spec.description is spec.description


def test_no_template_leaves_the_file_empty_and_makes_none(c, base):
    assert copy_into(c, base) == (False, b"")
    assert tt.template_files(c) == []
    c.qemu.create.assert_not_called()


@pytest.mark.parametrize("damage", [tt.damage_truncate, tt.damage_flip,
                                    tt.damage_garbage])
def test_a_damaged_template_leaves_the_file_empty_and_is_kept(c, base,
                                                              damage):
    tt.make(c, base, tt.new_target(c, "first"))
    [name] = tt.template_files(c)
    damage(os.path.join(c.base_dir, name))
    calls = c.qemu.create.call_count
    assert copy_into(c, base) == (False, b"")
    assert c.qemu.create.call_count == calls
    # Made again by the next create that can run qemu-img, not here.
    assert tt.template_files(c) == [name]


def test_a_base_outside_the_cache_has_no_template(c, base, tmp_path):
    assert copy_into(c, base, backing=str(tmp_path / "elsewhere")) == (
        False, b"")


def test_other_options_are_another_template(c, base):
    tt.make(c, base, tt.new_target(c, "first"))
    assert copy_into(c, base, options={"cluster_size": "4096"}) == (
        False, b"")
    assert copy_into(c, base)[0] is True


def test_a_symlink_at_the_template_name_is_not_followed(c, base, tmp_path):
    spec = templates.spec_for(c.base_dir, base.path, "raw", GiB)
    decoy = tmp_path / "decoy"
    decoy.write_bytes(b"secret")
    os.symlink(decoy, os.path.join(c.base_dir, spec.file_name()))
    assert copy_into(c, base) == (False, b"")


def test_templates_and_their_copies_keep_zero_blocks_as_holes(c, base):
    first = tt.new_target(c, "first")
    tt.make(c, base, first)
    [name] = tt.template_files(c)
    path = os.path.join(c.base_dir, name)
    body = tt.overlay_bytes(base.path, "raw", GiB)
    data_blocks = sum(1 for i in range(0, len(body), 4096)
                      if body[i:i + 4096].strip(b"\0"))
    # The trailer adds at most one block of data.
    assert os.stat(path).st_blocks * 512 <= (data_blocks + 1) * 4096
    assert len(body) > 4 * (data_blocks + 1) * 4096
    assert tt.read(path)[:len(body)] == body
    target = tt.new_target(c, "second")
    assert tt.make(c, base, target) is True
    assert tt.read(target) == body
    assert os.stat(target).st_blocks * 512 <= (data_blocks + 1) * 4096


# -- a checked template, remembered -------------------------------------------

@pytest.fixture
def reads(monkeypatch):
    """The template copies made from files (not from memory)."""
    made = []
    real = templates.sparseio.sparse_copy

    def counted(src, fd, **kwargs):
        made.append(src)
        return real(src, fd, **kwargs)
    monkeypatch.setattr(templates.sparseio, "sparse_copy", counted)
    return made


def copy_with(t, base, size=GiB):
    """copy_overlay of ``t`` into a new file: (result, bytes, blocks)."""
    path = tt.new_target(_C[0], "copy")
    fd = os.open(path, os.O_RDWR)
    try:
        done = t.copy_overlay(base.path, "raw", fd, size)
        return done, tt.read(path), os.fstat(fd).st_blocks
    finally:
        os.close(fd)
        os.unlink(path)


_C = []


@pytest.fixture
def t(c, base):
    """A Templates whose template of ``base`` exists (made through another
    Templates, so nothing is remembered yet).
    """
    _C[:] = [c]
    tt.make(c, base, tt.new_target(c, "first"))
    return templates.Templates(c.store, c.qemu)


def template_path(t):
    [name] = tt.template_files(_C[0])
    return os.path.join(t.store.base_dir, name)


def test_a_checked_template_is_written_from_memory_after(t, base, reads):
    body = tt.overlay_bytes(base.path, "raw", GiB)
    first = copy_with(t, base)
    assert reads == [template_path(t)]
    second = copy_with(t, base)
    assert reads == [template_path(t)]      # not copied again
    assert first[:2] == second[:2] == (True, body)
    # Holes kept: only the data blocks are written.
    assert second[2] <= first[2]
    assert second[2] * 512 < len(body) // 4


@pytest.mark.parametrize("damage", [tt.damage_flip, tt.damage_refcounts,
                                    tt.damage_truncate])
def test_a_template_written_to_since_is_checked_again(t, base, reads,
                                                      damage):
    assert copy_with(t, base)[0] is True
    damage(template_path(t))
    assert copy_with(t, base)[:2] == (False, b"")
    assert len(reads) == 2


def test_a_template_replaced_since_is_copied_and_checked_again(t, base,
                                                               reads):
    assert copy_with(t, base)[0] is True
    path = template_path(t)
    data = tt.read(path)
    os.unlink(path)
    with open(path, "wb") as f:         # the same bytes, another file
        f.write(data)
    assert copy_with(t, base)[:2] == (
        True, tt.overlay_bytes(base.path, "raw", GiB))
    assert len(reads) == 2


def test_a_template_removed_since_is_not_written_from_memory(t, base):
    assert copy_with(t, base)[0] is True
    os.unlink(template_path(t))
    assert copy_with(t, base)[:2] == (False, b"")


def test_a_template_that_changed_while_copied_is_not_remembered(
        t, base, monkeypatch):
    path = template_path(t)
    real = templates.sparseio.sparse_copy
    reads = []

    def touched(src, fd, **kwargs):
        reads.append(src)
        size = real(src, fd, **kwargs)
        if len(reads) == 1:
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        return size
    monkeypatch.setattr(templates.sparseio, "sparse_copy", touched)
    assert copy_with(t, base)[0] is True
    assert t._checked == {}
    assert copy_with(t, base)[0] is True
    assert copy_with(t, base)[0] is True
    assert reads == [path, path]


def test_a_failed_write_from_memory_leaves_the_file_empty(t, base,
                                                          monkeypatch):
    assert copy_with(t, base)[0] is True

    def full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    assert copy_with(t, base)[:2] == (False, b"")


def test_a_short_write_from_memory_is_finished(t, base, monkeypatch):
    assert copy_with(t, base)[0] is True
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(
        fd, bytes(data[:100]), offset))
    assert copy_with(t, base)[:2] == (
        True, tt.overlay_bytes(base.path, "raw", GiB))


def test_what_is_remembered_is_checked_against_the_spec(t, base, reads):
    assert copy_with(t, base)[0] is True
    path = template_path(t)
    t._checked[path] = dataclasses.replace(t._checked[path],
                                           description=b"another")
    assert copy_with(t, base)[0] is True
    assert len(reads) == 2


def test_at_most_so_many_templates_are_remembered(t, base, reads,
                                                  monkeypatch):
    monkeypatch.setattr(templates, "REMEMBERED", 2)
    for size in (GiB, 2 * GiB, 3 * GiB):
        tt.make(_C[0], base, tt.new_target(_C[0], "m%d" % size), size)
        assert copy_with(t, base, size)[0] is True
    assert len(t._checked) == 2
    # The first one remembered is the one forgotten.
    assert [p.split("-")[-2] for p in t._checked] == [str(2 * GiB),
                                                      str(3 * GiB)]
    del reads[:]
    assert copy_with(t, base, 3 * GiB)[0] is True
    assert reads == []
    assert copy_with(t, base, GiB)[0] is True
    assert len(reads) == 1


@pytest.mark.parametrize("blocks, runs", [
    ([0], [(0, 1)]),
    ([1, 2], [(1, 2)]),
    ([0, 2, 3, 5], [(0, 1), (2, 2), (5, 1)]),
    ([], []),
])
def test_the_data_blocks_of_a_body_are_its_runs(blocks, runs):
    block = 4096
    body = bytearray(6 * block + 100)
    for i in blocks:
        body[i * block + 7] = 1
    spec = templates.Spec("/b", "raw", GiB)
    st = os.stat("/")
    checked = templates.Checked.of(st, spec, bytes(body))
    assert checked.length == len(body)
    assert [(off // block, len(data) // block)
            for off, data in checked.runs] == runs
    assert all(data == bytes(body[off:off + len(data)])
               for off, data in checked.runs)
    assert checked.identity == templates.identity(st)
    assert checked.description == spec.description


def test_a_last_block_of_data_shorter_than_a_block_is_a_run():
    body = bytes(4096) + b"\x01" * 10
    checked = templates.Checked.of(os.stat("/"), templates.Spec(
        "/b", "raw", GiB), body)
    assert checked.runs == ((4096, b"\x01" * 10),)


def test_a_checked_body_is_written_with_its_holes(tmp_path):
    body = bytes(8192) + b"\x05" * 4096 + bytes(3 * 4096)
    checked = templates.Checked.of(os.stat("/"), templates.Spec(
        "/b", "raw", GiB), body)
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        checked.write(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == body
    assert os.stat(path).st_blocks * 512 <= 4096 * 2


def test_identity_is_device_inode_size_and_times():
    st = os.stat("/")
    assert templates.identity(st) == (st.st_dev, st.st_ino, st.st_size,
                                      st.st_mtime_ns, st.st_ctime_ns)


@pytest.mark.parametrize("remembered", [False, True])
def test_a_file_that_is_not_empty_is_emptied_first(t, base, remembered):
    if remembered:
        assert copy_with(t, base)[0] is True
    path = tt.new_target(_C[0], "junk")
    with open(path, "wb") as f:
        f.write(b"\x01" * (5 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        assert t.copy_overlay(base.path, "raw", fd, GiB) is True
    finally:
        os.close(fd)
    assert tt.read(path) == tt.overlay_bytes(base.path, "raw", GiB)


def test_an_empty_file_is_not_truncated(t, base, monkeypatch):
    assert copy_with(t, base)[0] is True
    sizes = []
    real = os.ftruncate
    monkeypatch.setattr(os, "ftruncate", lambda fd, n: (sizes.append(n),
                                                        real(fd, n)))
    assert copy_with(t, base)[0] is True
    assert sizes == [len(tt.overlay_bytes(base.path, "raw", GiB))]
