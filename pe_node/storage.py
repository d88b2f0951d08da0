"""Where pe-node keeps files, and the one way it writes them durably.

Layout (every path is built here and nowhere else):

    <storage>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm     received instances (``instance_path``)
    <storage>/results/job-<id>/<SOPUID>.dcm           the result objects of a job (``results_folder``)
    <folder destination>/<Study>/<Series>/<SOP>.dcm   delivered objects, the same scheme as received ones

The RSPECT data set (``train/<Study>/<Series>/<SOP>.dcm``) uses the same scheme, so training reads and writes it
through ``instance_path`` too.

A durable write (``atomic_write``, ``replacing``) goes to a temporary file beside its target, is fsynced, renamed over
the target and the directory is fsynced (and every directory it had to create, up to one that existed): after a
crash the target is either the old file or the whole new one, and once the call returns the new one survives a power
cut. ``stage`` and ``publish`` are the two halves, for a writer that makes several files durable together and pays
one directory fsync per directory rather than one per file (the receiver's group commit).

A ``SpoolFile`` is the incremental form of ``stage`` for data whose target is known only once all of it has arrived (a
received dataset names its own study and series): it is filled piece by piece in a spool folder on the same volume,
then fsynced and staged for its target; ``publish`` renames it across folders (one volume, so the rename is atomic).

Temporary files are named ``.<target name>.<unique>.<owner tag>.tmp``: ``remove_stale_temporaries`` finds those a
crash left behind (never renamed, so never acknowledged) by that pattern.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
RESULTS = "results"
DICOM_SUFFIX = ".dcm"

#: The tag of this process in the temporary files it makes (host and pid, so a shared volume tells owners apart).
OWNER_TAG = f"{socket.gethostname()}.{os.getpid()}"

_counter = itertools.count()
_counter_lock = threading.Lock()

Content = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview] | Callable[[BinaryIO], object]
"""What ``atomic_write`` writes: bytes, an iterable of byte chunks, or a function that writes to the open file."""


def series_folder(root: Path | str, study_uid: str, series_uid: str) -> Path:
    """``<root>/<StudyUID>/<SeriesUID>``: the folder of one series."""
    return Path(root) / study_uid / series_uid


def instance_path(root: Path | str, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """``<root>/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``: the file of one instance (UIDs already validated)."""
    return series_folder(root, study_uid, series_uid) / f"{sop_uid}{DICOM_SUFFIX}"


def results_root(storage: Path | str) -> Path:
    """``<storage>/results``: where the result objects of every job are kept."""
    return Path(storage) / RESULTS


def results_folder(storage: Path | str, job_id: int) -> Path:
    """``<storage>/results/job-<id>``: the result objects of one job."""
    return results_root(storage) / f"job-{job_id}"


@dataclass(frozen=True)
class Staged:
    """A file written and fsynced under its temporary name, not yet renamed to ``target``."""

    temporary: Path
    target: Path

    def discard(self) -> None:
        self.temporary.unlink(missing_ok=True)


def temporary_name(target: Path, owner: str = OWNER_TAG) -> Path:
    """A fresh temporary path beside ``target``, unique within this process and tagged with its owner."""
    with _counter_lock:
        unique = next(_counter)
    return target.with_name(f".{target.name}.{threading.get_ident():x}-{unique}.{owner}{TMP_SUFFIX}")


def stage(target: Path, content: Content, *, mode: int = 0o666) -> Staged:
    """Write ``content`` to a temporary file beside ``target`` and fsync it; the target is untouched.

    Missing directories are created, each made durable in its parent. ``mode`` is masked by the umask as for any new
    file (0o666: the umask decides; received instances use 0o640).
    """
    target = Path(target)
    make_directories(target.parent)
    temporary = temporary_name(target)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb", closefd=True) as stream:
            _write(stream, content)
            stream.flush()
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return Staged(temporary, target)


class SpoolFile:
    """A temporary file in ``folder`` written piece by piece, then fsynced and staged once its target is known.

    ``discard`` removes it (a no-op once staged); the file is created with ``mode`` (masked by the umask).
    """

    def __init__(self, folder: Path | str, *, mode: int = 0o666) -> None:
        folder = Path(folder)
        make_directories(folder)
        self.path = temporary_name(folder / "spool")
        self.size = 0
        self._stream: BinaryIO | None = os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._stream is not None, "spool file already staged or discarded"
        self._stream.write(data)
        self.size += len(data)

    def flush(self) -> None:
        """Hand what was written to the kernel, so that a memory map or another open of the file sees all of it."""
        if self._stream is not None:
            self._stream.flush()

    def stage(self, target: Path) -> Staged:
        """fsync and close the file; the ``Staged`` pair renames it over ``target`` when published."""
        assert self._stream is not None, "spool file already staged or discarded"
        target = Path(target)
        make_directories(target.parent)
        stream, self._stream = self._stream, None
        try:
            stream.flush()
            os.fsync(stream.fileno())
        except BaseException:
            stream.close()
            self.path.unlink(missing_ok=True)
            raise
        stream.close()
        return Staged(self.path, target)

    def discard(self) -> None:
        """Close and remove the file unless it was staged (then ``Staged.discard`` is the owner's)."""
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        try:
            stream.close()
        except OSError:
            pass
        self.path.unlink(missing_ok=True)


def publish(staged: Sequence[Staged]) -> None:
    """Rename each staged file over its target, then fsync each directory involved once; raise the first error."""
    for error in publish_each(staged):
        if error is not None:
            raise error


def publish_each(staged: Sequence[Staged]) -> list[OSError | None]:
    """Rename each staged file over its target, then fsync each directory a file was renamed into, once. Returns,
    per file, None when it is in place and durable, or the error its rename met (its temporary is then removed).
    An error fsyncing a directory is raised: none of its files can be called durable."""
    errors: list[OSError | None] = []
    directories: dict[Path, None] = {}
    for item in staged:
        try:
            os.replace(item.temporary, item.target)
        except OSError as error:
            item.discard()
            errors.append(error)
            continue
        errors.append(None)
        directories[item.target.parent] = None
    for directory in directories:
        fsync_directory(directory)
    return errors


def atomic_write(path: Path | str, content: Content, *, mode: int = 0o666) -> Path:
    """Replace ``path`` durably with ``content`` (see the module docstring); returns the path."""
    path = Path(path)
    publish([stage(path, content, mode=mode)])
    return path


@contextlib.contextmanager
def replacing(path: Path | str) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to by name (``np.save``, a memory map); on leaving the block
    it is fsynced and renamed over ``path`` durably, or removed if the block raised."""
    target = Path(path)
    make_directories(target.parent)
    temporary = temporary_name(target)
    try:
        yield temporary
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    publish([Staged(temporary, target)])


def make_directories(directory: Path) -> None:
    """``mkdir -p`` that also fsyncs the parent of every directory it creates, so the new entries survive a crash."""
    directory = Path(directory)
    if directory.is_dir():
        return
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_directory(created.parent)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(root: Path, pattern: str, older_than_seconds: float) -> int:
    """Delete temporary files under ``root`` matching ``pattern`` (a glob of folders, e.g. ``*/*``) that a crash left:
    older than ``older_than_seconds``, or made by an earlier process with this host and pid. Returns how many."""
    cutoff = time.time() - older_than_seconds
    removed = 0
    for temporary in Path(root).glob(f"{pattern}/.*{TMP_SUFFIX}"):
        try:
            if temporary.stat().st_mtime < cutoff or temporary.name.endswith(f".{OWNER_TAG}{TMP_SUFFIX}"):
                temporary.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        log.info("removed %d unacknowledged temporary files from %s", removed, root)
    return removed


def _write(stream: BinaryIO, content: Content) -> None:
    if isinstance(content, bytes | bytearray | memoryview):
        stream.write(content)
    elif callable(content):
        content(stream)
    else:
        for chunk in content:
            stream.write(chunk)
