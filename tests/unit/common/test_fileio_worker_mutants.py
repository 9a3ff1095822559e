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

"""What a forked child does with the background threads, in this process
(the child's own run is in test_fileio_unnamed.py, where coverage cannot
see it).
"""

from imagebackend.common import fileio


def test_forget_leaves_no_idle_thread_and_a_free_lock(monkeypatch):
    monkeypatch.setattr(fileio._Worker, "idle", [object()])
    held = fileio._Worker.lock
    monkeypatch.setattr(fileio._Worker, "lock", held)
    held.acquire()          # as a thread of the parent held it at fork
    try:
        fileio._Worker.forget()
        assert fileio._Worker.idle == []
        assert fileio._Worker.lock is not held
        assert fileio._Worker.lock.acquire(blocking=False)
        fileio._Worker.lock.release()
    finally:
        held.release()
