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

"""Every user of one ``_base`` locks in one lock directory.

Locks only save duplicate work, but two hosts sharing ``_base`` while
locking in different directories download and convert every image in
duplicate.  Each (host, lock directory) that publishes into ``_base``
keeps an entry in ``_base/.lock-dirs/`` naming its lock directory's
identity (a UUID kept in the lock directory itself), and
:func:`check_shared` refuses a configuration it can tell is split.
"""

import hashlib
import os
import socket
import tempfile
import time

from imagebackend.cache import layout as cache_layout
from imagebackend.cache import locks as cache_locks
from imagebackend.common import fileio
from imagebackend import exception

#: a file in the lock directory holding its identity (a random UUID).
LOCK_DIR_ID = ".imagebackend-lock-dir-id"
#: an entry of ``_base/.lock-dirs`` not refreshed for this long (seconds) is
#: from a configuration no longer in use.
LOCK_DIR_ENTRY_AGE = 86400
#: how often (seconds) a running cache refreshes its entry.
LOCK_DIR_REFRESH = 3600


def _lock_dir_id(lock_dir: str, create: bool) -> str | None:
    """The identity of ``lock_dir``: a UUID in a file in it, made once
    (with ``create``; otherwise None until then).  The file appears
    complete or not at all, so every reader sees one identity.
    """
    path = os.path.join(lock_dir, LOCK_DIR_ID)
    try:
        with open(path, "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except FileNotFoundError:
        if not create:
            return None
    # Made once per lock directory: not worth importing uuid (and the
    # platform module it loads) in every process.
    import uuid

    fd, tmp = tempfile.mkstemp(dir=lock_dir, prefix=".", suffix=".tmp")
    try:
        os.write(fd, (str(uuid.uuid4()) + "\n").encode())
        os.fchmod(fd, 0o644)
        os.fsync(fd)
        fileio.publish_fd(fd, tmp, path)
    finally:
        os.close(fd)
        fileio.remove_quietly(tmp)
    with open(path, "rb") as f:
        return f.read(64).decode("ascii", "replace").strip()


def check_shared(base_dir: str, lock_dir: str, *,
                 record: bool = False) -> None:
    """Refuse to lock in ``lock_dir`` for ``base_dir`` when another
    configuration (on this host or another) uses ``base_dir`` with
    another lock directory.

    Each (host, lock directory) that has published into ``base_dir``
    keeps a file in ``base_dir/.lock-dirs/`` naming its lock directory's
    identity: a UUID kept in the lock directory itself, so that one shared
    directory has one identity on every host, and two host-local
    directories of the same path have two.  Entries not refreshed for
    :data:`LOCK_DIR_ENTRY_AGE` seconds are ignored (a configuration no
    longer in use).

    :param record: also write (refresh) this configuration's entry, then
        check (the caller is about to publish, or just did).
    :raises imagebackend.exception.SplitLockDirectory: a split is seen.
    :raises OSError: the entries cannot be read or written.
    """
    entries = os.path.join(base_dir, cache_layout.LOCK_DIRS_DIR)
    if not record and not os.path.lexists(entries):
        return
    my_id = _lock_dir_id(lock_dir, create=record)
    host = socket.gethostname()
    mine = hashlib.sha1(("%s\0%s" % (host, lock_dir)).encode(
        "utf-8", "surrogateescape")).hexdigest() + ".json"
    now = time.time()
    if record:
        fileio.ensure_dir(entries)
        fileio.write_json_atomic(
            os.path.join(entries, mine),
            {"host": host, "lock_dir": lock_dir, "id": my_id, "seen": now},
            durable=False)
    for name in sorted(os.listdir(entries)):
        if name == mine or not name.endswith(".json"):
            continue
        path = os.path.join(entries, name)
        if os.path.islink(path):
            continue
        entry = fileio.read_json(path) or {}
        seen = entry.get("seen")
        if (entry.get("id") is None or entry.get("id") == my_id
                or not isinstance(seen, (int, float))
                or now - seen > LOCK_DIR_ENTRY_AGE):
            continue
        raise exception.SplitLockDirectory(
            base_dir=base_dir, lock_dir=lock_dir,
            other=cache_locks.printable_field(entry.get("lock_dir")),
            host=cache_locks.printable_field(entry.get("host"), 100),
            marker=path)
