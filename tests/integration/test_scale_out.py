"""Scale-out on PostgreSQL: one receiver and two workers share the database and the storage path."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import (
    NodeProcess,
    PostgresServer,
    free_port,
    kill_mid_job,
    node_config,
    run_dcmtk,
    wait_until,
)

pytestmark = [needs_dcmtk, pytest.mark.peer("postgresql")]


@pytest.fixture
def database_url() -> Iterator[str]:
    server = PostgresServer().start()
    try:
        yield server.create_database("pe_node")
    finally:
        server.stop()


def test_twenty_series_each_analysed_once_with_a_worker_killed_mid_job(tmp_path: Path, tiny_checkpoint: Path,
                                                                        database_url: str) -> None:
    root = tmp_path / "shared"
    config = node_config(
        root, free_port(),
        database={"url": database_url},
        series={"quiet_seconds": 0.5, "min_instances": 30, "sweep_seconds": 0.2},
        model={"checkpoint": str(tiny_checkpoint), "device": "cpu", "batch_size": 1},
        worker={"enabled": True, "lease_seconds": 6, "max_attempts": 3, "poll_seconds": 0.1},
        destinations=[{"type": "folder", "name": "outbox", "path": str(root / "outbox")}],
    )
    receiver = NodeProcess(root, config, args=("serve", "--no-worker")).start()
    workers = [NodeProcess(root, config, args=("worker",)) for _ in range(2)]
    for number, worker in enumerate(workers):
        worker.log_path = root / f"worker-{number}.log"
    try:
        # Every job is queued before the workers start, so both take part from the first job on; the one seen
        # first inside a job is killed there (waiting for a given one to hold a job can wait for ever: the other
        # may finish the lot first).
        series = [write_ct_series(tmp_path / f"s{k}", n_slices=60, size=96, seed=k) for k in range(20)]
        result = run_dcmtk("storescu", "-aec", "PE_NODE", "127.0.0.1", str(receiver.port),
                           *map(str, itertools.chain.from_iterable(series)))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: [job["state"] for job in receiver.status()["jobs"]] == ["queued"] * 20, timeout=60,
                   interval=0.5, what="20 queued jobs")
        for worker in workers:
            worker.start()

        _, killed_job, _ = kill_mid_job(workers, database_url)

        def all_done() -> dict | None:
            status = receiver.status()
            return status if len(status["jobs"]) == 20 and all(j["state"] == "done" for j in status["jobs"]) \
                else None

        status = wait_until(all_done, timeout=300, interval=0.5, what="20 finished jobs")
    finally:
        for process in (*workers, receiver):
            process.stop()
    jobs = status["jobs"]
    assert sorted(j["series_instance_uid"] for j in jobs) == sorted({j["series_instance_uid"] for j in jobs})
    assert len({j["series_instance_uid"] for j in jobs}) == 20, "every series analysed, none twice"
    [redone] = [j for j in jobs if j["id"] == killed_job]
    assert redone["attempts"] == 2, "the killed worker's job ran again on the other worker"
    assert all(j["attempts"] == 1 for j in jobs if j["id"] != killed_job)
    assert {s["state"] for s in status["series"]} == {"analysed"}
    delivered = [d for d in status["deliveries"] if d["state"] == "done"]
    objects = list((root / "outbox").rglob("*.dcm"))
    assert len(objects) == len(delivered) == len({d["sop_instance_uid"] for d in delivered})
