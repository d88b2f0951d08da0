"""The coded concepts of pe-node's result objects, including its private coding scheme.

Standard concepts come from SNOMED CT (SCT), DICOM (DCM, PS3.16 Annex D) and UCUM; their code meanings follow the
DICOM context groups that list them (pydicom's concept dictionary). Two concepts have no standard code and live in a
private scheme that every object using it declares in its CodingSchemeIdentificationSequence (PS3.3 C.12.1.1.4):

- the RV/LV diameter ratio >= 1 (the RSNA-STR label of right-heart strain),
- the reason a series was not analysed (with the reasons DICOM has no code for), and
- the first and last slice of a located finding (its extent along the series).

The domain's outcomes (``pe_node.findings``: exam result, clinical course, reason not analysed) are coded by the
mappings at the end of this module, the one place that ties them to concepts.

The exam evaluation uses CID 240-style values (Present / Absent / Undetermined); a series that was not analysed gets
the distinct value "Not Evaluated" (SCT 373121007, CID 3703), so that "negative" and "not analysed" differ in coded
content and not only in text.
"""

from __future__ import annotations

import enum

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pe_node.findings import ClinicalCourse, ExamLabel, ExamResult, NotAnalysedReason
from pe_node.located import Side

PRIVATE_SCHEME = "99PENODE"
"""Coding Scheme Designator of pe-node's private concepts ("99" prefix: local scheme, PS3.3 8.2)."""


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """The CodingSchemeIdentificationSequence item that declares :data:`PRIVATE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="pe-node private concepts",
        responsible_organization="pe-node",
    )


# The finding and where it is (SNOMED CT)
PULMONARY_EMBOLISM = Code("59282003", "SCT", "Pulmonary embolism")
PULMONARY_ARTERY = Code("81040000", "SCT", "Pulmonary artery")

# TID 1500 containers and TID 1501 content that highdicom does not name
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
FINDING_SITE: Code = codes.SCT.FindingSite
COMMENT: Code = codes.DCM.Comment
IMAGE_REGION: Code = codes.DCM.ImageRegion
SOURCE = Code("260753009", "SCT", "Source")

# Concept name of the chronicity evaluation (SNOMED CT attribute); its values are COURSE_CODES
CLINICAL_COURSE = Code("263502005", "SCT", "Clinical course")

# Measurement: DCM 122157 "Probability" (PS3.16 Annex D), dimensionless, UCUM "1"
PROBABILITY: Code = codes.DCM.Probability
NO_UNITS: Code = codes.UCUM.NoUnits

# Language of the content (TID 1204)
ENGLISH = Code("en-US", "RFC5646", "English (United States)")

# Procedure reported (CID 100)
IMAGING_PROCEDURE: Code = codes.SCT.ImagingProcedure

# Key Object Selection document title (CID 7010)
OF_INTEREST: Code = codes.DCM.OfInterest

# Secondary capture: purpose of reference of the CT slice in SourceImageSequence (CID 7202)
SOURCE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation

# Private concepts
RV_LV_RATIO_GTE_1 = Code("RVLV-GTE-1", PRIVATE_SCHEME, "RV/LV diameter ratio >= 1")
REASON_NOT_ANALYSED = Code("NA-REASON", PRIVATE_SCHEME, "Reason not analysed")
FIRST_SLICE = Code("EXT-FIRST", PRIVATE_SCHEME, "First slice of finding")
LAST_SLICE = Code("EXT-LAST", PRIVATE_SCHEME, "Last slice of finding")


class Evaluation(enum.Enum):
    """The value of a finding's qualitative evaluation (the finding itself is the concept name)."""

    PRESENT = Code("52101004", "SCT", "Present")
    ABSENT = Code("272519000", "SCT", "Absent")
    UNDETERMINED = Code("373068000", "SCT", "Undetermined")
    NOT_EVALUATED = Code("373121007", "SCT", "Not Evaluated")

    @classmethod
    def of(cls, present: bool) -> Evaluation:
        return cls.PRESENT if present else cls.ABSENT


class Location(enum.Enum):
    """The RSNA-STR location labels and the artery each stands for (central = pulmonary trunk)."""

    CENTRAL = Code("45341000", "SCT", "Pulmonary trunk")
    LEFT = Code("50408007", "SCT", "Left pulmonary artery")
    RIGHT = Code("78480002", "SCT", "Right pulmonary artery")


LOCATION_LABELS: dict[Location, ExamLabel] = {
    Location.CENTRAL: ExamLabel.CENTRAL,
    Location.LEFT: ExamLabel.LEFT,
    Location.RIGHT: ExamLabel.RIGHT,
}
"""The RSNA-STR location label of each artery."""

SIDE_LOCATIONS: dict[Side, Location] = {
    Side.CENTRAL: Location.CENTRAL,
    Side.LEFT: Location.LEFT,
    Side.RIGHT: Location.RIGHT,
}
"""The artery a located finding's side stands for (its finding site; the pulmonary artery when not determined)."""

EVALUATIONS: dict[ExamResult, Evaluation] = {
    ExamResult.POSITIVE: Evaluation.PRESENT,
    ExamResult.NEGATIVE: Evaluation.ABSENT,
    ExamResult.INDETERMINATE: Evaluation.UNDETERMINED,
    ExamResult.NOT_ANALYSED: Evaluation.NOT_EVALUATED,
}
"""The evaluation the SR gives the exam finding for each exam result."""

COURSE_CODES: dict[ClinicalCourse, Code] = {
    ClinicalCourse.ACUTE: Code("373933003", "SCT", "Acute onset"),
    ClinicalCourse.CHRONIC: Code("90734009", "SCT", "Chronic"),
    ClinicalCourse.ACUTE_ON_CHRONIC: Code("255212004", "SCT", "Acute-on-chronic"),
}
"""Values of the clinical course (SCT 263502005) of a positive exam."""

NOT_ANALYSED_CODES: dict[NotAnalysedReason, Code] = {
    NotAnalysedReason.TOO_FEW_SLICES: Code("NA-SLICES", PRIVATE_SCHEME, "Too few slices"),
    NotAnalysedReason.NOT_AXIAL: Code("NA-AXIAL", PRIVATE_SCHEME, "Not an axial series"),
    # Inadequate contrast has a DICOM code (DCM 130580, CID 6315); the other reasons are private concepts.
    NotAnalysedReason.NO_CONTRAST: Code("130580", "DCM", "Inadequate contrast enhancement"),
    NotAnalysedReason.INCONSISTENT_SPACING: Code("NA-SPACING", PRIVATE_SCHEME, "Inconsistent slice spacing"),
    NotAnalysedReason.UNREADABLE: Code("NA-UNREADABLE", PRIVATE_SCHEME, "Unreadable series"),
    NotAnalysedReason.IMAGE_TOO_LARGE: Code("NA-SIZE", PRIVATE_SCHEME, "Image too large"),
    NotAnalysedReason.NOT_CT_IMAGES: Code("NA-KIND", PRIVATE_SCHEME, "Not axial CT images"),
    NotAnalysedReason.TOO_THICK: Code("NA-THICK", PRIVATE_SCHEME, "Slices too thick"),
    NotAnalysedReason.NO_USABLE_SERIES: Code("NA-NOSERIES", PRIVATE_SCHEME, "No usable series in the study"),
}
"""The coded reason a "not analysed" SR gives."""
