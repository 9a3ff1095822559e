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

"""How much StreamInspector adds to streaming an image, per GiB.

Compares, over the same chunks: a bare loop, a memory copy (the cheapest
possible copy), inspection alone, and copy + inspection.

    python benchmarks/inspect_stream.py
"""

import time

from oslo_config import cfg

from imagebackend import inspection
from tests.functional import test_inspect_corpus

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def _time_stream(first, middle, last, chunk_size, total, consume):
    """Time ``consume`` over ``total`` bytes: ``first``, then ``middle``
    repeated, then ``last`` (4 MiB each), cut in ``chunk_size`` chunks.
    """
    def cut(buf):
        return [buf[i:i + chunk_size] for i in range(0, len(buf), chunk_size)]

    stream = (cut(first) + cut(middle) * (total // len(middle) - 2) +
              cut(last))
    start = time.perf_counter()
    consume(stream)
    return time.perf_counter() - start


def measure(directory, total=GiB, chunk_sizes=(4 * MiB, 64 * KiB)):
    """Time inspection of ``total`` bytes against a bare loop and a copy.

    :returns: rows of (stream, chunk size, seconds for: bare loop, memcpy
        copy, feed, copy + feed).
    """
    conf = cfg.ConfigOpts()
    inspection.register_opts(conf)
    conf([])
    rows = []
    streams = test_inspect_corpus.sample_streams(directory)
    for name, first, middle, last in streams:
        for chunk_size in chunk_sizes:
            buf = bytearray(chunk_size)

            def bare(stream):
                for _chunk in stream:
                    pass

            def copy(stream):
                for chunk in stream:
                    buf[:len(chunk)] = chunk

            def feed(stream):
                inspector = inspection.StreamInspector(
                    "bench", conf, declared_format=name.split("-")[0])
                for chunk in stream:
                    inspector.feed(chunk)
                inspector.finish()

            def copy_and_feed(stream):
                inspector = inspection.StreamInspector(
                    "bench", conf, declared_format=name.split("-")[0])
                for chunk in stream:
                    inspector.feed(chunk)
                    buf[:len(chunk)] = chunk
                inspector.finish()

            times = [min(_time_stream(first, middle, last, chunk_size, total,
                                      fn) for _ in range(3))
                     for fn in (bare, copy, feed, copy_and_feed)]
            rows.append((name, chunk_size, *times))
    return rows


def main():
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        # ratio: throughput of copy+feed relative to the copy alone, from
        # the separately timed loops (the "both" loop is noisier).
        print("%-12s %8s %9s %9s %9s %9s %7s" % (
            "stream/1GiB", "chunk", "bare ms", "copy ms", "feed ms",
            "both ms", "ratio"))
        for name, chunk, bare, copy, feed, both in measure(directory):
            print("%-12s %8d %9.2f %9.2f %9.2f %9.2f %7.3f" % (
                name, chunk, bare * 1e3, copy * 1e3, feed * 1e3, both * 1e3,
                copy / (copy + feed - bare)))


if __name__ == "__main__":
    main()
