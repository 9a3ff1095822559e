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

"""An in-memory stand-in for Ceph's ``rados`` and ``rbd`` modules: the
calls the rbd backend makes, with librbd's refusals (an existing name, a
protected snapshot with clones, a missing image), and failures a test
injects by operation name.
"""

import datetime
import errno
import json
import types


class Error(Exception):
    def __init__(self, message="", errno=None):
        super().__init__(message)
        self.errno = errno


def _errors(prefix):
    names = {"ImageNotFound": errno.ENOENT, "ImageExists": errno.EEXIST,
             "ImageBusy": errno.EBUSY, "ImageHasSnapshots": errno.ENOTEMPTY,
             "ObjectNotFound": errno.ENOENT, "ObjectExists": errno.EEXIST,
             "ObjectBusy": errno.EBUSY, "TimedOut": errno.ETIMEDOUT}
    base = type(prefix + "Error", (Error,), {})
    classes = {"Error": base}
    for name, code in names.items():
        classes[name] = type(name, (base,), {
            "__init__": (lambda self, message="", _c=code:
                         Error.__init__(self, message, _c))})
    return classes


class Image:
    """One image's state."""

    def __init__(self, size, parent=None, created=None):
        self.size = size
        self.created = created or datetime.datetime.utcnow()
        self.writes = {}            # offset -> bytes
        self.meta = {}
        self.snaps = {}             # name -> protected
        self.parent = parent        # (pool, name, snap)


class Cluster:
    """The cluster's state, shared by every handle on it.

    :attr fail: operation name -> exception (or a callable returning one)
        raised when that operation is next called (once).
    :attr calls: the operation names called, in order.
    """

    def __init__(self, pools=("rbd",), fsid="fsid-1"):
        self.pools = {pool: {} for pool in pools}
        self.locks = {}             # (pool, key) -> cookie
        self.fsid = fsid
        self.fail = {}
        self.calls = []
        self.rados_errors = _errors("Rados")
        self.rbd_errors = _errors("Rbd")
        self.connected = 0

    def op(self, name):
        self.calls.append(name)
        exc = self.fail.pop(name, None)
        if exc is not None:
            raise exc() if callable(exc) else exc

    def children(self, pool, name, snap):
        return [(p, n) for p, images in self.pools.items()
                for n, image in images.items()
                if image.parent == (pool, name, snap)]

    def modules(self):
        """``(rados, rbd)`` module stand-ins on this cluster."""
        cluster = self
        rados = types.SimpleNamespace(**self.rados_errors)
        rbd = types.SimpleNamespace(**self.rbd_errors)
        rbd.RBD_FEATURE_LAYERING = 1
        rados.Rados = lambda **kwargs: _Rados(cluster, **kwargs)
        rbd.RBD = lambda: _RBD(cluster)
        rbd.Image = (lambda ioctx, name, snapshot=None, read_only=False:
                     _ImageHandle(cluster, ioctx.pool, name, snapshot))
        return rados, rbd


class _Rados:
    def __init__(self, cluster, conffile=None, rados_id=None, conf=None):
        self.cluster = cluster
        self.args = (conffile, rados_id, conf)

    def connect(self, timeout=None):
        self.cluster.op("connect")
        self.cluster.connected += 1

    def shutdown(self):
        self.cluster.connected -= 1

    def open_ioctx(self, pool):
        self.cluster.op("open_ioctx")
        if pool not in self.cluster.pools:
            raise self.cluster.rados_errors["ObjectNotFound"](
                "no pool %s" % pool)
        return _Ioctx(self.cluster, pool)

    def get_fsid(self):
        return self.cluster.fsid

    def mon_command(self, cmd, inbuf, timeout=0):
        self.cluster.op("mon_command")
        assert json.loads(cmd)["prefix"] == "mon dump"
        return 0, json.dumps({"mons": [
            {"name": "a", "addr": "192.0.2.1:6789/0"},
            {"name": "b", "addr": "192.0.2.2:6789/0"}]}).encode(), ""


class _Ioctx:
    def __init__(self, cluster, pool):
        self.cluster = cluster
        self.pool = pool

    def close(self):
        pass

    def lock_exclusive(self, key, name, cookie, desc="", duration=None,
                       flags=0):
        self.cluster.op("lock_exclusive")
        held = self.cluster.locks.get((self.pool, key))
        if held is not None and held != cookie:
            raise self.cluster.rados_errors["ObjectBusy"]("locked")
        if held == cookie and not flags:
            raise self.cluster.rados_errors["ObjectExists"]("mine already")
        self.cluster.locks[(self.pool, key)] = cookie

    def unlock(self, key, name, cookie):
        self.cluster.op("unlock")
        if self.cluster.locks.get((self.pool, key)) != cookie:
            raise self.cluster.rados_errors["ObjectNotFound"]("not held")
        del self.cluster.locks[(self.pool, key)]


