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

"""What the rbd backend makes and names: its result (a disk libvirt
reaches over the network), the names a disk may have, and Glance's
``rbd://`` locations.
"""

import dataclasses
import urllib.parse

from imagebackend.backends import base
from imagebackend.backends import rbd_cluster
from imagebackend import exception

#: the longest image name accepted (librbd's limit is longer).
MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class RbdLibvirtDisk(base.LibvirtDisk):
    """A libvirt ``<disk type='network'>`` with ``<source protocol='rbd'
    name=source_path>``, its ``<host>`` elements and ``<auth>``.
    """

    protocol: str = "rbd"
    #: ``host:port`` of each monitor.
    hosts: tuple[str, ...] = ()
    auth_username: str | None = None
    secret_type: str = "ceph"
    secret_uuid: str | None = None

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["hosts"] = list(self.hosts)
        return data


@dataclasses.dataclass
class RbdDisk(base.Disk):
    """A disk made by the rbd backend: ``path`` is ``<pool>/<name>``."""

    monitors: list[str] = dataclasses.field(default_factory=list)
    auth_username: str | None = None
    secret_uuid: str | None = None

    def libvirt_disk(self) -> RbdLibvirtDisk:
        return RbdLibvirtDisk(
            source_type="network", source_path=self.path,
            driver_name="qemu", driver_type=self.format,
            backing_chain=tuple(self.backing_chain),
            hosts=tuple(self.monitors), auth_username=self.auth_username,
            secret_uuid=self.secret_uuid)


def normalize(target, pool: str) -> str:
    """``NAME`` or ``<pool>/NAME`` (``pool`` being ``[rbd] pool``) as
    ``<pool>/NAME``.

    :raises imagebackend.exception.InvalidTarget: it is no name a disk of
        this library may have.
    """
    if not isinstance(target, str):
        raise exception.InvalidTarget(path=repr(target),
                                      reason="it is not an image name")
    name = target
    if "/" in target:
        given_pool, name = target.split("/", 1)
        if given_pool != pool:
            raise exception.InvalidTarget(
                path=target,
                reason="disks are made in pool %s ([rbd] pool); give "
                       "the image name alone" % pool)
    if (not name or len(name) > MAX_NAME or name.startswith(".")
            or not name.isprintable()
            or any(c in name for c in "/@ ")
            or rbd_cluster.is_temp(name)):
        raise exception.InvalidTarget(
            path=target,
            reason="an RBD image name is 1 to %d printable characters "
                   "without '/', '@', spaces, a leading '.' or %r"
                   % (MAX_NAME, rbd_cluster.TEMP_MARK))
    return "%s/%s" % (pool, name)


def parse_rbd_url(url) -> tuple[str, str, str, str] | None:
    """``(fsid, pool, image, snap)`` of an ``rbd://`` location, or None
    when it is not one (four non-empty parts, percent-decoded, none with
    a character an image spec cannot hold).
    """
    if not isinstance(url, str) or not url.startswith("rbd://"):
        return None
    parts = [urllib.parse.unquote(p) for p in url[len("rbd://"):].split("/")]
    if len(parts) != 4 or not all(parts) or any(
            c in p for p in parts for c in "/@\0") or not all(
            p.isprintable() for p in parts):
        return None
    return tuple(parts)
