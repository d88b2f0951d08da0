"""The DICOM CT Image Storage objects a phantom series is written as, and a fast encoder for their files.

Every slice of a series shares all but five attributes (SOP Instance UID, Instance Number, Image Position (Patient),
Slice Location and Pixel Data), so ``SeriesEncoder`` encodes the shared ones once with pydicom and only the five,
with the file meta information, per slice. The bytes are those ``pydicom.dcmwrite(..., enforce_file_format=True)``
writes (Explicit VR Little Endian, 128-byte preamble, DICM prefix), at a fraction of the cost: pydicom spends
milliseconds a file on its sixty-odd elements.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

RESCALE_INTERCEPT = -1024
MANUFACTURER = "pe-node phantom"
IMPLEMENTATION_VERSION_NAME = "PE_NODE_PHANTOM"
# The attributes that differ between the slices of a series, in tag order.
PER_SLICE = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "SliceLocation", "PixelData")
_PIXEL_DATA = Tag("PixelData")


def derived_uid(namespace: uuid.UUID, *parts: object) -> str:
    """A UID derived from ``parts`` (a set's seed, a study's index, what the UID names): 2.25 and the integer of a
    name-based (SHA-1, version 5) UUID in ``namespace`` (DICOM PS3.5 B.2), so a seed gives the same UIDs every time.
    pydicom's generate_uid ignores its entropy sources under the 2.25 root and is random."""
    return f"2.25.{uuid.uuid5(namespace, '/'.join(map(str, parts))).int}"


def to_stored(hu: np.ndarray) -> np.ndarray:
    """HU to the stored int16 values of RescaleIntercept -1024, RescaleSlope 1 (air, -1000 HU, is 24)."""
    return np.clip(np.rint(hu) - RESCALE_INTERCEPT, -32768, 32767).astype("<i2")


@dataclass(frozen=True)
class SliceGeometry:
    """Where one slice lies: the patient-frame position of its first pixel's centre (mm) and its instance number."""

    x0: float
    y0: float
    z: float
    instance_number: int


def series_dataset(header: Mapping[str, object], *, size: int, spacing: float, thickness: float) -> pydicom.Dataset:
    """The attributes all slices of an axial CT series share (CT Image IOD: patient, general study and series,
    frame of reference, general equipment, image plane, image pixel, CT image and SOP common modules).

    ``header`` holds the patient, study and series values drawn for the study (names as DICOM keywords, plus
    ``Window``: (center, width)).
    """
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = header["StudyDate"]
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = header["StudyTime"]
    ds.AccessionNumber = header["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = MANUFACTURER
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT PULMONARY ANGIOGRAM"
    ds.SeriesDescription = "CTPA"
    ds.ManufacturerModelName = "CTPA phantom"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge"):
        setattr(ds, keyword, header[keyword])
    ds.ContrastBolusAgent = header["ContrastBolusAgent"]
    ds.BodyPartExamined = "CHEST"
    ds.ScanOptions = "HELICAL MODE"
    ds.SliceThickness = f"{thickness:g}"
    ds.KVP = f"{header['KVP']:g}"
    ds.ConvolutionKernel = header["ConvolutionKernel"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header["StudyInstanceUID"]
    ds.SeriesInstanceUID = header["SeriesInstanceUID"]
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = header["FrameOfReferenceUID"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [f"{spacing:.6f}"] * 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter, ds.WindowWidth = header["Window"]
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    return ds


def slice_dataset(series: pydicom.Dataset, sop_instance_uid: str, where: SliceGeometry,
                  stored: np.ndarray) -> pydicom.Dataset:
    """One slice as a full dataset (the series' attributes and the five of the slice); what SeriesEncoder encodes."""
    ds = copy.deepcopy(series)
    for keyword, value in _slice_values(sop_instance_uid, where, stored).items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    return ds


def _slice_values(sop_instance_uid: str, where: SliceGeometry, stored: np.ndarray) -> dict[str, object]:
    return {
        "SOPInstanceUID": sop_instance_uid,
        "InstanceNumber": where.instance_number,
        "ImagePositionPatient": [f"{where.x0:.3f}", f"{where.y0:.3f}", f"{where.z:.3f}"],
        "SliceLocation": f"{where.z:.3f}",
        "PixelData": stored.astype("<i2", copy=False).tobytes(),
    }


def _encode(ds: pydicom.Dataset) -> bytes:
    """Elements in Explicit VR Little Endian, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


class SeriesEncoder:
    """Encodes the files of one series: the shared elements once, the per-slice ones for each slice."""

    def __init__(self, series: pydicom.Dataset) -> None:
        self.file_meta = series.file_meta
        variable = {Tag(keyword) for keyword in PER_SLICE}
        held = [series[tag].keyword for tag in variable if tag in series]
        if held:
            raise ValueError(f"the series dataset already holds the per-slice attribute(s) {', '.join(held)}")
        # Runs of shared elements between the per-slice ones, in tag order: bytes, or the keyword of a slot.
        self.parts: list[bytes | str] = []
        run = pydicom.Dataset()
        tags = sorted({*series.keys(), *variable})
        for tag in tags:
            if tag in variable:
                if len(run):
                    self.parts.append(_encode(run))
                    run = pydicom.Dataset()
                self.parts.append(pydicom.datadict.keyword_for_tag(tag))
            else:
                run[tag] = series[tag]
        if len(run):
            self.parts.append(_encode(run))

    def encode(self, sop_instance_uid: str, where: SliceGeometry, stored: np.ndarray) -> bytes:
        """The file of one slice."""
        meta = FileMetaDataset(self.file_meta)
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        values = _slice_values(sop_instance_uid, where, stored)
        chunks = [fp.getvalue()]
        for part in self.parts:
            if isinstance(part, bytes):
                chunks.append(part)
            else:
                single = pydicom.Dataset()
                if part == "PixelData":  # OW, as dcmwrite resolves "OB or OW" for 16-bit pixels
                    single.add_new(_PIXEL_DATA, "OW", values[part])
                else:
                    setattr(single, part, values[part])
                chunks.append(_encode(single))
        return b"".join(chunks)
