"""pe-node: a DICOM node that detects pulmonary embolism on CT pulmonary angiograms."""

__version__ = "0.1.0"
