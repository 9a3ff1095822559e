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

"""Option strings and qemu-img output parsed into typed values."""

import pytest

from imagebackend.qemu import results as qemu_results


def test_format_options_escapes_commas_and_spells_booleans():
    assert qemu_results.format_options(
        {"backing_file": "/a,b/c", "lazy_refcounts": False, "x": None,
         "cluster_size": 65536}) == (
        "backing_file=/a,,b/c,lazy_refcounts=off,cluster_size=65536")


@pytest.mark.parametrize("key", ["", "a,b", "a=b", "help", "?"])
def test_format_options_refuses_names_qemu_would_misread(key):
    with pytest.raises(ValueError):
        qemu_results.format_options({key: "1"})


@pytest.mark.parametrize("stderr,expected", [
    ("qemu-img: Could not open 'x': Could not open 'x': No such file or "
     "directory\n", "Could not open 'x': No such file or directory"),
    ("qemu-img: warning: something\nqemu-img: the real error\n"
     "qemu-img: warning: later warning\n", "the real error"),
    ("some other program output\n\n", "some other program output"),
    ("", "(no error message)"),
])
def test_useful_error(stderr, expected):
    assert qemu_results.useful_error(stderr) == expected


def test_useful_error_is_trimmed():
    text = qemu_results.useful_error("qemu-img: " + "x" * 1000, limit=50)
    assert len(text) == 50 and text.endswith("...")


def test_create_option_help_lines_without_description():
    assert qemu_results.CreateOption.parse_help(
        "Supported raw options:\n  size=<size>\n\nSome footer\n") == [
        ("size", "size", "")]


def test_image_info_properties_read_the_raw_json():
    info = qemu_results.ImageInfo.from_qemu({
        "filename": "d", "format": "qcow2", "virtual-size": 1,
        "encrypted": True, "dirty-flag": True, "backing-filename": "b",
        "full-backing-filename": "/dir/b",
        "format-specific": {"type": "qcow2",
                            "data": {"data-file": "/dir/data"}}})
    assert info.encrypted and info.dirty
    assert info.backing_file == "b"
    assert info.data_file == "/dir/data"
    assert info.actual_size is None


def test_check_result_clean():
    result = qemu_results.CheckResult.from_qemu(
        {"filename": "d", "format": "qcow2", "check-errors": 0,
         "corruptions": 2}, 2)
    assert result.corruptions == 2 and not result.clean
