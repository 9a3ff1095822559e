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

"""Tests that kill mutants of imagebackend.inspection (the stream inspector).

``tox -e mutation`` (doc/source/mutation.rst) showed what the policy tests
did not pin down: the attributes and messages of refusals a caller reads,
how the end of a stream is kept for a VMDK footer whatever the chunking
(bytes or reused buffers, chunks straddling the footer, skipped parts),
that the inspectors see the stream in fixed pieces, that memory stays
bounded, and how :func:`inspect_file` reports the file it cannot use.
"""

import errno
import logging
import os
import stat
import struct
import tracemalloc
from unittest import mock
import warnings

from oslo_utils.imageutils import format_inspector as fi
import pytest

from imagebackend import exception
from imagebackend import inspection
from imagebackend.inspection import rules
from tests.unit.inspection import test_inspection as ti

KiB = ti.KiB
MiB = ti.MiB
GiB = ti.GiB


@pytest.fixture
def conf():
    return ti.conf.__wrapped__()


def _feed_all(inspector, chunks):
    for chunk in chunks:
        inspector.feed(chunk)
    return inspector.finish()


# --- records and names ----------------------------------------------------

def test_a_malformed_record_is_named_in_the_error():
    with pytest.raises(ValueError) as err:
        inspection.InspectionResult.from_dict({"format": "raw"})
    assert str(err.value) == "not an inspection record: {'format': 'raw'}"
    assert isinstance(err.value.__cause__, KeyError)


def test_a_record_keeps_every_field():
    record = {"format": "qcow2", "virtual_size": "1024", "version": 7,
              "file_size": "300", "declared_format": "qcow2"}
    result = inspection.InspectionResult.from_dict(record)
    assert result == inspection.InspectionResult(
        format="qcow2", virtual_size=1024, version=7, file_size=300,
        declared_format="qcow2")
    assert not result.current


def test_a_record_without_file_size_reads_none():
    result = inspection.InspectionResult.from_dict(
        {"format": "raw", "virtual_size": 10, "version": 1})
    assert result.file_size is None
    assert result.declared_format is None
    assert result.current


def test_qemu_format_names_the_refused_format():
    with pytest.raises(ValueError) as err:
        inspection.qemu_format("qed")
    assert str(err.value) == "no qemu-img format for 'qed'"
    assert err.value.__cause__ is None


# --- requested size -------------------------------------------------------

def test_a_disk_smaller_than_the_image_names_both_sizes():
    result = inspection.InspectionResult(format="qcow2", virtual_size=GiB)
    with pytest.raises(exception.DiskSmallerThanImage) as err:
        inspection.check_requested_size("img-1", result, GiB - 1)
    assert err.value.kwargs == {"image_id": "img-1", "virtual_size": GiB,
                                "requested_size": GiB - 1}
    assert str(err.value) == (
        "Image img-1: its virtual size is 1073741824 bytes, larger than "
        "the requested disk of 1073741823 bytes; request a disk of at least "
        "1073741824 bytes (a larger flavor).")


@pytest.mark.parametrize("data,fmt,vsize", [
    (ti.qcow2(size=3 * GiB), "qcow2", 3 * GiB),
    (ti.iso(), "iso", 64 * 2048),
    (ti.RAW, "raw", len(ti.RAW)),
])
def test_the_stream_checks_the_requested_size_with_the_image_size(
        conf, data, fmt, vsize):
    exc, fed = ti.stream(data, conf, requested_size=1000)
    assert type(exc) is exception.DiskSmallerThanImage
    assert exc.kwargs == {"image_id": "img-1", "virtual_size": vsize,
                          "requested_size": 1000}
    if fmt != "qcow2":
        # The size of raw data (ISO, partition table) is only known at the
        # end: it is never refused on a part of the stream.
        assert fed == len(data)


