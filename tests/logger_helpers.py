"""Shared by the FactLogger tests: a fact type, fast logger settings, reading facts back from the
store, and a clock that can stall the logger's writer thread (a writer that cannot keep up)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from factlog import FactLogger, FactType
from ttstore import ManualClock, Store

PLAY = FactType(
    "play", entity=("member_id", "int64"),
    fields={"video_id": "int64", "seconds": "float64", "device": "string", "autoplay": "bool",
            "country": "string"},
)
T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
DAY = 86_400_000_000

#: Small intervals keep the tests fast.
FAST: dict[str, Any] = {
    "group_commit_interval_s": 0.02,
    "segment_max_age_s": 0.2,
    "heartbeat_interval_s": 0.2,
    "max_backoff_s": 0.2,
}


def make_logger(store: Store, spool: Path, **kw: Any) -> FactLogger:
    args: dict[str, Any] = {"producer": "svc", "fact_types": [PLAY], **FAST}
    args.update(kw)
    return FactLogger(store=store, spool_dir=spool, **args)


def row(i: int, **extra: Any) -> dict[str, Any]:
    return {"member_id": i, "video_id": i * 7, "seconds": i / 4, "device": f"d{i % 3}",
            "autoplay": i % 2 == 0, "country": "US", **extra}


def fact_keys(store: Store, fact_type: str = "play") -> list[str]:
    return [o.key for o in store.list(f"facts/{fact_type}/")
            if o.key.endswith(".parquet") and "/_" not in o.key]


def read_facts(store: Store, fact_type: str = "play") -> pa.Table:
    """Every fact object of ``fact_type``, as one table (empty table if none)."""
    tables = [store.read_parquet(k) for k in fact_keys(store, fact_type)]
    if not tables:
        return PLAY.arrow_schema().remove_metadata().empty_table()
    return pa.concat_tables(tables, promote_options="default")


def id_counts(table: pa.Table) -> Counter[str]:
    return Counter(table.column("fact_id").to_pylist())


@pytest.fixture(autouse=True)
def no_logger_threads_left() -> Iterator[None]:
    """Every test closes its loggers: no writer or uploader thread outlives it."""
    yield
    for t in threading.enumerate():
        if t.name.startswith("factlog-"):
            t.join(5)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("factlog-")]


class WriterGateClock(ManualClock):
    """A manual clock whose reads from a logger's writer thread wait until :attr:`gate` is set,
    so the writer stops draining the buffer: a deterministic "writer cannot keep up"."""

    def __init__(self, start_us: int) -> None:
        super().__init__(start_us)
        self.gate = threading.Event()

    def now_us(self) -> int:
        if threading.current_thread().name.startswith("factlog-writer"):
            self.gate.wait(60)
        return super().now_us()
