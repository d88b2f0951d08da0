"""Reading one CT series from DICOM files into a volume in slice order and Hounsfield units.

Slices are ordered along the slice normal (the cross product of the two ImageOrientationPatient direction cosines)
by the projection of ImagePositionPatient on it, never by InstanceNumber, which scanners and PACS do not keep in
position order.

``load_series`` reads the headers first (without pixel data), refuses with ``SeriesError`` anything that is not
one CT series with full geometry, then decodes the pixels slice by slice (compressed transfer syntaxes through
pydicom's pylibjpeg / GDCM plugins) straight into one preallocated int16 volume, so that a 1,100-slice series never
exists as a float copy. Whether the series suits the model (axial, enough slices, contrast) is judged elsewhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

logger = logging.getLogger(__name__)

_INT16 = np.iinfo(np.int16)
_ORIENTATION_TOLERANCE = 1e-3


Orientation = tuple[float, float, float, float, float, float]
"""ImageOrientationPatient: the row and column direction cosines."""


class SeriesError(ValueError):
    """Files that do not make one readable CT series; the message names the files or series and the reason."""


@dataclass(frozen=True)
class SliceRef:
    """One slice of a series: where it came from and where it lies along the slice normal (mm).

    ``frame`` is the slice's frame number (from 1) in a multi-frame image (Enhanced CT), None in a single-frame one;
    every reference to the slice (SR, captures, key objects, presentation states) names it when it is set.
    """

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    position: float
    instance_number: int | None
    frame: int | None = None


@dataclass
class CTSeries:
    """A CT series sorted along the slice normal, with its voxels in HU.

    ``hu`` is int16 [slices, rows, columns] (HU rounded to the unit, clipped to the int16 range): half the memory of a
    float copy, and windows are hundreds of HU wide. ``header`` is the first slice's dataset without pixel data,
    the source of patient, study and equipment attributes for the reports.
    """

    study_instance_uid: str
    series_instance_uid: str
    slices: list[SliceRef]
    hu: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    orientation: Orientation
    header: pydicom.Dataset

    @property
    def sop_instance_uids(self) -> list[str]:
        return [s.sop_instance_uid for s in self.slices]

    def __len__(self) -> int:
        return len(self.slices)


@dataclass(frozen=True)
class _Header:
    """What the header pass keeps of each file: identity and geometry, not the whole dataset."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instance_number: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    rows: int
    columns: int
    frames: int
    thickness: float | None


def load_series(source: str | Path | Iterable[str | Path]) -> CTSeries:
    """Read one CT series from a folder (searched recursively), one file, or a list of files.

    Files that are not DICOM, and DICOM files without a series (a DICOMDIR), are skipped. Raises ``SeriesError``
    when no DICOM image is found, the files hold more than one series, the modality is not CT, a slice is
    multi-frame, lacks geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) or has another size or
    orientation than the others, or its pixels cannot be decoded. ``slice_spacing`` is the median gap between
    neighbouring slice positions (SliceThickness, else 0, for a single slice).
    """
    where, paths = _files(source)
    headers = list(_one_series(where, _unique(h for h in map(_read_header, paths) if h is not None)))
    if not headers:
        raise SeriesError(f"{where}: no DICOM image files")
    _check_one_ct_series(where, headers)
    orientation = _check_geometry(headers)
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda h: (float(h.position @ normal), h.instance_number or 0, h.sop_instance_uid))
    positions = np.array([float(h.position @ normal) for h in headers])
    hu = np.empty((len(headers), headers[0].rows, headers[0].columns), dtype=np.int16)
    for index, header in enumerate(headers):
        _read_pixels(header, hu[index])
    first = headers[0]
    return CTSeries(
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        slices=[
            SliceRef(h.sop_instance_uid, h.sop_class_uid, h.path, float(p), h.instance_number)
            for h, p in zip(headers, positions, strict=True)
        ],
        hu=hu,
        pixel_spacing=first.pixel_spacing or (1.0, 1.0),
        slice_spacing=_slice_spacing(positions, first.thickness),
        orientation=_orientation(orientation),
        header=pydicom.dcmread(first.path, stop_before_pixels=True),
    )


def _orientation(values: np.ndarray) -> Orientation:
    row_x, row_y, row_z, column_x, column_y, column_z = (float(v) for v in values)
    return row_x, row_y, row_z, column_x, column_y, column_z


