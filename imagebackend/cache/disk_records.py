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

"""The image cache's records, as disk operations read them.

:class:`DiskRecords` gives :class:`imagebackend.disk.operations.
DiskOperations` (through the
:class:`imagebackend.disk.trust.FormatRecords` interface) the formats the
cache recorded:

* for a base in ``_base`` (``<cache_id>[-N]``), the ``format`` of its
  record ``_base/<stem>.json``; a sized base (``<cache_id>[-N]_<size>``)
  has the format of its own record if it has one, else of its base's;
* for a disk the library made, the format in the registry of disks
  (:meth:`imagebackend.cache.registry.Registry.find`: a record is tied to
  its file, so a file later put at a recorded path gets no format from
  it).

Records and the registry are read without following any symlink inside
``_base``.  Nothing here writes.
"""

import os
import stat

from oslo_config import cfg

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import registry as cache_registry
from imagebackend.disk import trust as disk_trust
from imagebackend import exception


class DiskRecords:
    """:class:`imagebackend.disk.trust.FormatRecords` on the cache's
    records.

    :param conf: a ConfigOpts with the library's options registered
        (:func:`imagebackend.opts.register_opts`).
    """

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        self.conf = conf

    @property
    def paths(self) -> disk_trust.CachePaths:
        """The cache's directories, as the configuration sets them now."""
        return disk_trust.cache_paths(self.conf)

    def base_record(self, path: str) -> disk_trust.BaseRecord | None:
        """What the cache records about base or sized base ``path``.

        :returns: ``None`` when ``path`` is not in ``_base``.
        :raises exception.DiskOperationError: ``path`` is in ``_base`` but
            is not a base (a record, scratch, bookkeeping, a symlink), or
            is in the lock directory.
        :raises exception.DiskNotFound: it does not exist.
        """
        paths = self.paths
        name = disk_trust.name_in_base(paths, path)
        if name is None:
            return None
        parsed = cache_layout.parse(name) if name else None
        if parsed is None or parsed.suffix:
            raise exception.DiskOperationError(
                path=path, reason="it is in the image cache %s but is not "
                "a base; only bases (<cache_id>[-N]) and sized bases "
                "(<cache_id>[-N]_<size>) there are images" % paths.base_dir)
        try:
            st = os.lstat(os.path.join(paths.base_dir, name))
        except FileNotFoundError as exc:
            raise exception.DiskNotFound(path=path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise exception.DiskOperationError(
                path=path, reason="%s in the image cache is not a regular "
                "file; nothing in the cache is followed through a symlink"
                % name)
        return disk_trust.BaseRecord(
            format=self._recorded(paths.base_dir, parsed),
            record=parsed.stem + ".json")

    @staticmethod
    def _recorded(base_dir, name):
        """The format the sized base's own record gives, else its base's.
        """
        records = [name.base_name + ".json"]
        if name.size is not None:
            records.append(name.stem + ".json")
        for record_name in records:
            record = cache_layout.read_record(
                os.path.join(base_dir, record_name))
            fmt = (record or {}).get("format")
            if fmt in disk_trust.BACKING_FORMATS:
                return fmt
        return None

    def disk_format(self, path: str) -> str | None:
        """The format the registry of disks records for ``path``, if the
        library made the file that is there now.  This is the one place
        disk operations consult the registry.

        :returns: ``qcow2`` or ``raw``; ``None`` when no record describes
            ``path``.
        """
        record = cache_registry.Registry(self.paths.base_dir, []).find(path)
        if record is None or record["format"] not in disk_trust.DISK_FORMATS:
            return None
        return record["format"]
