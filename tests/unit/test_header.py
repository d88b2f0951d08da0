"""Reading a received dataset: the structure check catches truncated and foreign bytes; UIDs are validated."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from pe_node.dicom.header import HeaderError, check_uid, read_header
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