def _files(source: str | Path | Iterable[str | Path]) -> tuple[str, list[Path]]:
    """A description of the source for messages, and its files in a stable order."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            return str(root), sorted(p for p in root.rglob("*") if p.is_file())
        if root.is_file():
            return str(root), [root]
        raise SeriesError(f"{root}: no such file or folder")
    paths = [Path(p) for p in source]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SeriesError(f"no such file: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return f"{len(paths)} files", paths


def _read_header(path: Path) -> _Header | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        logger.debug("skipping %s: not a DICOM file", path)
        return None
    except Exception as error:  # a damaged file: pydicom raises many kinds here
        raise SeriesError(f"{path}: unreadable DICOM header ({error})") from None
    if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        logger.debug("skipping %s: no series or SOP instance UID (a DICOMDIR?)", path)
        return None
    try:
        return _Header(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            series_instance_uid=str(ds.SeriesInstanceUID),
            modality=str(ds.get("Modality", "")),
            instance_number=_optional_int(ds, "InstanceNumber"),
            position=_vector(ds, "ImagePositionPatient", 3),
            orientation=_vector(ds, "ImageOrientationPatient", 6),
            pixel_spacing=_spacing(ds),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            frames=_optional_int(ds, "NumberOfFrames") or 1,
            thickness=_optional_float(ds, "SliceThickness"),
        )
    except (TypeError, ValueError) as error:
        raise SeriesError(f"{path}: malformed header value ({error})") from None


def _optional_int(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    return None if value is None or value == "" else int(value)


def _optional_float(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    return None if value is None or value == "" else float(value)


def _vector(ds: pydicom.Dataset, keyword: str, length: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None or value == "" or len(value) != length:
        return None
    return np.array([float(v) for v in value], dtype=np.float64)


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    value = _vector(ds, "PixelSpacing", 2)
    return None if value is None else (float(value[0]), float(value[1]))


def _unique(headers: Iterable[_Header]) -> Iterable[_Header]:
    """One header per SOP instance (the same instance stored twice is read once)."""
    seen: set[str] = set()
    for header in headers:
        if header.sop_instance_uid not in seen:
            seen.add(header.sop_instance_uid)
            yield header


def _one_series(where: str, headers: Iterable[_Header]) -> Iterable[_Header]:
    """The headers, refused as soon as a second series shows up (a wrong folder may hold thousands of files)."""
    first: _Header | None = None
    for header in headers:
        first = first or header
        if header.series_instance_uid != first.series_instance_uid:
            raise SeriesError(
                f"{where}: more than one series ({first.series_instance_uid} in {first.path.name}, "
                f"{header.series_instance_uid} in {header.path.name}); expected one CT series"
            )
        yield header


def _check_one_ct_series(where: str, headers: list[_Header]) -> None:
    modalities = sorted({h.modality for h in headers})
    if modalities != ["CT"]:
        series = headers[0].series_instance_uid
        raise SeriesError(f"{where}: series {series} has modality {'/'.join(modalities) or 'none'}, not CT")
    multiframe = [h for h in headers if h.frames > 1]
    if multiframe:
        raise SeriesError(
            f"{multiframe[0].path}: multi-frame image ({multiframe[0].frames} frames); "
            "only single-frame CT slices are supported"
        )


def _check_geometry(headers: list[_Header]) -> np.ndarray:
    """The series' ImageOrientationPatient, after checking every slice has full and matching geometry."""
    for header in headers:
        for name, value in (
            ("ImagePositionPatient", header.position),
            ("ImageOrientationPatient", header.orientation),
            ("PixelSpacing", header.pixel_spacing),
        ):
            if value is None:
                raise SeriesError(f"{header.path}: missing or malformed {name}; the slices cannot be placed")
        if header.rows < 1 or header.columns < 1:
            raise SeriesError(f"{header.path}: missing Rows/Columns")
    first = headers[0]
    orientation = first.orientation
    assert orientation is not None
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise SeriesError(f"{first.path}: ImageOrientationPatient {orientation.tolist()} is not two unit vectors")
    for header in headers[1:]:
        if (header.rows, header.columns) != (first.rows, first.columns):
            raise SeriesError(
                f"{header.path}: {header.rows}x{header.columns} pixels, other slices have {first.rows}x{first.columns}"
            )
        if header.orientation is None or not np.allclose(header.orientation, orientation,
                                                         atol=_ORIENTATION_TOLERANCE):
            raise SeriesError(f"{header.path}: ImageOrientationPatient differs from the other slices'")
    return orientation


def _read_pixels(header: _Header, out: np.ndarray) -> None:
    """Decode one slice and store it in ``out`` as HU (Modality LUT applied, rounded, clipped to int16)."""
    try:
        ds = pydicom.dcmread(header.path)
    except Exception as error:  # the file changed or broke since its header was read
        raise SeriesError(f"{header.path}: unreadable DICOM file ({error})") from None
    try:
        stored = ds.pixel_array
    except Exception as error:  # decoding boundary: missing plugin, damaged fragment, truncated pixel data
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "unknown")
        raise SeriesError(f"{header.path}: pixel data cannot be decoded (transfer syntax {syntax}): {error}") from None
    if stored.shape != out.shape:
        raise SeriesError(f"{header.path}: pixel data of shape {stored.shape}, expected {out.shape}")
    values = apply_modality_lut(stored, ds)
    if np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    np.clip(values, _INT16.min, _INT16.max, out=out, casting="unsafe")


def _slice_spacing(positions: np.ndarray, thickness: float | None) -> float:
    if len(positions) < 2:
        return float(thickness or 0.0)
    return float(np.median(np.abs(np.diff(positions))))
