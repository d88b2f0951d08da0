"""The durable store of received instances: files under ``<storage>/<Study>/<Series>/<SOP>.dcm`` and their rows.

An instance is acknowledged only after its file is written to a temporary name, fsynced, renamed into place, the
directory entry fsynced, and its row committed: once a sender sees success, a crash or power cut loses nothing.
These are two steps: staged (written and fsynced, in the association's thread, so that the files of concurrent
associations are written and synced in parallel) and published (renamed, directory fsynced, row committed). Publishing
is a group commit (``GroupCommit``): instances that arrive while a publication is under way wait, and the next one
publishes all of them with one fsync per directory and one transaction, so parallel associations do not queue behind
each other's commits; each association is still answered only once its own instance is durable. A large dataset reaches
the archive already spooled to a file in ``<storage>/.incoming`` (``incoming.py``); that file is checked through a
memory map and renamed into place, never copied or read into memory.
The bytes are the dataset exactly as it arrived (any transfer syntax, compressed or not) behind a Part 10 header,
so what is on disk is what was sent. Storing an instance is idempotent on its SOP Instance UID: the same bytes
again change nothing; different bytes replace the file and re-open the series.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import bindparam, select, text

from pe_node import storage
from pe_node.config import StorageConfig
from pe_node.db import Database, Instance, Series, UTCDateTime, utcnow
from pe_node.dicom.header import DEFAULT_MAX_INFLATED_BYTES, HeaderError, InstanceHeader, read_header
from pe_node.dicom.incoming import IncomingDataset
from pe_node.dicom.part10 import file_header

log = logging.getLogger(__name__)

_MB = 1024 * 1024
_STALE_TMP_SECONDS = 3600
SPOOL = ".incoming"  # under the storage root: datasets being received, too large to hold in memory


_UPSERT_SERIES = text(
    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, series_description, state, "
    "first_received_at, last_received_at) VALUES (:series_uid, :study_uid, :modality, :description, 'receiving', "
    ":now, :now) ON CONFLICT (series_instance_uid) DO UPDATE SET last_received_at = excluded.last_received_at, "
    "state = 'receiving', reason = NULL, purged_at = NULL, "
    "modality = COALESCE(excluded.modality, series.modality) RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_INSERT_INSTANCE = text(
    "INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid, transfer_syntax_uid, instance_number, "
    "image_type, size, received_at, association_id) VALUES (:sop_uid, :series_id, :sop_class_uid, "
    ":transfer_syntax_uid, :instance_number, :image_type, :size, :now, :association_id) "
    "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id"
).bindparams(bindparam("now", type_=UTCDateTime()))
_PREVIOUS_SERIES = text(
    "SELECT s.id, s.study_instance_uid, s.series_instance_uid FROM instances i JOIN series s ON s.id = i.series_id "
    "WHERE i.sop_instance_uid = :sop_uid"
)
_UPDATE_INSTANCE = text(
    "UPDATE instances SET series_id = :series_id, sop_class_uid = :sop_class_uid, "
    "transfer_syntax_uid = :transfer_syntax_uid, instance_number = :instance_number, image_type = :image_type, "
    "size = :size, received_at = :now, association_id = :association_id WHERE sop_instance_uid = :sop_uid"
).bindparams(bindparam("now", type_=UTCDateTime()))


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses (PS3.4 Table B.2-1; the C0xx codes are our "cannot understand" details)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    BAD_UID = 0xC001
    UID_MISMATCH = 0xC002


@dataclass(frozen=True)
class StoreOutcome:
    status: StoreStatus
    comment: str | None = None
    header: InstanceHeader | None = None
    duplicate: bool = False


@dataclass(frozen=True)
class Received:
    """One C-STORE request as the archive needs it: the dataset as received (bytes, or as it arrived, possibly
    spooled), the command's UIDs it must match, and the cap on what a deflated dataset may inflate to."""

    dataset: bytes | IncomingDataset
    transfer_syntax_uid: str
    affected_sop_class_uid: str
    affected_sop_instance_uid: str
    calling_ae_title: str
    association_id: int | None = None
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES


