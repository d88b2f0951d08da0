"""pe-node: a DICOM node that detects pulmonary embolism on CT pulmonary angiograms."""

import os

# OpenMP threads otherwise spin while they wait for work: on a small shared machine that burns the cores the
# receiver and the peers need, and made stage-1 inference five to ten times slower. It must be set before torch
# loads, and every pe-node and pe-train process imports this package first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
