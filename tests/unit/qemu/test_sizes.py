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

"""Sizes as qemu-img takes them."""

import pytest

from imagebackend import exception
from imagebackend.qemu import sizes as qemu_sizes

KiB, MiB, GiB, TiB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4


@pytest.mark.parametrize("value,expected", [
    (0, 0), (1024, 1024), ("1024", 1024), ("512M", 512 * MiB),
    ("10G", 10 * GiB), ("10g", 10 * GiB), ("1.5G", 3 * GiB // 2),
    ("2T", 2 * TiB), ("4k", 4 * KiB), ("4K", 4 * KiB), ("10GB", 10 * GiB),
    ("10GiB", 10 * GiB), ("100b", 100), (" 8 M ", 8 * MiB),
    (".5K", 512), ("1.", 1), ("2.0G", 2 * GiB), ("007M", 7 * MiB),
    ("\u0663K", 3 * KiB),
])
def test_parse_size_accepts(value, expected):
    assert qemu_sizes.parse_size(value) == expected


@pytest.mark.parametrize("value", [
    "", "G", "-1G", "1.5", "0.3K", "10X", "1e3", "ten", "10 G B", "nan",
    -1, 1.0, True, None, "1G2",
])
def test_parse_size_refuses(value):
    with pytest.raises(exception.InvalidSize) as err:
        qemu_sizes.parse_size(value)
    assert isinstance(err.value, ValueError)
    assert repr(value) in str(err.value)