class Archive:
    """Writes received instances durably and records them; safe to call from many association threads."""

    def __init__(self, storage: StorageConfig, db: Database, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.root = Path(storage.path)
        self.min_free_bytes = storage.min_free_mb * _MB
        self.db = db
        self.clock = clock
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool_folder = self.root / SPOOL
        self._free_checked_at = 0.0
        self._free_bytes = 0
        self._free_lock = threading.Lock()
        self._publisher = GroupCommit(self._publish_batch)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return storage.instance_path(self.root, study_uid, series_uid, sop_uid)

    def store(self, request: Received) -> StoreOutcome:
        """Check, write and record one instance; the outcome's status is the C-STORE response status."""
        dataset = _incoming(request.dataset)
        if dataset.error is not None:
            log.error("cannot spool the dataset of %s: %s", request.affected_sop_instance_uid[:64], dataset.error)
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES,
                                f"cannot write the instance: {dataset.error.strerror or dataset.error}")
        try:
            with dataset.view() as data:
                header = read_header(data, request.transfer_syntax_uid, max_inflated_bytes=request.max_inflated_bytes)
        except HeaderError as exc:
            if exc.too_large:
                return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, str(exc))
            status = StoreStatus.BAD_UID if exc.bad_uid else StoreStatus.CANNOT_UNDERSTAND
            return StoreOutcome(status, str(exc))
        if header.sop_instance_uid != request.affected_sop_instance_uid.strip("\x00 "):
            return StoreOutcome(
                StoreStatus.UID_MISMATCH,
                f"SOP Instance UID {header.sop_instance_uid} differs from Affected SOP Instance UID "
                f"{request.affected_sop_instance_uid}",
            )
        if header.sop_class_uid != request.affected_sop_class_uid.strip("\x00 "):
            return StoreOutcome(
                StoreStatus.SOP_CLASS_MISMATCH,
                f"SOP Class UID {header.sop_class_uid} differs from Affected SOP Class UID "
                f"{request.affected_sop_class_uid}",
            )
        if self.free_bytes() < self.min_free_bytes:
            log.error("storage %s below %d MB free: refusing %s", self.root, self.min_free_bytes // _MB,
                      header.sop_instance_uid)
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "storage full on the receiving node", header)
        return self._write_and_record(request, dataset, header)

    def free_bytes(self) -> int:
        """Free space of the storage volume, re-read at most every 0.2 s (statvfs is cheap, but not free)."""
        now = time.monotonic()
        with self._free_lock:
            if now - self._free_checked_at > 0.2:
                self._free_bytes = shutil.disk_usage(self.root).free
                self._free_checked_at = now
            return self._free_bytes

    def _write_and_record(self, request: Received, dataset: IncomingDataset, header: InstanceHeader) -> StoreOutcome:
        path = self.path_for(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        if path.exists() and _holds_dataset(path, dataset) and self._is_recorded(header, request):
            return StoreOutcome(StoreStatus.SUCCESS, None, header, duplicate=True)
        content = file_header(
            header.sop_class_uid, header.sop_instance_uid, request.transfer_syntax_uid, request.calling_ae_title
        )
        try:
            staged = dataset.stage(path, content)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc)
            return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, f"cannot write the instance: {exc.strerror}", header)
        return self._publish(staged, header, request, size=len(content) + dataset.size)

    def _publish(self, staged: storage.Staged, header: InstanceHeader, request: Received, size: int) -> StoreOutcome:
        """Rename the staged file into place, fsync its directory and commit its row, together with whatever other
        associations stage meanwhile: then it may be acknowledged."""
        pending = _Pending(staged, header, request, size)
        self._publisher.publish(pending)
        assert pending.outcome is not None
        return pending.outcome

    def _publish_batch(self, batch: list[_Pending]) -> None:
        """Publish staged instances: every rename, one fsync per directory, one transaction for all their rows."""
        renamed = []
        for pending, error in zip(batch, storage.publish_each([p.staged for p in batch]), strict=True):
            if error is None:
                renamed.append(pending)
                continue
            log.error("cannot rename %s into place: %s", pending.staged.target, error)
            pending.outcome = StoreOutcome(StoreStatus.OUT_OF_RESOURCES,
                                           f"cannot write the instance: {error.strerror}", pending.header)
        if not renamed:
            return
        moved = self._record(renamed)
        for pending in renamed:
            pending.outcome = StoreOutcome(StoreStatus.SUCCESS, None, pending.header)
        for (study, series), sop in moved:
            # The same SOP Instance UID arrived before under another study or series: keep only the new copy.
            self.path_for(study, series, sop).unlink(missing_ok=True)

    def _is_recorded(self, header: InstanceHeader, request: Received) -> bool:
        """Whether the row of this exact instance (same series, same transfer syntax) is committed."""
        with self.db.engine.connect() as connection:
            row = connection.execute(
                select(Instance.transfer_syntax_uid, Series.series_instance_uid)
                .join(Series, Series.id == Instance.series_id)
                .where(Instance.sop_instance_uid == header.sop_instance_uid)
            ).first()
            connection.rollback()
        return (
            row is not None
            and row.series_instance_uid == header.series_instance_uid
            and row.transfer_syntax_uid == request.transfer_syntax_uid
        )

    def _record(self, batch: list[_Pending]) -> list[tuple[tuple[str, str], str]]:
        """Upsert the series and the instance of each pending instance in one transaction, re-opening the series.

        Returns, for each instance that was filed under another (study, series) before, that pair and its SOP
        Instance UID. Plain SQL that SQLite and PostgreSQL both speak: building the equivalent ORM or Core statements
        costs more than the commit itself. A new instance (the usual case) takes two statements.
        """
        now = self.clock()
        moved = []
        with self.db.engine.begin() as connection:
            for pending in batch:
                params = _row(pending, now)
                params["series_id"] = connection.execute(_UPSERT_SERIES, params).scalar_one()
                if connection.execute(_INSERT_INSTANCE, params).first() is not None:
                    continue
                before = connection.execute(_PREVIOUS_SERIES, params).one()
                connection.execute(_UPDATE_INSTANCE, params)
                if before.id != params["series_id"]:
                    filed = (before.study_instance_uid, before.series_instance_uid)
                    moved.append((filed, pending.header.sop_instance_uid))
        return moved

    def remove_stale_temporaries(self, older_than_seconds: float = _STALE_TMP_SECONDS) -> int:
        """Delete temporary files left by a crash mid-write (never acknowledged, so nothing is lost)."""
        return (storage.remove_stale_temporaries(self.root, "*/*", older_than_seconds)
                + storage.remove_stale_temporaries(self.root, SPOOL, older_than_seconds))


