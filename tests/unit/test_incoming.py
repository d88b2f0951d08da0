"""A dataset as it arrives: in memory while small, spooled to the storage volume past the limit, staged in place."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from pe_node import storage
from pe_node.dicom.incoming import IncomingDataset

PREFIX = b"P" * 132


def arrive(folder: Path, fragments: list[bytes], limit: int) -> IncomingDataset:
    incoming = IncomingDataset(folder, limit, PREFIX)
    for fragment in fragments:
        incoming.write(memoryview(fragment))
    return incoming


def test_a_small_dataset_stays_in_memory(tmp_path: Path) -> None:
    incoming = arrive(tmp_path / "spool", [b"ab", b"cd"], limit=10)
    assert not incoming.spooled and incoming.size == 4
    with incoming.view() as data:
        assert bytes(data) == b"abcd"
    assert not (tmp_path / "spool").exists()


def test_a_large_dataset_is_spooled_behind_its_prefix_and_staged_in_place(tmp_path: Path) -> None:
    fragments = [bytes([k]) * 1000 for k in range(5)]
    incoming = arrive(tmp_path / "spool", fragments, limit=2500)
    assert incoming.spooled and incoming.size == 5000
    with incoming.view() as data:
        assert bytes(data) == b"".join(fragments)
    [spooled] = (tmp_path / "spool").iterdir()
    assert spooled.name.endswith(storage.TMP_SUFFIX) and spooled.read_bytes() == PREFIX + b"".join(fragments)
    assert b"".join(bytes(chunk) for chunk in incoming.chunks()) == b"".join(fragments)
    target = tmp_path / "study" / "series" / "sop.dcm"
    staged = incoming.stage(target, PREFIX)
    assert staged.temporary == spooled, "staged where it was spooled, not copied"
    storage.publish([staged])
    assert target.read_bytes() == PREFIX + b"".join(fragments)
    incoming.discard()
    assert target.exists() and not list((tmp_path / "spool").iterdir())


def test_a_spooled_dataset_staged_behind_another_prefix_is_copied(tmp_path: Path) -> None:
    incoming = arrive(tmp_path / "spool", [b"x" * 100, b"y" * 100], limit=50)
    storage.publish([incoming.stage(tmp_path / "out.dcm", b"OTHER")])
    incoming.discard()
    assert (tmp_path / "out.dcm").read_bytes() == b"OTHER" + b"x" * 100 + b"y" * 100
    assert not list((tmp_path / "spool").iterdir())


def test_discard_removes_the_spool_file(tmp_path: Path) -> None:
    incoming = arrive(tmp_path / "spool", [b"z" * 100], limit=10)
    incoming.discard()
    assert not list((tmp_path / "spool").iterdir())


def test_a_failing_write_is_kept_and_the_rest_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(self: storage.SpoolFile, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    incoming = arrive(tmp_path / "spool", [b"a" * 100], limit=10)
    monkeypatch.setattr(storage.SpoolFile, "write", full)
    incoming.write(memoryview(b"b" * 100))
    incoming.write(memoryview(b"c" * 100))
    assert incoming.error is not None and incoming.error.errno == errno.ENOSPC
    assert incoming.size == 300 and not list((tmp_path / "spool").iterdir())


def test_a_spool_file_that_cannot_be_staged_is_still_discarded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    incoming = arrive(tmp_path / "spool", [b"q" * 100], limit=10)

    def no_space(directory: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "make_directories", no_space)
    with pytest.raises(OSError):
        incoming.stage(tmp_path / "study" / "series" / "sop.dcm", PREFIX)
    incoming.discard()
    assert not list((tmp_path / "spool").iterdir())
