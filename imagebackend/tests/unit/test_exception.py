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
