"""DICOM result objects of pe-node: the TID 1500 SR, key-slice secondary captures, a presentation state and a key
object selection.

Callers use :func:`build_report` and the small types around it; the modules below it each build one kind of object.
"""

from pe_node.reporting.algorithm import AlgorithmInfo
from pe_node.reporting.report import ReportObjects, ReportOptions, build_report

__all__ = [
    "AlgorithmInfo",
    "ReportObjects",
    "ReportOptions",
    "build_report",
]
