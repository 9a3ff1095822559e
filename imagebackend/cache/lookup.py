#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.
"""Finding the newest usable generation of an image in ``_base``.

A base is usable only while it is a regular file whose record is valid
(see :func:`imagebackend.cache.layout.valid_record`), names the image,
is not stale, describes the content the source now serves, and was
recorded under the current inspection policy (or is raw).
"""

import dataclasses
import os

from imagebackend.cache import generations as cache_generations
from imagebackend.cache import layout as cache_layout
from imagebackend.cache import reinspect as cache_reinspect
from imagebackend.cache import store as cache_store


@dataclasses.dataclass
class CacheEntry:
    """One published base image.

    :param cache_id: the base's file name in ``_base``: ``sha1(image_id)``
        for generation 1, ``sha1(image_id)-<N>`` for generation N.
    """

    image_id: str
    cache_id: str
    path: str
    format: str
    virtual_size: int
    record: dict
    generation: int = 1

    @property
    def last_used(self) -> float | None:
        try:
            return os.stat(self.path + ".json").st_mtime
        except FileNotFoundError:
            return None


def entry(store: cache_store.Store, image_id: str, stem: str,
          record: dict) -> CacheEntry:
    """The entry of base ``stem`` of image ``image_id``, as ``record``
    describes it.
    """
    return CacheEntry(image_id=image_id, cache_id=stem,
                      path=store.base_path(stem), format=record["format"],
                      virtual_size=record["virtual_size"], record=record,
                      generation=cache_layout.parse(stem).generation)


def same_identity(record: dict, identity: str | None) -> bool:
    """Whether a record describes the content the source now serves; an
    identity unknown on either side cannot tell, and counts as the same.
    (A source that only defers computing it is asked for it before any
    comparison: see :meth:`imagebackend.cache.fetch.Fetcher.identify`.)
    """
    recorded = record.get("identity")
    return identity is None or recorded is None or recorded == identity


def find(store: cache_store.Store, image_id: str, cid: str,
         identity: str | None) -> CacheEntry | None:
    """The newest usable generation of image ``image_id`` (cache id
    ``cid``) whose content is ``identity`` (None: any).

    :returns: its entry, or None when none is usable.
    :raises imagebackend.exception.UnsafeCachePath: a base is not a
        regular file.
    """
    found = _usable(store, image_id, cid, 1, identity)
    if found is not None:
        return found
    generations = cache_generations.generations(store.base_dir, cid)
    for gen in sorted(generations, reverse=True):
        if gen > 1 and "base" in generations[gen]:
            found = _usable(store, image_id, cid, gen, identity)
            if found is not None:
                return found
    return None


def _usable(store, image_id, cid, gen, identity):
    stem = cache_layout.stem(cid, gen)
    path = store.base_path(stem)
    if not store.check_regular(path):
        return None
    # Only a valid record is trusted: one that is missing, a symlink or of
    # the wrong shape never makes a base usable.
    record = cache_layout.read_record(path + ".json")
    if (not cache_layout.valid_record(record)
            or record["image_id"] != image_id
            or record.get("stale")
            or not same_identity(record, identity)):
        return None
    if cache_reinspect.needs_reinspection(record):
        return None
    return entry(store, image_id, stem, record)
