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
"""The cache's typed results turn into exactly the dicts the command line
prints as JSON.
"""

import types

from imagebackend.cache import results


def cached_file(path="/c/_base/x", kind="base", image_id="img"):
    return types.SimpleNamespace(path=path, kind=kind, image_id=image_id)


def test_a_prune_report_keeps_its_json_shape():
    report = results.PruneReport(dry_run=True, cache_size=100,
                                 free_space=10)
    report.add("/c/_base/a", "base", "stale", 40, "img")
    report.keep(cached_file(), "in use by 1 disk(s)")
    assert report.removed[0].size == 40
    assert (report.bytes_freed, report.cache_size, report.free_space) == (
        40, 60, 50)
    assert report.to_dict() == {
        "dry_run": True,
        "removed": [{"file": "/c/_base/a", "kind": "base",
                     "reason": "stale", "bytes": 40, "image_id": "img"}],
        "kept": [{"file": "/c/_base/x", "kind": "base",
                  "reason": "in use by 1 disk(s)", "image_id": "img"}],
        "bytes_freed": 40, "cache_size": 60, "free_space": 50,
        "space_target_met": True, "registry_records_removed": 0,
        "lock_files_removed": 0}


def test_an_invalidation_keeps_its_json_shape():
    report = results.PruneReport()
    report.add("/c/_base/a", "base", "invalidated", 7, "img")
    done = results.Invalidation(image_id="img", marked_stale=["/c/_base/a"],
                                removed=report.removed, kept=report.kept,
                                bytes_freed=report.bytes_freed)
    assert done.to_dict() == {
        "image_id": "img", "marked_stale": ["/c/_base/a"],
        "removed": [{"file": "/c/_base/a", "kind": "base",
                     "reason": "invalidated", "bytes": 7,
                     "image_id": "img"}],
        "kept": [], "bytes_freed": 7}


def test_verification_rows_and_failure():
    ok = results.VerifiedFile(image_id="img", kind="base", generation=1,
                              file="/c/_base/a", status="ok")
    missing = results.VerifiedFile(image_id="gone", kind=None,
                                   generation=None, file=None,
                                   status="not cached")
    assert not results.Verification(files=[ok, missing]).failed
    assert ok.to_dict() == {"image_id": "img", "kind": "base",
                            "generation": 1, "file": "/c/_base/a",
                            "status": "ok", "detail": "", "action": None}
    for status in ("corrupt", "unverified"):
        bad = results.VerifiedFile(image_id="img", kind="sized",
                                   generation=2, file="/c/_base/b",
                                   status=status, detail="why")
        report = results.Verification(files=[ok, bad])
        assert report.failed and list(report) == [ok, bad]
        assert report.to_dict()["files"][1]["status"] == status


def test_prefetch_rows_name_either_the_base_or_the_error():
    done = results.Prefetched(image_id="a", seconds=1.5, file="/c/_base/a",
                              generation=2, cache_hit=False)
    failed = results.Prefetched(image_id="b", seconds=0.1,
                                error="Image b not found")
    assert done.to_dict() == {"image_id": "a", "file": "/c/_base/a",
                              "generation": 2, "cache_hit": False,
                              "seconds": 1.5}
    assert failed.to_dict() == {"image_id": "b", "error": "Image b not found",
                                "seconds": 0.1}
    assert not results.Prefetch(images=[done]).failed
    assert results.Prefetch(images=[done, failed]).failed


def test_a_listed_base_keeps_its_json_shape():
    row = results.CachedBase(image_id="img", kind="sized", generation=1,
                             file="/c/_base/a_10", size_on_disk=4096,
                             virtual_size=10, format="raw",
                             last_used="2026-01-01T00:00:00+00:00", disks=2,
                             stale=False)
    assert sorted(row.to_dict()) == sorted([
        "image_id", "kind", "generation", "file", "size_on_disk",
        "virtual_size", "format", "last_used", "disks", "stale",
        "shared_with"])
    assert row.to_dict()["disks"] == 2
