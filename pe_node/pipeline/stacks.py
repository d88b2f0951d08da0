"""What a series holds, read from its headers: its slices and the stacks (volumes) they form.

A slice is a single-frame image or one frame of a multi-frame image (Enhanced CT, PS3.3 C.7.6.16: its position,
orientation, pixel measures and rescale come from the per-frame or shared functional groups). A stack is a set of
slices that make one volume: the same kind of image (ImageType, kernel, slice thickness, orientation, matrix, the
Stack ID of a multi-frame image), and no two at one position. One Series Instance UID may hold several stacks (two
reconstructions, two acquisitions, a multi-frame image with two stacks); their slices are never mixed into one
volume. ``read_stacks`` reads only headers (no pixel data) and never raises for bad content: what keeps a stack from
being a volume is listed in ``Stack.problems``, for the selection rules to report.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

log = logging.getLogger(__name__)

DEFER_BYTES = 1 << 20
"""Header values larger than this stay on disk until used (a private blob, an embedded document)."""
MAX_HEADER_BYTES = 64 << 20
"""The most a deflated dataset may inflate to before its pixel data, for its header to be read."""
_META_START = 132  # the 128-byte preamble and "DICM"
_PIXEL_DATA = 0x7FE00010
_PIXEL_DATA_BYTES = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian
_ORIENTATION_DECIMALS = 2
_SAME_POSITION_MM = 0.05


@dataclass(frozen=True)
class Slice:
    """One slice with the geometry and rescale the pixel loader needs; ``frame`` counts from 1 (multi-frame)."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    rows: int
    columns: int
    rescale: tuple[float, float] | None  # slope, intercept of a frame (multi-frame); None: the file's own
    stack_id: str | None = None  # FrameContentSequence's Stack ID of a frame


@dataclass(frozen=True)
class Image:
    """What one instance says about itself, besides its slices."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    image_type: tuple[str, ...]
    acquisition_number: int | None
    kernel: str
    contrast_agent: str
    frames: int
    slices: tuple[Slice, ...]
    problems: tuple[str, ...] = ()


@dataclass(eq=False)
class Stack:
    """The slices of one volume of a series, sorted along the slice normal, and what selection rules look at.

    Stacks compare and hash by identity: each is one volume read from the store, and selection and the worker keep
    per-stack outcomes in dictionaries keyed by them."""

    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    description: str
    label: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    kernel: str
    contrast_agent: str
    multiframe: bool
    slices: list[Slice]
    problems: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The stack's identity within its series: the same slices read again give the same key."""
        return self.label or "1"

    @property
    def thickness(self) -> float | None:
        values = [s.thickness for s in self.slices if s.thickness]
        return float(np.median(values)) if values else self.spacing

    @property
    def spacing(self) -> float | None:
        """The median gap between neighbouring slice positions (mm), or None without two placed slices."""
        positions = self.positions()
        if positions is None or len(positions) < 2:
            return None
        return float(np.median(np.abs(np.diff(positions))))

    @property
    def orientation(self) -> tuple[float, float, float, float, float, float] | None:
        return self.slices[0].orientation if self.slices else None

    @property
    def matrix(self) -> tuple[int, int]:
        return (self.slices[0].rows, self.slices[0].columns) if self.slices else (0, 0)

    def positions(self) -> np.ndarray | None:
        """Each slice's position along the slice normal, in slice order; None when some slice cannot be placed."""
        orientation = self.orientation
        if orientation is None or any(s.position is None for s in self.slices):
            return None
        normal = np.cross(orientation[:3], orientation[3:])
        return np.array([float(np.dot(s.position, normal)) for s in self.slices])  # type: ignore[arg-type]

    def digest(self) -> str:
        """A digest of the slices (instance and frame), which tells whether a stack changed since it was read."""
        parts = sorted(f"{s.sop_instance_uid}:{s.frame or 0}" for s in self.slices)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def describe(self) -> str:
        """E.g. "series 3 (1.25 mm, 120 slices)", naming the stack when its series has several."""
        number = f"series {self.series_number}" if self.series_number is not None else "series"
        thickness = f"{self.thickness:.3g} mm, " if self.thickness else ""
        stack = f", stack {self.label}" if self.label else ""
        return f"{number} ({thickness}{len(self.slices)} slices{stack})"


