"""Loading a CT series from DICOM files: order along the normal, HU values, compression, and clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from pe_node.pipeline.series import SeriesError, load_series
from tests.dicom_factory import phantom_volume, write_ct_series


def test_slices_are_sorted_by_position_not_instance_number(ct_series_dir: Path) -> None:
    series = load_series(ct_series_dir)
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions)
    numbers = [s.instance_number for s in series.slices]
    assert numbers != sorted(numbers)  # the factory shuffles them, so position order is not their order
    assert np.array_equal(series.hu, phantom_volume(n_slices=40, size=64, seed=3))


def test_volume_is_int16_hu_with_geometry(ct_series_dir: Path) -> None:
    series = load_series(ct_series_dir)
    assert series.hu.dtype == np.int16 and series.hu.shape == (40, 64, 64)
    assert len(series) == 40 and len(set(series.sop_instance_uids)) == 40
    assert series.slice_spacing == pytest.approx(1.25)
    assert series.pixel_spacing == (0.7, 0.7)
    assert series.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert "PixelData" not in series.header and series.header.Modality == "CT"
    assert series.header.SOPInstanceUID == series.slices[0].sop_instance_uid


def test_order_follows_the_slice_normal_for_a_tilted_orientation(tmp_path: Path) -> None:
    # Rows run along -x: the normal (cross product of the cosines) points to -z, so the order is reversed in z.
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    write_ct_series(tmp_path, n_slices=12, size=32, orientation=orientation)
    series = load_series(tmp_path)
    assert np.array_equal(series.hu, phantom_volume(n_slices=12, size=32))
    z = [float(pydicom.dcmread(s.path).ImagePositionPatient[2]) for s in series.slices]
    assert z == sorted(z, reverse=True)


def test_rescale_slope_and_intercept_give_hu(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=5, size=32, rescale_slope=0.5, rescale_intercept=-2048.0)
    assert np.array_equal(load_series(tmp_path).hu, phantom_volume(n_slices=5, size=32))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_transfer_syntaxes_are_decoded(tmp_path: Path, syntax: str) -> None:
    write_ct_series(tmp_path, n_slices=4, size=32, transfer_syntax=syntax)
    assert pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_series(tmp_path).hu, phantom_volume(n_slices=4, size=32))


def test_a_list_of_files_and_non_dicom_neighbours(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "series", n_slices=6, size=32)
    (tmp_path / "series" / "README.txt").write_text("not DICOM")
    assert len(load_series(tmp_path / "series")) == 6
    assert len(load_series(paths[:3])) == 3


def test_the_same_instance_twice_is_read_once(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=6, size=32)
    shutil.copy(paths[0], tmp_path / "copy.dcm")
    assert len(load_series(tmp_path)) == 6


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match=f"{tmp_path}: no DICOM image files"):
        load_series(tmp_path)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="no such file or folder"):
        load_series(tmp_path / "absent")


def test_two_series_are_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, size=32, series_uid="1.2.3.1")
    write_ct_series(tmp_path, n_slices=3, size=32, series_uid="1.2.3.2", seed=1)
    with pytest.raises(
        SeriesError, match=r"more than one series \(1\.2\.3\.[12] in .*; expected one CT series"
    ) as raised:
        load_series(tmp_path)
    assert "1.2.3.1" in str(raised.value) and "1.2.3.2" in str(raised.value)


def test_non_ct_modality_is_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, size=32, modality="MR")
    with pytest.raises(SeriesError, match="has modality MR, not CT"):
        load_series(tmp_path)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_missing_geometry_is_refused_naming_the_file_and_attribute(tmp_path: Path, keyword: str) -> None:
    paths = write_ct_series(tmp_path, n_slices=4, size=32)
    ds = pydicom.dcmread(paths[2])
    delattr(ds, keyword)
    ds.save_as(paths[2])
    with pytest.raises(SeriesError, match=f"{paths[2].name}: missing or malformed {keyword}"):
        load_series(tmp_path)


def test_slices_of_different_sizes_are_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, size=32, series_uid="1.2.3.9")
    write_ct_series(tmp_path / "b", n_slices=1, size=48, series_uid="1.2.3.9")
    with pytest.raises(SeriesError, match=r"holds 2 stacks, not one volume: .*3 slices of 32x32.*1 slices of 48x48"):
        load_series(tmp_path)


def test_undecodable_pixel_data_is_refused_naming_the_file(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, n_slices=3, size=32)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[1])
    with pytest.raises(SeriesError, match=f"{paths[1].name}: pixel data cannot be decoded"):
        load_series(tmp_path)
