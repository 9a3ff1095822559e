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

"""The safety policy against crafted images made by the real qemu-img.

Each corpus image is streamed through StreamInspector in chunks of several
sizes and read by inspect_file; refused images must raise their rule's
exception (early, where the header proves it), accepted ones must agree
with what qemu-img itself reports.  Run as a module, this file prints the
per-GiB cost of inspection::

    python -m tests.functional.test_inspect_corpus
"""

import json
import os

from oslo_config import cfg
import pytest

from imagebackend import inspection
from tests.functional.fixtures import corpus

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
CHUNK_SIZES = ("small", 64 * KiB, 4 * MiB)


@pytest.fixture(scope="module")
def entries(crafted_corpus):
    return {e.name: e for e in crafted_corpus}


@pytest.fixture
def conf():
    c = cfg.ConfigOpts()
    inspection.register_opts(c)
    c([])
    return c


def _names(accepted):
    # Test ids are builder names, known before the corpus is built.
    return [b.__name__ for b in corpus.BUILDERS
            if (b.__name__.startswith("valid_")) == accepted]


def _entry(entries, builder_name):
    by_builder = {os.path.basename(os.path.dirname(e.path)): e
                  for e in entries.values()}
    return by_builder[builder_name]


def _stream(entry, conf, chunk_size):
    inspector = inspection.StreamInspector(
        "img-" + entry.name, conf, declared_format=entry.declared_format)
    fed = 0
    with open(entry.path, "rb") as f:
        while chunk := f.read(chunk_size):
            inspector.feed(chunk)
            fed += len(chunk)
    return inspector.finish(), fed


def _small_chunk(entry):
    # One byte at a time where that stays quick: images refused from their
    # header, and small ones.
    size = os.path.getsize(entry.path)
    return 1 if entry.early or size <= 512 * KiB else 4093


def _qemu_info(path, fmt):
    return json.loads(corpus.qemu_img("info", "--output=json", "-f", fmt,
                                      path))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("builder", _names(accepted=False))
def test_refused_while_streaming(entries, conf, builder, chunk_size):
    entry = _entry(entries, builder)
    if chunk_size == "small":
        chunk_size = _small_chunk(entry)
    size = os.path.getsize(entry.path)
    fed = []

    with pytest.raises(entry.expected) as err:
        inspector = inspection.StreamInspector(
            "img-1", conf, declared_format=entry.declared_format)
        with open(entry.path, "rb") as f:
            while chunk := f.read(chunk_size):
                inspector.feed(chunk)
                fed.append(len(chunk))
        inspector.finish()
    assert type(err.value) is entry.expected
    assert err.value.rule == entry.expected.rule
    assert "img-1" in str(err.value)
    if entry.early:
        # Refused by the chunk holding the header (gathered to 64 KiB).
        assert sum(fed) < min(size, max(64 * KiB, chunk_size))


@pytest.mark.parametrize("builder", _names(accepted=False))
def test_refused_on_disk(entries, conf, builder):
    entry = _entry(entries, builder)
    with pytest.raises(entry.expected):
        inspection.inspect_file(entry.path, "img-1", conf,
                                declared_format=entry.declared_format)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("builder", _names(accepted=True))
def test_accepted_while_streaming(entries, conf, builder, chunk_size):
    entry = _entry(entries, builder)
    if chunk_size == "small":
        chunk_size = _small_chunk(entry)
    result, fed = _stream(entry, conf, chunk_size)
    assert (result.format, result.virtual_size) == (
        entry.expected_format, entry.virtual_size)
    assert result.file_size == fed == os.path.getsize(entry.path)


@pytest.mark.parametrize("builder", _names(accepted=True))
def test_accepted_images_agree_with_qemu_img(entries, conf, builder):
    entry = _entry(entries, builder)
    result = inspection.inspect_file(entry.path, "img-1", conf,
                                     declared_format=entry.declared_format)
    assert result.format == entry.expected_format
    info = _qemu_info(entry.path, inspection.qemu_format(result))
    assert info["format"] == inspection.qemu_format(result)
    assert info["virtual-size"] == result.virtual_size == entry.virtual_size
    assert "backing-filename" not in info


@pytest.mark.parametrize("builder", [
    "qcow2_backing_file", "qcow2_backing_file_declared_raw",
    "qcow2_data_file", "vmdk_flat_descriptor",
    "vmdk_descriptor_relative_extent"])
def test_refused_images_really_reach_a_host_file(entries, builder,
                                                 tmp_path):
    """Without the policy, converting the image copies a host file."""
    entry = _entry(entries, builder)
    fmt = entry.path.rsplit(".", 1)[1]
    info = corpus.qemu_img("info", "--output=json", "-f", fmt, entry.path)
    assert os.path.basename(entry.canary) in info
    out = str(tmp_path / "out.raw")
    corpus.qemu_img("convert", "-f", fmt, "-O", "raw", entry.path, out)
    with open(out, "rb") as f:
        assert entry.marker in f.read()


@pytest.mark.parametrize("builder", ["polyglot_qcow2_gpt",
                                     "polyglot_qcow2_iso"])
def test_polyglots_are_valid_qcow2_for_qemu_img(entries, builder):
    entry = _entry(entries, builder)
    corpus.qemu_img("check", "-f", "qcow2", entry.path)
    assert _qemu_info(entry.path, "qcow2")["virtual-size"] == 8 * MiB


# --- cost of inspection ---------------------------------------------------

def sample_streams(directory):
    """(name, first chunk, later chunk, last chunk) of 1 GiB streams."""
    noise = os.urandom(4 * MiB)
    qcow2 = os.path.join(directory, "head.qcow2")
    corpus.qemu_img("create", "-f", "qcow2", qcow2, "2G")
    with open(qcow2, "rb") as f:
        qcow2_head = f.read()
    vmdk = corpus.valid_vmdk_stream_footer(directory)
    with open(vmdk.path, "rb") as f:
        vmdk_data = f.read()
    return [
        ("raw", noise, noise, noise),
        ("qcow2", qcow2_head + noise[len(qcow2_head):], noise, noise),
        ("vmdk-footer", vmdk_data[:-1536] + noise[len(vmdk_data) - 1536:],
         noise, noise[:-1536] + vmdk_data[-1536:]),
    ]
