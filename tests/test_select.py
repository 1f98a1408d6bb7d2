"""Context selection: allocation invariants, panel selection, typed keys, the store, the CLI.

Allocations are checked against an exact (Fraction) brute-force reference, the keyed hash
against a pure-Python one, and proportional counts against scikit-learn's ``train_test_split``.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter import (
    CONTEXT_COLUMNS,
    ContextSet,
    PopulationError,
    SelectionConflict,
    SelectionError,
    SelectionNotFound,
    allocate,
    entity_hash,
    latest_selection,
    list_selections,
    load_selection,
    read_population,
    save_selection,
    select_contexts,
)
from snapshotter._hashing import seed_keys
from snapshotter._select import _smallest_per_stratum
from snapshotter._selections import CONTEXTS_NAME, DESIGN_NAME, REPORT_NAME, selection_key
from ttstore import ObjectNotFound, Store, parse_timestamp
from ttstore._cli import main

T0 = parse_timestamp("2026-11-20T10:00:00Z", field="t")
DAY_US = 86_400 * 1_000_000
MASK = (1 << 64) - 1


# -- references ------------------------------------------------------------------------------


def ref_water_fill(w: list[Fraction], lo: list[int], hi: list[int], total: int) -> list[Fraction]:
    """Exact clip(λ·w, lo, hi) summing to total, by scanning every breakpoint segment."""
    x = [Fraction(v) for v in lo]
    pos = [i for i in range(len(w)) if w[i] > 0 and hi[i] > lo[i]]
    room = total - sum(lo)
    if room <= 0:
        return x
    if not pos:
        shares = [Fraction(hi[i]) if hi[i] > lo[i] else Fraction(0) for i in range(len(w))]
        return ref_water_fill(shares, lo, hi, total)
    if sum(hi[i] - lo[i] for i in pos) <= room:
        for i in pos:
            x[i] = Fraction(hi[i])
        left = total - sum(x)
        rest = [i for i in range(len(w)) if i not in pos and hi[i] > lo[i]]
        if left > 0:
            sub = ref_water_fill([Fraction(hi[i]) for i in rest], [lo[i] for i in rest],
                                 [hi[i] for i in rest], sum(lo[i] for i in rest) + int(left))
            for j, i in enumerate(rest):
                x[i] = sub[j]
        return x
    target = total - sum(lo[i] for i in range(len(w)) if i not in pos)

    def s(lam: Fraction) -> Fraction:
        return sum((min(max(lam * w[i], Fraction(lo[i])), Fraction(hi[i])) for i in pos),
                   Fraction(0))

    points = sorted({Fraction(lo[i]) / w[i] for i in pos} | {Fraction(hi[i]) / w[i] for i in pos})
    for a, b in zip(points, points[1:], strict=False):
        sa, sb = s(a), s(b)
        if sa <= target <= sb:
            lam = a if sb == sa else a + (b - a) * (target - sa) / (sb - sa)
            for i in pos:
                x[i] = min(max(lam * w[i], Fraction(lo[i])), Fraction(hi[i]))
            return x
    raise AssertionError("no segment")


def ref_allocate(sizes: list[int], n: int, allocation: str, std: list[int] | None,
                 floor: int) -> list[int]:
    total_pop = sum(sizes)
    if n >= total_pop:
        return list(sizes)
    lo = [min(floor, s) for s in sizes]
    if allocation == "proportional" or (allocation == "neyman" and not any(std or [])):
        w = [Fraction(s) for s in sizes]
    elif allocation == "equal":
        w = [Fraction(1)] * len(sizes)
    else:
        assert std is not None
        w = [Fraction(s * d) for s, d in zip(sizes, std, strict=True)]
    x = ref_water_fill(w, lo, list(sizes), n)
    base = [int(v) for v in x]  # floor of a non-negative Fraction
    left = n - sum(base)
    order = sorted(range(len(sizes)), key=lambda i: (-(x[i] - base[i]), i))
    for i in order:
        if left == 0:
            break
        if base[i] < sizes[i]:
            base[i] += 1
            left -= 1
    assert left == 0
    return base


def _mix(z: int) -> int:
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & MASK
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def ref_hash(value: int | str, seed: int) -> int:
    k0, k1 = (int(k) for k in seed_keys(seed))
    if isinstance(value, int):
        return _mix((_mix((value & MASK) ^ k0) + k1) & MASK)
    b = value.encode()
    h = _mix(len(b)) ^ k0
    for i in range(0, len(b), 8):
        h = _mix(h ^ int.from_bytes(b[i:i + 8], "little"))
    return _mix((h + k1) & MASK)


def ref_select(keys: list[Any], strata: list[str], n_h: dict[str, int], seed: int) -> set[Any]:
    """The n_h members of each stratum with the smallest reference hashes."""
    out: set[Any] = set()
    for s, want in n_h.items():
        members = sorted((ref_hash(k, seed), k) for k, st_ in zip(keys, strata, strict=True)
                         if st_ == s)
        out |= {k for _, k in members[:want]}
    return out


def population(n: int, *, seed: int = 0, regions: tuple[str, ...] = ("eu", "us", "apac"),
               start: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "member_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "region": pa.array(rng.choice(list(regions), n)),
        "device": pa.array(rng.choice(["tv", "mobile"], n)),
        "hours": pa.array(rng.gamma(2.0, size=n)),
    })


def check_invariants(cs: ContextSet, pop: pa.Table, n: int, strata: list[str]) -> None:
    t = cs.table
    assert t.column_names[:2] == ["entity_id", "stratum"]
    assert set(CONTEXT_COLUMNS) <= set(t.column_names)
    total = pop.num_rows
    assert t.num_rows == min(n, total) == cs.design.sample_size
    assert pc.sum(t["weight"]).as_py() == pytest.approx(total, rel=1e-12)
    pop_counts = Counter(
        "|".join(f"{c}={v}" for c, v in zip(strata, row, strict=True)) or "all"
        for row in zip(*(pop[c].to_pylist() for c in strata), strict=True)
    ) if strata else Counter({"all": total})
    per = t.group_by("stratum").aggregate([("weight", "sum"), ("entity_id", "count")])
    got = dict(zip(per["stratum"].to_pylist(), per["weight_sum"].to_pylist(), strict=True))
    assert set(got) == set(pop_counts)  # every non-empty stratum is in the sample
    for name, size in pop_counts.items():
        assert got[name] == pytest.approx(size, rel=1e-12)
    np.testing.assert_allclose(t["weight"].to_numpy() * t["pi"].to_numpy(), 1.0, rtol=1e-12)
    assert len(set(t["entity_id"].to_pylist())) == t.num_rows
    assert t["entity_id"].to_pylist() == sorted(t["entity_id"].to_pylist())
    assert set(t["selection_id"].to_pylist()) == {cs.selection_id}


# -- allocation ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=12),
    extra=st.integers(0, 2000),
    allocation=st.sampled_from(["proportional", "equal", "neyman"]),
    std=st.lists(st.integers(0, 4), min_size=12, max_size=12),
    floor=st.integers(1, 3),
)
def test_allocation_invariants_and_reference(sizes: list[int], extra: int, allocation: str,
                                            std: list[int], floor: int) -> None:
    std = std[: len(sizes)]
    floors = sum(min(floor, s) for s in sizes)
    n = floors + extra
    result = allocate(sizes, n, allocation=allocation, std=std, min_per_stratum=floor)
    n_h = result.sample_sizes.tolist()
    assert sum(n_h) == min(n, sum(sizes))
    assert all(min(floor, s) <= k <= s for k, s in zip(n_h, sizes, strict=True))
    assert n_h == ref_allocate(sizes, n, allocation, std, floor)
    if allocation == "neyman" and not any(std):
        assert result.allocation == "proportional"
        assert any("fell back to proportional" in note for note in result.notes)


def test_n_below_number_of_strata_is_an_error() -> None:
    with pytest.raises(SelectionError) as err:
        allocate([5, 5, 5, 5], 3)
    assert err.value.code == "too_few_samples"
    assert "smaller than the number of non-empty strata (4)" in err.value.message
    with pytest.raises(SelectionError) as err:
        allocate([5, 5, 5], 5, min_per_stratum=2)
    assert "floors" in err.value.message
    assert allocate([5, 5, 1], 5, min_per_stratum=2).sample_sizes.tolist() == [2, 2, 1]


def test_caps_redistribute_the_excess() -> None:
    # equal wants 10 each; the 3-member stratum is capped and its 7 go to the others (13.5 each,
    # the tie to the stratum that sorts first)
    assert allocate([3, 200, 300], 30, allocation="equal").sample_sizes.tolist() == [3, 14, 13]
    # proportional: the tiny strata keep their floor of 1 and the big one takes the rest
    assert allocate([1000, 1, 1], 10).sample_sizes.tolist() == [8, 1, 1]
    # everyone: n beyond N
    r = allocate([3, 4], 100)
    assert r.sample_sizes.tolist() == [3, 4] and "everyone" in r.notes[0]


def test_neyman_zero_variance_strata() -> None:
    # a zero-std stratum keeps its floor; the others split the rest by N_h * S_h
    assert allocate([3, 200, 300], 30, allocation="neyman",
                    std=[0, 1, 2]).sample_sizes.tolist() == [1, 7, 22]
    # the positive-std strata are capped: the zero-std one takes what is left
    r = allocate([10, 5, 4], 15, allocation="neyman", std=[0, 1, 2])
    assert r.sample_sizes.tolist() == [6, 5, 4]
    with pytest.raises(SelectionError):
        allocate([10, 5], 4, allocation="neyman")  # no std given


# -- selection -------------------------------------------------------------------------------


def test_hash_matches_pure_python_reference() -> None:
    ints = [0, 1, -1, 42, 2**63 - 1, -(2**63), 7]
    strs = ["", "a", "a\x00", "007", "7", "héllo wörld", "x" * 17, "member-000000042"]
    assert entity_hash(pa.array(ints, pa.int64()), 3).tolist() == [ref_hash(v, 3) for v in ints]
    assert entity_hash(pa.array(strs), 3).tolist() == [ref_hash(v, 3) for v in strs]
    # slices and chunking do not change a key's hash
    chunked = pa.chunked_array([pa.array(strs[:3]), pa.array(["zz"] + strs[3:]).slice(1)])
    assert entity_hash(chunked, 3).tolist() == [ref_hash(v, 3) for v in strs]
    assert entity_hash(pa.array(ints), 4).tolist() != entity_hash(pa.array(ints), 3).tolist()


def test_candidate_threshold_retries_until_exact() -> None:
    # Hashes crowded at the top of the range defeat the first-pass threshold (which assumes
    # uniform hashes): the pass must widen until each stratum has its n_h, and stay exact.
    rng = np.random.default_rng(5)
    hashes = (np.uint64((1 << 64) - 1) - rng.integers(0, 1 << 20, 3000).astype(np.uint64))
    codes = np.repeat(np.arange(3, dtype=np.int64), [1000, 1500, 500])
    sizes = np.array([1000, 1500, 500], dtype=np.int64)
    n_h = np.array([10, 40, 5], dtype=np.int64)
    got = _smallest_per_stratum(hashes, codes, sizes, n_h)
    expected: set[int] = set()
    for h in range(3):
        rows = np.flatnonzero(codes == h)
        expected |= set(rows[np.argsort(hashes[rows], kind="stable")[: n_h[h]]].tolist())
    assert len(got) == n_h.sum() and set(got.tolist()) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strata_of=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=60),
    extra=st.integers(0, 70),
    allocation=st.sampled_from(["proportional", "equal", "neyman"]),
    seed=st.integers(-5, 5),
    string_keys=st.booleans(),
)
def test_selection_invariants_vs_reference(strata_of: list[str], extra: int, allocation: str,
                                           seed: int, string_keys: bool) -> None:
    rng = np.random.default_rng(len(strata_of))
    ids = rng.choice(10_000, size=len(strata_of), replace=False).tolist()
    keys = [f"m{i:04d}" for i in ids] if string_keys else ids
    values = rng.integers(0, 3, len(strata_of)).astype(float).tolist()
    pop = pa.table({"entity_id": keys, "seg": strata_of, "v": values})
    n = len(set(strata_of)) + extra
    cs = select_contexts(pop, n=n, selected_at_us=T0, strata=["seg"], allocation=allocation,
                         variability_col="v", seed=seed)
    check_invariants(cs, pop, n, ["seg"])
    n_h = {s.name: s.sample_size for s in cs.design.strata_detail}
    expected = ref_select(keys, [f"seg={s}" for s in strata_of], n_h, seed)
    assert set(cs.table["entity_id"].to_pylist()) == expected


@pytest.mark.parametrize(("allocation", "big"), [
    ("proportional", (100, 8, 12.5)),
    ("equal", (100, 7, 100 / 7)),  # 10/3 each: "one" and "two" are capped, "big" takes the rest
    ("neyman", (100, 8, 12.5)),  # N_h * S_h: "one" has no spread, "two" little
])
def test_tiny_one_member_and_everyone(allocation: str, big: tuple[int, int, float]) -> None:
    pop = pa.table({"entity_id": list(range(103)),
                    "seg": ["big"] * 100 + ["one"] + ["two"] * 2,
                    "v": [float(i) for i in range(103)]})
    kw = {"strata": ["seg"], "allocation": allocation,
          "variability_col": "v" if allocation == "neyman" else None}
    cs = select_contexts(pop, n=10, selected_at_us=T0, **kw)
    check_invariants(cs, pop, 10, ["seg"])
    detail = {s.name: (s.population_size, s.sample_size, s.weight)
              for s in cs.design.strata_detail}
    two = (2, 2, 1.0) if allocation == "equal" else (2, 1, 2.0)
    assert detail == {"seg=big": pytest.approx(big), "seg=one": (1, 1, 1.0), "seg=two": two}
    everyone = select_contexts(pop, n=1000, selected_at_us=T0, **kw)
    check_invariants(everyone, pop, 1000, ["seg"])
    assert everyone.table["weight"].to_pylist() == [1.0] * 103
    assert "everyone" in everyone.design.notes[0]
    with pytest.raises(SelectionError) as err:
        select_contexts(pop, n=2, selected_at_us=T0, **kw)
    assert err.value.code == "too_few_samples"


def test_neyman_std_and_fallback_recorded() -> None:
    pop = pa.table({"entity_id": list(range(9)), "seg": list("aaaabbbbc"),
                    "v": [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, None, 9.0]})
    cs = select_contexts(pop, n=4, selected_at_us=T0, strata=["seg"], allocation="neyman",
                         variability_col="v")
    std = {s.name: s.std for s in cs.design.strata_detail}
    assert std["seg=a"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert std["seg=b"] == 0.0 and std["seg=c"] == 0.0  # constant (null ignored); one member
    assert cs.design.allocation_used == "neyman"
    flat = pa.table({"entity_id": list(range(6)), "seg": list("aaabbc"), "v": [2.0] * 6})
    fb = select_contexts(flat, n=4, selected_at_us=T0, strata=["seg"], allocation="neyman",
                         variability_col="v")
    check_invariants(fb, flat, 4, ["seg"])
    assert fb.design.allocation == "neyman" and fb.design.allocation_used == "proportional"
    assert any("fell back to proportional" in note for note in fb.design.notes)


def test_multiple_strata_columns_and_nulls() -> None:
    pop = pa.table({"entity_id": list(range(8)), "r": ["eu", "eu", None, "us", "us", "us",
                                                       None, "eu"],
                    "d": [1, 2, 1, 1, 1, 2, 1, 1]})
    cs = select_contexts(pop, n=6, selected_at_us=T0, strata=["r", "d"])
    names = [s.name for s in cs.design.strata_detail]
    assert names == ["r=eu|d=1", "r=eu|d=2", "r=us|d=1", "r=us|d=2", "r=<null>|d=1"]
    assert cs.table.schema.field("d").type == pa.int64()
    assert pc.sum(cs.table["weight"]).as_py() == pytest.approx(8)
    with pytest.raises(PopulationError):
        select_contexts(pop, n=6, selected_at_us=T0, strata=["weight"])
    with pytest.raises(PopulationError):
        select_contexts(pop, n=6, selected_at_us=T0, strata=["entity_id"])


def test_bad_keys_are_rejected() -> None:
    with pytest.raises(PopulationError, match="duplicate"):
        select_contexts(pa.table({"entity_id": [1, 2, 2]}), n=2, selected_at_us=T0)
    with pytest.raises(PopulationError, match="duplicate"):
        select_contexts(pa.table({"entity_id": ["a", "b", "a"]}), n=2, selected_at_us=T0)
    with pytest.raises(PopulationError, match="null"):
        select_contexts(pa.table({"entity_id": [1, None]}), n=1, selected_at_us=T0)
    with pytest.raises(PopulationError, match="type"):
        select_contexts(pa.table({"entity_id": [1.5, 2.5]}), n=1, selected_at_us=T0)
    with pytest.raises(PopulationError, match="no entity column"):
        select_contexts(pa.table({"id": [1]}), n=1, selected_at_us=T0)


def test_key_encodings_normalize_to_declared_types() -> None:
    keys = ["b", "a", "c", "a2"]
    plain = select_contexts(pa.table({"entity_id": keys}), n=2, selected_at_us=T0, seed=4)
    for arr in (pa.array(keys).dictionary_encode(), pa.array(keys, pa.large_string())):
        other = select_contexts(pa.table({"entity_id": arr}), n=2, selected_at_us=T0, seed=4)
        assert other.table.schema.field("entity_id").type == pa.string()
        assert other.table.equals(plain.table)
    small = select_contexts(pa.table({"entity_id": pa.array([3, 1, 2], pa.int16())}), n=2,
                            selected_at_us=T0)
    assert small.table.schema.field("entity_id").type == pa.int64()
    assert small.design.entity_type == "int64"


def test_same_inputs_same_id_and_sample() -> None:
    pop = population(500)
    a = select_contexts(pop, n=50, selected_at_us=T0, entity="member_id", strata=["region"])
    b = select_contexts(pop.take(np.random.default_rng(1).permutation(500)), n=50,
                        selected_at_us=T0, entity="member_id", strata=["region"])
    assert a.selection_id == b.selection_id and a.table.equals(b.table)
    c = select_contexts(pop, n=50, selected_at_us=T0, entity="member_id", strata=["region"],
                        seed=1)
    assert c.selection_id != a.selection_id
    assert a.selection_id.startswith("sel-20261120T100000Z-")


def test_panel_is_stable_across_days() -> None:
    n = 400
    day1 = population(10_000, seed=1)
    rng = np.random.default_rng(2)
    keep = np.sort(rng.choice(10_000, size=9_900, replace=False))  # 1% leave
    joiners = population(100, seed=3, start=50_000)  # 1% join
    day2 = pa.concat_tables([day1.take(pa.array(keep)), joiners])
    s1 = select_contexts(day1, n=n, selected_at_us=T0, entity="member_id",
                         strata=["region", "device"], seed=7)
    s2 = select_contexts(day2, n=n, selected_at_us=T0 + DAY_US, entity="member_id",
                         strata=["region", "device"], seed=7)
    check_invariants(s2, day2, n, ["region", "device"])
    first, second = set(s1.table["entity_id"].to_pylist()), set(s2.table["entity_id"].to_pylist())
    stayers = first & set(day2["member_id"].to_pylist())
    # exactly: a day-1 member still present stays iff its day-2 rank in its stratum < n_h
    strata2 = [f"region={r}|device={d}" for r, d in zip(day2["region"].to_pylist(),
                                                        day2["device"].to_pylist(), strict=True)]
    n_h2 = {s.name: s.sample_size for s in s2.design.strata_detail}
    assert second == ref_select(day2["member_id"].to_pylist(), strata2, n_h2, 7)
    n_h1 = {s.name: s.sample_size for s in s1.design.strata_detail}
    held = {name for name in n_h1 if n_h1[name] == n_h2[name]}
    by_stratum = dict(zip(day2["member_id"].to_pylist(), strata2, strict=True))
    # where a stratum's sample size held, a member leaves only when a joiner outranks it
    joined = set(joiners["member_id"].to_pylist())
    assert held
    for name in held:
        stayed_h = {m for m in stayers if by_stratum[m] == name}
        second_h = {m for m in second if by_stratum[m] == name}
        assert len(stayed_h - second_h) <= len(second_h & joined)
    assert len(first & second) >= 0.95 * n  # the panel carries over
    other_seed = select_contexts(day2, n=n, selected_at_us=T0 + DAY_US, entity="member_id",
                                 strata=["region", "device"], seed=8)
    assert len(first & set(other_seed.table["entity_id"].to_pylist())) < 0.2 * n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proportional_agrees_with_sklearn(seed: int) -> None:
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    sizes = rng.integers(500, 5000, size=6)
    labels = np.repeat([f"s{i}" for i in range(6)], sizes)
    pop = pa.table({"entity_id": np.arange(labels.size), "seg": labels})
    n = int(rng.integers(300, 2000))
    cs = select_contexts(pop, n=n, selected_at_us=T0, strata=["seg"])
    _, test_labels = train_test_split(labels, test_size=n, stratify=labels, random_state=seed)
    theirs = Counter(test_labels.tolist())
    ours = {s.name.removeprefix("seg="): s.sample_size for s in cs.design.strata_detail}
    assert sum(ours.values()) == sum(theirs.values()) == n
    assert all(abs(ours[k] - theirs[k]) <= 1 for k in theirs)


# -- reading populations ---------------------------------------------------------------------


def test_csv_keys_keep_their_declared_type(tmp_path: Path, local_store: Store) -> None:
    csv = tmp_path / "pop.csv"
    csv.write_text("entity_id,region,tenure\n007,eu,01\n7,eu,01\n0042,us,2\n")
    t = read_population(str(csv), entity="entity_id", strata=["region", "tenure"])
    assert t["entity_id"].type == pa.string()
    assert t["entity_id"].to_pylist() == ["007", "7", "0042"]
    assert t["tenure"].to_pylist() == ["01", "01", "2"]  # strata stay as written
    cs = select_contexts(t, n=3, selected_at_us=T0, strata=["region"])
    assert sorted(cs.table["entity_id"].to_pylist()) == ["0042", "007", "7"]
    as_int = read_population(str(csv), entity="entity_id", entity_type="int64")
    assert as_int["entity_id"].to_pylist() == [7, 7, 42]
    with pytest.raises(PopulationError, match="duplicate"):
        select_contexts(as_int, n=2, selected_at_us=T0)
    # the same CSV as a key in the store
    local_store.put_if_absent("populations/p.csv", csv.read_bytes())
    from_store = read_population("populations/p.csv", entity="entity_id", store=local_store)
    assert from_store["entity_id"].to_pylist() == ["007", "7", "0042"]
    with pytest.raises(PopulationError, match="no column"):
        read_population(str(csv), entity="entity_id", strata=["device"])
    with pytest.raises(PopulationError, match="not found"):
        read_population("populations/missing.parquet", entity="entity_id", store=local_store)


def test_parquet_population_file_dir_and_store(tmp_path: Path, store: Store) -> None:
    pop = population(300)
    pq.write_table(pop, tmp_path / "pop.parquet")
    (tmp_path / "dir").mkdir()
    pq.write_table(pop.slice(0, 100), tmp_path / "dir" / "a.parquet")
    pq.write_table(pop.slice(100), tmp_path / "dir" / "b.parquet")
    store.write_parquet("populations/one.parquet", pop)
    store.write_parquet("populations/many/a.parquet", pop.slice(0, 100))
    store.write_parquet("populations/many/b.parquet", pop.slice(100))
    for source, st_ in [(str(tmp_path / "pop.parquet"), None), (str(tmp_path / "dir"), None),
                        ("populations/one.parquet", store), ("populations/many", store)]:
        t = read_population(source, entity="member_id", strata=["region"], store=st_)
        assert t.column_names == ["member_id", "region"]
        assert sorted(t["member_id"].to_pylist()) == list(range(300))
    s = read_population(str(tmp_path / "pop.parquet"), entity="member_id", entity_type="string")
    assert s["member_id"].type == pa.string() and s["member_id"][5].as_py() == "5"


# -- the store -------------------------------------------------------------------------------


def test_save_load_latest_list(store: Store) -> None:
    pop = population(600)
    with pytest.raises(SelectionNotFound):
        latest_selection(store, T0)
    a = select_contexts(pop, n=60, selected_at_us=T0, entity="member_id", strata=["region"])
    b = select_contexts(pop, n=90, selected_at_us=T0 + DAY_US, entity="member_id",
                        strata=["region", "device"], allocation="equal")
    assert save_selection(store, a, report=False) == a.selection_id
    assert save_selection(store, b) == b.selection_id
    loaded = load_selection(store, b.selection_id)
    assert loaded.table.equals(b.table)
    assert loaded.design.strata_detail == b.design.strata_detail
    assert loaded.design.committed_at_us is not None
    assert latest_selection(store, T0).selection_id == a.selection_id
    assert latest_selection(store, T0 + DAY_US - 1).selection_id == a.selection_id
    assert latest_selection(store, T0 + 2 * DAY_US).selection_id == b.selection_id
    with pytest.raises(SelectionNotFound):
        latest_selection(store, T0 - 1)
    assert [d.selection_id for d in list_selections(store)] == [a.selection_id, b.selection_id]
    png = store.get(selection_key(b.selection_id, REPORT_NAME))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ObjectNotFound):
        store.get(selection_key(a.selection_id, REPORT_NAME))
    # saving the same set again is a no-op; a different set under the same id is refused
    assert save_selection(store, b) == b.selection_id
    forged = ContextSet(table=b.table.slice(1), design=b.design)
    with pytest.raises(SelectionConflict):
        save_selection(store, forged, report=False)
    with pytest.raises(SelectionNotFound):
        load_selection(store, "sel-20261120T100000Z-000000000000")


def test_crash_before_commit_leaves_nothing_and_resave_completes(store: Store) -> None:
    cs = select_contexts(population(200), n=20, selected_at_us=T0, entity="member_id",
                         strata=["region"])
    # a crash after the rows but before selection.json
    store.write_parquet(selection_key(cs.selection_id, CONTEXTS_NAME), cs.table)
    assert list_selections(store) == []
    with pytest.raises(SelectionNotFound):
        latest_selection(store, T0)
    save_selection(store, cs, report=False)
    assert latest_selection(store, T0).table.equals(cs.table)
    body = json.loads(store.get(selection_key(cs.selection_id, DESIGN_NAME)))
    assert body["N"] == 200 and body["n"] == 20 and body["strata"] == ["region"]
    assert sum(s["N_h"] for s in body["strata_detail"]) == 200


# -- the CLI ---------------------------------------------------------------------------------


def _csv_population(path: Path, n: int = 400) -> Path:
    pop = population(n)
    buf = io.StringIO()
    buf.write("member,region,device,hours\n")
    for m, r, d, h in zip(*(pop[c].to_pylist() for c in pop.column_names), strict=True):
        buf.write(f"{m:05d},{r},{d},{h:.4f}\n")
    path.write_text(buf.getvalue())
    return path


def test_cli_prints_only_the_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv_population(tmp_path / "pop.csv")
    store_dir = tmp_path / "store"
    out, report = tmp_path / "cs.parquet", tmp_path / "r.png"
    rc = main(["snapshot", "select", "--store", str(store_dir), "--population", str(csv),
               "--entity", "member", "--strata", "region,device", "--n", "40",
               "--allocation", "neyman", "--variability-col", "hours", "--seed", "3",
               "--now", "2026-11-20T10:00:00Z", "--out", str(out), "--report", str(report)])
    captured = capsys.readouterr()
    assert rc == 0
    sid = captured.out.strip()
    assert captured.out == sid + "\n" and sid.startswith("sel-20261120T100000Z-")
    cs = load_selection(Store(str(store_dir)), sid)
    assert pq.read_table(out).equals(cs.table)
    assert cs.table["entity_id"].type == pa.string()
    assert cs.table["entity_id"][0].as_py().startswith("0")  # "00012" stays a string key
    assert cs.design.allocation == "neyman" and cs.design.seed == 3
    assert report.read_bytes() == Store(str(store_dir)).get(selection_key(sid, REPORT_NAME))

    rc = main(["snapshot", "select", "--store", str(store_dir), "--population", str(csv),
               "--entity", "member", "--strata", "region,device", "--n", "5"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert "too_few_samples" in captured.err and "(6)" in captured.err


def test_cli_subprocess_stdout_is_the_id(tmp_path: Path) -> None:
    csv = _csv_population(tmp_path / "pop.csv", 100)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("timetravel")), "snapshot", "select", "--store",
         str(tmp_path / "store"), "--population", str(csv), "--entity", "member",
         "--strata", "region", "--n", "10", "--now", "2026-11-21T00:00:00Z"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sel-20261121T000000Z-")
    assert "selected 10 of 100 in 3 strata" in proc.stderr
    assert len(load_selection(Store(str(tmp_path / "store")), lines[0])) == 10


def test_cli_min_per_stratum_floors_a_tiny_stratum(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--min-per-stratum`` reaches the allocation: a stratum of 6 in 1,006 members, which
    proportional allocation of 50 gives 0.3 of a context, gets its floor of 4; the total stays
    exactly n and the weights still add up to each stratum's size."""
    rows = ["member,region"] + [f"{i:05d},{'tiny' if i < 6 else 'big'}" for i in range(1006)]
    csv = tmp_path / "pop.csv"
    csv.write_text("\n".join(rows) + "\n")
    store_dir = tmp_path / "store"
    for floor, want in (("1", 1), ("4", 4)):
        rc = main(["snapshot", "select", "--store", str(store_dir), "--population", str(csv),
                   "--entity", "member", "--strata", "region", "--n", "50",
                   "--min-per-stratum", floor, "--seed", "1",
                   "--now", f"2026-11-20T1{floor}:00:00Z"])
        sid = capsys.readouterr().out.strip()
        assert rc == 0
        cs = load_selection(Store(str(store_dir)), sid)
        assert cs.design.min_per_stratum == int(floor) and cs.table.num_rows == 50
        by = {d.name: d for d in cs.design.strata_detail}
        assert by["region=tiny"].sample_size == want and by["region=big"].sample_size == 50 - want
        w = cs.table.group_by("stratum").aggregate([("weight", "sum")]).to_pydict()
        assert dict(zip(w["stratum"], w["weight_sum"], strict=True)) == pytest.approx(
            {"region=tiny": 6.0, "region=big": 1000.0})
    rc = main(["snapshot", "select", "--store", str(store_dir), "--population", str(csv),
               "--entity", "member", "--strata", "region", "--n", "50",
               "--min-per-stratum", "0"])
    assert rc == 2 and "min_per_stratum" in capsys.readouterr().err


