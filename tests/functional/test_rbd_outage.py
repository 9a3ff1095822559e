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

"""The rbd backend when Ceph stops answering mid-create: a clear error
within the configured timeout, and no half-made image under a final name.

The daemons of a cluster of the test's own are frozen (SIGSTOP) at a
chosen instant, through a wrapper around the real ``rbd`` module, and
thawed afterwards so the cluster's state can be read.
"""

import contextlib
import os
import signal
import time

import pytest

from imagebackend.backends import base as backends_base
from imagebackend.backends import rbd_cluster
from imagebackend.common import digest
from imagebackend import exception
from tests.functional.fixtures import ceph
from tests.functional.fixtures import env as fenv

MiB = fenv.MiB
TIMEOUT = 3


@pytest.fixture
def own_cluster(ceph_cluster):
    """A cluster for this test alone (the run's own one is left alone)."""
    with ceph.cluster_in_tempdir() as cluster:
        yield cluster


class _FreezeAfter:
    """The real ``rbd`` module, but ``RBD().<method>`` freezes the cluster
    right after it succeeds.
    """

    def __init__(self, real, method, freeze):
        self._real, self._method, self._freeze = real, method, freeze

    def __getattr__(self, name):
        return getattr(self._real, name)

    def RBD(self):
        real, method, freeze = self._real.RBD(), self._method, self._freeze

        class Wrapped:
            def __getattr__(self, name):
                call = getattr(real, name)
                if name != method:
                    return call

                def then_freeze(*args, **kwargs):
                    result = call(*args, **kwargs)
                    freeze()
                    return result
                return then_freeze
        return Wrapped()


@contextlib.contextmanager
def _frozen_on(cluster, method):
    """A ``(rados, rbd)`` pair that freezes ``cluster`` after
    ``RBD().<method>`` while ``armed[0]``; thawed on exit.
    """
    rados, rbd = rbd_cluster.bindings()
    frozen = []
    armed = [True]

    def freeze():
        if armed[0] and not frozen:
            for proc in cluster.procs.values():
                os.kill(proc.pid, signal.SIGSTOP)
            frozen.append(time.monotonic())

    try:
        yield (rados, _FreezeAfter(rbd, method, freeze)), frozen, armed
    finally:
        for proc in cluster.procs.values():
            os.kill(proc.pid, signal.SIGCONT)


def _backend(tmp_path, cluster, modules):
    dep = fenv.Deployment(str(tmp_path))
    dep.write_config(rbd=dict(cluster.rbd_conf(), pool="disks",
                              base_pool="bases", connect_timeout=TIMEOUT))
    fenv.make_raw(os.path.join(dep.images, "img"), 8 * MiB)
    conf = dep.conf()
    return backends_base.load(conf, "rbd", modules=modules)


def test_stopped_after_clone_leaves_no_disk(own_cluster, tmp_path):
    with _frozen_on(own_cluster, "clone") as (modules, frozen, armed):
        backend = _backend(tmp_path, own_cluster, modules)
        armed[0] = False
        backend.create_image("img", "first", 16 * MiB)     # the base
        armed[0] = True
        with pytest.raises(exception.RbdUnavailable) as caught:
            backend.create_image("img", "second", 16 * MiB)
        waited = time.monotonic() - frozen[0]
    message = str(caught.value)
    assert "did not answer" in message
    assert own_cluster.conf_path in message
    assert "connect_timeout" in message
    # Bounded by the timeout (the resize, then the clean-up attempt).
    assert waited < 6 * TIMEOUT
    disks = own_cluster.run("rbd", "ls", "disks").stdout.split()
    assert "second" not in disks
    assert "first" in disks
    # What is left is under a temporary name only.
    assert all(d == "first" or rbd_cluster.is_temp(d) for d in disks)
    # Thawed, the next request works again (a new connection).
    backend.create_image("img", "third", 16 * MiB)
    assert "third" in own_cluster.run("rbd", "ls", "disks").stdout.split()


def test_stopped_mid_import_leaves_no_base(own_cluster, tmp_path):
    with _frozen_on(own_cluster, "create") as (modules, frozen, _):
        backend = _backend(tmp_path, own_cluster, modules)
        with pytest.raises(exception.RbdUnavailable) as caught:
            backend.create_image("img", "disk", 16 * MiB)
        waited = time.monotonic() - frozen[0]
    assert "did not answer" in str(caught.value)
    assert waited < 8 * TIMEOUT
    cid = digest.cache_id("img")
    bases = own_cluster.run("rbd", "ls", "bases").stdout.split()
    assert cid not in bases
    assert all(rbd_cluster.is_temp(b) for b in bases)
    assert "disk" not in own_cluster.run("rbd", "ls", "disks").stdout.split()
