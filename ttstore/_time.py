"""Time: the injectable clock, RFC 3339 parsing and formatting, durations.

Every time inside Timetravel is an ``int`` of microseconds since the Unix epoch, UTC, or an Arrow
``timestamp[us, tz=UTC]``. Conversions to and from text happen only at the edges, here.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import numpy as np
import pyarrow as pa

from ._errors import InvalidDuration, InvalidTimestamp

TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S

# RFC 3339 with a mandatory offset and at most 6 fractional digits. A space is accepted in place
# of "T" because RFC 3339 allows it; lowercase "t"/"z" likewise.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?([Zz]|[+-]\d{2}:\d{2})$"
)
RFC3339_PATTERN = _RFC3339.pattern
_DURATION = re.compile(r"^([1-9][0-9]*)(s|m|h|d)$")
_UNIT_US = {"s": US_PER_S, "m": 60 * US_PER_S, "h": 3600 * US_PER_S, "d": US_PER_DAY}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    """Where "now" comes from. Every component takes one, so tests and backfills can move time."""

    def now_us(self) -> int:
        """Microseconds since the epoch, UTC."""
        ...


class SystemClock:
    """The wall clock."""

    def now_us(self) -> int:
        return time.time_ns() // 1000


class ManualClock:
    """A clock that moves only when told to. Thread-safe."""

    def __init__(self, start_us: int) -> None:
        self._now_us = start_us
        self._lock = threading.Lock()

    def now_us(self) -> int:
        return self._now_us

    def set(self, now_us: int) -> None:
        with self._lock:
            self._now_us = now_us

    def advance(self, delta_us: int) -> None:
        with self._lock:
            self._now_us += delta_us


class OffsetClock:
    """A clock that starts at ``start_us`` and then advances with real time (``--now`` on a
    long-running command)."""

    def __init__(self, start_us: int) -> None:
        self._start_us = start_us
        self._t0_ns = time.monotonic_ns()

    def now_us(self) -> int:
        return self._start_us + (time.monotonic_ns() - self._t0_ns) // 1000


def clock_from_now(now: str | None) -> Clock:
    """The clock a CLI command uses: the system clock, or one that starts at ``--now``."""
    return SystemClock() if now is None else OffsetClock(parse_timestamp(now, field="--now"))


def parse_timestamp(value: object, *, field: str) -> int:
    """Parse an RFC 3339 string or an aware ``datetime`` into microseconds since the epoch.

    Raises:
        InvalidTimestamp: naming ``field``, for a naive time, more than 6 fractional digits, or
            anything that is not a time.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidTimestamp(f"{field}: timestamp has no time zone offset", field=field)
        delta = value - _EPOCH
        return (delta.days * 86_400 + delta.seconds) * US_PER_S + delta.microseconds
    if not isinstance(value, str):
        raise InvalidTimestamp(
            f"{field}: expected an RFC 3339 string, got {type(value).__name__}", field=field
        )
    m = _RFC3339.fullmatch(value)  # fullmatch: "$" alone would accept a trailing newline
    if m is None:
        if re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?$", value):
            reason = "has no time zone offset (add Z or +HH:MM)"
        elif re.match(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}\.\d{7,}", value):
            reason = "has more than 6 fractional digits"
        else:
            reason = "is not an RFC 3339 timestamp"
        raise InvalidTimestamp(f"{field}: {value!r} {reason}", field=field)
    year, month, day, hour, minute, second, frac, off = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError as exc:
        raise InvalidTimestamp(
            f"{field}: {value!r} is not a valid time: {exc}", field=field
        ) from exc
    us = (dt - datetime(1970, 1, 1)) // timedelta(microseconds=1)
    if frac:
        us += int(frac.ljust(6, "0"))
    if off not in ("Z", "z"):
        if int(off[1:3]) > 23 or int(off[4:6]) > 59:
            raise InvalidTimestamp(f"{field}: {value!r} has an invalid offset", field=field)
        sign = 1 if off[0] == "+" else -1
        us -= sign * (int(off[1:3]) * 3600 + int(off[4:6]) * 60) * US_PER_S
    return us


def format_timestamp(us: int) -> str:
    """``2026-11-20T10:00:00.000000Z``: the one form every response uses."""
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_datetime(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def format_timestamps(values: pa.Array | pa.ChunkedArray) -> list[str | None]:
    """Vectorized :func:`format_timestamp` over an Arrow timestamp array (nulls stay None)."""
    arr = values.cast(pa.int64())
    return [None if v is None else format_timestamp(v) for v in arr.to_pylist()]


def parse_duration(value: str, *, field: str = "duration") -> int:
    """``"30d"`` → microseconds. ``d`` is exactly 86,400 s.

    Raises:
        InvalidDuration: naming ``field``.
    """
    m = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise InvalidDuration(
            f"{field}: {value!r} is not a duration like 30s, 15m, 12h or 7d", field=field
        )
    return int(m.group(1)) * _UNIT_US[m.group(2)]


def utc_date(us: int) -> str:
    """The UTC date (``YYYY-MM-DD``) of a time, as used in partition names."""
    return (_EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%d")


def utc_dates(us: np.ndarray) -> np.ndarray:
    """Vectorized :func:`utc_date`: day numbers since the epoch for an int64 µs array."""
    days: np.ndarray = np.floor_divide(us, US_PER_DAY)
    return days


def day_to_date(day: int) -> str:
    return (_EPOCH + timedelta(days=int(day))).strftime("%Y-%m-%d")


@functools.lru_cache(maxsize=65536)
def date_to_day(date: str) -> int:
    return (datetime.strptime(date, "%Y-%m-%d").replace(tzinfo=UTC) - _EPOCH).days


def timestamps_us(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """int64 µs since the epoch of a timestamp (or int64) column without nulls; a view of the
    Arrow buffer when it is one chunk of ``timestamp[us]`` (no compute kernel, no copy), which
    is what the engine's hot paths read.

    Raises:
        ValueError: the column has nulls.
    """
    if isinstance(values, pa.ChunkedArray):
        arr = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
    else:
        arr = values
    if arr.null_count:
        raise ValueError("timestamps must not be null")
    t = arr.type
    if pa.types.is_timestamp(t) and t.unit != "us":
        arr = arr.cast(pa.timestamp("us", tz=t.tz))
    out: np.ndarray = arr.to_numpy(zero_copy_only=False)
    return out.view(np.int64) if out.dtype != np.int64 else out
