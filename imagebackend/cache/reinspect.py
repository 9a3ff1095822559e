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

"""Re-inspecting a cached base whose valid record predates the current
inspection policy, before trusting it again.

A raw base is never inspected again: its bytes are an image's guest data
(any header in them is data), and qemu-img only ever reads it as raw.
"""

import logging
import typing

from oslo_config import cfg

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import store as cache_store
from imagebackend import exception
from imagebackend import inspection

LOG = logging.getLogger(__name__)


def needs_reinspection(record: dict) -> bool:
    """Whether a valid base record predates the current inspection
    policy and names a format that is inspected.  A raw base never is:
    its bytes are an image's guest data (any header in them is data), and
    qemu-img only ever reads it as raw.
    """
    if record.get("format") == "raw":
        return False
    inspected = record.get("inspection") or {}
    return inspected.get("version", 0) < inspection.INSPECTION_VERSION


def reinspect(store: cache_store.Store, conf: cfg.ConfigOpts, meta,
              stem: str, users_of: typing.Callable[[str], list[str]]
              ) -> dict:
    """Inspect non-raw base ``stem`` of image ``meta`` again, as the format
    its record names, before trusting it under the current inspection
    policy (``conf``'s ``[inspection]`` options).

    Nothing is moved: a base the policy now refuses may be in use by
    disks, which must go on reading it.  It is marked stale instead (no
    new disk uses it; ``cache prune`` removes it once nothing does).

    :param users_of: ``users_of(stem)`` -> the disks using that base, for
        the warning when it is refused.
    :returns: its updated metadata record.
    :raises imagebackend.exception.UnsafeImage: the policy refuses it.
    """
    base = store.base_path(stem)
    record = cache_layout.read_record(base + ".json")
    if not cache_layout.valid_record(record):
        raise exception.CacheError(
            path=base, reason="its record changed while it was being "
                              "re-inspected; retry")
    if not needs_reinspection(record):
        return record
    LOG.info("Re-inspecting cached base %s of image %s as %s", base,
             meta.image_id, record["format"])
    try:
        result = inspection.inspect_file(
            base, meta.image_id, conf,
            declared_format=_declared_base_format(record))
        if inspection.qemu_format(result) != record["format"]:
            raise exception.FormatMismatch(
                image_id=meta.image_id,
                reason="cached base %s is recorded as %s but inspects as "
                       "%s" % (base, record["format"], result.format))
    except exception.UnsafeImage as exc:
        store.mark_stale(stem, "refused on re-inspection: %s"
                         % exc.message)
        users = users_of(stem)
        LOG.warning("Cached base %s of image %s is refused by the current "
                    "inspection policy; marked stale, left in place for "
                    "the disks using it (%s)", base, meta.image_id,
                    ", ".join(users) or "none known")
        raise
    inspected = dict(result.to_dict(),
                     version=inspection.INSPECTION_VERSION)
    changes = {"virtual_size": result.virtual_size,
               "inspection": inspected}
    return cache_layout.update_record(base + ".json", changes) or dict(
        record, **changes)


def _declared_base_format(record: dict) -> str | None:
    """The format a base must inspect as: the source's own format when
    the base is the downloaded file itself (an ISO stays an ISO, a GPT disk
    a GPT disk, though qemu-img reads both as raw), otherwise the format
    it was converted to.
    """
    fmt, source_fmt = record.get("format"), record.get("source_format")
    if fmt and source_fmt:
        try:
            if inspection.qemu_format(source_fmt) == fmt:
                return source_fmt
        except ValueError:
            pass
    return fmt