class _RBD:
    def __init__(self, cluster):
        self.cluster = cluster
        self.errors = cluster.rbd_errors

    def _images(self, ioctx):
        return self.cluster.pools[ioctx.pool]

    def create(self, ioctx, name, size, old_format=True, features=None):
        self.cluster.op("create")
        if name in self._images(ioctx):
            raise self.errors["ImageExists"](name)
        self._images(ioctx)[name] = Image(size)

    def list(self, ioctx):
        return list(self._images(ioctx))

    def rename(self, ioctx, src, dest):
        self.cluster.op("rename")
        images = self._images(ioctx)
        if dest in images:
            raise self.errors["ImageExists"](dest)
        if src not in images:
            raise self.errors["ImageNotFound"](src)
        images[dest] = images.pop(src)
        for image in (i for p in self.cluster.pools.values()
                      for i in p.values()):
            if image.parent and image.parent[:2] == (ioctx.pool, src):
                image.parent = (ioctx.pool, dest, image.parent[2])

    def clone(self, p_ioctx, p_name, p_snap, c_ioctx, c_name,
              features=None):
        self.cluster.op("clone")
        parent = self._images(p_ioctx).get(p_name)
        if parent is None or not parent.snaps.get(p_snap):
            raise self.errors["ImageNotFound"]("%s@%s" % (p_name, p_snap))
        if c_name in self._images(c_ioctx):
            raise self.errors["ImageExists"](c_name)
        self._images(c_ioctx)[c_name] = Image(
            parent.size, parent=(p_ioctx.pool, p_name, p_snap))

    def remove(self, ioctx, name):
        self.cluster.op("remove")
        image = self._images(ioctx).get(name)
        if image is None:
            raise self.errors["ImageNotFound"](name)
        if image.snaps:
            raise self.errors["ImageHasSnapshots"](name)
        del self._images(ioctx)[name]


class _ImageHandle:
    def __init__(self, cluster, pool, name, snapshot=None):
        cluster.op("open_image")
        self.cluster, self.pool, self.name = cluster, pool, name
        self.errors = cluster.rbd_errors
        self.snap = snapshot
        if name not in cluster.pools[pool]:
            raise self.errors["ImageNotFound"](name)

    @property
    def image(self):
        return self.cluster.pools[self.pool][self.name]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        pass

    def size(self):
        return self.image.size

    def resize(self, size):
        self.cluster.op("resize")
        self.image.size = size

    def write(self, data, offset):
        self.cluster.op("write")
        self.image.writes[offset] = bytes(data)
        return len(data)

    def flush(self):
        self.cluster.op("flush")

    def metadata_set(self, key, value):
        self.image.meta[key] = value

    def metadata_list(self):
        return list(self.image.meta.items())

    def create_snap(self, name):
        self.cluster.op("create_snap")
        self.image.snaps[name] = False

    def protect_snap(self, name):
        self.cluster.op("protect_snap")
        self.image.snaps[name] = True

    def unprotect_snap(self, name):
        self.cluster.op("unprotect_snap")
        if self.cluster.children(self.pool, self.name, name):
            raise self.errors["ImageBusy"]("has clones")
        self.image.snaps[name] = False

    def is_protected_snap(self, name):
        return self.image.snaps[name]

    def remove_snap(self, name):
        self.cluster.op("remove_snap")
        if self.image.snaps[name]:
            raise self.errors["ImageBusy"]("protected")
        del self.image.snaps[name]

    def list_snaps(self):
        return [{"name": name} for name in self.image.snaps]

    def set_snap(self, name):
        self.snap = name

    def list_children(self):
        return self.cluster.children(self.pool, self.name, self.snap)

    def parent_info(self):
        if self.image.parent is None:
            raise self.errors["ImageNotFound"]("no parent")
        return self.image.parent

    def create_timestamp(self):
        return self.image.created

    def diff_iterate(self, offset, length, from_snapshot, callback):
        for start, data in sorted(self.image.writes.items()):
            callback(start, len(data), True)

    def read(self, offset, length):
        out = bytearray(length)
        for start, data in self.image.writes.items():
            for i, byte in enumerate(data):
                if offset <= start + i < offset + length:
                    out[start + i - offset] = byte
        return bytes(out)

    def aio_write(self, data, offset, oncomplete):
        failure = self.cluster.fail.pop("aio_write", None)
        self.cluster.calls.append("aio_write")
        if failure is None:
            self.image.writes[offset] = bytes(data)
        return _Completion(-failure if failure else len(data))


class _Completion:
    def __init__(self, ret):
        self.ret = ret

    def wait_for_complete_and_cb(self):
        pass

    def get_return_value(self):
        return self.ret
