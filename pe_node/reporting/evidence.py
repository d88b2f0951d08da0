"""Header-only stand-ins for the source CT slices that the result objects reference.

highdicom builds evidence and key-object references from datasets. Reading 1,100 slice headers back from disk for
that costs more than the report itself, and what those references need is already in memory: each slice's UIDs in
``CTSeries.slices`` and the series-wide attributes (patient, study, equipment, geometry) in ``CTSeries.header``, the
first slice's header. So the first slice is stood for by a private copy of the header (highdicom copies patient and
study from the first evidence dataset, and the Image Library takes its shared descriptors from it), every other
slice by a dataset holding just its four UIDs, and a key slice that a key object selection flags by a header copy
with its own UIDs.
"""

from __future__ import annotations

import copy

from pydicom import Dataset

from pe_node.pipeline.series import CTSeries

# Type 2 attributes of the Patient and General Study modules that highdicom copies into every object. A scanner
# that omits one must not stop the report (least of all a "not analysed" one): the copy gets it empty.
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def study_header(series: CTSeries) -> Dataset:
    """A private copy of the series header carrying the first slice's UIDs: patient, study and equipment source."""
    if not series.slices:
        raise ValueError(f"series {series.series_instance_uid} has no slices to report on")
    header = copy.deepcopy(series.header)
    for keyword in _TYPE_2:
        if keyword not in header:
            setattr(header, keyword, None)
    first = series.slices[0]
    header.SOPClassUID = first.sop_class_uid
    header.SOPInstanceUID = first.sop_instance_uid
    header.StudyInstanceUID = series.study_instance_uid
    header.SeriesInstanceUID = series.series_instance_uid
    return header


def slice_reference(series: CTSeries, index: int) -> Dataset:
    """The four UIDs of slice ``index`` (slice order): all that evidence sequences need."""
    ref = series.slices[index]
    dataset = Dataset()
    dataset.StudyInstanceUID = series.study_instance_uid
    dataset.SeriesInstanceUID = series.series_instance_uid
    dataset.SOPClassUID = ref.sop_class_uid
    dataset.SOPInstanceUID = ref.sop_instance_uid
    return dataset


def image_reference(series: CTSeries, index: int) -> Dataset:
    """A Referenced SOP item (Image SOP Instance Reference Macro) of slice ``index``, with its frame if it has one."""
    ref = series.slices[index]
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame is not None:
        item.ReferencedFrameNumber = ref.frame
    return item


def series_references(series: CTSeries, header: Dataset) -> list[Dataset]:
    """Every slice in slice order, ``header`` (from :func:`study_header`) standing for the first one."""
    return [header, *(slice_reference(series, i) for i in range(1, len(series.slices)))]


def slice_header(series: CTSeries, header: Dataset, index: int) -> Dataset:
    """A copy of ``header`` standing for slice ``index``: for references that also carry patient and study."""
    dataset = copy.deepcopy(header)
    ref = series.slices[index]
    dataset.SOPClassUID = ref.sop_class_uid
    dataset.SOPInstanceUID = ref.sop_instance_uid
    if ref.instance_number is not None:
        dataset.InstanceNumber = ref.instance_number
    elif "InstanceNumber" in dataset:
        del dataset.InstanceNumber
    return dataset