def test_inspect_file_checks_the_requested_size(conf, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(ti.qcow2(size=3 * GiB))
    with pytest.raises(exception.DiskSmallerThanImage, match="img-7"):
        inspection.inspect_file(str(path), "img-7", conf,
                                requested_size=2 * GiB)
    result = inspection.inspect_file(str(path), "img-7", conf,
                                     declared_format="qcow2",
                                     requested_size=3 * GiB)
    assert result.declared_format == "qcow2"
    assert result.virtual_size == 3 * GiB


def test_too_large_names_the_size_and_the_option(conf):
    conf.set_override("max_image_virtual_size", 2 * GiB, "imagebackend")
    exc, _ = ti.stream(ti.qcow2(size=2 * GiB + 1), conf)
    assert type(exc) is exception.ImageTooLarge
    assert exc.kwargs["image_id"] == "img-1"
    assert exc.kwargs["virtual_size"] == 2 * GiB + 1
    assert exc.kwargs["reason"] == (
        "its virtual size of 2147483649 bytes exceeds [imagebackend] "
        "max_image_virtual_size (2147483648 bytes); raise that option only "
        "if the image is genuine")


@pytest.mark.parametrize("data,vsize", [
    # A qcow2 header may record a size of 0 (qemu-img creates such disks).
    (ti.qcow2(size=0), 0),
    # VHD: the current size, which qemu uses, larger than the original.
    (ti.vhd(size=GiB)[:48] + struct.pack(">Q", 4 * GiB) +
     ti.vhd(size=GiB)[56:], 4 * GiB),
])
def test_the_stream_reads_each_format_s_own_virtual_size(conf, data, vsize):
    result = ti.inspect_bytes(data, conf)
    assert result.virtual_size == vsize


def test_a_header_without_a_virtual_size_is_refused(conf):
    exc, _ = ti.stream(ti.vdi(size=0), conf)
    assert type(exc) is exception.InvalidImageFormat
    assert exc.kwargs == {
        "image_id": "img-1", "detected_format": "vdi",
        "rule": "invalid-format",
        "reason": "its content starts like a vdi image but its header "
                  "records no virtual size; the image is truncated, corrupt "
                  "or crafted: upload a valid copy"}


# --- mismatches and ambiguity ---------------------------------------------

@pytest.mark.parametrize("data,declared,detected,content", [
    # Refused on the way: the declared inspector has said "not this".
    (ti.RAW, "qcow2", None, "not qcow2"),
    # The name declared is kept in the message, the format it means too.
    (ti.RAW, "vpc", None, "not vhd"),
    (ti.qcow2(), "raw", "qcow2", "qcow2"),
    (ti.qcow2(), "vmdk", "qcow2", "qcow2"),
    # Refused at the end: too short for the declared format, so raw.
    (b"x" * 1000, "vhdx", "raw", "raw"),
    (b"x" * 1000, "ISO", "raw", "raw"),
])
def test_a_mismatch_names_what_was_declared_and_found(conf, data, declared,
                                                      detected, content):
    exc, _ = ti.stream(data, conf, declared_format=declared)
    assert type(exc) is exception.FormatMismatch
    assert exc.kwargs == {
        "image_id": "img-1", "declared_format": declared,
        "detected_format": detected, "rule": "format-mismatch",
        "reason": "it is declared %s but its content is %s; correct the "
                  "image's disk format or upload the right file" % (
                      declared, content)}


def test_ambiguous_content_lists_the_formats(conf):
    data = ti.qcow2()[:446] + ti.mbr(((0x83, 2048),))[446:] + bytes(MiB)
    exc, _ = ti.stream(data, conf)
    assert type(exc) is exception.AmbiguousFormat
    assert exc.kwargs["image_id"] == "img-1"
    assert exc.kwargs["formats"] == ["gpt", "qcow2"]
    assert "valid as each of gpt, qcow2 at once" in exc.kwargs["reason"]


# --- logs -----------------------------------------------------------------

def test_a_refusal_is_logged_once_as_a_warning(conf, caplog):
    caplog.set_level(logging.DEBUG, logger="imagebackend.inspection")
    exc, _ = ti.stream(ti.qcow2(backing=True), conf)
    records = [r for r in caplog.records
               if r.name == "imagebackend.inspection"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "Image img-1 refused: %s" % exc)]


def test_the_result_is_logged_at_debug(conf, caplog):
    caplog.set_level(logging.DEBUG, logger="imagebackend.inspection")
    ti.inspect_bytes(ti.qcow2(size=3 * GiB), conf)
    messages = [r.getMessage() for r in caplog.records
                if r.name == "imagebackend.inspection"]
    assert messages == ["Image img-1: qcow2, virtual size 3221225472 bytes"]


# --- programming errors ---------------------------------------------------

def test_feed_after_finish_says_so(conf):
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(ti.RAW)
    inspector.finish()
    with pytest.raises(RuntimeError) as err:
        inspector.feed(b"more")
    assert str(err.value) == "feed() after finish()"


def test_skip_while_inspectors_need_data_says_so(conf):
    inspector = inspection.StreamInspector("img-1", conf)
    with pytest.raises(RuntimeError) as err:
        inspector.skip(10)
    assert str(err.value) == "skip() while the inspectors need data"
    assert inspector.bytes_seen == 0


# --- the end of the stream ------------------------------------------------

def _footer_image(body=8 * MiB):
    return ti.vmdk_with_footer(body=body)


