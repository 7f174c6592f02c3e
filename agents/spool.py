"""The spool's disk: segments as files in one directory of the worker (streams/spool.py decides what
goes where; this only writes, reads and deletes).

The directory is emptied when the store opens: segments of an earlier run hold batches of
connections of a process that is gone, and their index died with it. Nothing is fsynced: the spool
outlives a broker outage, not the worker (a restarted worker repairs what it missed from REST).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SUFFIX = ".spool"


class FileSegments:
    """A `SegmentStore` over files `<directory>/<segment>.spool`: appended to, read back with pread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for left_over in directory.glob(f"*{SUFFIX}"):
            left_over.unlink()
        self._files: dict[str, int] = {}

    def _path(self, name: str) -> Path:
        if "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a segment name")
        return self.directory / f"{name}{SUFFIX}"

    def _descriptor(self, name: str) -> int:
        descriptor = self._files.get(name)
        if descriptor is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
            descriptor = self._files[name] = os.open(self._path(name), flags, 0o600)
        return descriptor

    def append(self, name: str, data: bytes) -> None:
        descriptor = self._descriptor(name)
        view = memoryview(data)
        while view:
            written = os.write(descriptor, view)
            view = view[written:]

    def read(self, name: str, offset: int, size: int) -> bytes:
        descriptor = self._descriptor(name)
        data = os.pread(descriptor, size, offset)
        while len(data) < size:  # pread may return less than asked
            more = os.pread(descriptor, size - len(data), offset + len(data))
            if not more:
                raise OSError(f"segment {name} ends at {offset + len(data)}; {size} bytes wanted")
            data += more
        return data

    def delete(self, name: str) -> None:
        descriptor = self._files.pop(name, None)
        if descriptor is not None:
            os.close(descriptor)
        self._path(name).unlink(missing_ok=True)

    def close(self) -> None:
        """Close and delete every segment."""
        for name in list(self._files):
            self.delete(name)
        for left_over in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                left_over.unlink()
