"""Fixtures for tests against a running pe-node process and real DICOM peers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import NodeProcess, free_port, node_config

needs_dcmtk = pytest.mark.peer("dcmtk")
needs_orthanc = pytest.mark.peer("orthanc")
needs_dicom3tools = pytest.mark.peer("dicom3tools")


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Start ``pe-node serve`` with a test config (sections override the defaults); all stopped at the end."""
    nodes: list[NodeProcess] = []

    def start(args: tuple[str, ...] = ("serve",), **sections: Any) -> NodeProcess:
        root = tmp_path / f"node{len(nodes)}"
        node = NodeProcess(root, node_config(root, free_port(), **sections), args=args).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()
