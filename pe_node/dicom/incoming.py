"""The dataset of one C-STORE as it arrives: held in memory while small, spooled to the storage volume once large.

The acceptor writes each P-DATA fragment here as it comes off the socket, so a dataset is never held twice and a
large one is never held at all: past ``memory_limit`` bytes what was buffered goes to a ``storage.SpoolFile`` in the
archive's spool folder, behind the Part 10 header the instance file will start with (``prefix``), and every later
fragment follows it there. Once the message is complete the archive walks the dataset (``view``: the buffer, or a
read-only memory map of the spooled file) and stages it for its target: from memory with ``storage.stage``, or the
spooled file itself, fsynced and renamed, never copied.

A write that fails (a full disk) does not stop the association: the error is kept, later fragments are dropped, and
the C-STORE is answered 0xA700 from ``error``.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
from collections.abc import Iterator
from pathlib import Path

from pe_node import storage

Buffer = bytes | bytearray | memoryview
"""What the header walk reads: a contiguous, sliceable byte buffer (``bytes``, the receive buffer, a memory map)."""

_CHUNK = 1 << 20


class IncomingDataset:
    """One dataset being received; see the module docstring. Not thread-safe: one association writes it."""

    def __init__(self, spool_folder: Path | None, memory_limit: int, prefix: bytes = b"") -> None:
        self.spool_folder = spool_folder
        self.memory_limit = memory_limit
        self.prefix = prefix
        self.size = 0
        self.error: OSError | None = None
        self._memory = bytearray()
        self._spool: storage.SpoolFile | None = None

    @classmethod
    def holding(cls, data: Buffer) -> IncomingDataset:
        """A dataset already complete in memory (an archive call with plain bytes)."""
        incoming = cls(None, len(data))
        incoming._memory = bytearray(data)
        incoming.size = len(data)
        return incoming

    @property
    def spooled(self) -> bool:
        return self._spool is not None

    def write(self, fragment: Buffer) -> None:
        """Append one fragment; past the memory limit, spool to the storage volume."""
        self.size += len(fragment)
        if self.error is not None:
            return
        try:
            if self._spool is not None:
                self._spool.write(fragment)
            elif self.size > self.memory_limit and self.spool_folder is not None:
                self._spill(fragment)
            else:
                self._memory += fragment
        except OSError as exc:
            self.error = exc
            self._drop()

    def _spill(self, fragment: Buffer) -> None:
        assert self.spool_folder is not None
        self._spool = storage.SpoolFile(self.spool_folder, mode=0o640)
        self._spool.write(self.prefix)
        self._spool.write(self._memory)
        self._memory = bytearray()
        self._spool.write(fragment)

    @contextlib.contextmanager
    def view(self) -> Iterator[Buffer]:
        """The whole dataset as one buffer: the memory itself, or a read-only memory map of the spooled file."""
        if self._spool is None:
            with memoryview(self._memory) as memory:
                yield memory
            return
        self._spool.flush()
        if self.size == 0:
            yield b""
            return
        with open(self._spool.path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as whole, whole[len(self.prefix) :] as dataset:
                yield dataset

    def chunks(self) -> Iterator[memoryview]:
        """The dataset in pieces of at most 1 MiB (to compare it with a stored file without reading either whole);
        each piece is valid until the next is asked for."""
        with self.view() as data, memoryview(data) as whole:
            for start in range(0, len(whole), _CHUNK):
                with whole[start : start + _CHUNK] as piece:
                    yield piece

    def stage(self, target: Path, prefix: bytes) -> storage.Staged:
        """Write ``prefix`` + the dataset under a temporary name for ``target`` and fsync it (``storage.stage``).

        A spooled dataset is staged in place when its file already starts with ``prefix`` (always, for a C-STORE
        the archive accepted: the prefix was made from the command's UIDs, which the dataset's had to match).
        """
        if self._spool is not None and prefix == self.prefix:
            staged = self._spool.stage(target)  # on failure the spool file is still ours to discard
            self._spool = None
            return staged
        if self._spool is None:
            with memoryview(self._memory) as memory:
                return storage.stage(target, (prefix, memory), mode=0o640)
        return storage.stage(target, itertools.chain((prefix,), self.chunks()), mode=0o640)

    def discard(self) -> None:
        """Free the memory and remove any spool file (a no-op for what was already staged)."""
        self._drop()

    def _drop(self) -> None:
        self._memory = bytearray()
        if self._spool is not None:
            spool, self._spool = self._spool, None
            spool.discard()
