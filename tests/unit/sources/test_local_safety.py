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

"""The local source serves regular files inside its directory, and
nothing a name there may point at.
"""

import concurrent.futures
import os

import pytest

from imagebackend import exception
from tests import fakes

SECRET = b"host secret canary\n" * 100


@pytest.fixture
def source(tmp_path):
    return fakes.local_source(tmp_path, fakes.conf(tmp_path))


@pytest.mark.parametrize("points_at", ["outside", "inside"])
def test_a_symlink_out_of_the_directory_is_refused(tmp_path, source,
                                                   points_at):
    if points_at == "outside":
        target = tmp_path / "secret"
    else:
        # Even a link to an image of the directory: a name is a file.
        target = os.path.join(source.directory, "real.raw")
    with open(target, "wb") as f:
        f.write(SECRET)
    link = os.path.join(source.directory, "link.raw")
    # Looked up as a regular file, then replaced by the symlink before
    # the download opens it.
    with open(link, "wb") as f:
        f.write(b"an image")
    meta = source.get_meta("link.raw")
    os.unlink(link)
    os.symlink(target, link)

    for look in (source.get_meta, lambda _i: list(source.open(meta))):
        with pytest.raises(exception.InvalidImageId) as err:
            look("link.raw")
        assert "%s is a symlink" % link in str(err.value)
    with open(target, "rb") as f:
        assert f.read() == SECRET


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_directory_or_a_fifo_is_refused_without_blocking(source, kind):
    path = os.path.join(source.directory, "thing")
    if kind == "directory":
        os.mkdir(path)
    else:
        os.mkfifo(path)     # opening it for reading would wait for a writer

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        lookup = pool.submit(source.get_meta, "thing")
        try:
            failure = lookup.exception(timeout=10)
        finally:
            if not lookup.done():
                # Unblock the open so the pool can shut down.
                with open(path, "wb"):
                    pass
    assert isinstance(failure, exception.InvalidImageId)
    assert "%s is not a regular file" % path in str(failure)
