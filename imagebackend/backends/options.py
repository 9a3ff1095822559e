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

"""The backends' options, declared apart from the backends so that a
configuration can be built without importing them:

* ``[imagebackend]`` (:data:`OPTIONS`): which backend makes disks and
  whether they reserve their space (read by
  :mod:`imagebackend.backends.base`);
* ``[rbd]`` (:data:`RBD_OPTIONS`): the Ceph cluster and pools of the
  ``rbd`` backend (:mod:`imagebackend.backends.rbd`).

:func:`imagebackend.opts.register_opts` registers them.
"""

from oslo_config import cfg

RBD_GROUP = "rbd"

OPTIONS = [
    cfg.StrOpt("images_type",
               default="qcow2",
               choices=[
                   ("qcow2", "a qcow2 copy-on-write overlay over the "
                             "cached base"),
                   ("cached-base", "a qcow2 overlay over a shared base "
                                   "already grown to the disk's size"),
                   ("raw", "an independent sparse raw copy of the base"),
                   ("rbd", "a Ceph RBD copy-on-write clone of a base "
                           "imported once per cluster (options in [rbd])"),
               ],
               help="How instance disks are made from cached base images "
                    "(the name of an 'imagebackend.backends' entry "
                    "point). Default: qcow2."),
    cfg.StrOpt("preallocate_images",
               default="none",
               choices=[
                   ("none", "allocate disk space as the guest writes"),
                   ("space", "reserve the disk's full size when it is "
                             "created (fallocate), so a full host "
                             "filesystem is found at creation, not by a "
                             "guest I/O error"),
               ],
               help="Whether instance disks reserve their space up front. "
                    "Applies to every backend. Default: none."),
]

RBD_OPTIONS = [
    cfg.StrOpt("pool",
               default="rbd",
               help="Ceph pool that holds the instance disks (RBD clones "
                    "of the bases). Default: rbd."),
    cfg.StrOpt("base_pool",
               help="Ceph pool that holds the base images, one per image "
                    "for the whole cluster, each with a protected "
                    "snapshot 'snap' the disks are cloned from. Unset: "
                    "the same pool as [rbd] pool."),
    cfg.StrOpt("ceph_conf",
               default="/etc/ceph/ceph.conf",
               help="The cluster's configuration file (monitors, "
                    "keyring). Default: /etc/ceph/ceph.conf."),
    cfg.StrOpt("user",
               help="The cephx user to connect as, without 'client.' "
                    "(its key must be in a keyring that ceph_conf names), "
                    "also given to libvirt as the disk's auth user. Unset: "
                    "Ceph's default, client.admin."),
    cfg.StrOpt("secret_uuid",
               help="UUID of the libvirt secret that holds the key of "
                    "[rbd] user, written into the network disk libvirt is "
                    "given. Unset: no auth element (a cluster without "
                    "cephx)."),
    cfg.IntOpt("connect_timeout",
               default=5, min=1,
               help="Seconds to wait for the cluster when connecting and "
                    "for each monitor or OSD operation; a cluster that "
                    "does not answer in time fails the request with an "
                    "error naming it, instead of hanging. Default: 5."),
]
