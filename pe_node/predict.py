"""``pe-node predict SERIES_DIR [--json]``: the model on one folder of DICOM files, without the network.

``run_predict`` loads the series, runs the ``Predictor`` and prints the findings: with ``--json`` exactly the shape
of DESIGN.md ("Command line"), otherwise a short readable summary. A folder that is not one CT series or an unusable
checkpoint is one line on stderr and exit status 1; bad arguments (device, batch size) exit with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

from pe_node.findings import EXAM_LABELS, Prediction, exam_probability
from pe_node.model.checkpoint import CheckpointError
from pe_node.model.predictor import Predictor, resolve_device
from pe_node.pipeline.series import SeriesError, load_series

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
TOP_SLICES = 5


def run_predict(
    series_dir: Path,
    checkpoint: Path,
    device: str = "auto",
    batch_size: int = 32,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Predict on the series in ``series_dir`` with ``checkpoint``; returns the process exit status."""
    try:
        resolve_device(device)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size {batch_size!r}: must be a positive integer")
    except ValueError as error:
        print(f"pe-node predict: {error}", file=err)
        return EXIT_USAGE
    try:
        predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size)
        series = load_series(series_dir)
    except (SeriesError, CheckpointError) as error:
        print(f"pe-node predict: {error}", file=err)
        return EXIT_FAILED
    prediction = predictor.predict(series)
    logger.info("series %s: %d slices in %.2f s", series.series_instance_uid, len(series), prediction.timings["total"])
    if as_json:
        json.dump(prediction.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(summary(prediction))
    return EXIT_OK


def summary(prediction: Prediction, top: int = TOP_SLICES) -> str:
    """The findings in a few lines: PE yes/no with the probability the SR reports, each exam label, the most likely
    slices, the timings."""
    image = np.asarray(prediction.image, dtype=np.float64)
    peak = int(np.argmax(image))
    verdict = "PE present" if prediction.pe_present else "no PE"
    lines = [
        f"Series {prediction.series_instance_uid} ({len(image)} slices): {verdict} "
        f"(PE probability {exam_probability(prediction):.3f}; highest image probability {image[peak]:.3f}, "
        f"slice {peak})",
        "Exam labels:",
        *(f"  {label:<22} {prediction.exam[label]:.3f}" for label in EXAM_LABELS),
        "Top slices (index, PE probability, attention, SOP Instance UID):",
    ]
    for index in np.argsort(-image, kind="stable")[:top]:
        lines.append(
            f"  {int(index):>5}  {image[index]:.3f}  {float(prediction.attention[index]):.4f}  "
            f"{prediction.sop_instance_uids[index]}"
        )
    timings = ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in prediction.timings.items())
    lines.append(f"Timings: {timings}")
    return "\n".join(lines) + "\n"
