"""make demo: a phantom with a clot goes through a running node and its findings and files are printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import needs_dcmtk
from tests.integration.test_results import working_node
from tests.peers import REPO

pytestmark = needs_dcmtk


def test_demo_prints_the_findings_and_where_the_results_are(start_node, tiny_checkpoint: Path,
                                                             tmp_path: Path) -> None:
    node = working_node(start_node, tiny_checkpoint,
                        [{"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}],
                        series={"quiet_seconds": 2.0, "min_instances": 30})
    result = subprocess.run([sys.executable, "-m", "pe_node.demo", "--config", str(node.config_path), "--seed", "7"],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "with a pulmonary embolism (truth:" in out
    assert re.search(r"^PE: (YES|no) \(probability 0\.\d\d, (positive|negative|indeterminate)\)", out, re.M)
    for line in ("location: central", "chronicity: ", "RV/LV >= 1: ", "key slices: ", "timings: load"):
        assert line in out
    [sr] = re.findall(r"^structured report: (\S+)$", out, re.M)
    assert Path(sr).is_file() and Path(sr).is_relative_to(tmp_path / "outbox")
    for png in re.findall(r"as PNG: (\S+)$", out, re.M):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
