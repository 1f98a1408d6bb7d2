"""The one-row kernel (the online lookup's path) gives exactly what the batch kernel gives, and
what the brute-force reference gives, on random data: every built-in feature, both knowledge
modes, ties, late facts, window edges, NaN and -0.0, int sums beyond int64, string keys."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timetravel_api._features import parse_features
from timetravel_api._kernels import _Kernel, fact_feature_columns

from .test_kernels import (
    T0,
    S,
    _fact,
    check_against_reference,
    fact_type,
    facts_table,
    feature_names,
    pylist,
    same,
    scenarios,
)


def batch_columns(table: pa.Table, specs: Any, ents: pa.Array, at: np.ndarray, *,
                  knowledge: str, lookback_us: int | None) -> dict[str, Any]:
    """The batch kernel, whatever the number of rows (the dispatcher sends one row to the
    one-row kernel)."""
    kernel = _Kernel(table, ents, at, as_known=knowledge == "as_known",
                     lookback_us=lookback_us, entity_col="member_id")
    return {s.name: kernel.column(s, provenance=True) for s in specs}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), knowledge=st.sampled_from(["as_known", "event"]))
def test_one_row_equals_the_batch_kernel_and_the_reference(scenario, knowledge):
    ft, facts, queries, windows = scenario
    names = feature_names(windows)
    specs = parse_features(names, fact_types={"tt": ft})
    table = facts_table(ft, facts)
    etype = table.schema.field("member_id").type
    for e, t in queries:
        ents, at = pa.array([e], etype), np.array([t], dtype=np.int64)
        row = fact_feature_columns(table, specs, ents, at, knowledge=knowledge,
                                   lookback_us=ft.lookback_us, entity_col="member_id",
                                   provenance=True)
        batch = batch_columns(table, specs, ents, at, knowledge=knowledge,
                              lookback_us=ft.lookback_us)
        for s in specs:
            r, b = row[s.name], batch[s.name]
            assert r.values.type == b.values.type == s.output_type, s.name
            assert r.values.equals(b.values) or same(pylist(r.values), pylist(b.values)), (
                f"{s.name} at {(e, t)} {knowledge}: {r.values} != {b.values}")
            assert same(pylist(r.values), pylist(b.values)), s.name
            assert list(r.status) == list(b.status), s.name
            if b.fact_index is None:
                assert r.fact_index is None, s.name
            else:
                assert r.fact_index is not None and list(r.fact_index) == list(b.fact_index)
        check_against_reference(ft, facts, [(e, t)], windows, knowledge)


def test_one_row_on_targeted_edges():
    """Late facts, window edges, exact int sums, string min/max: one row at a time."""
    ft = fact_type("string")
    facts = [_fact(0, "a", T0, x=1.0, i=2**63 - 1, s="b"),
             _fact(1, "a", T0 + 5 * S, la=T0 + 50 * S, x=2.0, i=2**63 - 1, s="a"),
             _fact(2, "a", T0 + 5 * S, x=float("nan"), i=3, s="é"),
             _fact(3, "b", T0 + S, x=-0.0)]
    queries = [("a", t) for t in (T0 - 1, T0, T0 + 5 * S, T0 + 10 * S, T0 + 50 * S)]
    queries += [("b", T0 + S), ("zz", T0 + S)]
    for knowledge in ("as_known", "event"):
        for q in queries:
            check_against_reference(ft, facts, [q], ["5s", "1d"], knowledge)


def test_one_row_keeps_the_input_checks():
    ft = fact_type("int64")
    table = facts_table(ft, [_fact(0, 1, T0), _fact(1, 2, T0), _fact(2, 1, T0 + S)])
    specs = parse_features(["tt.x", "tt.count.1d"], fact_types={"tt": ft})
    at = np.array([T0 + S])
    for order in ([0, 2, 1], [1, 0, 2]):  # entity 1 split in two blocks / out of time order
        with pytest.raises(ValueError, match="sorted"):
            fact_feature_columns(table.take(pa.array(order)), specs, pa.array([1]), at,
                                 knowledge="event", lookback_us=None, entity_col="member_id")
    # blocks out of key order are fine, as for the batch kernel
    reordered = table.take(pa.array([2, 0, 1]))
    got = fact_feature_columns(reordered, specs, pa.array([1]), at, knowledge="event",
                               lookback_us=None, entity_col="member_id")
    assert got["tt.count.1d"].values.to_pylist() == [2]
