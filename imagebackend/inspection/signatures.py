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

"""The one table of image formats: their names and their signatures.

Each format has the name oslo.utils' inspectors give it (``vhd``), the
name qemu-img's ``-f`` takes for it (``vpc``) when the library accepts it,
and the bytes its header starts with, if any.  Every other module derives
what it needs from :data:`FORMATS`: the inspection policy
(:mod:`imagebackend.inspection`), the formats a base's record or a backing
file may have (:data:`QEMU_FORMAT_NAMES`), the names an image source may
declare (:data:`DECLARED_FORMATS`).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Format:
    """One image format.

    :param name: oslo.utils' name for it.
    :param qemu: qemu-img's name for it, ``None`` when the library refuses
        it (then a header with its signature is refused, never read as
        raw).
    :param magic: the bytes a header of this format holds at ``offset``;
        ``None`` for formats without one (raw data, partition tables and
        ISO images are all read as ``raw``).
    :param offset: where ``magic`` is.
    """

    name: str
    qemu: str | None
    magic: bytes | None = None
    offset: int = 0

    def signed(self, head: bytes) -> bool:
        """Whether ``head``, the start of an image, carries the signature.
        """
        return (self.magic is not None
                and head[self.offset:self.offset + len(self.magic)]
                == self.magic)


#: Every format the inspection knows, by oslo.utils' name.
FORMATS = {f.name: f for f in (
    Format("raw", "raw"),
    Format("gpt", "raw"),
    Format("iso", "raw"),
    Format("qcow2", "qcow2", b"QFI\xfb"),
    Format("vmdk", "vmdk", b"KDMV"),
    Format("vhd", "vpc", b"conectix"),
    Format("vhdx", "vhdx", b"vhdxfile"),
    Format("vdi", "vdi", b"\x7f\x10\xda\xbe", 0x40),
    Format("qed", None, b"QED\x00"),
    Format("luks", None, b"LUKS\xba\xbe"),
)}

QCOW2 = FORMATS["qcow2"]

#: Accepted format (oslo.utils' name) -> the name qemu-img's -f takes.
QEMU_FORMATS = {f.name: f.qemu for f in FORMATS.values() if f.qemu}

#: qemu-img's names of the accepted formats: what a base's record or a
#: backing file may say.
QEMU_FORMAT_NAMES = tuple(sorted(set(QEMU_FORMATS.values())))

#: A declared disk format (Glance's and qemu-img's names) -> the accepted
#: format it must be.
DECLARED_FORMATS = dict(
    {name: name for name in QEMU_FORMATS},
    ami="raw", aki="raw", ari="raw", vpc="vhd")
