"""The outbox against real destinations: a folder, DCMTK storescp, a port nobody listens on, a refusing node."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pe_node.config import Config, load_config
from pe_node.db import (
    Database,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from pe_node.delivery.outbox import Outbox, enqueue, resend_job
from pe_node.delivery.outgoing import Outgoing
from tests.dicom_factory import write_ct_series
from tests.integration.conftest import needs_dcmtk
from tests.peers import Orthanc, StoreSCP, free_port

pytestmark = needs_dcmtk


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'outbox.db'}")
    yield database
    database.dispose()


@pytest.fixture
def objects(tmp_path: Path) -> list[Outgoing]:
    files = write_ct_series(tmp_path / "results", n_slices=3, size=32, seed=4)
    items = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        items.append(Outgoing(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID))
    return items


def config(tmp_path: Path, destinations: list[dict], **delivery: float) -> Config:
    environ = {"PE_NODE__DESTINATIONS": repr(destinations).replace("'", '"')}
    environ.update({f"PE_NODE__DELIVERY__{k.upper()}": str(v) for k, v in delivery.items()})
    return load_config(None, environ)


def queue(db: Database, objects: list[Outgoing], names: list[str], now: dt.datetime) -> int:
    with db.session() as session:
        series = Series(series_instance_uid="1.2.3", study_instance_uid="1.2", state=SeriesState.ANALYSED,
                        first_received_at=now, last_received_at=now)
        study = Study(study_instance_uid="1.2", created_at=now)
        session.add_all([series, study])
        session.flush()
        job = Job(study_id=study.id, series_id=series.id, state=JobState.DONE, attempts=1, created_at=now)
        session.add(job)
        session.flush()
        enqueue(session, job.id, objects, names, now=now)
        return job.id


def states(db: Database) -> dict[str, list[tuple[DeliveryState, int]]]:
    with db.session() as session:
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
    grouped: dict[str, list[tuple[DeliveryState, int]]] = {}
    for row in rows:
        grouped.setdefault(row.destination, []).append((row.state, row.attempts))
    return grouped


def test_delivers_to_folder_and_storescp_and_retries_a_down_peer(tmp_path: Path, db: Database,
                                                                 objects: list[Outgoing]) -> None:
    down_port = free_port()
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = config(tmp_path, [
            {"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")},
            {"type": "dicom", "name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            {"type": "dicom", "name": "later", "ae_title": "LATER", "host": "127.0.0.1", "port": down_port},
        ])
        t0 = utcnow()
        queue(db, objects, ["outbox", "pacs", "later"], t0)
        outbox = Outbox(db, cfg)
        assert outbox.deliver_due(now=t0) == 6
        received = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "pacs").iterdir()}
    assert received == {o.sop_instance_uid for o in objects}
    for item in objects:
        copy = tmp_path / "outbox" / item.study_instance_uid / item.series_instance_uid / f"{item.sop_instance_uid}.dcm"
        assert copy.read_bytes() == item.path.read_bytes()
    result = states(db)
    assert result["outbox"] == result["pacs"] == [(DeliveryState.DONE, 1)] * 3
    assert result["later"] == [(DeliveryState.PENDING, 1)] * 3
    with db.session() as session:
        row = session.scalars(select(Delivery).where(Delivery.destination == "later")).first()
        assert "no association" in row.error
        assert row.next_attempt_at == t0 + dt.timedelta(seconds=10)

    assert outbox.deliver_due(now=t0 + dt.timedelta(seconds=5)) == 0, "not due yet"
    assert outbox.deliver_due(now=t0 + dt.timedelta(seconds=10)) == 0
    with db.session() as session:
        row = session.scalars(select(Delivery).where(Delivery.destination == "later")).first()
        assert row.attempts == 2 and row.next_attempt_at == t0 + dt.timedelta(seconds=30), "10 s, then 20 s"

    with StoreSCP(tmp_path / "later", port=down_port, ae_title="LATER"):
        assert outbox.deliver_due(now=t0 + dt.timedelta(seconds=30)) == 3
    assert states(db)["later"] == [(DeliveryState.DONE, 3)] * 3
    assert len(list((tmp_path / "later").iterdir())) == 3, "each object once"


def test_backoff_is_capped_and_gives_up_with_the_error_kept(tmp_path: Path, db: Database,
                                                            objects: list[Outgoing]) -> None:
    cfg = config(tmp_path, [{"type": "dicom", "name": "gone", "ae_title": "GONE", "host": "127.0.0.1",
                             "port": free_port()}],
                 initial_backoff_seconds=10, max_backoff_seconds=15, give_up_after_hours=0.01)
    t0 = utcnow()
    queue(db, objects[:1], ["gone"], t0)
    outbox = Outbox(db, cfg)
    outbox.deliver_due(now=t0)
    outbox.deliver_due(now=t0 + dt.timedelta(seconds=10))
    with db.session() as session:
        row = session.scalars(select(Delivery)).one()
        assert row.next_attempt_at == t0 + dt.timedelta(seconds=25), "20 s capped at 15 s"
    outbox.deliver_due(now=t0 + dt.timedelta(seconds=40))
    with db.session() as session:
        row = session.scalars(select(Delivery)).one()
        assert (row.state, row.attempts) == (DeliveryState.FAILED, 3)
        assert "no association" in row.error


def test_failure_status_from_the_peer_is_not_counted_as_delivered(tmp_path: Path, db: Database,
                                                                 objects: list[Outgoing], start_node) -> None:
    refusing = start_node(storage={"min_free_mb": 10**9})
    cfg = config(tmp_path, [{"type": "dicom", "name": "full", "ae_title": "PE_NODE", "host": "127.0.0.1",
                             "port": refusing.port}])
    t0 = utcnow()
    queue(db, objects[:1], ["full"], t0)
    assert Outbox(db, cfg).deliver_due(now=t0) == 0
    with db.session() as session:
        row = session.scalars(select(Delivery)).one()
    assert row.state == DeliveryState.PENDING and "status 0xA700" in row.error


def test_resend_queues_a_jobs_objects_again(tmp_path: Path, db: Database, objects: list[Outgoing]) -> None:
    cfg = config(tmp_path, [{"type": "folder", "name": "outbox", "path": str(tmp_path / "outbox")}])
    t0 = utcnow()
    job_id = queue(db, objects, ["outbox"], t0)
    outbox = Outbox(db, cfg)
    outbox.deliver_due(now=t0)
    assert resend_job(db, job_id) == 3
    assert states(db)["outbox"] == [(DeliveryState.PENDING, 0)] * 3
    assert outbox.deliver_due() == 3
    with pytest.raises(LookupError):
        resend_job(db, job_id + 1)


def test_enqueue_twice_keeps_one_delivery_per_object_and_destination(tmp_path: Path, db: Database,
                                                                     objects: list[Outgoing]) -> None:
    t0 = utcnow()
    job_id = queue(db, objects, ["outbox"], t0)
    with db.session() as session:
        enqueue(session, job_id, objects, ["outbox"], now=t0)
    assert len(states(db)["outbox"]) == 3


def test_removed_destination_fails_with_a_reason(tmp_path: Path, db: Database, objects: list[Outgoing]) -> None:
    t0 = utcnow()
    queue(db, objects[:1], ["retired"], t0)
    Outbox(db, config(tmp_path, [])).deliver_due(now=t0)
    with db.session() as session:
        row = session.scalars(select(Delivery)).one()
    assert row.state == DeliveryState.FAILED and "'retired' is no longer configured" in row.error


needs_dicomweb = pytest.mark.peer("orthanc", "orthanc-dicomweb")


@needs_dicomweb
def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path, db: Database, objects: list[Outgoing]) -> None:
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as pacs:
        cfg = config(tmp_path, [{"type": "dicomweb", "name": "web", "url": pacs.dicomweb_url}])
        t0 = utcnow()
        queue(db, objects, ["web"], t0)
        assert Outbox(db, cfg).deliver_due(now=t0) == 3
        stored = {pacs.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in pacs.get("/instances")}
        assert stored == {o.sop_instance_uid for o in objects}
        from pe_node.delivery.dicomweb import probe

        assert probe(cfg.destinations[0])[0]
    assert states(db)["web"] == [(DeliveryState.DONE, 1)] * 3


def test_stow_rs_to_a_server_that_is_down_is_retried(tmp_path: Path, db: Database, objects: list[Outgoing]) -> None:
    cfg = config(tmp_path, [{"type": "dicomweb", "name": "web", "url": f"http://127.0.0.1:{free_port()}/dicom-web"}])
    t0 = utcnow()
    queue(db, objects[:1], ["web"], t0)
    assert Outbox(db, cfg).deliver_due(now=t0) == 0
    with db.session() as session:
        row = session.scalars(select(Delivery)).one()
    assert row.state == DeliveryState.PENDING and "STOW-RS to http://127.0.0.1" in row.error