def read_header(path: Path) -> pydicom.Dataset:
    """A file's dataset up to its pixel data, in bounded memory whatever the file holds.

    Values over ``DEFER_BYTES`` are left on disk (read only if used). A deflated dataset is inflated piece by piece
    only up to its pixel data, at most ``MAX_HEADER_BYTES``: pydicom would inflate all of it, and a few kilobytes
    of deflate can stand for gigabytes. Raises ``InvalidDicomError`` for a file that is not DICOM and ``ValueError``
    for a deflated header over the limit.
    """
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(path, stop_before_pixels=True, defer_size=DEFER_BYTES)
    with path.open("rb") as stream:
        stream.seek(_META_START)
        group_length = int.from_bytes(stream.read(12)[8:12], "little")
        stream.seek(_META_START + 12 + group_length)
        inflated = _inflate_header(stream, path)
    ds = read_dataset(io.BytesIO(inflated), is_implicit_VR=False, is_little_endian=True,
                      stop_when=lambda tag, vr, length: tag == _PIXEL_DATA)  # in memory: nothing to defer
    ds.file_meta = meta
    return ds


def _inflate_header(stream: BinaryIO, path: Path) -> bytes:
    """The inflated bytes of a deflated dataset up to (and a little past) its pixel data tag, a megabyte at a time."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    while True:
        pending = inflater.unconsumed_tail or stream.read(1 << 16)
        if not pending or inflater.eof:
            return bytes(inflated)
        searched = max(0, len(inflated) - len(_PIXEL_DATA_BYTES))
        inflated += inflater.decompress(pending, 1 << 20)
        if inflated.find(_PIXEL_DATA_BYTES, searched) >= 0:
            return bytes(inflated)
        if len(inflated) > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: the deflated dataset's header is over {MAX_HEADER_BYTES >> 20} MB")


def read_image(path: Path) -> Image | None:
    """The header of one file (pixel data not read); None when it is not DICOM or has no series (a DICOMDIR).

    Raises ``ValueError`` naming the file when the header itself cannot be parsed.
    """
    try:
        ds = read_header(path)
    except InvalidDicomError:
        log.debug("skipping %s: not a DICOM file", path)
        return None
    except Exception as error:  # a damaged file: pydicom raises many kinds here
        raise ValueError(f"{path}: unreadable DICOM header ({error})") from None
    if "SeriesInstanceUID" not in ds or "SOPInstanceUID" not in ds:
        log.debug("skipping %s: no series or SOP instance UID (a DICOMDIR?)", path)
        return None
    try:
        return _image(path, ds)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as error:
        raise ValueError(f"{path}: malformed header value ({error})") from None


def _image(path: Path, ds: pydicom.Dataset) -> Image:
    frames = _int(ds.get("NumberOfFrames")) or 1
    problems: list[str] = []
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        slices = _frames(path, ds, frames, problems)
    elif frames > 1:
        slices = ()
        problems.append(f"a multi-frame image ({frames} frames) without per-frame positions (functional groups)")
    else:
        slices = (_single(path, ds),)
    image_type = tuple(str(v).strip().upper() for v in _values(ds.get("ImageType")))
    kernel = "\\".join(str(v).strip() for v in _values(ds.get("ConvolutionKernel")))
    if not kernel:
        kernel = _shared(ds, "CTReconstructionSequence", "ConvolutionKernel") or ""
    return Image(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        series_instance_uid=str(ds.SeriesInstanceUID),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        series_number=_int(ds.get("SeriesNumber")),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        image_type=image_type,
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        kernel=str(kernel),
        contrast_agent=_contrast_agent(ds),
        frames=frames,
        slices=slices,
        problems=tuple(problems),
    )


def _single(path: Path, ds: pydicom.Dataset) -> Slice:
    return Slice(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        frame=None,
        instance_number=_int(ds.get("InstanceNumber")),
        position=_vector(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_vector(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
        pixel_spacing=_vector(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        thickness=_float(ds.get("SliceThickness")),
        rows=_int(ds.get("Rows")) or 0,
        columns=_int(ds.get("Columns")) or 0,
        rescale=None,
    )


def _frames(path: Path, ds: pydicom.Dataset, frames: int, problems: list[str]) -> tuple[Slice, ...]:
    """The frames of a multi-frame image, each with its functional groups (per-frame overriding shared)."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else pydicom.Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames:
        problems.append(f"{len(per_frame)} per-frame functional group items for {frames} frames")
        return ()
    result = []
    for index, item in enumerate(per_frame):
        def group(sequence: str, keyword: str, item: Any = item) -> Any:
            for source in (item, shared_item):
                inner = source.get(sequence)
                if inner and keyword in inner[0]:
                    return inner[0].get(keyword)
            return None

        position = _vector(group("PlanePositionSequence", "ImagePositionPatient"), 3)
        slope, intercept = group("PixelValueTransformationSequence", "RescaleSlope"), group(
            "PixelValueTransformationSequence", "RescaleIntercept")
        result.append(Slice(
            path=path,
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            frame=index + 1,
            instance_number=_int(ds.get("InstanceNumber")),
            position=position,  # type: ignore[arg-type]
            orientation=_vector(group("PlaneOrientationSequence", "ImageOrientationPatient"), 6),  # type: ignore[arg-type]
            pixel_spacing=_vector(group("PixelMeasuresSequence", "PixelSpacing"), 2),  # type: ignore[arg-type]
            thickness=_float(group("PixelMeasuresSequence", "SliceThickness")),
            rows=_int(ds.get("Rows")) or 0,
            columns=_int(ds.get("Columns")) or 0,
            rescale=(_float(slope) or 1.0, _float(intercept) or 0.0),
            stack_id=_text(group("FrameContentSequence", "StackID")),
        ))
    return tuple(result)


