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

"""A lock file is never opened through a symlink: whoever can write the
lock directory cannot make the cache write (a holder record) elsewhere.
"""

import os

import pytest

from imagebackend import cache
from imagebackend.cache import locks as cache_locks
from imagebackend.common import digest as content_digest
from imagebackend import exception
from tests import fakes

VICTIM = b"a host file the cache must never write\n"


@pytest.mark.parametrize("lock", ["fetch", "use"])
def test_a_symlink_at_a_lock_files_name_is_never_followed(tmp_path, lock):
    conf = fakes.conf(tmp_path)
    c = cache.ImageCache(conf, fakes.FakeSource(
        conf, images={"img": fakes.RAW_IMAGE}), fakes.qemu())
    c.store.ensure_dirs()
    cid = content_digest.cache_id("img")
    victim = tmp_path / "victim"
    victim.write_bytes(VICTIM)
    if lock == "fetch":
        path = cache_locks.lock_file(c.lock_dir, cid)
    else:
        path = cache_locks.use_lock_file(c.lock_dir, cid)
    os.symlink(victim, path)

    with pytest.raises(exception.LockFileError) as err:
        if lock == "fetch":
            c.get("img")
        else:
            with c.use("img", exclusive=True):
                pass
    assert os.path.basename(path) in str(err.value)
    assert victim.read_bytes() == VICTIM
    assert os.path.islink(path)
    assert not os.path.exists(c.base_path(cid))
