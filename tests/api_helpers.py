"""Shared data and helpers for the query server and SDK tests: a small store with facts of every
field type (NaN, a late fact, an int64 key above 2^53, values above 2^53) and a snapshot run."""

from __future__ import annotations

import math
from typing import Any

from factlog import FactTypeCatalog
from tests.factdata import DAY, PAGE, PLAY, T0, H, write_facts
from tests.test_snapshot_reader import answer, commit_simple_run
from ttstore import Authenticator, ManualClock, Store, format_timestamp, parse_tokens

TOKENS = "r-token read reader\nw-token write writer\nrw-token read,write admin\n"
R = {"Authorization": "Bearer r-token"}
W = {"Authorization": "Bearer w-token"}
RW = {"Authorization": "Bearer rw-token"}
ARROW = "application/vnd.apache.arrow.stream"
BIG = 2**53 + 3  # an int64 key a JSON number cannot carry exactly
NOW_US = T0 + 20 * DAY

FEATURES = [
    "play.secs.last", "play.secs.sum.7d", "play.count.1d", "play.video_id.last",
    "play.tag.last", "play.meta.last", "play.ids.last", "play.at.max.7d",
    "play.time_since_last", "play.secs.distinct_count.7d",
]

# (entity, at): before anything, between facts, after the late fact's event_time but before it
# was logged, after everything; the big key; an entity with no facts.
QUERIES: list[tuple[int, int]] = [
    (1, T0 + 1 * H),
    (1, T0 + 10 * H),
    (1, T0 + DAY + 11 * H),
    (1, T0 + 5 * DAY),
    (BIG, T0 + DAY + 13 * H),
    (3, T0 + DAY),
    (1, T0 + 2 * H),  # exactly on the first fact's event_time
]


def seed(store: Store) -> None:
    """Declare PLAY and PAGE and write their facts, and commit one snapshot run."""
    cat = FactTypeCatalog(store)
    cat.declare(PLAY)
    cat.declare(PAGE)
    write_facts(store, PLAY, [
        {"member_id": 1, "event_time": T0 + 2 * H, "logged_at": T0 + 2 * H, "video_id": 7,
         "secs": 1.5, "tag": "tv",
         "meta": {"a": [1, 2]}, "at": T0 + H, "ids": [1, 2]},
        {"member_id": 1, "event_time": T0 + 5 * H, "logged_at": T0 + 5 * H,
         "video_id": 2**60, "secs": math.nan,
         "tag": "phone", "meta": "text", "at": T0 + 4 * H, "ids": []},
        # late: happened on day 1 at 10:00, logged on day 3
        {"member_id": 1, "event_time": T0 + DAY + 10 * H, "logged_at": T0 + 3 * DAY,
         "video_id": 9, "secs": 4.0, "tag": None, "meta": None, "at": None, "ids": None},
        {"member_id": BIG, "event_time": T0 + DAY + 12 * H, "logged_at": T0 + DAY + 12 * H,
         "video_id": -5, "secs": 10.0,
         "tag": "big", "meta": 3, "at": T0, "ids": [BIG]},
    ])
    write_facts(store, PAGE, [
        {"user": "007", "event_time": T0 + H, "path": "/a", "n": 1},
        {"user": "007", "event_time": T0 + 2 * H, "path": "/b", "n": 2},
    ])
    commit_simple_run(  # type: ignore[no-untyped-call]
        store, T0 + 6 * H, T0 + 7 * H, "history", [
        answer(1, {"count": 3, "name": "a"}),  # type: ignore[no-untyped-call]
        answer(2, {"count": 5, "name": "b"}),  # type: ignore[no-untyped-call]
        answer(4, None, status="missing"),  # type: ignore[no-untyped-call]
    ])


def add_late_object(store: Store) -> None:
    """A new fact object for member 1 (a later segment of another writer)."""
    write_facts(store, PLAY, [
        {"member_id": 1, "event_time": T0 + 4 * DAY, "logged_at": T0 + 4 * DAY,
         "video_id": 11, "secs": 100.0,
         "tag": "new", "meta": None, "at": None, "ids": None},
    ], writer="w2", segment=7)


def rows_json(queries: list[tuple[int, int]] = QUERIES) -> list[dict[str, Any]]:
    return [{"entity_id": e if e <= 2**53 else str(e), "at": format_timestamp(t)}
            for e, t in queries]


def auth() -> Authenticator:
    return Authenticator(parse_tokens(TOKENS))


def clock() -> ManualClock:
    return ManualClock(NOW_US)
