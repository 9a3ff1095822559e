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

"""qemu-img's progress output, parsed into percentages."""

from imagebackend.qemu import running


def test_progress_parser_never_goes_backwards():
    seen = []
    parser = running.ProgressParser(seen.append)
    parser.feed("    (10.00/100%)\r    (5.00/100%)\r    (2")
    parser.feed("0.00/100%)\r")
    parser.finish()
    assert seen == [10.0, 20.0, 100.0]


def test_progress_parser_does_not_repeat_100():
    seen = []
    parser = running.ProgressParser(seen.append)
    parser.feed("    (100.00/100%)\r    (100.00/100%)")
    parser.finish()
    assert seen == [100.0]
