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

"""What goes into qemu-img and what comes out, as typed values.

``-o`` option strings going in (sizes: :mod:`imagebackend.qemu.sizes`);
JSON and error text coming out, parsed into the dataclasses
:class:`ImageInfo`,
:class:`Snapshot`, :class:`CheckResult`, :class:`MapEntry`,
:class:`Measurement` and :class:`CreateOption`.  Nothing here runs a
process; :mod:`imagebackend.qemu.img` does.
"""

import dataclasses
import datetime
import re
import typing

_HELP_RE = re.compile(r"^\s+([^\s=]+)=<(.*?)>(?:\s+-\s+(.*))?$")


def format_options(options: dict) -> str:
    """``{"a": 1, "b": "x,y", "c": True}`` -> ``"a=1,b=x,,y,c=on"``.

    Commas in values are doubled, as qemu's option parser needs; ``None``
    values are left out.

    :raises ValueError: an option name qemu-img would misread.
    """
    parts = []
    for key, value in options.items():
        if value is None:
            continue
        if not key or "," in key or "=" in key or key in ("help", "?"):
            raise ValueError("bad option name %r" % (key,))
        if isinstance(value, bool):
            value = "on" if value else "off"
        parts.append("%s=%s" % (key, str(value).replace(",", ",,")))
    return ",".join(parts)


