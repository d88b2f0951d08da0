"""The coded concepts of pe-node's result objects, including its private coding scheme.

Standard concepts come from SNOMED CT (SCT), DICOM (DCM, PS3.16 Annex D) and UCUM; their code meanings follow the
DICOM context groups that list them (pydicom's concept dictionary). Two concepts have no standard code and live in a
private scheme that every object using it declares in its CodingSchemeIdentificationSequence (PS3.3 C.12.1.1.4):

- the RV/LV diameter ratio >= 1 (the RSNA-STR label of right-heart strain), and
- the reason a series was not analysed (with the reasons DICOM has no code for).

The exam evaluation uses CID 240-style values (Present / Absent / Undetermined); a series that was not analysed gets
the distinct value "Not Evaluated" (SCT 373121007, CID 3703), so that "negative" and "not analysed" differ in coded
content and not only in text.
"""

from __future__ import annotations

import enum

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

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

# Concept name of the chronicity evaluation (SNOMED CT attribute); its values are ClinicalCourse
CLINICAL_COURSE = Code("263502005", "SCT", "Clinical course")

# Measurement: DCM 122157 "Probability" (PS3.16 Annex D), dimensionless, UCUM "1"
PROBABILITY: Code = codes.DCM.Probability
NO_UNITS: Code = codes.UCUM.NoUnits

# Procedure reported (CID 100)
IMAGING_PROCEDURE: Code = codes.SCT.ImagingProcedure

# Key Object Selection document title (CID 7010)
OF_INTEREST: Code = codes.DCM.OfInterest

# Secondary capture: purpose of reference of the CT slice in SourceImageSequence (CID 7202)
SOURCE_FOR_PROCESSING: Code = codes.DCM.SourceImageForImageProcessingOperation

# Private concepts
RV_LV_RATIO_GTE_1 = Code("RVLV-GTE-1", PRIVATE_SCHEME, "RV/LV diameter ratio >= 1")
REASON_NOT_ANALYSED = Code("NA-REASON", PRIVATE_SCHEME, "Reason not analysed")


class Evaluation(enum.Enum):
    """The value of a finding's qualitative evaluation (the finding itself is the concept name)."""

    PRESENT = Code("52101004", "SCT", "Present")
    ABSENT = Code("272519000", "SCT", "Absent")
    UNDETERMINED = Code("373068000", "SCT", "Undetermined")
    NOT_EVALUATED = Code("373121007", "SCT", "Not Evaluated")

    @classmethod
    def of(cls, present: bool) -> Evaluation:
        return cls.PRESENT if present else cls.ABSENT


class ClinicalCourse(enum.Enum):
    """Values of the clinical course (SCT 263502005) of a positive exam."""

    ACUTE = Code("373933003", "SCT", "Acute onset")
    CHRONIC = Code("90734009", "SCT", "Chronic")
    ACUTE_ON_CHRONIC = Code("255212004", "SCT", "Acute-on-chronic")


class Location(enum.Enum):
    """The RSNA-STR location labels and the artery each stands for (central = pulmonary trunk)."""

    CENTRAL = Code("45341000", "SCT", "Pulmonary trunk")
    LEFT = Code("50408007", "SCT", "Left pulmonary artery")
    RIGHT = Code("78480002", "SCT", "Right pulmonary artery")
