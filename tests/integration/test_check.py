"""pe-node check: every part of the configuration tried for real."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import needs_dcmtk
from tests.peers import NodeProcess, StoreSCP, free_port, node_config

pytestmark = needs_dcmtk


def test_check_passes_with_reachable_destinations_and_a_good_model(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with StoreSCP(tmp_path / "scp") as scp:
        root = tmp_path / "node"
        config = node_config(root, free_port(), model={"checkpoint": str(tiny_checkpoint), "device": "cpu"},
                             destinations=[
                                 {"type": "dicom", "name": "pacs", "ae_title": scp.ae_title, "host": "127.0.0.1",
                                  "port": scp.port},
                                 {"type": "folder", "name": "outbox", "path": str(root / "outbox")},
                             ])
        result = NodeProcess(root, config).cli("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    destination pacs: C-ECHO to STORESCP@127.0.0.1" in result.stdout
    assert "ok    model:" in result.stdout and "ok    database:" in result.stdout


def test_check_fails_naming_what_is_wrong(tmp_path: Path) -> None:
    root = tmp_path / "node"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    config = node_config(root, free_port(), model={"checkpoint": str(broken)}, destinations=[
        {"type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    result = NodeProcess(root, config).cli("check")
    assert result.returncode == 1
    assert "FAIL  destination pacs: C-ECHO to PACS@127.0.0.1" in result.stdout
    assert f"FAIL  model: checkpoint {broken}: cannot be read" in result.stdout
