"""Synthetic CT series as real DICOM files, for tests and benchmarks.

``write_ct_series(folder, n_slices=60, size=64)`` writes a small chest-like phantom (air, body, two lungs, a
contrast-filled central vessel, a spine and a thin table under the body) as CT Image Storage files with
RescaleSlope/Intercept, ImagePositionPatient/ImageOrientationPatient and, by default, InstanceNumbers in shuffled
order, so that only sorting along the slice normal gives the right order. ``phantom_volume`` returns the same HU
values the files hold, in position order, to compare a loaded series against; ``make_ct_dataset`` builds one slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
TABLE_GAP = 2
"""Pixels of air between the body and the table."""


def phantom_slice(index: int, n_slices: int, size: int, seed: int = 0) -> np.ndarray:
    """HU int16 [size, size] of slice ``index`` of the phantom; the anatomy changes slowly along the series."""
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    t = index / max(n_slices - 1, 1)
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    body = (x / 0.42) ** 2 + (y / 0.32) ** 2 <= 1
    hu[body] = 40.0
    lung_rx, lung_ry = 0.11 + 0.03 * np.sin(np.pi * t), 0.17
    for side in (-1, 1):
        hu[((x - side * 0.19) / lung_rx) ** 2 + ((y + 0.02) / lung_ry) ** 2 <= 1] = -850.0
    hu[(x**2 + (y + 0.05) ** 2) <= (0.05 + 0.02 * t) ** 2] = 300.0
    hu[(x**2 + (y - 0.24) ** 2) <= 0.04**2] = 700.0
    body_bottom = int(np.ceil((0.5 + 0.32) * size))
    table = slice(min(body_bottom + TABLE_GAP, size - 1), min(body_bottom + TABLE_GAP + 2, size))
    hu[table, int(0.1 * size) : int(0.9 * size)] = 200.0
    hu += rng.normal(0.0, 8.0, size=hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def phantom_volume(n_slices: int = 60, size: int = 64, seed: int = 0) -> np.ndarray:
    """The phantom's HU volume int16 [n_slices, size, size], in position order (what ``load_series`` should give)."""
    return np.stack([phantom_slice(k, n_slices, size, seed) for k in range(n_slices)])


def new_dataset(sop_class: str, sop_uid: str, study_uid: str, series_uid: str, modality: str) -> Dataset:
    """A dataset with its file meta, its UIDs and the phantom patient's and study's attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Phantom^Chest"
    ds.PatientID = "PHANTOM"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Manufacturer = "pe-node tests"
    return ds


def make_ct_dataset(
    hu: np.ndarray,
    *,
    position: Sequence[float],
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    instance_number: int = 1,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: tuple[float, float] = (0.7, 0.7),
    slice_thickness: float = 1.25,
    modality: str = "CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """One CT Image Storage dataset holding ``hu`` (int16 [rows, cols]) as stored values (HU - intercept) / slope."""
    stored = np.rint((hu.astype(np.float64) - rescale_intercept) / rescale_slope)
    signed = bool(stored.min() < 0)
    stored = stored.astype(np.int16 if signed else np.uint16)
    ds = new_dataset(CTImageStorage, sop_uid or generate_uid(), study_uid, series_uid, modality)
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = slice_thickness
    ds.KVP = 120
    ds.RescaleSlope = rescale_slope
    ds.RescaleIntercept = rescale_intercept
    ds.RescaleType = "HU"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.tobytes()
    if UID(transfer_syntax) != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    return ds


def write_ct_series(
    folder: str | Path,
    n_slices: int = 60,
    size: int = 64,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_instance_numbers: bool = True,
    slice_spacing: float = 1.25,
    orientation: Sequence[float] = AXIAL,
    modality: str = "CT",
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
) -> list[Path]:
    """Write the phantom as one series, files named ``<SOPInstanceUID>.dcm``; returns the paths in position order.

    Slice k lies at ``k * slice_spacing`` mm along the slice normal of ``orientation``. With
    ``shuffle_instance_numbers`` the InstanceNumbers are a random permutation, so they do not follow position.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(n_slices) + 1 if shuffle_instance_numbers else np.arange(n_slices) + 1
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float))
    origin = np.array([-0.35 * size, -0.35 * size, -100.0])
    paths = []
    for k in range(n_slices):
        ds = make_ct_dataset(
            phantom_slice(k, n_slices, size, seed),
            position=origin + k * slice_spacing * normal,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=int(numbers[k]),
            orientation=orientation,
            slice_thickness=slice_spacing,
            modality=modality,
            rescale_slope=rescale_slope,
            rescale_intercept=rescale_intercept,
            transfer_syntax=transfer_syntax,
        )
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