def test_only_a_vmdk_with_a_footer_asks_for_the_end(conf):
    fresh = inspection.StreamInspector("img-1", conf)
    assert fresh.tail_bytes == 0 and fresh.wants_bytes
    for data, tail in ((ti.qcow2(pad=MiB), 0), (ti.RAW, 0),
                       (_footer_image(), 4 * KiB)):
        inspector = inspection.StreamInspector("img-1", conf)
        inspector.feed(data[:MiB])
        assert not inspector.wants_bytes
        assert inspector.tail_bytes == tail


# The end of a VMDK whose footer is its last 1536 bytes, split in chunks
# of every kind a reader produces: a chunk of exactly the kept size, chunks
# smaller than the footer, chunks straddling it.
END_SPLITS = {
    "4k-then-small": (-5096, -1000, -500),
    "last-is-4k": (-4096,),
    "last-between-4k-and-8k": (-6000,),
    "small-bytes-only": (-3000, -2500, -2000, -1500, -1000, -500),
}


@pytest.mark.parametrize("split", sorted(END_SPLITS))
@pytest.mark.parametrize("kind", ("bytes", "bytearray"))
def test_the_footer_is_kept_whatever_the_chunks_of_the_end(conf, split,
                                                           kind):
    data = _footer_image()
    cuts = END_SPLITS[split]
    bounds = [0, len(data) + cuts[0]] + [len(data) + c for c in cuts[1:]]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:] + [len(data)])]
    if kind == "bytearray":
        chunks = [chunks[0]] + [bytearray(c) for c in chunks[1:]]
    inspector = inspection.StreamInspector("img-1", conf)
    result = _feed_all(inspector, chunks)
    assert (result.format, result.virtual_size) == ("vmdk", MiB)


def test_a_corrupt_footer_is_refused_whatever_the_chunks_of_the_end(conf):
    data = _footer_image()
    data = data[:-1] + b"\x01"
    inspector = inspection.StreamInspector("img-1", conf)
    with pytest.raises(exception.InvalidImageFormat, match="footer"):
        _feed_all(inspector, [data[:-3000], data[-3000:-1000],
                              data[-1000:]])


def test_skipping_to_the_end_keeps_the_bytes_still_fed(conf):
    data = _footer_image()
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(data[:-1000])
    assert not inspector.wants_bytes
    inspector.skip(0)       # nothing skipped: nothing forgotten
    inspector.feed(data[-1000:])
    assert inspector.bytes_seen == len(data)
    assert inspector.finish().format == "vmdk"


def test_skip_counts_every_byte_and_forgets_what_it_passes(conf):
    data = _footer_image()
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(data[:MiB])
    inspector.skip(1)
    assert inspector.bytes_seen == MiB + 1
    # A chunk fed before a skip is not the end of the stream any more.
    inspector.feed(data[MiB + 1:MiB + 2049])
    inspector.skip(len(data) - 4096 - (MiB + 2049))
    assert inspector.bytes_seen == len(data) - 4096
    for offset in range(len(data) - 4096, len(data), 1024):
        inspector.feed(data[offset:offset + 1024])
    result = inspector.finish()
    assert (result.format, result.file_size) == ("vmdk", len(data))


def test_a_footer_completed_by_the_last_small_piece(conf):
    # The stream ends 1000 bytes into a new piece while another inspector
    # (VHDX) still reads: the footer is in the last two chunks.
    data = _footer_image(body=2 * 64 * KiB - 536)
    assert len(data) == 2 * 64 * KiB + 1000
    result, _ = ti.stream(data, conf, 64 * KiB)
    assert (result.format, result.file_size) == ("vmdk", len(data))


def test_the_kept_end_stays_small_with_reused_buffers(conf):
    data = _footer_image(body=MiB)
    inspector = inspection.StreamInspector("img-1", conf)
    inspector.feed(data[:MiB])
    assert inspector.tail_bytes == 4 * KiB
    buf = bytearray(b"\x01" * MiB)
    tracemalloc.start()
    try:
        for _ in range(48):
            inspector.feed(buf)      # a reader's buffer: copied where kept
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    inspector.feed(data[MiB:])
    assert inspector.finish().file_size == len(data) + 48 * MiB


# --- how the inspectors see the stream ------------------------------------

@pytest.mark.parametrize("chunk_size", (7, 1000, 1024, 4 * KiB, 64 * KiB,
                                        4 * MiB))
