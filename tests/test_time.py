"""Time at the edges: RFC 3339 in, ``...Z`` with 6 digits out, durations, clocks (SPEC §1)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttstore import (
    TIMESTAMP_TYPE,
    US_PER_DAY,
    InvalidDuration,
    InvalidTimestamp,
    ManualClock,
    OffsetClock,
    SystemClock,
    clock_from_now,
    date_to_day,
    day_to_date,
    format_timestamp,
    format_timestamps,
    parse_duration,
    parse_timestamp,
    to_datetime,
    utc_date,
)
from ttstore._time import utc_dates

T = 1_795_687_200_000_000  # 2026-11-26T10:00:00Z


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("2026-11-26T10:00:00Z", T),
        ("2026-11-26T10:00:00z", T),
        ("2026-11-26t10:00:00Z", T),
        ("2026-11-26 10:00:00Z", T),
        ("2026-11-26T10:00:00+00:00", T),
        ("2026-11-26T10:00:00-00:00", T),
        ("2026-11-26T11:00:00+01:00", T),
        ("2026-11-26T04:30:00-05:30", T),
        ("2026-11-27T09:59:00+23:59", T),
        ("2026-11-26T10:00:00.5Z", T + 500_000),
        ("2026-11-26T10:00:00.000001Z", T + 1),
        ("2026-11-26T10:00:00.123456Z", T + 123_456),
        ("2026-11-26T10:00:00.120Z", T + 120_000),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.999999Z", -1),
        ("2024-02-29T00:00:00Z", 1_709_164_800_000_000),
    ],
)
def test_parse_rfc3339(text: str, us: int) -> None:
    assert parse_timestamp(text, field="at") == us


def test_parse_aware_datetimes() -> None:
    assert parse_timestamp(datetime(2026, 11, 26, 10, tzinfo=UTC), field="at") == T
    plus2 = timezone(timedelta(hours=2))
    assert parse_timestamp(datetime(2026, 11, 26, 12, 0, 0, 7, tzinfo=plus2), field="at") == T + 7


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2026-11-26T10:00:00", "no time zone offset"),
        ("2026-11-26T10:00:00.123", "no time zone offset"),
        ("2026-11-26 10:00:00", "no time zone offset"),
        ("2026-11-26T10:00:00.1234567Z", "more than 6 fractional digits"),
        ("2026-11-26T10:00:00.123456789+01:00", "more than 6 fractional digits"),
        ("2026-02-30T10:00:00Z", "not a valid time"),
        ("2026-13-01T10:00:00Z", "not a valid time"),
        ("2026-11-26T24:00:00Z", "not a valid time"),
        ("2026-11-26T10:60:00Z", "not a valid time"),
        ("2025-02-29T00:00:00Z", "not a valid time"),
        ("2026-11-26T10:00:00+24:00", "offset"),
        ("2026-11-26T10:00:00+01:60", "offset"),
        ("2026-11-26", "not an RFC 3339 timestamp"),
        ("2026-11-26T10:00Z", "not an RFC 3339 timestamp"),
        ("2026-11-26T10:00:00+0100", "not an RFC 3339 timestamp"),
        ("2026-11-26T10:00:00.Z", "not an RFC 3339 timestamp"),
        ("26-11-26T10:00:00Z", "not an RFC 3339 timestamp"),
        ("yesterday", "not an RFC 3339 timestamp"),
        ("", "not an RFC 3339 timestamp"),
        (" 2026-11-26T10:00:00Z", "not an RFC 3339 timestamp"),
        ("2026-11-26T10:00:00Z\n", "not an RFC 3339 timestamp"),
    ],
)
def test_parse_rejects_naming_the_field(value: str, reason: str) -> None:
    with pytest.raises(InvalidTimestamp) as exc:
        parse_timestamp(value, field="event_time")
    err = exc.value
    assert err.field == "event_time"
    assert err.code == "invalid_timestamp" and err.http_status == 400
    assert err.message.startswith("event_time: ")
    assert reason in err.message


@pytest.mark.parametrize("value", [1_795_687_200, 1.5, None, b"2026-11-26T10:00:00Z",
                                   datetime(2026, 11, 26, 10)])
def test_parse_rejects_non_times(value: object) -> None:
    with pytest.raises(InvalidTimestamp) as exc:
        parse_timestamp(value, field="logged_at")
    assert exc.value.field == "logged_at"
    assert "logged_at" in exc.value.message


def test_format_is_always_z_with_six_digits() -> None:
    assert format_timestamp(T) == "2026-11-26T10:00:00.000000Z"
    assert format_timestamp(T + 1) == "2026-11-26T10:00:00.000001Z"
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert format_timestamp(-1) == "1969-12-31T23:59:59.999999Z"
    assert format_timestamp(parse_timestamp("2026-11-26T11:00:00.5+01:00", field="t")) == (
        "2026-11-26T10:00:00.500000Z"
    )


@given(st.integers(min_value=-(10**16), max_value=253_402_300_799_999_999))
def test_format_parse_round_trip(us: int) -> None:
    text = format_timestamp(us)
    assert len(text) == 27 and text.endswith("Z") and text[19] == "."
    assert parse_timestamp(text, field="t") == us


def test_format_timestamps_vectorized() -> None:
    arr = pa.array([T, None, 0], pa.int64()).cast(TIMESTAMP_TYPE)
    assert format_timestamps(arr) == ["2026-11-26T10:00:00.000000Z", None,
                                      "1970-01-01T00:00:00.000000Z"]
    chunked = pa.chunked_array([arr.slice(0, 1), arr.slice(1)])
    assert format_timestamps(chunked) == format_timestamps(arr)


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("1s", 1_000_000),
        ("30s", 30_000_000),
        ("15m", 900_000_000),
        ("12h", 43_200_000_000),
        ("1d", 86_400_000_000),
        ("7d", 7 * 86_400_000_000),
        ("30d", 30 * US_PER_DAY),
        ("100000d", 100_000 * US_PER_DAY),
    ],
)
def test_parse_duration(text: str, us: int) -> None:
    assert parse_duration(text) == us


@pytest.mark.parametrize(
    "text", ["0d", "07d", "1", "d", "1w", "1y", "1.5h", "-1d", "+1d", "1D", "1 d", " 1d", "1d ",
             "1h30m", "", "1ms", "1d\n"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidDuration) as exc:
        parse_duration(text, field="lookback")
    assert exc.value.field == "lookback"
    assert exc.value.code == "invalid_duration"
    assert "lookback" in exc.value.message and repr(text) in exc.value.message


def test_parse_duration_rejects_non_strings() -> None:
    with pytest.raises(InvalidDuration):
        parse_duration(7)  # type: ignore[arg-type]


def test_dates_are_utc_days() -> None:
    assert utc_date(T) == "2026-11-26"
    assert utc_date(parse_timestamp("2026-11-26T23:30:00-01:00", field="t")) == "2026-11-27"
    assert utc_date(-1) == "1969-12-31"
    day = date_to_day("2026-11-26")
    assert day_to_date(day) == "2026-11-26"
    assert day * US_PER_DAY <= T < (day + 1) * US_PER_DAY
    midnight = day * US_PER_DAY
    us = np.array([T, midnight + US_PER_DAY - 1, midnight - 1, -1], dtype=np.int64)
    assert [day_to_date(int(d)) for d in utc_dates(us)] == [
        "2026-11-26", "2026-11-26", "2026-11-25", "1969-12-31",
    ]
    assert to_datetime(T) == datetime(2026, 11, 26, 10, tzinfo=UTC)


def test_manual_clock() -> None:
    c = ManualClock(T)
    assert c.now_us() == T
    c.advance(5)
    assert c.now_us() == T + 5
    c.set(0)
    assert c.now_us() == 0


def test_system_clock_is_the_wall_clock() -> None:
    before = time.time_ns() // 1000
    now = SystemClock().now_us()
    after = time.time_ns() // 1000
    assert before <= now <= after


def test_offset_clock_starts_at_now_and_advances() -> None:
    c = OffsetClock(T)
    first = c.now_us()
    assert T <= first < T + 60_000_000
    time.sleep(0.002)
    assert c.now_us() > first


def test_clock_from_now() -> None:
    assert isinstance(clock_from_now(None), SystemClock)
    c = clock_from_now("2026-11-26T10:00:00Z")
    assert isinstance(c, OffsetClock)
    assert T <= c.now_us() < T + 60_000_000
    with pytest.raises(InvalidTimestamp) as exc:
        clock_from_now("2026-11-26T10:00:00")
    assert exc.value.field == "--now"
