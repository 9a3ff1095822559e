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

"""Digests of image content, including one that skips zeros.

``sparse-64k-xxh3-padded`` is an XXH3-128 hash over a file's non-zero
64 KiB blocks (aligned to the file), each prefixed with its offset as 8
big-endian bytes; a last, shorter block is hashed padded with zeros to
64 KiB.  Zero blocks and holes contribute nothing, so the digest depends
only on the content (not on which zeros are holes), and a reader that
knows where the holes are never reads or hashes them.  A file and the same
file grown with zeros have the same digest, whatever its length: a base
and the sized bases grown from it.  It names content only together with
a length.

It is what the cache records to notice change and corruption in bytes
that no image service vouches for: a converted base and a sized base.
XXH3 is not a cryptographic hash, and does not need to be there: whoever
could craft a collision can already write the image directory or
``_base`` itself.  It hashes about 9 GiB/s where SHA-256 manages 1.2
(with the CPU's SHA instructions), and a cold disk creation hashes every
byte once or twice.  Bytes from Glance are still checked against the hash
Glance records, whatever its algorithm.

The schemes of earlier records hash a last, shorter block as it is, so
their digest of a file whose length is not a multiple of 64 KiB differs
from that of the file grown with zeros: ``sparse-64k-xxh3`` (XXH3-128),
still the local image source's identity of a file (with its length), and
``sparse-64k`` (SHA-256), only verified.  A grown copy is checked against
such a digest over the original's length only (see :func:`file_digests`).

:func:`cache_id` names an image in the cache (the sha1 of its id).
:func:`new` makes a hasher for any :mod:`hashlib` algorithm or sparse
scheme, with ``update`` and ``hexdigest``.
"""

import hashlib
import os

import xxhash

from imagebackend.common import sparseio

#: the sparse scheme new records use.
SPARSE = "sparse-64k-xxh3-padded"
#: the XXH3 scheme of earlier records, without padding; the local image
#: source's identity.
SPARSE_XXH3 = "sparse-64k-xxh3"
#: the SHA-256 scheme of earlier records, without padding.
SPARSE_SHA256 = "sparse-64k"
# scheme -> (hash, whether a last, shorter block is padded with zeros)
_SCHEMES = {SPARSE: (xxhash.xxh3_128, True),
            SPARSE_XXH3: (xxhash.xxh3_128, False),
            SPARSE_SHA256: (hashlib.sha256, False)}
# The digest's block is the unit in which zeros are skipped: the one the
# sparse writer leaves holes in.
_BLOCK = sparseio.ZERO_BLOCK
# Reads of a file's data extents, at most this much at a time.
_READ = 4 * 1024 * 1024


class SparseDigest:
    """A streaming sparse digest: feed it the whole content with
    :meth:`update` (any chunking), or skip known zeros with :meth:`zeros`.

    :param scheme: :data:`SPARSE`, :data:`SPARSE_XXH3` or
        :data:`SPARSE_SHA256`.
    """

    def __init__(self, scheme: str = SPARSE) -> None:
        self.name = scheme
        algo, self._padded = _SCHEMES[scheme]
        self._hash = algo()
        self._base = 0                  # offset of _pending's first byte
        self._pending = bytearray()     # a block not yet complete

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._pending:
            take = min(_BLOCK - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < _BLOCK:
                return
            self._block(self._pending, self._base)
            self._base += _BLOCK
            self._pending = bytearray()
        whole = len(view) - len(view) % _BLOCK
        # A chunk of zeros (a hole read by the source) is skipped whole.
        if whole and not sparseio.all_zeros(view[:whole]):
            for i in range(0, whole, _BLOCK):
                self._block(view[i:i + _BLOCK], self._base + i)
        self._base += whole
        self._pending = bytearray(view[whole:])

    def zeros(self, count: int) -> None:
        """Account for ``count`` zero bytes without reading them."""
        if self._pending:
            take = min(_BLOCK - len(self._pending), count)
            self.update(memoryview(sparseio.HOLE)[:take])
            count -= take
            if self._pending:       # still short of a whole block
                return
        whole = count - count % _BLOCK
        self._base += whole
        self._pending = bytearray(count - whole)

    def _block(self, block, offset: int) -> None:
        if not sparseio.all_zeros(block):
            self._hash.update(offset.to_bytes(8, "big"))
            self._hash.update(block)

    def hexdigest(self) -> str:
        final = self._hash.copy()
        if self._pending and not sparseio.all_zeros(self._pending):
            final.update(self._base.to_bytes(8, "big"))
            final.update(self._pending)
            if self._padded:
                final.update(memoryview(sparseio.HOLE)[
                    :_BLOCK - len(self._pending)])
        return final.hexdigest()


def cache_id(image_id: str) -> str:
    """The name the cache (and an image source's memo) gives image
    ``image_id``: the sha1 of its id (UTF-8), in hex.  A name of fixed
    length and alphabet whatever the id holds.
    """
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def new(algo: str):
    """A hasher for ``algo``: a sparse scheme or a :mod:`hashlib` name.

    :raises ValueError: an unknown algorithm.
    """
    if algo in _SCHEMES:
        return SparseDigest(algo)
    return hashlib.new(algo)


def file_digests(fd: int, algos=(), sparse: bool = True,
                 scheme: str = SPARSE, length: int | None = None) -> dict:
    """Hash the open file ``fd`` in one pass, reading only its data.

    :param algos: algorithms for :func:`new`, over the whole byte stream
        (holes read as zeros).
    :param sparse: also compute the sparse digest of ``scheme``.
    :param length: compute the sparse digest over the file's first
        ``length`` bytes only: the digest of the original a copy was grown
        from, under a scheme that does not pad.  It is None if the file is
        shorter or any byte after them is not zero.
    :returns: ``{"full": {algo: hex}, "sparse": hex or None, "size": n}``.
    :raises ValueError: an unknown algorithm or scheme.
    :raises OSError: the file cannot be read.
    """
    if scheme not in _SCHEMES:
        raise ValueError("unknown sparse digest scheme %r" % scheme)
    full = {algo: new(algo) for algo in algos}
    blocks = SparseDigest(scheme) if sparse else None
    size = os.fstat(fd).st_size
    end = size if length is None else length
    grown = end <= size     # nothing but zeros after ``end``
    pos = 0
    for count, data in sparseio.read_regions(fd, size, _READ):
        inside = max(0, min(count, end - pos))
        pos += count
        if data is None:
            _zeros(full.values(), count)
            if blocks is not None:
                blocks.zeros(inside)
            continue
        for h in full.values():
            h.update(data)
        if blocks is not None:
            view = memoryview(data)
            blocks.update(view[:inside])
            grown = grown and sparseio.all_zeros(view[inside:])
    return {"full": {a: h.hexdigest() for a, h in full.items()},
            "sparse": (blocks.hexdigest() if blocks is not None and grown
                       else None),
            "size": size}


def _zeros(hashers, count: int) -> None:
    for h in hashers:
        if isinstance(h, SparseDigest):
            h.zeros(count)
            continue
        for piece in sparseio.zero_chunks(count):
            h.update(piece)
