"""``pe-node predict``: JSON in exactly the DESIGN.md keys, a readable summary, one-line errors with exit status."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from pe_node.findings import EXAM_LABELS
from pe_node.predict import EXIT_FAILED, EXIT_OK, EXIT_USAGE, run_predict
from tests.dicom_factory import write_ct_series


def predict(series_dir: Path, checkpoint: Path, **kwargs: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run_predict(series_dir, checkpoint, **{"device": "cpu", **kwargs}, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_json_output_has_exactly_the_design_keys(ct_series_dir: Path, tiny_checkpoint: Path) -> None:
    status, out, err = predict(ct_series_dir, tiny_checkpoint, as_json=True)
    assert status == EXIT_OK and err == ""
    data = json.loads(out)
    assert set(data) == {"series_instance_uid", "exam", "images", "attention", "timings"}
    assert list(data["exam"]) == list(EXAM_LABELS)
    assert len(data["images"]) == len(data["attention"]) == 40
    assert all(set(image) == {"sop_instance_uid", "pe_present_on_image"} for image in data["images"])
    assert sum(data["attention"]) == pytest.approx(1.0, abs=1e-4)
    assert {"preprocess", "stage1", "stage2", "total"} <= set(data["timings"])


def test_human_summary_names_the_verdict_and_every_exam_label(ct_series_dir: Path, tiny_checkpoint: Path) -> None:
    status, out, _ = predict(ct_series_dir, tiny_checkpoint)
    assert status == EXIT_OK
    first = out.splitlines()[0]
    assert "(40 slices)" in first and ("PE present" in first or "no PE" in first)
    reported = float(re.search(r"PE probability (\d\.\d{3});", first).group(1))
    assert (reported > 0.5) == ("PE present" in first), "the probability the SR reports, on the verdict's side of 0.5"
    assert all(label in out for label in EXAM_LABELS)
    assert "Top slices" in out and "Timings:" in out


def test_folder_that_is_not_one_ct_series_is_a_one_line_error(tmp_path: Path, tiny_checkpoint: Path) -> None:
    write_ct_series(tmp_path, n_slices=3, size=32, modality="MR")
    status, out, err = predict(tmp_path, tiny_checkpoint, as_json=True)
    assert status == EXIT_FAILED and out == ""
    assert err.count("\n") == 1 and "not CT" in err


def test_bad_checkpoint_is_a_one_line_error(ct_series_dir: Path, tmp_path: Path) -> None:
    status, _, err = predict(ct_series_dir, tmp_path / "missing.pt")
    assert status == EXIT_FAILED
    assert err.count("\n") == 1 and "missing.pt: no such file" in err


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"device": "gpu9"}, "device 'gpu9'"), ({"batch_size": 0}, "batch size 0")]
)
def test_bad_arguments_exit_with_usage_status(
    ct_series_dir: Path, tiny_checkpoint: Path, kwargs: dict, message: str
) -> None:
    status, _, err = predict(ct_series_dir, tiny_checkpoint, **kwargs)
    assert status == EXIT_USAGE and message in err
