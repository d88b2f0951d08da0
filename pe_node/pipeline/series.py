"""Reading one stack of CT slices from DICOM files into a volume in slice order and Hounsfield units.

Slices are ordered along the slice normal (the cross product of the two ImageOrientationPatient direction cosines)
by the projection of ImagePositionPatient on it, never by InstanceNumber, which scanners and PACS do not keep in
position order; the frames of a multi-frame image (Enhanced CT) likewise by their per-frame positions, never by
frame number.

``load_stack`` decodes the pixels of a ``pe_node.pipeline.stacks.Stack`` slice by slice (compressed transfer syntaxes
through pydicom's pylibjpeg / GDCM plugins; a multi-frame image frame by frame) straight into one preallocated int16
volume, so that a 1,100-slice series never exists as a float copy, after checking its size against
``series.max_matrix`` and ``series.max_megavoxels`` before anything is allocated. ``load_series`` reads a folder or
list of files that must hold one CT series of one stack (``pe-node predict``, training). Whether a stack suits the
model (axial, enough slices, contrast) is judged elsewhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut, iter_pixels

from pe_node.config import SeriesConfig
from pe_node.pipeline.stacks import Image, Slice, Stack, read_header, read_image, stacks_of

logger = logging.getLogger(__name__)

_INT16 = np.iinfo(np.int16)
_ORIENTATION_TOLERANCE = 1e-3


Orientation = tuple[float, float, float, float, float, float]
"""ImageOrientationPatient: the row and column direction cosines."""


class SeriesError(ValueError):
    """Files that do not make one readable CT series; the message names the files or series and the reason."""


class ImageTooLarge(SeriesError):
    """A stack over ``series.max_matrix`` or ``series.max_megavoxels``: refused before its pixels are allocated."""


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


def load_series(source: str | Path | Iterable[str | Path], limits: SeriesConfig | None = None) -> CTSeries:
    """Read one CT series of one stack from a folder (searched recursively), one file, or a list of files.

    Files that are not DICOM, and DICOM files without a series (a DICOMDIR), are skipped. Raises ``SeriesError``
    when no DICOM image is found, the files hold more than one series or more than one stack (two reconstructions,
    two sizes), the modality is not CT, a slice lacks geometry (ImagePositionPatient, ImageOrientationPatient,
    PixelSpacing), or its pixels cannot be decoded.
    """
    where, paths = _files(source)
    images = list(_one_series(where, _unique(_read(path) for path in paths)))
    if not images:
        raise SeriesError(f"{where}: no DICOM image files")
    _check_ct(where, images)
    stacks = stacks_of(images)
    if len(stacks) > 1:
        listed = "; ".join(f"{s.label}: {len(s.slices)} slices of {s.matrix[0]}x{s.matrix[1]}"
                           + (f" ({', '.join(s.problems)})" if s.problems else "") for s in stacks)
        raise SeriesError(f"{where}: series {images[0].series_instance_uid} holds {len(stacks)} stacks, "
                          f"not one volume: {listed}")
    return load_stack(stacks[0], limits)


def load_stack(stack: Stack, limits: SeriesConfig | None = None) -> CTSeries:
    """The volume of ``stack``; raises ``ImageTooLarge`` over the limits, ``SeriesError`` for anything unreadable."""
    limits = limits or SeriesConfig()
    if stack.problems:
        raise SeriesError("; ".join(stack.problems))
    if not stack.slices:
        raise SeriesError(f"series {stack.series_instance_uid}: no slices")
    too_large = size_problem(stack, limits)
    if too_large is not None:
        raise ImageTooLarge(too_large)
    rows, columns = stack.matrix
    positions, orientation = stack.positions(), stack.orientation
    assert positions is not None and orientation is not None, "a stack without problems has its geometry"
    first = stack.slices[0]
    hu = np.empty((len(stack.slices), rows, columns), dtype=np.int16)
    _read_pixels(stack.slices, hu)
    header = _report_header(first)
    return CTSeries(
        study_instance_uid=stack.study_instance_uid,
        series_instance_uid=stack.series_instance_uid,
        slices=[
            SliceRef(s.sop_instance_uid, s.sop_class_uid, s.path, float(p), s.instance_number, s.frame)
            for s, p in zip(stack.slices, positions, strict=True)
        ],
        hu=hu,
        pixel_spacing=first.pixel_spacing or (1.0, 1.0),
        slice_spacing=_slice_spacing(positions, first.thickness),
        orientation=orientation,
        header=header,
    )


def size_problem(stack: Stack, limits: SeriesConfig) -> str | None:
    """Why the stack is too large to load (``series.max_matrix``, ``series.max_megavoxels``), or None."""
    rows, columns = stack.matrix
    if max(rows, columns) > limits.max_matrix:
        return f"image too large: {rows} x {columns} pixels (series.max_matrix {limits.max_matrix})"
    megavoxels = len(stack.slices) * rows * columns / 1e6
    if megavoxels > limits.max_megavoxels:
        return (f"image too large: {len(stack.slices)} slices of {rows} x {columns}, {megavoxels:.0f} megavoxels "
                f"(series.max_megavoxels {limits.max_megavoxels:g})")
    return None


def _files(source: str | Path | Iterable[str | Path]) -> tuple[str, list[Path]]:
    """A description of the source for messages, and its files in a stable order."""
    if isinstance(source, str | os.PathLike):
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


def _read(path: Path) -> Image | None:
    try:
        return read_image(path)
    except ValueError as error:
        raise SeriesError(str(error)) from None


def _unique(images: Iterable[Image | None]) -> Iterable[Image]:
    """One image per SOP instance (the same instance stored twice is read once)."""
    seen: set[str] = set()
    for image in images:
        if image is not None and image.sop_instance_uid not in seen:
            seen.add(image.sop_instance_uid)
            yield image


def _one_series(where: str, images: Iterable[Image]) -> Iterable[Image]:
    """The images, refused as soon as a second series shows up (a wrong folder may hold thousands of files)."""
    first: Image | None = None
    for image in images:
        first = first or image
        if image.series_instance_uid != first.series_instance_uid:
            raise SeriesError(
                f"{where}: more than one series ({first.series_instance_uid} in {first.path.name}, "
                f"{image.series_instance_uid} in {image.path.name}); expected one CT series"
            )
        yield image


def _check_ct(where: str, images: list[Image]) -> None:
    modalities = sorted({image.modality for image in images})
    if modalities != ["CT"]:
        series = images[0].series_instance_uid
        raise SeriesError(f"{where}: series {series} has modality {'/'.join(modalities) or 'none'}, not CT")


def _report_header(first: Slice) -> pydicom.Dataset:
    """The first slice's header without pixel data, for the reports' patient, study and equipment attributes.

    A multi-frame image's functional groups are dropped (reports copy the header, and they can be thousands of
    items) and the first frame's geometry and rescale are set at the top level, where a single-frame image has them.
    """
    header = read_header(first.path)
    if first.frame is None:
        return header
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if keyword in header:
            delattr(header, keyword)
    if first.position is not None:
        header.ImagePositionPatient = list(first.position)
    if first.orientation is not None:
        header.ImageOrientationPatient = list(first.orientation)
    if first.pixel_spacing is not None:
        header.PixelSpacing = list(first.pixel_spacing)
    if first.thickness is not None:
        header.SliceThickness = first.thickness
    if first.rescale is not None:
        header.RescaleSlope, header.RescaleIntercept = first.rescale
        header.RescaleType = "HU"
    return header


def _read_pixels(slices: list[Slice], out: np.ndarray) -> None:
    """Decode every slice into ``out`` (slice order) as HU: a file at a time, a multi-frame file frame by frame."""
    by_file: dict[Path, list[int]] = {}
    for index, piece in enumerate(slices):
        by_file.setdefault(piece.path, []).append(index)
    for path, indices in by_file.items():
        if slices[indices[0]].frame is None:
            _read_single(path, out[indices[0]])
        else:
            _read_frames(path, [(slices[i], out[i]) for i in indices])


def _read_single(path: Path, out: np.ndarray) -> None:
    """Decode one single-frame file into ``out`` (Modality LUT applied, rounded, clipped to int16)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # the file changed or broke since its header was read
        raise SeriesError(f"{path}: unreadable DICOM file ({error})") from None
    try:
        stored = ds.pixel_array
    except Exception as error:  # decoding boundary: missing plugin, damaged fragment, truncated pixel data
        syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "unknown")
        raise SeriesError(f"{path}: pixel data cannot be decoded (transfer syntax {syntax}): {error}") from None
    if stored.shape != out.shape:
        raise SeriesError(f"{path}: pixel data of shape {stored.shape}, expected {out.shape}")
    _store(apply_modality_lut(stored, ds), out)


