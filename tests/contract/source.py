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

"""The image-source contract: what the pipeline relies on from a source.

``SourceContract`` runs against the local source (``tests/unit/sources/
test_source_contract.py`` and ``tests/functional/test_local_source.py``),
the Glance source against a real Keystone and Glance
(``tests/functional/test_glance_source.py``) and the fake the unit tests
use (``tests/fakes.FakeSource``, in the unit module), so the fake cannot
drift from the real sources: whatever this suite asks of one, it asks of
all.

A test class provides a ``source_world`` fixture returning a
:class:`SourceWorld`.  The library names the suite depends on are used only
in the "seams" section.
"""

import abc
import os
import time

import pytest

from imagebackend import cache as image_cache
from imagebackend.common import digest as content_digest
from imagebackend import exception
from tests.contract import backend as backend_contract

MiB = 1024 * 1024

# -- seams: the library API the contract uses ---------------------------------


def new_cache(conf, source, qemu):
    """An image cache fetching from ``source``."""
    return image_cache.ImageCache(conf, source, qemu)


def fetch(cache, image_id, progress=None):
    """Fetch an image into ``cache``: ``(entry, cache_hit)``."""
    return cache.get(image_id, progress=progress)


def cached_files(cache):
    """The files in the cache's ``_base`` (not its hidden bookkeeping)."""
    try:
        return sorted(n for n in os.listdir(cache.base_dir)
                      if not n.startswith("."))
    except FileNotFoundError:
        return []


# -- the world a contract runs in --------------------------------------------

class SourceWorld(abc.ABC):
    """A source under test and a way to put images in it."""

    #: the source under test.
    source = None

    @abc.abstractmethod
    def add_image(self, data: bytes) -> str:
        """Store a new image of ``data``, declared ``raw``; return its id."""

    @abc.abstractmethod
    def missing_id(self) -> str:
        """A well-formed id of no image."""

    @abc.abstractmethod
    def tamper(self, image_id: str) -> None:
        """Change one byte of what the source serves for ``image_id``,
        keeping its size and whatever the source recorded about it.
        """

    @abc.abstractmethod
    def cache_conf(self):
        """A ConfigOpts for an image cache in a directory of its own."""

    @abc.abstractmethod
    def qemu(self, conf):
        """The QemuImg a cache on ``conf`` uses."""


