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

"""Sizes as qemu-img takes them: ``10G``, ``512M``, ``1.5G``, ``1024``.

Apart from :mod:`imagebackend.qemu.results` (qemu-img's output as
dataclasses), so that a command given a size (``disk create --size``) or
a cache reading ``[image_cache] max_size`` loads no more than this.
"""

import re

from imagebackend import exception

_SIZE_RE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?)?b?$",
                      re.IGNORECASE)
_UNITS = {None: 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3,
          "t": 1024 ** 4}


def parse_size(value: str | int) -> int:
    """Return bytes from an int or a string such as ``"10G"``.

    ``"512M"``, ``"1.5G"`` and ``"1024"`` are sizes too.

    Suffixes K, M, G and T (either case) are powers of 1024; a trailing
    ``B`` (or ``iB``) is ignored.  A fraction is accepted when the result
    is a whole number of bytes.

    :raises exception.InvalidSize: not a size (also a ``ValueError``).
    """
    # Not oslo_utils.strutils.string_to_bytes: it needs a B suffix ("10G"
    # fails), reads a lower-case "b" as bits, and goes through a float.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise exception.InvalidSize(value=value,
                                    reason="not a number or a string")
    if isinstance(value, int):
        if value < 0:
            raise exception.InvalidSize(value=value, reason="negative")
        return value
    match = _SIZE_RE.match(value.strip())
    if not match:
        raise exception.InvalidSize(value=value, reason="not a size")
    number, unit = match.groups()
    if number.isdigit():
        # A whole number needs no decimal arithmetic (nor the decimal
        # module's import, for every command given a size).
        return int(number) * _UNITS[unit and unit.lower()]
    import decimal

    size = decimal.Decimal(number) * _UNITS[unit and unit.lower()]
    if size != size.to_integral_value():
        raise exception.InvalidSize(value=value,
                                    reason="not a whole number of bytes")
    return int(size)
