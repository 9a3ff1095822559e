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

import os

import pytest

from imagebackend.cache import templates
from tests.unit.cache import test_templates as tt

GiB = tt.GiB
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