def sample(seed: bytes, size: int = 3 * MiB) -> bytes:
    """Image bytes: recognisable data, a run of zeros, data again."""
    third = size // 3
    head = (seed * (third // len(seed) + 1))[:third]
    tail = (seed[::-1] * (third // len(seed) + 1))[:size - 2 * third]
    return head + bytes(third) + tail


def _open_fds() -> set:
    """This process's open descriptors, each as (number, what it names)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            found.add((name, os.readlink("/proc/self/fd/" + name)))
        except OSError:
            pass  # closed between the listing and the readlink
    return found


def _assert_no_new_handles(before: set, settle: float = 5.0) -> None:
    """Fail if descriptors opened since ``before`` stay open.

    The count is process-wide, so a thread another test left running (a
    server harness reading a log, a background fsync) may hold a
    descriptor of its own for a moment: such a descriptor goes away by
    itself, while one the source leaked stays open as long as its object
    is referenced (the caller keeps it), so waiting up to ``settle``
    seconds tells the two apart.
    """
    deadline = time.monotonic() + settle
    while True:
        now = _open_fds()
        # A connection pool may swap a socket for a new one under the same
        # count: that is not a handle the stream kept.
        settled = len(now) <= len(before) or not now - before
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert settled, "descriptors left open: %s" % sorted(now - before)


def _described(source, meta):
    """``meta`` with any deferred identity resolved, as the cache asks."""
    return source.resolve_identity(meta) if meta.identity_deferred else meta


class SourceContract:
    """What every image source promises."""

    @pytest.fixture(autouse=True)
    def _contract_world(self, source_world):
        self.world = source_world
        self.source = source_world.source

    def _open_counted(self):
        """Count the downloads the source starts from now on."""
        opened = []
        real_open = self.source.open

        def counted(meta):
            opened.append(meta.image_id)
            return real_open(meta)
        self.source.open = counted
        return opened

    # -- metadata ------------------------------------------------------------

    def test_meta_describes_the_image(self):
        data = sample(b"meta ")
        image_id = self.world.add_image(data)
        meta = self.source.get_meta(image_id)
        assert meta.image_id == image_id
        assert isinstance(meta.source, str) and meta.source
        assert meta.disk_format == "raw"
        assert meta.size == len(data) and type(meta.size) is int
        assert meta.virtual_size is None or (
            type(meta.virtual_size) is int and meta.virtual_size > 0)
        assert isinstance(meta.extra, dict)
        if meta.identity_deferred:
            assert meta.identity is None
        else:
            assert isinstance(meta.identity, str) and meta.identity
        meta = _described(self.source, meta)
        assert isinstance(meta.identity, str) and meta.identity
        algo, value = meta.expected_digest()
        content_digest.new(algo)        # an algorithm the cache can check
        assert isinstance(value, str) and int(value, 16) >= 0
        assert isinstance(self.source.describe(), str)
        assert self.source.describe()

    def test_identity_is_stable_and_tells_images_apart(self):
        first = self.world.add_image(sample(b"first "))
        second = self.world.add_image(sample(b"second "))
        one = _described(self.source, self.source.get_meta(first))
        again = _described(self.source, self.source.get_meta(first))
        other = _described(self.source, self.source.get_meta(second))
        assert one.identity == again.identity
        assert one.identity != other.identity

    # -- streaming -----------------------------------------------------------

    def test_stream_yields_the_exact_bytes_the_digest_names(self):
        data = sample(b"stream ")
        image_id = self.world.add_image(data)
        meta = _described(self.source, self.source.get_meta(image_id))
        chunks = list(self.source.open(meta))
        for chunk in chunks:
            assert isinstance(chunk, (bytes, memoryview))
            assert 0 < len(chunk) <= self.source.chunk_size
        body = b"".join(chunks)
        assert body == data
        algo, value = meta.expected_digest()
        hasher = content_digest.new(algo)
        hasher.update(body)
        assert hasher.hexdigest() == value

    def test_stream_can_be_closed_early_and_lets_go_of_its_handles(self):
        data = sample(b"close ")
        image_id = self.world.add_image(data)
        meta = self.source.get_meta(image_id)
        before = _open_fds()
        unread = self.source.open(meta)
        unread.close()
        _assert_no_new_handles(before)
        partly = self.source.open(meta)
        first = next(iter(partly))
        partly.close()
        _assert_no_new_handles(before)
        assert data.startswith(bytes(first))
        whole = self.source.open(meta)
        assert b"".join(whole) == data
        _assert_no_new_handles(before)
        del unread, partly, whole

    # -- refusals ------------------------------------------------------------

    def test_unknown_image_is_image_not_found(self):
        image_id = self.world.missing_id()
        with pytest.raises(exception.ImageNotFound) as err:
            self.source.get_meta(image_id)
        assert isinstance(err.value, exception.ImageBackendException)
        assert image_id in str(err.value)

    @pytest.mark.parametrize("image_id", ["", "a\nb", "x" * 300, 42])
    def test_malformed_id_is_refused_before_any_lookup(self, image_id):
        with pytest.raises(exception.InvalidImageId):
            self.source.check_id(image_id)
        with pytest.raises(exception.InvalidImageId):
            self.source.get_meta(image_id)

    # -- through the pipeline ------------------------------------------------

    def test_download_is_verified_cached_and_reported_in_bytes(self):
        data = sample(b"download ")
        image_id = self.world.add_image(data)
        opened = self._open_counted()
        conf = self.world.cache_conf()
        cache = new_cache(conf, self.source, self.world.qemu(conf))
        reports = []
        entry, hit = fetch(cache, image_id,
                           lambda stage, done, total: reports.append(
                               (stage, done, total)))
        assert hit is False
        with open(entry.path, "rb") as f:
            assert f.read() == data
        download = [(done, total) for stage, done, total in reports
                    if stage.split()[0] in backend_contract.DOWNLOAD_STAGES]
        assert {total for _done, total in download} == {len(data)}
        done = [d for d, _total in download]
        assert done == sorted(done) and done[-1] == len(data)
        entry, hit = fetch(new_cache(conf, self.source,
                                     self.world.qemu(conf)), image_id)
        assert hit is True
        assert opened == [image_id]

    def test_bytes_that_do_not_match_are_refused(self):
        data = sample(b"tampered ")
        image_id = self.world.add_image(data)
        real_open = self.source.open

        def open_tampered(meta):
            # Between the lookup and the download, the bytes change.
            self.world.tamper(meta.image_id)
            return real_open(meta)
        self.source.open = open_tampered
        conf = self.world.cache_conf()
        cache = new_cache(conf, self.source, self.world.qemu(conf))
        with pytest.raises(exception.ImageDownloadError) as err:
            fetch(cache, image_id)
        assert image_id in str(err.value)
        assert cached_files(cache) == []