@dataclass
class _Pending:
    """An instance staged by its association, waiting to be published; ``outcome`` is set once it is."""

    staged: storage.Staged
    header: InstanceHeader
    request: Received
    size: int
    outcome: StoreOutcome | None = None
    settled: bool = False  # its batch was committed (or failed with ``failure``)
    failure: BaseException | None = None


def _row(pending: _Pending, now: dt.datetime) -> dict[str, object]:
    header, request = pending.header, pending.request
    return dict(
        series_uid=header.series_instance_uid,
        study_uid=header.study_instance_uid,
        modality=header.modality,
        description=header.series_description,
        sop_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=request.transfer_syntax_uid,
        instance_number=header.instance_number,
        image_type=header.image_type,
        size=pending.size,
        now=now,
        association_id=request.association_id,
    )


class GroupCommit:
    """Leader/follower group commit: ``publish`` returns once ``commit`` has run on a batch holding its item.

    A caller that finds no commit under way becomes the leader and commits every item queued so far, its own among
    them; callers arriving meanwhile queue up and wait, and when the leader is done the first of them that still
    waits leads the next batch. One caller alone waits for nobody (its batch is itself); many share a commit. An
    exception from ``commit`` reaches every caller of that batch.
    """

    def __init__(self, commit: Callable[[list[_Pending]], None]) -> None:
        self._commit = commit
        self._lock = threading.Condition()
        self._queue: list[_Pending] = []
        self._leading = False

    def publish(self, item: _Pending) -> None:
        with self._lock:
            self._queue.append(item)
            while self._leading and not item.settled:
                self._lock.wait()
            if not item.settled:
                self._leading = True
                batch, self._queue = self._queue, []
        if item.settled:
            if item.failure is not None:
                raise item.failure
            return
        failure: BaseException | None = None
        try:
            self._commit(batch)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with self._lock:
                for member in batch:
                    member.settled, member.failure = True, failure
                self._leading = False
                self._lock.notify_all()


def _incoming(dataset: bytes | IncomingDataset) -> IncomingDataset:
    return dataset if isinstance(dataset, IncomingDataset) else IncomingDataset.holding(dataset)


def _holds_dataset(path: Path, dataset: IncomingDataset) -> bool:
    """Whether the stored file is exactly a Part 10 header followed by these dataset bytes.

    The header itself may differ (it names the sending AE), so compare what follows the File Meta group, whose
    length is the value of (0002,0000) at bytes 140-143; piece by piece, so neither is read whole.
    """
    try:
        with path.open("rb") as stored:
            head = stored.read(144)
            if len(head) < 144:
                return False
            meta_end = 144 + int.from_bytes(head[140:144], "little")
            if os.fstat(stored.fileno()).st_size - meta_end != dataset.size:
                return False
            stored.seek(meta_end)
            return all(stored.read(len(chunk)) == chunk for chunk in dataset.chunks())
    except FileNotFoundError:
        return False