def test_the_inspectors_see_whole_pieces_whatever_the_chunks(conf,
                                                             chunk_size):
    data = ti.RAW + bytes(MiB)
    with ti.chunk_sizes(fi.VHDXInspector, "eat_chunk") as pieces:
        result, _ = ti.stream(data, conf, chunk_size)
    assert result.format == "raw"
    # The VHDX inspector reads its first 256 KiB, in pieces of 64 KiB.
    if 64 * KiB % chunk_size == 0 or chunk_size > 64 * KiB:
        assert pieces == [64 * KiB] * 4
    else:
        # Small chunks are gathered up to the first chunk that reaches
        # 64 KiB; what is beyond that is cut into a small piece.
        assert max(pieces) == 64 * KiB
        assert len(pieces) <= 8 and sum(pieces) <= 4 * (64 * KiB + 1000)


def test_the_policy_is_applied_only_when_a_verdict_changes(conf):
    data = ti.RAW + bytes(MiB)
    inspector = inspection.StreamInspector("img-1", conf)
    with mock.patch.object(rules, "Policy", wraps=rules.Policy) as policy:
        inspector.feed(data[:64 * KiB])
        # Eight inspectors decided on the first piece; VHDX still reads.
        assert policy.call_count == 1
        assert inspector.wants_bytes
        inspector.feed(data[64 * KiB:192 * KiB])
        assert policy.call_count == 1
        inspector.feed(data[192 * KiB:])
        assert policy.call_count == 2 and not inspector.wants_bytes
        inspector.finish()
    assert policy.call_count == 3


# --- inspect_file ---------------------------------------------------------

def _open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def test_inspect_file_passes_the_image_and_declared_format(conf, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(ti.qcow2())
    before = _open_fds()
    with pytest.raises(exception.FormatMismatch) as err:
        inspection.inspect_file(str(path), "img-7", conf,
                                declared_format="raw")
    assert err.value.kwargs["image_id"] == "img-7"
    assert err.value.kwargs["declared_format"] == "raw"
    assert _open_fds() == before


def test_inspect_file_names_a_symlink(conf, tmp_path):
    (tmp_path / "target").write_bytes(ti.RAW)
    os.symlink(tmp_path / "target", tmp_path / "link")
    link = str(tmp_path / "link")
    with pytest.raises(exception.UnsafeCachePath) as err:
        inspection.inspect_file(link, "img-1", conf)
    assert err.value.kwargs == {"path": link,
                                "reason": "it is a symbolic link"}
    assert err.value.__cause__.errno == errno.ELOOP


def test_inspect_file_names_a_file_it_cannot_open(conf, tmp_path):
    path = str(tmp_path / "nothing")
    with pytest.raises(exception.CacheError) as err:
        inspection.inspect_file(path, "img-1", conf)
    assert type(err.value) is exception.CacheError
    assert err.value.kwargs == {
        "path": path, "reason": "cannot open it: No such file or directory"}


def test_inspect_file_names_a_file_that_is_not_regular(conf, tmp_path):
    before = _open_fds()
    with pytest.raises(exception.UnsafeCachePath) as err:
        inspection.inspect_file(str(tmp_path), "img-1", conf)
    mode = os.stat(tmp_path).st_mode
    assert stat.S_ISDIR(mode)
    assert err.value.kwargs == {
        "path": str(tmp_path),
        "reason": "it is not a regular file (mode %o)" % mode}
    assert _open_fds() == before


def test_inspect_file_names_a_file_it_cannot_read(conf, tmp_path):
    path = tmp_path / "image"
    path.write_bytes(ti.RAW)
    before = _open_fds()
    failure = OSError(errno.EIO, "Input/output error")
    with mock.patch.object(inspection, "_read_into", side_effect=failure):
        with pytest.raises(exception.CacheError) as err:
            inspection.inspect_file(str(path), "img-1", conf)
    assert err.value.kwargs == {
        "path": str(path), "reason": "cannot read it: Input/output error"}
    assert err.value.__cause__ is failure
    assert _open_fds() == before


@pytest.mark.parametrize("head,size,fed_sizes", [
    # Every inspector has decided within the first read: nothing more.
    (ti.RAW, 6 * GiB, [4 * MiB]),
    # A footer is wanted: the last 4 KiB are read after a skip.
    (ti.vmdk_with_footer()[:64 * KiB], None, [4 * MiB, 4 * KiB]),
])
def test_inspect_file_reads_4_mib_then_only_the_end(
        conf, tmp_path, head, size, fed_sizes):
    path = tmp_path / "image"
    with open(path, "wb") as f:
        f.write(head)
        if size is None:
            f.seek(5 * GiB)
            f.write(ti.vmdk_with_footer()[-1536:])
        else:
            f.truncate(size)
    with ti.chunk_sizes(inspection.StreamInspector, "feed") as fed:
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # e.g. a bad buffering mode
            result = inspection.inspect_file(str(path), "img-1", conf)
    assert fed == fed_sizes
    assert result.file_size == os.path.getsize(path)
