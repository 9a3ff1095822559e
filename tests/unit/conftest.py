"""Fixtures shared by the unit tests."""

import pytest

from tests import fakes


@pytest.fixture
def fake_qemu():
    """An autospec QemuImg whose convert writes an 8 MiB raw target."""
    return fakes.qemu()
