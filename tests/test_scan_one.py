"""A scan of one entity (the online lookup's) takes a short path (``factlog._scan_one``) and
returns exactly the general scan's answer, bytes included: raw and compacted files, duplicate
copies and conflicts (which go to the general dedup), ties in event_time and logged_at that
fact_id breaks, time bounds, through the row-group cache and without it, and the brute-force
reference."""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factlog._scan_one as scan_one
from factlog import Compactor, FactReader, FactTypeCatalog, RowGroupCache
from factlog._scan_one import one_entity_rows
from ttstore import ManualClock, Store

from .factdata import DAY, PLAY, T0, H, random_facts, reference_scan, table_rows, write_facts


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


_bounds = st.fixed_dictionaries({
    "start_us": st.one_of(st.none(), st.integers(0, 3 * 24).map(lambda h: T0 + h * H)),
    "end_us": st.one_of(st.none(), st.integers(0, 3 * 24).map(lambda h: T0 + h * H + 1000)),
    "logged_before_us": st.one_of(st.none(), st.integers(0, 4 * 24).map(lambda h: T0 + h * H)),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), compact=st.booleans(),
       cached=st.booleans(), bounds=_bounds, few_ids=st.booleans())
def test_one_entity_scan_is_the_general_scan(seed, n, compact, cached, bounds, few_ids) -> None:
    if bounds["start_us"] is not None and bounds["end_us"] is not None \
            and bounds["start_us"] > bounds["end_us"]:
        bounds = {**bounds, "start_us": bounds["end_us"], "end_us": bounds["start_us"]}
    rng = np.random.default_rng(seed)
    # few ids: many copies (the general dedup's turn); many ids: mostly distinct facts, with
    # ties in (event_time, logged_at) in raw files' own order (the short path sorts them)
    rows = random_facts(rng, n, n_entities=3, n_ids=max(1, n // 3 if few_ids else 50 * n))
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        FactTypeCatalog(store).declare(PLAY)
        for i, idx in enumerate(np.array_split(np.arange(n), 3)):
            if len(idx):
                write_facts(store, PLAY, [rows[j] for j in idx], writer=f"w{i}", segment=i,
                            ingested_at_us=T0 + 10 * DAY + i)
        if compact:
            Compactor(store, clock=ManualClock(T0 + 20 * DAY)).run()
        copies = table_rows(FactReader(store).scan("play", dedup=False))
        reader = FactReader(store)
        if cached:
            reader.row_groups = RowGroupCache(max_bytes=1 << 24)
        for e in range(4):
            fast = reader.scan("play", entities=[e], **bounds)
            saved = scan_one.MAX_ROWS
            scan_one.MAX_ROWS = -1  # every scan takes the general path
            try:
                general = reader.scan("play", entities=[e], **bounds)
            finally:
                scan_one.MAX_ROWS = saved
            assert _ipc(fast) == _ipc(general), (e, bounds)
            assert table_rows(fast) == reference_scan(copies, PLAY, entities=[e], **bounds)


def test_ties_are_broken_by_fact_id_and_duplicates_go_to_the_general_dedup() -> None:
    ev = pa.array([5, 5, 5, 3], pa.int64()).cast(pa.timestamp("us", "UTC"))
    lg = pa.array([9, 7, 9, 3], pa.int64()).cast(pa.timestamp("us", "UTC"))
    table = pa.table({"fact_id": ["c", "z", "a", "q"], "event_time": ev, "logged_at": lg})
    assert one_entity_rows(table, None, None, None).tolist() == [3, 1, 2, 0]
    assert one_entity_rows(table, 4, None, 8).tolist() == [1]
    dup = table.set_column(0, "fact_id", pa.array(["c", "z", "c", "q"]))
    assert one_entity_rows(dup, None, None, None) is None


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_tables(n: int) -> None:
    ts = pa.array([7] * n, pa.int64()).cast(pa.timestamp("us", "UTC"))
    table = pa.table({"fact_id": ["x"] * n, "event_time": ts, "logged_at": ts})
    assert one_entity_rows(table, None, None, None).tolist() == list(range(n))
    assert one_entity_rows(table, 8, None, None).tolist() == []
