"""Receiving from real DCMTK peers: echo, a 512x512 CT series, and every common transfer syntax as sent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import StoreSCP, have, run_dcmtk, wait_until

pytestmark = needs_dcmtk

# One file per transfer syntax the node must accept, all bundled with pydicom.
TRANSFER_SYNTAX_FILES = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "CT_small.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_jpeg_dcmtk.dcm",
    "1.2.840.10008.1.2.4.51": "JPGExtended.dcm",
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_08.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "JPEG2000.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
}


def dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta group: the dataset exactly as it travels on the wire."""
    raw = path.read_bytes()
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def stored_files(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in (root / "dicom").rglob("*.dcm")}


def test_echoscu_gets_success(start_node) -> None:
    node = start_node()
    result = run_dcmtk("echoscu", "-aec", "PE_NODE", "127.0.0.1", str(node.port))
    assert result.returncode == 0, result.stderr


def test_storescu_series_is_stored_as_sent_and_queued_once(start_node, tmp_path: Path) -> None:
    node = start_node(series={"quiet_seconds": 1.0, "min_instances": 30})
    sent = write_ct_series(tmp_path / "sent", n_slices=40, size=512, seed=5)
    result = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, sent))
    assert result.returncode == 0, result.stderr
    status = wait_until(lambda: (s := node.status())["jobs"] and s, what="a queued job")
    [series] = status["series"]
    assert (series["state"], series["instances"], series["modality"]) == ("deciding", 40, "CT")
    [job] = status["jobs"]
    assert (job["state"], job["attempts"], job["study_instance_uid"]) == ("queued", 0, series["study_instance_uid"])
    stored = stored_files(node.root)
    assert len(stored) == 40
    for path in sent:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_part(stored[uid]) == dataset_part(path), f"{uid} differs from what was sent"
        assert stored[uid].parent.name == series["series_instance_uid"]


def transfer_syntax_files(folder: Path) -> dict[str, Path]:
    """Copies of the bundled files with UIDs of their own (several are one image in different syntaxes, and some
    lack a Study Instance UID); the pixel data stay exactly as they were encoded."""
    folder.mkdir()
    files = {}
    for syntax, name in TRANSFER_SYNTAX_FILES.items():
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if keyword not in ds:
                setattr(ds, keyword, pydicom.uid.generate_uid())
        ds.save_as(folder / name, enforce_file_format=True)
        files[syntax] = folder / name
    return files


def by_sop_uid(folder: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in folder.rglob("*") if p.is_file()}


def test_every_transfer_syntax_arrives_as_sent_and_decodable(start_node, tmp_path: Path) -> None:
    """dcmsend -dn sends each file in its own syntax, never decompressing; a bit-preserving storescp receiving
    the same sends is the reference for the bytes that travelled."""
    node = start_node(series={"quiet_seconds": 3600})
    sources = transfer_syntax_files(tmp_path / "sources")
    with StoreSCP(tmp_path / "reference", options=["--bit-preserving", "+xa"]) as reference:
        for port, aet in ((node.port, "PE_NODE"), (reference.port, reference.ae_title)):
            result = run_dcmtk("dcmsend", "-dn", "-aec", aet, "127.0.0.1", str(port), *map(str, sources.values()))
            assert f"with status SUCCESS  : {len(sources)}" in result.stdout + result.stderr or result.returncode == 0
    stored, sent = stored_files(node.root), by_sop_uid(tmp_path / "reference")
    assert len(stored) == len(sources)
    for syntax, source in sources.items():
        original = pydicom.dcmread(source)
        copy = stored[original.SOPInstanceUID]
        assert dataset_part(copy) == dataset_part(sent[original.SOPInstanceUID]), f"{source.name} changed"
        received = pydicom.dcmread(copy)
        travelled = pydicom.dcmread(sent[original.SOPInstanceUID], stop_before_pixels=True)
        assert received.file_meta.TransferSyntaxUID == travelled.file_meta.TransferSyntaxUID
        if pydicom.uid.UID(syntax).is_compressed or pydicom.uid.UID(syntax).is_deflated:
            assert received.file_meta.TransferSyntaxUID == syntax, f"{source.name} was converted"
        assert (received.pixel_array == original.pixel_array).all(), f"{source.name} pixels do not decode alike"


def htj2k_file(folder: Path, work: Path) -> Path:
    """CT_small re-encoded as lossless High-Throughput JPEG 2000 by OpenJPH (DCMTK does not know HTJ2K yet)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.pixel_array
    rows, columns = pixels.shape
    work.mkdir(exist_ok=True)
    pgm = work / "ct.pgm"
    pgm.write_bytes(f"P5\n{columns} {rows}\n65535\n".encode() + pixels.astype(">u2").tobytes())
    subprocess.run(["ojph_compress", "-i", str(pgm), "-o", str(work / "ct.j2c"), "-reversible", "true"],
                   check=True, capture_output=True)
    ds.PixelData = encapsulate([(work / "ct.j2c").read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "CT_small_htj2k.dcm", enforce_file_format=True)
    return folder / "CT_small_htj2k.dcm"


def test_pe_node_send_delivers_files_byte_for_byte(start_node, tmp_path: Path) -> None:
    node = start_node(series={"quiet_seconds": 3600})
    sources = transfer_syntax_files(tmp_path / "sources")
    if have("ojph_compress"):
        sources[HTJ2KLossless] = htj2k_file(tmp_path / "sources", tmp_path / "openjph")
    result = node.cli_send(tmp_path / "sources")
    assert result.returncode == 0, result.stderr
    assert f"sent {len(sources)} of {len(sources)} files" in result.stdout
    stored = stored_files(node.root)
    for syntax, source in sources.items():
        original = pydicom.dcmread(source)
        copy = stored[original.SOPInstanceUID]
        assert dataset_part(copy) == dataset_part(source), f"{source.name} changed on the way"
        received = pydicom.dcmread(copy)
        assert received.file_meta.TransferSyntaxUID == syntax
        assert (received.pixel_array == original.pixel_array).all(), f"{source.name} pixels do not decode alike"


@pytest.mark.parametrize("syntax_option", ["-xi", "-xe", "-xb"])
def test_storescu_uncompressed_syntaxes(start_node, tmp_path: Path, syntax_option: str) -> None:
    node = start_node(series={"quiet_seconds": 3600})
    sent = write_ct_series(tmp_path / "sent", n_slices=3, size=64, seed=7)
    result = run_dcmtk("storescu", syntax_option, "-aec", "PE_NODE", "127.0.0.1", str(node.port), *map(str, sent))
    assert result.returncode == 0, result.stderr
    stored = stored_files(node.root)
    for path in sent:
        original = pydicom.dcmread(path)
        received = pydicom.dcmread(stored[original.SOPInstanceUID])
        assert (received.pixel_array == original.pixel_array).all()
        assert received.ImagePositionPatient == original.ImagePositionPatient
