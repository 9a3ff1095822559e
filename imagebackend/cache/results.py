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
"""What the cache's reports and upkeep calls return: dataclasses, each with
``to_dict()`` (what ``imagebackend cache ... -f json`` prints).
"""

import dataclasses
import typing


@dataclasses.dataclass
class Removed:
    """A file a prune or an invalidation removed (or would remove, on a
    dry run).

    :param kind: ``base``, ``sized``, ``scratch``, ``temporary``,
        ``aside`` or ``template`` (an overlay template of a removed base).
    :param size: the bytes it took on disk.
    """

    file: str
    kind: str
    reason: str
    size: int
    image_id: str | None = None

    def to_dict(self) -> dict:
        return {"file": self.file, "kind": self.kind, "reason": self.reason,
                "bytes": self.size, "image_id": self.image_id}


@dataclasses.dataclass
class Kept:
    """A base or sized base a prune or an invalidation left in place, and
    why (in use, busy, used since the scan...).
    """

    file: str
    kind: str
    reason: str
    image_id: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PruneReport:
    """What a prune removed (or would remove, on a dry run) and kept."""

    dry_run: bool = False
    removed: list[Removed] = dataclasses.field(default_factory=list)
    kept: list[Kept] = dataclasses.field(default_factory=list)
    bytes_freed: int = 0
    cache_size: int = 0
    free_space: int | None = None
    space_target_met: bool = True
    registry_records_removed: int = 0
    lock_files_removed: int = 0

    def add(self, path: str, kind: str, reason: str, size: int,
            image_id: str | None = None) -> None:
        """Count file ``path`` of ``size`` bytes as removed."""
        self.removed.append(Removed(file=path, kind=kind, reason=reason,
                                    size=size, image_id=image_id))
        self.bytes_freed += size
        self.cache_size -= size
        if self.free_space is not None:
            self.free_space += size

    def keep(self, f, reason: str) -> None:
        """Report cached file ``f`` (a
        :class:`imagebackend.cache.scan.CachedFile`) as kept.
        """
        self.kept.append(Kept(file=f.path, kind=f.kind, reason=reason,
                              image_id=f.image_id))

    def to_dict(self) -> dict:
        found = dataclasses.asdict(self)
        found["removed"] = [r.to_dict() for r in self.removed]
        found["kept"] = [k.to_dict() for k in self.kept]
        return found


@dataclasses.dataclass
class Invalidation:
    """What invalidating an image did: the bases marked stale, and those
    removed or kept (as in :class:`PruneReport`).
    """

    image_id: str
    marked_stale: list[str] = dataclasses.field(default_factory=list)
    removed: list[Removed] = dataclasses.field(default_factory=list)
    kept: list[Kept] = dataclasses.field(default_factory=list)
    bytes_freed: int = 0

    def to_dict(self) -> dict:
        return {"image_id": self.image_id,
                "marked_stale": list(self.marked_stale),
                "removed": [r.to_dict() for r in self.removed],
                "kept": [k.to_dict() for k in self.kept],
                "bytes_freed": self.bytes_freed}


#: verification statuses that make ``cache verify`` fail.
FAILED_STATUSES = ("corrupt", "unverified")


@dataclasses.dataclass
class VerifiedFile:
    """One base or sized base checked against its record, or an image
    asked for that is not cached (``status`` ``not cached``, no file).

    :param status: ``ok``, ``corrupt``, ``unverified`` or
        ``not cached``.
    :param action: what a repair did, or None.
    """

    image_id: str | None
    kind: str | None
    generation: int | None
    file: str | None
    status: str
    detail: str = ""
    action: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Verification:
    """What a verification found, one :class:`VerifiedFile` per file."""

    files: list[VerifiedFile] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any file is corrupt or cannot be verified."""
        return any(f.failed for f in self.files)

    def __iter__(self) -> typing.Iterator[VerifiedFile]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def to_dict(self) -> dict:
        return {"files": [f.to_dict() for f in self.files]}


@dataclasses.dataclass
class Prefetched:
    """The outcome of prefetching one image: its base, or an error."""

    image_id: str
    seconds: float
    file: str | None = None
    generation: int | None = None
    cache_hit: bool | None = None
    #: the error's message, exactly (for machine-readable output)
    error: str | None = None

    def to_dict(self) -> dict:
        """``image_id``, ``seconds`` and either ``error`` or
        ``file``, ``generation``, ``cache_hit``.
        """
        if self.error is not None:
            return {"image_id": self.image_id, "error": self.error,
                    "seconds": self.seconds}
        return {"image_id": self.image_id, "file": self.file,
                "generation": self.generation, "cache_hit": self.cache_hit,
                "seconds": self.seconds}


@dataclasses.dataclass
class Prefetch:
    """What a prefetch did, one :class:`Prefetched` per distinct image,
    in the order asked.
    """

    images: list[Prefetched] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether any image could not be fetched."""
        return any(i.error is not None for i in self.images)

    def __iter__(self) -> typing.Iterator[Prefetched]:
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def to_dict(self) -> dict:
        return {"images": [i.to_dict() for i in self.images]}


@dataclasses.dataclass
class CachedBase:
    """One base or sized base in the cache, as listed.

    :param last_used: ISO 8601 UTC time of the last use.
    :param disks: how many disks use it.
    :param shared_with: how many other bases and sized bases listed are
        the same file (hard links: bytes shared by content, counted once
        on disk).
    """

    image_id: str | None
    kind: str
    generation: int
    file: str
    size_on_disk: int
    virtual_size: int | None
    format: str | None
    last_used: str
    disks: int
    stale: bool
    shared_with: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
