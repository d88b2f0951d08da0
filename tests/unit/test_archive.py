"""The archive: durable, idempotent storage of received instances and their rows."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from pe_node.config import StorageConfig
from pe_node.db import Database, Instance, Series, SeriesState
from pe_node.dicom.archive import Archive, GroupCommit, Received, StoreStatus, _Pending
from pe_node.dicom.incoming import IncomingDataset
from pe_node.dicom.part10 import file_header
from tests.dicom_factory import make_ct_dataset, phantom_slice

STUDY, SERIES = generate_uid(), generate_uid()


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def ct(index: int, series: str = SERIES, sop: str | None = None) -> pydicom.Dataset:
    ds = make_ct_dataset(phantom_slice(index, 10, 32), position=(0.0, 0.0, -2.0 * index), study_uid=STUDY,
                         series_uid=series, instance_number=index + 1)
    if sop is not None:
        ds.SOPInstanceUID = sop
    return ds


def request(ds: pydicom.Dataset, data: bytes | None = None) -> Received:
    return Received(encoded(ds) if data is None else data, ExplicitVRLittleEndian, ds.SOPClassUID,
                    ds.SOPInstanceUID, "TESTSCU")


@pytest.fixture
def archive(tmp_path: Path, db: Database) -> Archive:
    return Archive(StorageConfig(path=tmp_path / "dicom", min_free_mb=0), db)


def test_stored_file_is_the_sent_dataset_behind_a_part10_header(archive: Archive, db: Database) -> None:
    ds = ct(0)
    outcome = archive.store(request(ds))
    assert outcome.status == StoreStatus.SUCCESS
    path = archive.path_for(STUDY, SERIES, ds.SOPInstanceUID)
    stored = path.read_bytes()
    assert stored.endswith(encoded(ds))
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(path.parent.glob(".*.tmp")), "no temporary file left behind"
    with db.session() as session:
        series = session.scalars(select(Series)).one()
        assert (series.series_instance_uid, series.state) == (SERIES, SeriesState.RECEIVING)
        assert session.scalar(select(Instance.size)) == len(stored)


def test_resent_instance_is_stored_once(archive: Archive, db: Database) -> None:
    ds = ct(1)
    archive.store(request(ds))
    again = archive.store(request(ds))
    assert again.status == StoreStatus.SUCCESS and again.duplicate
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1


def test_resent_instance_with_new_content_replaces_the_file_and_reopens(archive: Archive, db: Database) -> None:
    ds = ct(2)
    archive.store(request(ds))
    with db.session() as session:
        session.scalars(select(Series)).one().state = SeriesState.ANALYSED
    ds.SeriesDescription = "corrected"
    assert archive.store(request(ds)).status == StoreStatus.SUCCESS
    assert pydicom.dcmread(archive.path_for(STUDY, SERIES, ds.SOPInstanceUID)).SeriesDescription == "corrected"
    with db.session() as session:
        assert session.scalars(select(Series)).one().state == SeriesState.RECEIVING
        assert session.scalar(select(func.count(Instance.id))) == 1


def test_instance_moved_to_another_series_leaves_one_copy(archive: Archive, db: Database) -> None:
    sop = generate_uid()
    archive.store(request(ct(3, sop=sop)))
    other = generate_uid()
    archive.store(request(ct(3, series=other, sop=sop)))
    assert not archive.path_for(STUDY, SERIES, sop).exists()
    assert archive.path_for(STUDY, other, sop).exists()
    with db.session() as session:
        counts = dict(session.execute(
            select(Series.series_instance_uid, func.count(Instance.id))
            .outerjoin(Instance, Instance.series_id == Series.id).group_by(Series.series_instance_uid)
        ).all())
    assert counts == {SERIES: 0, other: 1}


@pytest.mark.parametrize("uid", ["../../x", "1.2.3/../../../etc", "1.2.abc"])
def test_path_like_uids_are_refused_and_nothing_is_written(archive: Archive, uid: str) -> None:
    ds = ct(4, sop=uid)
    outcome = archive.store(request(ds))
    assert outcome.status == StoreStatus.BAD_UID
    assert "not a valid UID" in (outcome.comment or "")
    assert not any(p.is_file() for p in archive.root.rglob("*"))


def test_bad_study_uid_is_refused(archive: Archive) -> None:
    ds = ct(5)
    ds.StudyInstanceUID = "../.."
    assert archive.store(request(ds)).status == StoreStatus.BAD_UID


def test_command_and_dataset_disagreeing_is_refused(archive: Archive) -> None:
    ds = ct(6)
    mismatched = Received(encoded(ds), ExplicitVRLittleEndian, ds.SOPClassUID, generate_uid(), "X")
    assert archive.store(mismatched).status == StoreStatus.UID_MISMATCH
    wrong_class = Received(encoded(ds), ExplicitVRLittleEndian, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID, "X")
    assert archive.store(wrong_class).status == StoreStatus.SOP_CLASS_MISMATCH


def test_truncated_dataset_is_refused(archive: Archive) -> None:
    ds = ct(7)
    outcome = archive.store(request(ds, encoded(ds)[:-10]))
    assert outcome.status == StoreStatus.CANNOT_UNDERSTAND


def test_below_the_free_space_floor_answers_out_of_resources(tmp_path: Path, db: Database) -> None:
    full = Archive(StorageConfig(path=tmp_path / "dicom", min_free_mb=10**9), db)
    outcome = full.store(request(ct(8)))
    assert outcome.status == StoreStatus.OUT_OF_RESOURCES == 0xA700
    assert not any(p.is_file() for p in full.root.rglob("*"))


def test_concurrent_stores_of_one_series_count_every_instance(archive: Archive, db: Database) -> None:
    datasets = [ct(i) for i in range(12)]
    threads = [threading.Thread(target=archive.store, args=(request(ds),)) for ds in datasets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 12


def test_stale_temporary_files_are_removed(archive: Archive) -> None:
    folder = archive.root / "1.2" / "3.4"
    folder.mkdir(parents=True)
    stale = folder / ".5.6.dcm.1.otherhost.1.tmp"
    stale.write_bytes(b"partial")
    import os

    os.utime(stale, (0, 0))
    fresh = folder / ".7.8.dcm.1.otherhost.2.tmp"
    fresh.write_bytes(b"another receiver writing right now")
    assert archive.remove_stale_temporaries() == 1
    assert not stale.exists() and fresh.exists()


def spooled(archive: Archive, ds: pydicom.Dataset, data: bytes | None = None) -> Received:
    """The request as the receiver makes it for a large dataset: spooled as it arrived, behind the Part 10 header
    built from the command (a memory limit of 1 kB makes any dataset large)."""
    data = encoded(ds) if data is None else data
    prefix = file_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "TESTSCU")
    incoming = IncomingDataset(archive.spool_folder, 1024, prefix)
    for start in range(0, len(data), 700):
        incoming.write(memoryview(data)[start : start + 700])
    assert incoming.spooled
    return Received(incoming, ExplicitVRLittleEndian, ds.SOPClassUID, ds.SOPInstanceUID, "TESTSCU")


def test_a_spooled_dataset_is_renamed_into_place_and_recorded(archive: Archive, db: Database) -> None:
    ds = ct(20)
    outcome = archive.store(spooled(archive, ds))
    assert outcome.status == StoreStatus.SUCCESS and not outcome.duplicate
    path = archive.path_for(STUDY, SERIES, ds.SOPInstanceUID)
    assert path.read_bytes().endswith(encoded(ds)) and pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(archive.spool_folder.iterdir()), "the spool file became the instance file"
    again = archive.store(spooled(archive, ds))
    assert again.status == StoreStatus.SUCCESS and again.duplicate, "compared piece by piece with the stored file"
    ds.SeriesDescription = "changed"
    assert not archive.store(spooled(archive, ds)).duplicate
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1


def test_a_refused_spooled_dataset_leaves_nothing(archive: Archive) -> None:
    ds = ct(21)
    request = spooled(archive, ds, encoded(ds)[:-10])
    assert archive.store(request).status == StoreStatus.CANNOT_UNDERSTAND
    assert isinstance(request.dataset, IncomingDataset)
    request.dataset.discard()
    assert not any(p.is_file() for p in archive.root.rglob("*"))


def test_a_dataset_that_could_not_be_spooled_answers_out_of_resources(archive: Archive) -> None:
    ds = ct(22)
    request = spooled(archive, ds)
    assert isinstance(request.dataset, IncomingDataset)
    request.dataset.error = OSError(28, "No space left on device")
    outcome = archive.store(request)
    assert outcome.status == StoreStatus.OUT_OF_RESOURCES and "No space left" in (outcome.comment or "")


def test_stale_spool_files_are_removed(archive: Archive) -> None:
    archive.spool_folder.mkdir(parents=True)
    stale = archive.spool_folder / ".spool.1-1.otherhost.9.tmp"
    stale.write_bytes(b"half a dataset")
    os.utime(stale, (0, 0))
    assert archive.remove_stale_temporaries() == 1 and not stale.exists()


def test_group_commit_publishes_concurrent_items_together_and_each_caller_only_once_its_own_is(db: Database) -> None:
    committed: list[list[int]] = []
    lock = threading.Lock()
    release = threading.Event()

    def commit(batch: list) -> None:
        if not committed:
            release.wait(5)  # the first batch is slow: the other callers queue up meanwhile
        with lock:
            committed.append([item.size for item in batch])
        for item in batch:
            item.outcome = f"done {item.size}"

    group = GroupCommit(commit)
    items = [_Pending(None, None, None, size) for size in range(8)]  # type: ignore[arg-type]
    returned: dict[int, object] = {}

    def publish(item) -> None:
        group.publish(item)
        returned[item.size] = item.outcome

    first = threading.Thread(target=publish, args=(items[0],))
    first.start()
    while not group._leading:
        pass
    others = [threading.Thread(target=publish, args=(item,)) for item in items[1:]]
    for thread in others:
        thread.start()
    while len(group._queue) < 7:
        pass
    release.set()
    for thread in [first, *others]:
        thread.join(5)
    assert committed == [[0], [1, 2, 3, 4, 5, 6, 7]], "the seven that waited share one commit"
    assert returned == {size: f"done {size}" for size in range(8)}, "each caller saw its own item committed"


def test_group_commit_failure_reaches_every_caller_of_the_batch() -> None:
    def commit(batch: list) -> None:
        raise OSError("disk gone")

    group = GroupCommit(commit)
    with pytest.raises(OSError, match="disk gone"):
        group.publish(_Pending(None, None, None, 1))  # type: ignore[arg-type]
    follower = _Pending(None, None, None, 2)  # type: ignore[arg-type]
    follower.settled, follower.failure = True, OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        group.publish(follower)


def test_parallel_associations_share_directory_fsyncs_and_commits(archive: Archive, db: Database,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    publish = archive._publish_batch

    def counted(batch: list) -> None:
        batches.append(len(batch))
        publish(batch)

    monkeypatch.setattr(archive._publisher, "_commit", counted)
    datasets = [make_ct_dataset(phantom_slice(k, 64, 64), position=(0, 0, k), study_uid=STUDY, series_uid=SERIES)
                for k in range(64)]
    threads = [threading.Thread(target=lambda part=part: [archive.store(request(ds)) for ds in part])
               for part in (datasets[k::8] for k in range(8))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 64
    assert sum(batches) == 64 and all(archive.path_for(STUDY, SERIES, ds.SOPInstanceUID).exists() for ds in datasets)
    assert len(batches) < 64, "some instances shared a commit"
