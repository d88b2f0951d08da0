"""Whole CTPA studies as scanners send them, for tests: the series of one exam, each in its own folder.

``write_study(folder, volume)`` takes a contrast-enhanced HU volume (slices in position order, 1.25 mm apart) and
writes, with one Study Instance UID and the exam's patient:

- ``topogram``: one localizer (ORIGINAL\\PRIMARY\\LOCALIZER), a projection of the volume;
- ``precontrast``: a non-contrast scan at 3.75 mm (no ContrastBolusAgent; blood at blood's own attenuation);
- ``cta``: the CTA at 1.25 mm (ContrastBolusAgent named, a standard kernel), the series to analyse;
- ``cta_thick``: a 3.75 mm reconstruction of the same CTA;
- ``mpr``: a coronal reformat (DERIVED\\SECONDARY\\REFORMATTED);
- ``dose``: an X-Ray Radiation Dose SR.

``write_enhanced(path, volume, ...)`` writes the same CTA as ONE Enhanced CT Image Storage instance: per-frame plane
positions, shared pixel measures, orientation and rescale, frames stored in an order other than their positions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    EnhancedCTImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from tests.dicom_factory import AXIAL, make_ct_dataset, new_dataset

CORONAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SPACING = 1.25
PIXEL = 0.7
CONTRAST = "Omnipaque 350"


@dataclass(frozen=True)
class Study:
    """The files of each series of a written study, and their UIDs."""

    study_instance_uid: str
    series: dict[str, list[Path]]
    series_uids: dict[str, str]


def write_study(folder: Path, volume: np.ndarray, *, study_uid: str | None = None,
                series: Sequence[str] = ("topogram", "precontrast", "cta", "cta_thick", "mpr", "dose")) -> Study:
    """Write the named series of one exam of ``volume`` (HU int16 [slices, rows, columns]) under ``folder``."""
    study_uid = study_uid or generate_uid()
    written: dict[str, list[Path]] = {}
    uids: dict[str, str] = {}
    for number, name in enumerate(series, start=1):
        uids[name] = generate_uid(entropy_srcs=[study_uid, name])
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        written[name] = _WRITERS[name](out, volume, study_uid, uids[name], number)
    return Study(study_uid, written, uids)


def thick(volume: np.ndarray, factor: int = 3) -> np.ndarray:
    """A thicker reconstruction: the mean of each ``factor`` neighbouring slices."""
    usable = len(volume) // factor * factor
    return np.rint(volume[:usable].reshape(-1, factor, *volume.shape[1:]).mean(axis=1)).astype(np.int16)


def without_contrast(volume: np.ndarray) -> np.ndarray:
    """The same anatomy before contrast: enhanced blood (150-600 HU) back to about 45 HU."""
    plain = volume.copy()
    plain[(volume > 150) & (volume < 600)] = 45
    return plain


def _axial(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int, *, spacing: float,
           description: str, contrast: bool, kernel: str = "STANDARD", image_type: Sequence[str] = (
               "ORIGINAL", "PRIMARY", "AXIAL")) -> list[Path]:
    rows = volume.shape[1]
    origin = np.array([-PIXEL * rows / 2, -PIXEL * rows / 2, -150.0])
    order = np.random.default_rng(number).permutation(len(volume))
    paths = []
    for k, hu in enumerate(volume):
        ds = make_ct_dataset(hu, position=origin + np.array([0.0, 0.0, k * spacing]), study_uid=study_uid,
                             series_uid=series_uid, instance_number=int(order[k]) + 1,
                             pixel_spacing=(PIXEL, PIXEL), slice_thickness=spacing)
        _series_attributes(ds, number, description, kernel, contrast, image_type)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _series_attributes(ds: Dataset, number: int, description: str, kernel: str, contrast: bool,
                       image_type: Sequence[str]) -> None:
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ConvolutionKernel = kernel
    ds.ImageType = list(image_type)
    ds.AcquisitionNumber = 1
    ds.BodyPartExamined = "CHEST"
    if contrast:
        ds.ContrastBolusAgent = CONTRAST
        ds.ContrastBolusRoute = "IV"


def _cta(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    return _axial(out, volume, study_uid, series_uid, number, spacing=SPACING, description="CTA PE 1.25 mm",
                  contrast=True)


def _cta_thick(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    return _axial(out, thick(volume), study_uid, series_uid, number, spacing=3 * SPACING,
                  description="CTA PE 3.75 mm", contrast=True)


def _precontrast(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    return _axial(out, thick(without_contrast(volume)), study_uid, series_uid, number, spacing=3 * SPACING,
                  description="Chest non-contrast 3.75 mm", contrast=False)


def _topogram(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    projection = np.rint(np.clip(volume.astype(np.float32).mean(axis=1), -1024, 3071)).astype(np.int16)
    ds = make_ct_dataset(projection, position=(0.0, 0.0, 0.0), study_uid=study_uid, series_uid=series_uid,
                         orientation=CORONAL, pixel_spacing=(SPACING, PIXEL))
    _series_attributes(ds, number, "Topogram", "T80f", False, ("ORIGINAL", "PRIMARY", "LOCALIZER"))
    path = out / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


def _mpr(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    """Coronal planes: rows run head to feet, so each plane is volume[:, y, :] upside down."""
    step = max(1, volume.shape[1] // 40)
    paths = []
    for k, y in enumerate(range(0, volume.shape[1], step)):
        plane = volume[::-1, y, :]
        position = (-PIXEL * volume.shape[2] / 2, -PIXEL * volume.shape[1] / 2 + y * PIXEL,
                    -150.0 + (len(volume) - 1) * SPACING)
        ds = make_ct_dataset(np.ascontiguousarray(plane), position=position, study_uid=study_uid,
                             series_uid=series_uid, instance_number=k + 1, orientation=CORONAL,
                             pixel_spacing=(SPACING, PIXEL), slice_thickness=PIXEL * step)
        _series_attributes(ds, number, "CTA coronal MPR", "STANDARD", True, ("DERIVED", "SECONDARY", "REFORMATTED"))
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dose(out: Path, volume: np.ndarray, study_uid: str, series_uid: str, number: int) -> list[Path]:
    """A minimal X-Ray Radiation Dose SR (TID 10011's root), as scanners send one after each exam."""
    sop_uid = generate_uid()
    ds = _header(XRayRadiationDoseSRStorage, sop_uid, study_uid, series_uid, "SR", number, "Dose Report")
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("113701", "DCM", "X-Ray Radiation Dose Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContentDate, ds.ContentTime = "20240101", "121500"
    ds.InstanceNumber = 1
    path = out / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return [path]


_WRITERS = {
    "topogram": _topogram,
    "precontrast": _precontrast,
    "cta": _cta,
    "cta_thick": _cta_thick,
    "mpr": _mpr,
    "dose": _dose,
}


def write_enhanced(path: Path, volume: np.ndarray, *, study_uid: str, series_uid: str, series_number: int = 3,
                   frame_order: Sequence[int] | None = None, positions: bool = True) -> Path:
    """The CTA of ``write_study`` as one Enhanced CT instance. ``frame_order[f]`` is the slice stored as frame f+1
    (default: reversed, so frame numbers run against positions); ``positions=False`` leaves them out."""
    frames = len(volume)
    order = list(frame_order) if frame_order is not None else list(range(frames))[::-1]
    rows = volume.shape[1]
    origin = np.array([-PIXEL * rows / 2, -PIXEL * rows / 2, -150.0])
    intercept = -1024.0
    stored = (np.stack([volume[k] for k in order]).astype(np.int32) - int(intercept)).astype(np.int16)
    sop_uid = generate_uid()
    ds = _header(EnhancedCTImageStorage, sop_uid, study_uid, series_uid, "CT", series_number, "CTA PE enhanced")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20240101", "121000"
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = "20240101121000"
    ds.AcquisitionDuration = 5.0
    ds.ContentQualification = "PRODUCT"
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame of reference"])
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1  # signed: -2048 padding
    ds.NumberOfFrames = frames
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContrastBolusAgentSequence = [_code("C-B0317", "SRT", CONTRAST)]
    ds.ContrastBolusAgentSequence[0].ContrastBolusAgentNumber = 1
    ds.ContrastBolusAgentSequence[0].ContrastBolusAdministrationRouteSequence = [_code("G-D101", "SRT", "Intravenous")]
    ds.ContrastBolusAgentSequence[0].ContrastBolusVolume = 80
    ds.ContrastBolusAgentSequence[0].ContrastBolusIngredientConcentration = 350
    ds.ContrastBolusAgentSequence[0].ContrastBolusIngredientCodeSequence = [_code("C-11400", "SRT", "Iodine")]
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [PIXEL, PIXEL]
    shared.PixelMeasuresSequence[0].SliceThickness = SPACING
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(AXIAL)
    shared.PixelValueTransformationSequence = [Dataset()]
    transform = shared.PixelValueTransformationSequence[0]
    transform.RescaleIntercept, transform.RescaleSlope, transform.RescaleType = intercept, 1.0, "HU"
    shared.CTImageFrameTypeSequence = [Dataset()]
    shared.CTImageFrameTypeSequence[0].FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    shared.CTReconstructionSequence = [Dataset()]
    shared.CTReconstructionSequence[0].ConvolutionKernel = "STANDARD"
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        item = Dataset()
        if positions:
            item.PlanePositionSequence = [Dataset()]
            item.PlanePositionSequence[0].ImagePositionPatient = [float(v) for v in origin + [0, 0, k * SPACING]]
        item.FrameContentSequence = [Dataset()]
        content = item.FrameContentSequence[0]
        content.StackID = "1"
        content.InStackPositionNumber = k + 1
        content.DimensionIndexValues = [1, k + 1]
        content.FrameAcquisitionNumber = 1
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    dimension = generate_uid(entropy_srcs=[sop_uid, "dimensions"])
    ds.DimensionOrganizationSequence = [Dataset()]
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = [_dimension(dimension, 0x00209056, 0x00209111), _dimension(dimension, 0x00209057,
                                                                                             0x00209111)]
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _dimension(organization: str, pointer: int, group: int) -> Dataset:
    item = Dataset()
    item.DimensionOrganizationUID = organization
    item.DimensionIndexPointer = pointer
    item.FunctionalGroupPointer = group
    return item


def _header(sop_class: str, sop_uid: str, study_uid: str, series_uid: str, modality: str, number: int,
            description: str) -> Dataset:
    ds = new_dataset(sop_class, sop_uid, study_uid, series_uid, modality)
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.ManufacturerModelName = "study factory"
    ds.DeviceSerialNumber = "1"
    ds.SoftwareVersions = "1"
    ds.SeriesDate = "20240101"
    ds.SeriesTime = dt.time(12, 5).strftime("%H%M%S")
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item

