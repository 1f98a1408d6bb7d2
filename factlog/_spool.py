"""The local write-ahead spool of a :class:`~factlog.FactLogger`.

Layout of a spool directory::

    writer_id                 the writer's id (32 hex digits), created once, never changed
    lock                      held with ``fcntl.flock`` by the one logger using the directory
    segment_next              the reserved ceiling of segment numbers (numbers are never reused)
    segments/<n:010d>.<fact_type>.open      the segment being appended to
    segments/<n:010d>.<fact_type>.sealed    closed, immutable, waiting for upload

A segment holds facts of one fact type, already in the stored schema. It is a sequence of frames;
each frame is one group of facts written in one go::

    b"TTF1" | crc32 (u32 LE) | length (u64 LE) | an Arrow IPC stream of `length` bytes

Only frames covered by an ``fsync`` are promised durable. After a crash the readable prefix of an
open segment (every frame whose header and checksum are intact) is kept, the torn tail is cut off,
and the segment is sealed. A sealed segment is never modified again, so its upload is
deterministic: a retry writes the same bytes under the same object names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ._errors import FactlogError, SpoolLocked

_MAGIC = b"TTF1"
_HEADER = struct.Struct("<4sIQ")
_SEGMENT = re.compile(r"^(\d{10})\.([a-z][a-z0-9_]{0,62})\.(open|sealed)$")
_WRITER_ID = re.compile(r"^[0-9a-f]{32}$")
#: Segment numbers are reserved in blocks, so allocating one rarely touches the disk.
_RESERVE_BLOCK = 1000


@dataclass
class SealedSegment:
    """A closed segment waiting for upload."""

    number: int
    fact_type: str
    path: Path
    size_bytes: int
    rows: int
    min_logged_at_us: int | None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _min_logged_at(table: pa.Table) -> int | None:
    if table.num_rows == 0:
        return None
    m = pc.min(table.column("logged_at").cast(pa.int64())).as_py()
    return None if m is None else int(m)


def encode_frame(table: pa.Table) -> list[bytes | pa.Buffer]:
    """The bytes of one frame holding ``table``: a header and an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    payload = sink.getvalue()
    crc = zlib.crc32(memoryview(payload))
    return [_HEADER.pack(_MAGIC, crc, payload.size), payload]