def useful_error(stderr: str, limit: int = 300) -> str:
    """Return the line of qemu-img's standard error that says what failed.

    That is the last ``qemu-img:`` line that is not a warning, without the
    prefix and repeated parts (or the last line, if none has it).
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.split(":", 1)[1].strip() for line in lines
              if line.startswith("qemu-img:")]
    errors = [line for line in errors if not line.startswith("warning:")]
    text = (errors or lines or ["(no error message)"])[-1]
    # qemu nests messages: "Could not open 'x': Could not open 'x': No such
    # file or directory" reads better without the repeat.
    parts = text.split(": ")
    text = ": ".join(part for i, part in enumerate(parts)
                     if i == 0 or part != parts[i - 1])
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """An internal snapshot of an image.

    :param id: qemu's id for it (a number, as a string).
    :param name: its name (tag).
    :param vm_state_size: bytes of saved VM state (0 for a disk-only one).
    :param date: when it was taken (UTC).
    :param clock: the guest clock at that moment.
    :param icount: the instruction counter, when recorded.
    """

    id: str
    name: str
    vm_state_size: int
    date: datetime.datetime
    clock: datetime.timedelta
    icount: int | None = None

    @classmethod
    def from_qemu(cls, data: dict) -> "Snapshot":
        date = datetime.datetime.fromtimestamp(
            data["date-sec"] + data.get("date-nsec", 0) / 1e9,
            tz=datetime.timezone.utc)
        clock = datetime.timedelta(
            seconds=data.get("vm-clock-sec", 0),
            microseconds=data.get("vm-clock-nsec", 0) / 1000)
        return cls(id=str(data["id"]), name=data["name"],
                   vm_state_size=data.get("vm-state-size", 0), date=date,
                   clock=clock, icount=data.get("icount"))


@dataclasses.dataclass
class ImageInfo:
    """What ``qemu-img info`` reports about one image.

    :param filename: the image, as qemu-img names it.
    :param format: its format.
    :param virtual_size: the disk size the guest sees, in bytes.
    :param actual_size: bytes allocated on the host, when known.
    :param backing_file: the backing file as recorded in the image (the
        one reading of it: :func:`imagebackend.disk.chain.read_chain`
        resolves and checks it before anything opens it).
    :param backing_format: the backing file's format as recorded.
    :param snapshots: the internal snapshots.
    :param raw: the whole JSON object qemu-img printed.
    :param chain: with ``backing_chain=True``, the whole chain from this
        image (``chain[0] is self``) down to the last backing file;
        otherwise empty.
    """

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    backing_file: str | None = None
    backing_format: str | None = None
    snapshots: list[Snapshot] = dataclasses.field(default_factory=list)
    raw: dict = dataclasses.field(default_factory=dict, repr=False)
    chain: list["ImageInfo"] = dataclasses.field(
        default_factory=list, repr=False, compare=False)

    @classmethod
    def from_qemu(cls, data: dict | list, backing_chain: bool = False
                  ) -> "ImageInfo":
        """Parse the JSON of ``info`` (a list with ``--backing-chain``)."""
        # Not oslo_utils.imageutils.QemuImgInfo: it takes one image's JSON
        # text, leaves a missing field None (a missing virtual-size must be
        # an error here) and reads neither --backing-chain's list nor the
        # snapshots' dates.
        if not backing_chain:
            return cls._one(data)
        chain = [cls._one(item) for item in data]
        for depth, info in enumerate(chain):
            info.chain = chain[depth:]
        return chain[0]

    @classmethod
    def _one(cls, data: dict) -> "ImageInfo":
        return cls(
            filename=data["filename"], format=data["format"],
            virtual_size=int(data["virtual-size"]),
            actual_size=data.get("actual-size"),
            backing_file=data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
            snapshots=[Snapshot.from_qemu(item)
                       for item in data.get("snapshots", [])],
            raw=data)

    @property
    def format_specific(self) -> dict:
        """The format's own details (qcow2: compat, data-file, ...)."""
        return self.raw.get("format-specific", {}).get("data", {})

    @property
    def encrypted(self) -> bool:
        return bool(self.raw.get("encrypted", False))

    @property
    def cluster_size(self) -> int | None:
        return self.raw.get("cluster-size")

    @property
    def dirty(self) -> bool:
        return bool(self.raw.get("dirty-flag", False))

    @property
    def data_file(self) -> str | None:
        """A qcow2 external data file, if the image has one."""
        return self.format_specific.get("data-file")


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What ``qemu-img check`` found (and, with repair, fixed).

    :param supported: False when the format has no consistency checks
        (exit code 63); the counts are then all zero.
    :param exit_code: 0 consistent, 2 corruptions, 3 leaks, 63 unsupported.
    :param check_errors: errors that stopped parts of the check.
    :param corruptions: corruptions remaining.
    :param leaks: leaked clusters remaining (harmless, wasted space).
    :param corruptions_fixed: corruptions repaired by this run.
    :param leaks_fixed: leaks repaired by this run.
    :param image_end_offset: where the image's data ends in its file.
    """

    filename: str
    format: str
    supported: bool = True
    exit_code: int = 0
    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int | None = None
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    raw: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def clean(self) -> bool:
        """True when checked and nothing is wrong."""
        return self.supported and not (self.check_errors or self.corruptions
                                       or self.leaks)

    @classmethod
    def from_qemu(cls, data: dict, exit_code: int) -> "CheckResult":
        fields = {name: data[name.replace("_", "-")]
                  for name in ("check_errors", "corruptions", "leaks",
                               "corruptions_fixed", "leaks_fixed",
                               "image_end_offset", "total_clusters",
                               "allocated_clusters", "fragmented_clusters",
                               "compressed_clusters")
                  if name.replace("_", "-") in data}
        return cls(filename=data.get("filename", ""),
                   format=data.get("format", ""), exit_code=exit_code,
                   raw=data, **fields)


class MapEntry(typing.NamedTuple):
    """One range of ``qemu-img map``: ``length`` bytes from ``start``."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None = None
    compressed: bool = False

    @classmethod
    def from_qemu(cls, data: dict) -> "MapEntry":
        return cls(start=data["start"], length=data["length"],
                   depth=data.get("depth", 0),
                   present=data.get("present", data.get("data", False)),
                   zero=data.get("zero", False), data=data.get("data", False),
                   offset=data.get("offset"),
                   compressed=data.get("compressed", False))

    @classmethod
    def list_from_qemu(cls, data: list) -> list["MapEntry"]:
        return [cls.from_qemu(item) for item in data]


class Measurement(typing.NamedTuple):
    """Bytes an image would need (``qemu-img measure``)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    @classmethod
    def from_qemu(cls, data: dict) -> "Measurement":
        return cls(required=data["required"],
                   fully_allocated=data["fully-allocated"],
                   bitmaps=data.get("bitmaps"))


class CreateOption(typing.NamedTuple):
    """One ``-o`` option a format accepts: name, value type, description."""

    name: str
    type: str
    description: str

    @classmethod
    def parse_help(cls, text: str) -> list["CreateOption"]:
        """Parse the output of ``qemu-img create -f FMT -o help``."""
        options = []
        for line in text.splitlines():
            match = _HELP_RE.match(line)
            if match:
                name, kind, description = match.groups()
                options.append(cls(name, kind, description or ""))
        return options


#: the modes ``qemu-img check -r`` takes.
REPAIR_MODES = ("leaks", "all")


def repair_refusal(repair: str | None) -> str | None:
    """Why ``repair`` is not a mode ``qemu-img check`` takes (one message
    for every layer that checks it first), or None when it is one or None.
    """
    if repair is None or repair in REPAIR_MODES:
        return None
    return "repair must be %s, not %r" % (
        " or ".join("'%s'" % m for m in REPAIR_MODES), repair)
