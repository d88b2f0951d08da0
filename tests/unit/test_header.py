"""Reading a received dataset: the structure check catches truncated and foreign bytes; UIDs are validated; a
deflated dataset inflates in bounded chunks up to a cap; pydicom is the oracle of the property-based tests."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from pe_node.dicom.header import HeaderError, InstanceHeader, check_uid, read_header
from pe_node.dicom.part10 import IMPLEMENTATION_CLASS_UID, file_header


def dataset_bytes(path: str | Path) -> tuple[bytes, str]:
    """The dataset part of a Part 10 file, exactly as it would travel over the network, and its syntax."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw = Path(path).read_bytes()
    meta_end = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength
    return raw[meta_end:], str(ds.file_meta.TransferSyntaxUID)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",  # deflated
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
        "JPGExtended.dcm",
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "rtplan.dcm",  # sequences of undefined length
    ],
)
def test_every_transfer_syntax_reads_the_routing_attributes(name: str) -> None:
    path = get_testdata_file(name)
    data, syntax = dataset_bytes(path)
    header = read_header(data, syntax)
    reference = pydicom.dcmread(path)
    assert header.sop_instance_uid == reference.SOPInstanceUID
    assert header.sop_class_uid == reference.SOPClassUID
    assert header.series_instance_uid == reference.SeriesInstanceUID
    assert header.study_instance_uid == reference.StudyInstanceUID
    assert header.modality == reference.get("Modality")


def test_truncated_pixel_data_is_refused() -> None:
    data, syntax = dataset_bytes(get_testdata_file("CT_small.dcm"))
    with pytest.raises(HeaderError, match=r"is \d+ bytes but only \d+ remain"):
        read_header(data[:-100], syntax)


def test_truncated_encapsulated_pixel_data_is_refused() -> None:
    data, syntax = dataset_bytes(get_testdata_file("JPEG2000.dcm"))
    with pytest.raises(HeaderError):
        read_header(data[:-20], syntax)


