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

"""``imagebackend cache`` command helpers."""

import argparse

import pytest

from imagebackend.cmd import cache as cache_cmd
from imagebackend.cmd import main


def test_prefetch_progress_adds_up_parallel_downloads():
    calls = []
    progress = cache_cmd._PrefetchProgress(
        lambda *args: calls.append(args), count=3)
    progress("download a", 10, 100)
    progress("download b", 5, 50)
    progress("convert b", 1, 2)             # not a download
    progress("download a", 100, 100)
    assert calls == [("1/3", 10, 100), ("2/3", 15, 150), ("2/3", 105, 150)]
    progress("download c d", 1, None)       # size unknown; a space in the id
    assert calls[-1] == ("3/3", 106, None)
    assert set(progress.done) == {"a", "b", "c d"}


@pytest.mark.parametrize("argv,func,parsed", [
    (["cache", "list"], cache_cmd.list_cache, {}),
    (["cache", "prune", "--dry-run"], cache_cmd.prune_cache,
     {"dry_run": True}),
    (["cache", "prune"], cache_cmd.prune_cache, {"dry_run": False}),
    (["cache", "invalidate", "img"], cache_cmd.invalidate_image,
     {"image_id": "img"}),
    (["cache", "verify"], cache_cmd.verify_cache,
     {"image_ids": [], "repair": False}),
    (["cache", "verify", "a", "b", "--repair"], cache_cmd.verify_cache,
     {"image_ids": ["a", "b"], "repair": True}),
    (["cache", "prefetch", "a", "b", "--parallel", "2"],
     cache_cmd.prefetch_images, {"image_ids": ["a", "b"], "parallel": 2}),
    (["cache", "prefetch", "a"], cache_cmd.prefetch_images,
     {"image_ids": ["a"], "parallel": 4}),
])
def test_cache_commands_parse(argv, func, parsed):
    args = main.build_parser().parse_args(argv + ["-f", "json"])
    assert args.func is func
    assert {key: getattr(args, key) for key in parsed} == parsed


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_parallel_must_be_positive(value):
    with pytest.raises(argparse.ArgumentTypeError):
        cache_cmd._positive(value)
