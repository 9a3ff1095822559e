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
"""Fetching several images into the cache ahead of use, a few at a time."""

import concurrent.futures
import logging
import time
import typing

from imagebackend.cache import results
from imagebackend.common import progress as common_progress
from imagebackend import exception

LOG = logging.getLogger(__name__)


def prefetch(image_ids: list[str],
             fetch_one: typing.Callable[..., tuple[typing.Any, bool]], *,
             parallel: int = 4,
             progress: common_progress.Progress | None = None
             ) -> results.Prefetch:
    """Fetch each distinct image of ``image_ids`` with ``fetch_one``,
    ``parallel`` at a time.

    :param fetch_one: called as ``fetch_one(image_id, progress)``;
        returns ``(entry, cache_hit)`` (the entry has ``path`` and
        ``generation``) or raises an
        :class:`~imagebackend.exception.ImageBackendException`.
    :param progress: called as ``progress(stage, done, total)`` in
        bytes, each stage labelled with its image id
        (:func:`imagebackend.common.progress.labelled`).
    :returns: one :class:`~imagebackend.cache.results.Prefetched` per
        distinct image, in the order given; a failure is reported there,
        not raised.
    """
    def one(image_id):
        start = time.monotonic()
        try:
            entry, hit = fetch_one(
                image_id, common_progress.labelled(progress, image_id))
        except exception.ImageBackendException as exc:
            LOG.warning("Prefetching image %s failed: %s", image_id,
                        exc.message)
            return results.Prefetched(image_id=image_id,
                                      error=exc.exact_message,
                                      seconds=time.monotonic() - start)
        return results.Prefetched(image_id=image_id, file=entry.path,
                                  generation=entry.generation,
                                  cache_hit=hit,
                                  seconds=time.monotonic() - start)

    ids = list(dict.fromkeys(image_ids))
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        return results.Prefetch(images=list(pool.map(one, ids)))