def read_frames(data: bytes | memoryview) -> tuple[list[pa.Table], int]:
    """Decode frames until the first torn or corrupt one.

    Returns:
        The tables of the intact frames, and the byte length of that intact prefix.
    """
    view = memoryview(data)
    tables: list[pa.Table] = []
    off = 0
    while off + _HEADER.size <= len(view):
        magic, crc, length = _HEADER.unpack_from(view, off)
        start = off + _HEADER.size
        if magic != _MAGIC or start + length > len(view):
            break
        payload = view[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            tables.append(pa.ipc.open_stream(pa.py_buffer(payload)).read_all())
        except (pa.ArrowInvalid, OSError):
            break
        off = start + length
    return tables, off


def read_segment(path: Path) -> pa.Table:
    """Every fact in a segment file, frames concatenated (newer nullable fields widen older
    frames)."""
    tables, _ = read_frames(path.read_bytes())
    if not tables:
        raise FactlogError(f"spool segment {path} holds no readable facts", code="spool_corrupt")
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default")


class OpenSegment:
    """The segment of one fact type currently appended to. Used by the writer thread only."""

    def __init__(self, spool_dir: Path, number: int, fact_type: str) -> None:
        self.number = number
        self.fact_type = fact_type
        self.path = spool_dir / f"{number:010d}.{fact_type}.open"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.created_monotonic = time.monotonic()
        self.size_bytes = 0
        self.rows = 0
        self.unsynced_rows = 0
        self.min_logged_at_us: int | None = None
        self.broken = False  # a failed write left bytes we could not cut off; append no more

    def append(self, table: pa.Table) -> int:
        """Write one frame (not yet synced). Returns the bytes written.

        Raises:
            OSError: the write failed; the segment was cut back to its last whole frame (or
                marked broken if even that failed).
        """
        parts = encode_frame(table)
        total = sum(len(p) if isinstance(p, bytes) else p.size for p in parts)
        try:
            written = os.writev(self._fd, parts)
            if written != total:
                raise OSError(f"short write to {self.path} ({written} of {total} bytes)")
        except OSError:
            try:
                os.ftruncate(self._fd, self.size_bytes)
            except OSError:
                self.broken = True
            raise
        self.size_bytes += total
        self.rows += table.num_rows
        self.unsynced_rows += table.num_rows
        m = _min_logged_at(table)
        if m is not None and (self.min_logged_at_us is None or m < self.min_logged_at_us):
            self.min_logged_at_us = m
        return total

    def sync(self) -> None:
        os.fdatasync(self._fd)
        self.unsynced_rows = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class Spool:
    """A spool directory, locked for the lifetime of this object.

    Args:
        path: the directory; created if missing.

    Raises:
        SpoolLocked: another logger holds the directory.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).resolve()
        self.segments_dir = self.path / "segments"
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise SpoolLocked(
                f"spool directory {self.path} is in use by another FactLogger"
                + (f" (pid {holder})" if holder else "")
                + "; give each logger its own spool_dir"
            ) from None
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
            self.writer_id = self._writer_id()
            self._next, self._ceiling = self._reserve_start()
        except BaseException:
            self.release()
            raise

    def _writer_id(self) -> str:
        p = self.path / "writer_id"
        try:
            wid = p.read_text().strip()
        except FileNotFoundError:
            tmp = self.path / f"writer_id.tmp.{os.getpid()}"
            tmp.write_text(uuid.uuid4().hex + "\n")
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(tmp, p)  # never replaces an existing id
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.path)
            wid = p.read_text().strip()
        if not _WRITER_ID.match(wid):
            raise FactlogError(
                f"spool directory {self.path}: writer_id file is corrupt ({wid[:40]!r})",
                code="spool_corrupt",
            )
        return wid

    def _read_ceiling(self) -> int:
        try:
            return int((self.path / "segment_next").read_text().strip() or "1")
        except FileNotFoundError:
            return 1

    def _write_ceiling(self, value: int) -> None:
        tmp = self.path / "segment_next.tmp"
        with open(tmp, "w") as fh:
            fh.write(f"{value}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / "segment_next")
        _fsync_dir(self.path)

    def _reserve_start(self) -> tuple[int, int]:
        # Numbers below the stored ceiling may have been used (and uploaded) by an earlier run.
        start = self._read_ceiling()
        for name in os.listdir(self.segments_dir):
            m = _SEGMENT.match(name)
            if m:
                start = max(start, int(m.group(1)) + 1)
        ceiling = start + _RESERVE_BLOCK
        self._write_ceiling(ceiling)
        return start, ceiling

    def new_segment(self, fact_type: str) -> OpenSegment:
        """Open a new segment for ``fact_type`` with the next number."""
        if self._next >= self._ceiling:
            self._ceiling = self._next + _RESERVE_BLOCK
            self._write_ceiling(self._ceiling)
        n = self._next
        self._next += 1
        seg = OpenSegment(self.segments_dir, n, fact_type)
        _fsync_dir(self.segments_dir)  # fdatasync covers the data; the new name needs this
        return seg

    def last_number(self) -> int:
        """The greatest segment number handed out so far (0 if none)."""
        return self._next - 1

    def seal(self, seg: OpenSegment) -> SealedSegment | None:
        """Sync, close and rename ``seg`` to its sealed name. An empty segment is removed."""
        if seg.size_bytes == 0:
            seg.close()
            seg.path.unlink(missing_ok=True)
            return None
        seg.sync()
        seg.close()
        sealed = seg.path.with_suffix(".sealed")
        os.rename(seg.path, sealed)
        _fsync_dir(self.segments_dir)
        return SealedSegment(seg.number, seg.fact_type, sealed, seg.size_bytes, seg.rows,
                             seg.min_logged_at_us)

    def recover(self) -> list[SealedSegment]:
        """Seal what a previous run left open (keeping the intact prefix) and list every sealed
        segment, oldest first."""
        out: list[SealedSegment] = []
        for name in sorted(os.listdir(self.segments_dir)):
            m = _SEGMENT.match(name)
            if not m:
                continue
            number, fact_type, state = int(m.group(1)), m.group(2), m.group(3)
            p = self.segments_dir / name
            data = p.read_bytes()
            tables, good = read_frames(data)
            if state == "open":
                if good == 0:
                    p.unlink()
                    continue
                if good < len(data):
                    with open(p, "r+b") as fh:
                        fh.truncate(good)
                        fh.flush()
                        os.fsync(fh.fileno())
                sealed = p.with_suffix(".sealed")
                os.rename(p, sealed)
                _fsync_dir(self.segments_dir)
                p = sealed
            elif good == 0:
                continue  # unreadable sealed segment: keep it on disk, never upload garbage
            mins = [m_ for m_ in (_min_logged_at(t) for t in tables) if m_ is not None]
            out.append(SealedSegment(number, fact_type, p, good, sum(t.num_rows for t in tables),
                                     min(mins) if mins else None))
        out.sort(key=lambda s: s.number)
        return out

    def remove(self, seg: SealedSegment) -> None:
        seg.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Give up the lock. The directory stays as it is, for the next logger."""
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = -1
