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

from imagebackend import exception


def test_message_is_filled_from_keywords():
    exc = exception.ImageNotFound(image_id="abc", source="glance")
    assert str(exc) == "Image abc was not found in glance."
    assert exc.image_id == "abc"
    assert exc.kwargs == {"image_id": "abc", "source": "glance",
                          "hint": ""}


def test_builtin_bases_let_callers_catch_either():
    exc = exception.InvalidImageSize(image_id="x", reason="too small")
    assert isinstance(exc, ValueError)
    assert isinstance(exc, exception.ImageBackendException)
    assert isinstance(exception.ImageNotFound(image_id="x", source="s"),
                      LookupError)
    assert isinstance(exception.TargetExists(path="/p"), FileExistsError)


def test_missing_keyword_does_not_hide_the_error():
    exc = exception.QemuImgError(operation="convert")
    assert "qemu-img" in str(exc)
    assert "convert" in str(exc)


def test_unsafe_image_names_its_rule():
    exc = exception.BackingFileRefused(image_id="evil", reason="/etc/shadow")
    assert exc.rule == "backing-file"
    assert "(backing-file)" in str(exc)
    assert "evil" in str(exc)


def test_text_arguments_are_escaped_in_the_message_and_exact_as_given():
    image_id = "evil\nimagebackend: error: \x1b[2Jforged"
    exc = exception.ImageNotFound(image_id=image_id, source="glance")
    assert "\n" not in str(exc) and "\x1b" not in str(exc)
    assert str(exc) == ("Image evil\\nimagebackend: error: \\x1b[2Jforged "
                        "was not found in glance.")
    assert exc.image_id == image_id
    assert exc.kwargs["image_id"] == image_id


def test_a_server_error_body_is_escaped_and_bounded():
    body = "<html>\r\n" + "x" * 5_000_000 + "\x9b31m"
    exc = exception.ImageSourceError(image_id="abc", reason=body)
    assert len(exc.message) < 1200
    assert "\r" not in exc.message and "\n" not in exc.message
    assert "<html>\\r\\n" in exc.message
    assert exc.message.endswith("more characters)")
    assert exc.reason is body


def test_repr_templates_quote_without_escaping_twice():
    exc = exception.InvalidImageId(image_id="a\nb\\c", reason="no")
    assert str(exc) == "Invalid image id 'a\\nb\\\\c': no"
    exc = exception.InvalidSize(value="1\x1bQ", reason="bad suffix")
    assert str(exc).startswith("Invalid size '1\\x1bQ': bad suffix.")


def test_undecodable_bytes_in_an_argument_show_as_bytes():
    exc = exception.InvalidImageId(image_id="\udcff\udcfe", reason="no")
    assert str(exc) == "Invalid image id '\\xff\\xfe': no"
    str(exc).encode("utf-8")        # printable anywhere, no surrogates


def test_a_wrapped_library_error_is_not_escaped_twice():
    inner = exception.ImageNotFound(image_id="a\nb", source="s")
    outer = exception.ImageSourceError(image_id="x", reason=inner)
    assert "a\\nb" in str(outer) and "a\\\\nb" not in str(outer)


def test_other_exceptions_and_explicit_messages_are_escaped():
    outer = exception.CacheError(path="/c", reason=OSError("bad\nthing"))
    assert str(outer) == "Image cache /c: bad\\nthing"
    assert str(exception.CacheError("explicit\nmessage")) == (
        "explicit\\nmessage")


def test_numbers_and_lists_keep_their_formatting():
    exc = exception.QemuImgError(operation="info", path="/d", exit_code=1,
                                 stderr="line1\nline2")
    assert str(exc) == ("qemu-img info failed on /d (exit code 1): "
                        "line1\\nline2")
    exc = exception.BackendNotFound(name="x\n", choices=["raw", "qcow2"])
    assert str(exc).startswith("Unknown image backend 'x\\n'; ")
    assert "['raw', 'qcow2']" in str(exc)


def test_the_exact_message_is_there_for_machine_readable_output():
    exc = exception.ImageNotFound(image_id="a\nb", source="s")
    assert exc.exact_message == "Image a\nb was not found in s."
    assert exc.message == "Image a\\nb was not found in s."
    explicit = exception.ImageBackendException("given\nmessage")
    assert explicit.exact_message == "given\nmessage"
    assert explicit.message == "given\\nmessage"


def test_a_disk_smaller_than_its_image_is_one_message():
    exc = exception.DiskSmallerThanImage(image_id="img", virtual_size=2048,
                                         requested_size=1024)
    assert isinstance(exc, exception.InvalidImageSize)
    assert isinstance(exc, ValueError)
    assert str(exc) == (
        "Image img: its virtual size is 2048 bytes, larger than the "
        "requested disk of 1024 bytes; request a disk of at least 2048 "
        "bytes (a larger flavor).")


def test_every_exception_class_is_the_libraries_own():
    classes = [value for value in vars(exception).values()
               if isinstance(value, type) and issubclass(value,
                                                         BaseException)]
    assert len(classes) > 40
    for cls in classes:
        assert issubclass(cls, exception.ImageBackendException), cls