def stacks_of(images: Iterable[Image]) -> list[Stack]:
    """The stacks of the images of one series, in a stable order (by their first instance number and label)."""
    images = list(images)
    if not images:
        return []
    groups: dict[tuple[Any, ...], list[tuple[Image, Slice]]] = defaultdict(list)
    broken: list[Stack] = []
    for image in images:
        if image.problems and not image.slices:
            broken.append(_stack(image, [], [image], label=f"instance {image.sop_instance_uid}",
                                 problems=list(image.problems)))
            continue
        for piece in image.slices:
            groups[_group_key(image, piece)].append((image, piece))
    stacks: list[Stack] = []
    for key, members in groups.items():  # key[5]: the SOP instance of a multi-frame image
        multiframe = key[5] is not None
        parts = [members] if multiframe else _without_overlaps(members)
        for part in parts:
            member_images = list({img.sop_instance_uid: img for img, _ in part}.values())
            problems = sorted({p for img in member_images for p in img.problems})
            if multiframe and _overlapping(part):
                spots = len({_spot(piece.position) for _, piece in part if piece.position is not None})
                problems.append(f"{len(part)} frames at {spots} positions: not one volume (frames of a time series, "
                                "or stacks without Stack IDs)")
            stacks.append(_stack(member_images[0], [piece for _, piece in part], member_images, label="",
                                 problems=problems))
    stacks.sort(key=lambda s: (min((p.instance_number or 0) for p in s.slices) if s.slices else 0, _label(s)))
    if len(stacks) + len(broken) > 1:
        for index, stack in enumerate(stacks, start=1):
            stack.label = f"{index} ({_label(stack)})"
    return stacks + broken


def _group_key(image: Image, piece: Slice) -> tuple[Any, ...]:
    """What separates stacks before positions are looked at."""
    orientation = None if piece.orientation is None else tuple(np.round(piece.orientation, _ORIENTATION_DECIMALS))
    thickness = None if piece.thickness is None else round(piece.thickness, 2)
    multiframe = image.sop_instance_uid if image.frames > 1 else None
    return (image.image_type, image.kernel.upper(), thickness, orientation, (piece.rows, piece.columns),
            multiframe, piece.stack_id, image.sop_class_uid)


