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

"""Reading the whole cache directory at once: every base, sized base,
record, scratch and moved-aside file, as :func:`scan` finds them.  This
module only reads; the cache, the pruner and the verifier decide what to
do with what it finds.
"""

import dataclasses
import os
import stat

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import results
from imagebackend.cache import templates as cache_templates


@dataclasses.dataclass
class CachedFile:
    """A base or sized base found in ``_base``."""

    name: cache_layout.Name
    path: str
    st: os.stat_result
    #: the generation's record (the original base's), ``{}`` if it has
    #: none that can be read
    record: dict
    record_mtime: float | None
    #: a sized base's own record (``<stem>_<size>.json``), if valid
    own_record: dict | None = None

    @property
    def kind(self) -> str:
        return "base" if self.name.size is None else "sized"

    @property
    def described(self) -> dict:
        """The record that describes this file best: a sized base's own
        record when its original's is gone.
        """
        if self.record or self.own_record is None:
            return self.record
        return self.own_record

    @property
    def cid(self) -> str:
        return self.name.cid

    @property
    def generation(self) -> int:
        return self.name.generation

    @property
    def image_id(self) -> str | None:
        image_id = self.described.get("image_id")
        return image_id if isinstance(image_id, str) else None

    @property
    def allocated(self) -> int:
        return self.st.st_blocks * 512

    @property
    def trusted(self) -> bool:
        """Whether the generation has a valid record (see
        :func:`imagebackend.cache.layout.valid_record`); a base without
        one is never used again.
        """
        return cache_layout.valid_record(self.record)

    @property
    def stale(self) -> bool:
        return bool(self.record.get("stale")) or not self.trusted

    @property
    def stale_reason(self) -> str:
        if not self.trusted and not self.record.get("stale"):
            return "it has no valid record"
        return str(self.record.get("stale_reason") or "marked")

    @property
    def last_used(self) -> float:
        """The record's mtime for a base (refreshed on every use), the
        file's mtime for a sized base.
        """
        if self.name.size is None and self.record_mtime is not None:
            return self.record_mtime
        return self.st.st_mtime


@dataclasses.dataclass
class Layout:
    """Everything :func:`scan` found in ``_base``."""

    base_dir: str
    bases: list[CachedFile] = dataclasses.field(default_factory=list)
    #: stem -> (record, record mtime), for every record file found; the
    #: record is ``{}`` when it cannot be read (it may not be
    #: :func:`imagebackend.cache.layout.valid_record`)
    records: dict = dataclasses.field(default_factory=dict)
    #: sized base name -> its own record (``{}`` if not valid), by file
    sized_records: dict = dataclasses.field(default_factory=dict)
    scratch: list[tuple[cache_layout.Name, str]] = dataclasses.field(
        default_factory=list)
    aside: list[tuple[cache_layout.Name, str, os.stat_result]] = (
        dataclasses.field(default_factory=list))
    #: leftover temporary files of atomic JSON writes: (path, stat)
    temp: list[tuple[str, os.stat_result]] = dataclasses.field(
        default_factory=list)
    #: overlay templates and their scratch (never bases, never listed or
    #: verified as images): (name, path, stat)
    templates: list[tuple[cache_templates.TemplateName, str,
                          os.stat_result]] = dataclasses.field(
        default_factory=list)

    def cids(self) -> set[str]:
        """Every image with any file in the cache."""
        found = {f.cid for f in self.bases}
        found.update(cache_layout.parse(s).cid for s in self.records)
        found.update(cache_layout.parse(s).cid for s in self.sized_records)
        found.update(n.cid for n, _ in self.scratch)
        found.update(n.cid for n, _, _ in self.aside)
        return found

    def of_stem(self, stem_name: str) -> list[CachedFile]:
        return [f for f in self.bases if f.name.stem == stem_name]


def scan(base_dir: str) -> Layout:
    """Read ``base_dir`` once: bases, records, scratch and moved-aside
    files.  Symlinks and other non-regular files are ignored.
    """
    layout = Layout(base_dir=base_dir)
    try:
        entries = sorted(os.scandir(base_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return layout
    found = []
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".json.tmp"):
            st = _regular(entry)
            if st is not None:
                layout.temp.append((entry.path, st))
            continue
        name = cache_layout.parse(entry.name)
        if name is None:
            template = cache_templates.parse(entry.name)
            st = _regular(entry) if template is not None else None
            if st is not None:
                layout.templates.append((template, entry.path, st))
            continue
        st = _regular(entry)
        if st is None:
            continue
        if name.suffix == ".json":
            if name.size is None:
                record = cache_layout.read_record(entry.path) or {}
                layout.records[name.stem] = (record, st.st_mtime)
            else:
                record = cache_layout.read_record(entry.path)
                if not cache_layout.valid_sized_record(record, name):
                    record = {}
                layout.sized_records[name.base_name] = record
        elif name.is_scratch:
            layout.scratch.append((name, entry.path))
        elif name.suffix in cache_layout.ASIDE_SUFFIXES:
            layout.aside.append((name, entry.path, st))
        else:
            found.append((name, entry.path, st))
    for name, path, st in found:
        record, mtime = layout.records.get(name.stem, ({}, None))
        own = layout.sized_records.get(name.name) if name.size else None
        layout.bases.append(CachedFile(name=name, path=path, st=st,
                                       record=record, record_mtime=mtime,
                                       own_record=own or None))
    return layout


def _regular(entry: os.DirEntry) -> os.stat_result | None:
    try:
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def sharers(files) -> dict[str, int]:
    """For each scanned file (:class:`CachedFile`)
    path, how many of the other ``files`` are the same inode.
    """
    by_inode: dict[tuple, int] = {}
    for f in files:
        key = (f.st.st_dev, f.st.st_ino)
        by_inode[key] = by_inode.get(key, 0) + 1
    return {f.path: by_inode[(f.st.st_dev, f.st.st_ino)] - 1 for f in files}


def allocated_once(files) -> int:
    """The bytes ``files`` take on disk, each inode counted once."""
    seen = {}
    for f in files:
        seen[(f.st.st_dev, f.st.st_ino)] = f.allocated
    return sum(seen.values())


def listing(layout: Layout, users_of=None) -> list[results.CachedBase]:
    """The bases and sized bases of ``layout``, as listed.

    :param users_of: ``users_of(file name)`` -> the disks using that base.
    """
    shared = sharers(layout.bases)
    return [results.CachedBase(
        image_id=f.image_id,
        kind=f.kind,
        generation=f.generation,
        file=f.path,
        size_on_disk=f.allocated,
        virtual_size=(f.name.size if f.kind == "sized"
                      else f.record.get("virtual_size")),
        format=f.described.get("format"),
        last_used=cache_layout.isotime(f.last_used),
        disks=len(users_of(f.name.name)) if users_of else 0,
        stale=f.stale, shared_with=shared[f.path]) for f in layout.bases]