def _read_frames(path: Path, targets: list[tuple[Slice, np.ndarray]]) -> None:
    """Decode the frames of one multi-frame file one at a time, each with its own rescale, into its target."""
    wanted = {piece.frame or 1: (piece, out) for piece, out in targets}
    try:
        for index, frame in enumerate(iter_pixels(path), start=1):
            if index not in wanted:
                continue
            piece, out = wanted.pop(index)
            if frame.shape != out.shape:
                raise SeriesError(f"{path} frame {index}: pixel data of shape {frame.shape}, expected {out.shape}")
            slope, intercept = piece.rescale or (1.0, 0.0)
            _store(frame.astype(np.float64) * slope + intercept if (slope, intercept) != (1.0, 0.0) else frame, out)
            if not wanted:
                break
    except SeriesError:
        raise
    except Exception as error:  # decoding boundary, as for single frames
        raise SeriesError(f"{path}: pixel data cannot be decoded: {error}") from None
    if wanted:
        raise SeriesError(f"{path}: frames {sorted(wanted)} are missing from the pixel data")


def _store(values: np.ndarray, out: np.ndarray) -> None:
    if np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    np.clip(values, _INT16.min, _INT16.max, out=out, casting="unsafe")


def _slice_spacing(positions: np.ndarray, thickness: float | None) -> float:
    if len(positions) < 2:
        return float(thickness or 0.0)
    return float(np.median(np.abs(np.diff(positions))))