def test_report_draws_the_population_and_sample_shares() -> None:
    """The PNG report's bars are each stratum's share of the population and of the sample:
    equal under proportional allocation (up to rounding), apart under equal allocation, and
    beyond 40 strata the smallest are pooled into one bar; the PNG is as tall as its bars."""
    import matplotlib.image as mpimg

    from snapshotter._report import MAX_BARS, render_report, report_shares

    pop = population(3000)
    prop = select_contexts(pop, n=300, selected_at_us=T0, strata=["region", "device"], seed=1,
                          entity="member_id")
    names, p_share, s_share = report_shares(prop)
    assert names == [s.name for s in prop.design.strata_detail] and len(names) == 6
    assert p_share.sum() == pytest.approx(1.0) and s_share.sum() == pytest.approx(1.0)
    assert np.abs(p_share - s_share).max() <= 1 / 300  # largest remainder: within one context
    equal = select_contexts(pop, n=300, selected_at_us=T0, strata=["region", "device"], seed=1,
                            allocation="equal", entity="member_id")
    _, _, eq_share = report_shares(equal)
    assert np.allclose(eq_share, 1 / 6)
    png = render_report(prop)
    img = mpimg.imread(io.BytesIO(png), format="png")
    assert img.shape[0] == round((1.6 + 0.32 * 6) * 100) and img.shape[1] == 900

    many = pa.table({"member_id": pa.array(np.arange(5000, dtype=np.int64)),
                     "g": pa.array([f"g{i % 60:02d}" for i in range(5000)])})
    wide = select_contexts(many, n=600, selected_at_us=T0, strata=["g"], seed=1,
                           entity="member_id")
    names, p_share, s_share = report_shares(wide)
    assert len(names) == MAX_BARS and names[-1] == "(21 other strata)"
    assert p_share.sum() == pytest.approx(1.0) and s_share.sum() == pytest.approx(1.0)