def _without_overlaps(members: list[tuple[Image, Slice]]) -> list[list[tuple[Image, Slice]]]:
    """Split a group whose slices share positions: first by AcquisitionNumber, then in instance order."""
    if not _overlapping(members):
        return [members]
    by_acquisition: dict[int | None, list[tuple[Image, Slice]]] = defaultdict(list)
    for member in members:
        by_acquisition[member[0].acquisition_number].append(member)
    parts: list[list[tuple[Image, Slice]]] = []
    for _, group in sorted(by_acquisition.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        parts.extend(_greedy(group) if _overlapping(group) else [group])
    return parts


def _spot(position: Sequence[float]) -> tuple[int, ...]:
    """A position rounded to ``_SAME_POSITION_MM``: equal spots are one position."""
    return tuple(int(v) for v in np.round(np.asarray(position) / _SAME_POSITION_MM))


def _overlapping(members: Sequence[tuple[Image, Slice]]) -> bool:
    spots = [_spot(m[1].position) for m in members if m[1].position is not None]
    return len(set(spots)) < len(spots)


def _greedy(members: list[tuple[Image, Slice]]) -> list[list[tuple[Image, Slice]]]:
    """In instance (and frame) order, start a new stack whenever a position repeats one of the current stack."""
    ordered = sorted(members, key=lambda m: (m[1].instance_number or 0, m[1].frame or 0, m[1].sop_instance_uid))
    parts: list[list[tuple[Image, Slice]]] = [[]]
    seen: set[tuple[int, ...]] = set()
    for member in ordered:
        position = member[1].position
        spot = _spot(position) if position else None
        if spot is not None and spot in seen:
            parts.append([])
            seen = set()
        parts[-1].append(member)
        if spot is not None:
            seen.add(spot)
    return parts


def _stack(first: Image, slices: list[Slice], images: list[Image], *, label: str, problems: list[str]) -> Stack:
    stack = Stack(
        series_instance_uid=first.series_instance_uid,
        study_instance_uid=first.study_instance_uid,
        modality=first.modality,
        series_number=first.series_number,
        description=first.series_description,
        label=label,
        sop_class_uid=first.sop_class_uid,
        image_type=first.image_type,
        kernel=first.kernel,
        contrast_agent=next((img.contrast_agent for img in images if img.contrast_agent), ""),
        multiframe=any(img.frames > 1 for img in images),
        slices=slices,
        problems=list(problems),
    )
    _sort_and_check(stack)
    return stack


def _sort_and_check(stack: Stack) -> None:
    """Sort the slices along the slice normal and list what keeps them from being one volume."""
    if not stack.slices:
        return
    for name, attribute in (("ImagePositionPatient", "position"), ("ImageOrientationPatient", "orientation"),
                            ("PixelSpacing", "pixel_spacing")):
        unplaced = [s for s in stack.slices if getattr(s, attribute) is None]
        if unplaced:
            where = unplaced[0].path.name + (f" frame {unplaced[0].frame}" if unplaced[0].frame else "")
            stack.problems.append(f"{where}: missing or malformed {name} ({len(unplaced)} of {len(stack.slices)} "
                                  "slices); the slices cannot be placed")
    if stack.problems:
        return
    first = stack.slices[0]
    assert first.orientation is not None
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        stack.problems.append(f"ImageOrientationPatient {list(first.orientation)} is not two unit vectors")
        return
    if len({(s.rows, s.columns) for s in stack.slices}) > 1 or first.rows < 1 or first.columns < 1:
        stack.problems.append("slices of different or missing matrix sizes (Rows x Columns)")
    if len({s.pixel_spacing for s in stack.slices}) > 1:
        stack.problems.append("slices of different pixel spacings")
    stack.slices.sort(key=lambda s: (float(np.dot(s.position, normal)),  # type: ignore[arg-type]
                                     s.instance_number or 0, s.frame or 0, s.sop_instance_uid))
    positions = stack.positions()
    if positions is not None and len(positions) > 1 and float(np.ptp(positions)) < _SAME_POSITION_MM:
        stack.problems.append(f"all {len(positions)} slices lie at one position (not a volume: a time series?)")


def _label(stack: Stack) -> str:
    parts = ["\\".join(stack.image_type[:3]) or "no ImageType"]
    if stack.kernel:
        parts.append(f"kernel {stack.kernel}")
    if stack.thickness:
        parts.append(f"{stack.thickness:.3g} mm")
    parts.append("x".join(map(str, stack.matrix)))
    return ", ".join(parts)


def _contrast_agent(ds: pydicom.Dataset) -> str:
    """The contrast agent the header names: ContrastBolusAgent, or the Enhanced Contrast/Bolus module's code."""
    agent = _text(ds.get("ContrastBolusAgent"))
    if agent:
        return agent
    for item in ds.get("ContrastBolusAgentSequence") or []:
        meaning = _text(item.get("CodeMeaning"))
        if meaning:
            return meaning
    return ""


def _text(value: Any) -> str | None:
    return str(value).strip() or None if value not in (None, "") else None


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _shared(ds: pydicom.Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` from ``sequence`` in the dataset, or in its shared functional groups."""
    for source in (ds, *(ds.get("SharedFunctionalGroupsSequence") or [])):
        inner = source.get(sequence)
        if inner and keyword in inner[0]:
            return inner[0].get(keyword)
    return None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(_values(value)[0])
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(_values(value)[0])
    except (TypeError, ValueError):
        return None


def _vector(value: Any, length: int) -> tuple[float, ...] | None:
    values = _values(value)
    if len(values) != length:
        return None
    try:
        vector = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return vector if all(np.isfinite(vector)) else None