def test_random_and_text_bytes_are_refused() -> None:
    with pytest.raises(HeaderError):
        read_header(os.urandom(4096), ExplicitVRLittleEndian)
    with pytest.raises(HeaderError):
        read_header(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n" * 4, ExplicitVRLittleEndian)
    with pytest.raises(HeaderError, match="empty dataset"):
        read_header(b"", ExplicitVRLittleEndian)


def test_bytes_that_do_not_inflate_are_refused_for_deflate() -> None:
    with pytest.raises(HeaderError, match="does not inflate"):
        read_header(b"\x00\x01\x02 not deflate data", "1.2.840.10008.1.2.1.99")


@pytest.mark.parametrize("uid", ["../../x", "1.2.3/4", "1.2..3", ".1.2", "1.2.", "1" * 65, "1.2.3 4", "x"])
def test_uids_that_are_not_digits_and_dots_are_refused(uid: str) -> None:
    with pytest.raises(HeaderError) as caught:
        check_uid("SOP Instance UID", uid)
    assert caught.value.bad_uid


def test_a_missing_uid_is_named() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SeriesInstanceUID
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    with pytest.raises(HeaderError, match="Series Instance UID is missing"):
        read_header(buffer.getvalue(), ExplicitVRLittleEndian)


def test_file_header_makes_a_part10_file_pydicom_reads(tmp_path: Path) -> None:
    data, syntax = dataset_bytes(get_testdata_file("CT_small.dcm"))
    reference = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    path = tmp_path / "x.dcm"
    path.write_bytes(file_header(reference.SOPClassUID, reference.SOPInstanceUID, syntax, "STORESCU") + data)
    stored = pydicom.dcmread(path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == reference.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == syntax
    assert stored.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
    assert (stored.pixel_array == reference.pixel_array).all()


# Property-based: pydicom encodes, the walk must agree -------------------------------------------------------------

PROPERTY = settings(max_examples=40, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SYNTAXES = {  # transfer syntax: (implicit VR, little endian)
    "1.2.840.10008.1.2": (True, True),
    "1.2.840.10008.1.2.1": (False, True),
    "1.2.840.10008.1.2.2": (False, False),
}
uids = st.lists(st.integers(0, 10**9), min_size=2, max_size=6).map(lambda parts: ".".join(map(str, parts)))
texts = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=20)


@st.composite
def items(draw: st.DrawFn, depth: int) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    if draw(st.booleans()):
        ds.ReferencedSOPClassUID = draw(uids)
        ds.ReferencedSOPInstanceUID = draw(uids)
    if draw(st.booleans()):
        ds.CodeMeaning = draw(texts)
    if depth < 3 and draw(st.booleans()):
        ds.ContentSequence = draw(st.lists(items(depth + 1), max_size=2))
    return ds


@st.composite
def datasets(draw: st.DrawFn) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = draw(uids), draw(uids)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = draw(uids), draw(uids)
    for keyword, value in (("Modality", st.sampled_from(["CT", "MR", "SR"])), ("SeriesDescription", texts),
                           ("InstanceNumber", st.integers(-99, 9999)), ("PatientName", texts),
                           ("ImageType", st.lists(st.sampled_from(["ORIGINAL", "PRIMARY", "AXIAL"]), max_size=3)),
                           ("Rows", st.integers(0, 65535)),
                           ("SliceThickness", st.sampled_from(["0.625", "1.25", "5"]))):
        if draw(st.booleans()):
            setattr(ds, keyword, draw(value))
    if draw(st.booleans()):
        ds.ReferencedImageSequence = draw(st.lists(items(0), max_size=3))
    if draw(st.booleans()):
        ds.add_new(0x00090010, "LO", "PE_NODE TEST")
        ds.add_new(0x00091001, "OB", draw(st.binary(max_size=16).map(lambda b: b + b"\x00" * (len(b) % 2))))
    if draw(st.booleans()):
        ds.PixelData = draw(st.binary(min_size=2, max_size=64).map(lambda b: b + b"\x00" * (len(b) % 2)))
        ds["PixelData"].VR = "OB"
    return ds


def encode(ds: pydicom.Dataset, implicit: bool, little: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = little, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def element_ends(data: bytes, implicit: bool, little: bool) -> set[int]:
    """Where pydicom finds each top-level element to end: the only places a truncated dataset may end."""
    stream = io.BytesIO(data)
    ends = set()
    for _ in data_element_generator(stream, implicit, little):
        ends.add(stream.tell())
    return ends


def assert_routing(header: InstanceHeader, ds: pydicom.Dataset) -> None:
    assert (header.sop_class_uid, header.sop_instance_uid) == (ds.SOPClassUID, ds.SOPInstanceUID)
    assert (header.study_instance_uid, header.series_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert header.modality == (ds.get("Modality") or None)
    assert header.instance_number == (int(ds.InstanceNumber) if "InstanceNumber" in ds else None)
    assert header.series_description == (str(ds.SeriesDescription).strip() or None
                                          if "SeriesDescription" in ds else None)


@PROPERTY
@given(ds=datasets(), syntax=st.sampled_from([*SYNTAXES, DeflatedExplicitVRLittleEndian]))
def test_every_pydicom_encoding_walks_to_the_same_routing_values(ds: pydicom.Dataset, syntax: str) -> None:
    implicit, little = SYNTAXES.get(syntax, (False, True))
    data = encode(ds, implicit, little)
    assert_routing(read_header(deflate(data) if syntax == DeflatedExplicitVRLittleEndian else data, syntax), ds)


@PROPERTY
@given(ds=datasets(), syntax=st.sampled_from(list(SYNTAXES)), cut=st.floats(0, 1, exclude_max=True))
def test_a_truncated_dataset_is_refused_unless_it_ends_where_an_element_ends(ds: pydicom.Dataset, syntax: str,
                                                                             cut: float) -> None:
    implicit, little = SYNTAXES[syntax]
    data = encode(ds, implicit, little)
    end = int(cut * len(data))
    try:
        header = read_header(data[:end], syntax)
    except HeaderError as exc:
        assert exc.bad_uid or end not in element_ends(data, implicit, little), f"cut at {end}: {exc}"
        return
    assert end in element_ends(data, implicit, little), f"accepted a dataset cut at byte {end}"
    assert header.sop_instance_uid == ds.SOPInstanceUID


@PROPERTY
@given(ds=datasets(), syntax=st.sampled_from([*SYNTAXES, DeflatedExplicitVRLittleEndian]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=4))
def test_damaged_bytes_are_refused_or_read_never_crash(ds: pydicom.Dataset, syntax: str,
                                                       flips: list[tuple[float, int]]) -> None:
    implicit, little = SYNTAXES.get(syntax, (False, True))
    data = bytearray(encode(ds, implicit, little))
    if syntax == DeflatedExplicitVRLittleEndian:
        data = bytearray(deflate(bytes(data)))
    for where, value in flips:
        data[int(where * len(data))] = value
    try:
        read_header(bytes(data), syntax, max_inflated_bytes=1 << 20)
    except HeaderError:
        pass


def zeros_deflated(size: int) -> bytes:
    head = encode(reference_routing(), False, True) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [compressor.compress(head)] + [compressor.compress(bytes(1 << 20)) for _ in range(size >> 20)]
    return b"".join(chunks) + compressor.flush()


def reference_routing() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "1.2.3", "1.2.3.5"
    return ds


def test_a_deflate_bomb_inflates_in_bounded_chunks_up_to_the_cap() -> None:
    bomb = zeros_deflated(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(HeaderError, match="inflates to more than 16 MB") as caught:
            read_header(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=16 << 20)
        header = read_header(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=128 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.too_large and header.sop_instance_uid == "1.2.3.4"
    assert peak < 4 << 20, f"{peak} bytes to walk {len(bomb)} deflated bytes inflating to 64 MiB"


def test_a_truncated_deflate_stream_is_refused() -> None:
    data = deflate(encode(reference_routing(), False, True))
    with pytest.raises(HeaderError, match="truncated"):
        read_header(data[:-3], DeflatedExplicitVRLittleEndian)


@pytest.mark.parametrize("syntax", [*SYNTAXES, DeflatedExplicitVRLittleEndian])
def test_file_meta_elements_in_the_dataset_are_refused(syntax: str) -> None:
    meta = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 20) + b"1.2.840.10008.1.2.2\x00"
    implicit, little = SYNTAXES.get(syntax, (False, True))
    data = meta + encode(reference_routing(), implicit, little)
    with pytest.raises(HeaderError, match="File Meta Information"):
        read_header(deflate(data) if syntax == DeflatedExplicitVRLittleEndian else data, syntax)


def test_a_file_meta_element_after_the_start_is_refused_too() -> None:
    group_length = struct.pack("<HH2sHI", 0x0000, 0x0000, b"UL", 4, 0)
    meta = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", 20) + b"1.2.840.10008.1.2.2\x00"
    with pytest.raises(HeaderError, match=r"File Meta Information element \(0002,0010\) inside the dataset"):
        read_header(group_length + meta + encode(reference_routing(), False, True), ExplicitVRLittleEndian)


def test_a_huge_routing_value_is_not_read_whole() -> None:
    ds = reference_routing()
    ds.SeriesDescription = "x" * 60_000
    header = read_header(encode(ds, False, True), ExplicitVRLittleEndian)
    assert header.series_description == "x" * 64
