"""``timetravel demo`` with tiny parameters: parity, the training set (rows, labels, weights),
real time-split AUCs for the point-in-time model and the leaky baseline, the report; the same
demo on S3 gives the same numbers."""

from __future__ import annotations

import io
import json
import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from factlog import FactReader
from simworld._demo import DemoConfig, DemoResult, run_demo
from simworld._demo_train import BUILT_IN_FEATURES, _fit_score
from ttstore import US_PER_DAY, US_PER_S, Store

TINY = DemoConfig(members=200, days=2, seed=5, requests_per_day=150)
FACT_FED = ("minutes_7d", "plays_1d", "hours_since_last_play", "distinct_genres_7d",
            "requests_1d", "rec_play_rate_7d")
HOUR = timedelta(hours=1)
SNAPSHOT_FED = ("genre_affinity", "my_list_size", "tenure_days")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, DemoResult, str]:
    store = Store(str(tmp_path_factory.mktemp("demo") / "store"))
    out = io.StringIO()
    result = run_demo(store, TINY, out=out)
    return store, result, out.getvalue()


def test_parity_holds_for_every_fact_fed_encoder(tiny: tuple[Store, DemoResult, str]) -> None:
    _, result, text = tiny
    s = result.summary
    requests = s["simulation"]["requests"]
    assert requests == 2 * 150
    parity = s["parity"]
    assert parity["requests"] == requests
    assert parity["fact_fed_mismatches"] == 0
    for name in FACT_FED:
        assert parity["compared"][name] == requests
    # snapshot-fed encoders report staleness from the real 12h runs instead
    for name in SNAPSHOT_FED:
        st = parity["staleness"][name]
        # runs every 12h; my_list was down during the 4th run, so its rows age up to 24h
        bound = (24 if name == "my_list_size" else 12) * 3600 + 600
        assert st["rows"] > 0 and 0 <= st["p50_s"] <= st["max_s"] <= bound
        if name == "my_list_size":
            assert st["max_s"] > 12 * 3600 + 600
        assert set(st["statuses"]) <= {"ok", "missing", "not_sampled", "stale"}
        assert sum(st["statuses"].values()) == requests
    assert "fact-fed encoders" in text and "mismatches: 0" in text
    assert all(v == "ok" for v in s["steps"].values()), s["steps"]


def test_every_logged_fact_is_read_back_once(tiny: tuple[Store, DemoResult, str]) -> None:
    _, result, _ = tiny
    rb = result.summary["read_back"]
    assert set(rb) == {"playback", "recommendation_request", "impression", "served_features"}
    for v in rb.values():
        assert v["logged"] == v["stored_copies"] == v["facts"] > 0
    assert rb["impression"]["facts"] == 5 * rb["recommendation_request"]["facts"]
    assert result.summary["simulation"]["late_plays"] > 0


def _brute_labels(store: Store) -> dict[str, int]:
    """Did the member play a shown title within (at, at + 1h]? From the raw facts, by loops."""
    reader = FactReader(store)
    req = reader.scan("recommendation_request").to_pylist()
    imp = reader.scan("impression").to_pylist()
    plays = reader.scan("playback").to_pylist()
    shown: dict[str, set[int]] = {}
    for r in imp:
        shown.setdefault(r["request_id"], set()).add(r["video_id"])
    by_member: dict[int, list[dict[str, Any]]] = {}
    for p in plays:
        by_member.setdefault(p["member_id"], []).append(p)
    out = {}
    for r in req:
        at = r["event_time"]
        out[r["request_id"]] = int(any(
            p["video_id"] in shown[r["request_id"]] and at < p["event_time"] <= at + HOUR
            for p in by_member.get(r["member_id"], [])))
    return out


def test_training_set_rows_labels_and_weights(tiny: tuple[Store, DemoResult, str]) -> None:
    store, result, _ = tiny
    ts: pa.Table = result.training_set
    labels: pa.Table = result.labels
    features = [*FACT_FED, *SNAPSHOT_FED, *BUILT_IN_FEATURES]
    assert ts.column_names == [*labels.column_names, *features, "weight"]
    # one row per recommendation request, in label order, labels as the raw facts say
    assert ts.num_rows == result.summary["simulation"]["requests"]
    ids = ts.column("request_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert ts.column("at").equals(labels.column("at"))
    brute = _brute_labels(store)
    assert ts.column("played_1h").to_pylist() == [brute[i] for i in ids]
    assert 0 < sum(brute.values()) < len(ids)  # both classes
    # weight = 1/pi of the member's stratum for panel members once a snapshot was committed,
    # null for members outside the panel
    assert result.selection is not None
    sel = result.selection.table
    pi = dict(zip(sel.column("entity_id").to_pylist(), sel.column("pi").to_pylist(),
                  strict=True))
    first_commit = TINY.start_us + 10 * 60 * US_PER_S
    at_us = ts.column("at").cast(pa.int64()).to_pylist()
    for m, at, w in zip(ts.column("entity_id").to_pylist(), at_us,
                        ts.column("weight").to_pylist(), strict=True):
        if m in pi and at >= first_commit:
            assert w == pytest.approx(1 / pi[m], rel=1e-12)
        else:
            assert w is None
    weighted = sum(w is not None for w in ts.column("weight").to_pylist())
    assert weighted == result.summary["training"]["weighted_rows"] > 0
    # point in time: no play counted by a feature happened after the request
    played = ts.column("plays_1d").to_pylist()
    assert all(p is not None and p >= 0 for p in played)
    # the leaky baseline: the same rows, every feature as of the end of the simulated days
    leaky: pa.Table = result.leaky_set
    assert leaky.num_rows == ts.num_rows
    end = TINY.start_us + TINY.days * US_PER_DAY - 1
    assert set(leaky.column("at").cast(pa.int64()).to_pylist()) == {end}
    assert leaky.column("request_id").to_pylist() == ids
    # late plays: event mode at the same instants sees plays as_known does not know yet
    changed = result.summary["training"]["late_facts_changed_rows"]
    assert changed["minutes_7d"] > 0 and changed["requests_1d"] == 0


def test_time_split_auc_from_real_models(tiny: tuple[Store, DemoResult, str]) -> None:
    _, result, text = tiny
    t = result.summary["training"]
    assert t["split"] == {"test_days_from": 1}
    models = t["models"]
    pit, leak, prod = (models["point_in_time"], models["leaky_offline"],
                       models["leaky_in_production"])
    for m in (pit, leak, prod):
        assert isinstance(m["auc"], float) and 0.0 <= m["auc"] <= 1.0 and m["reason"] is None
        assert m["model"] == "HistGradientBoostingClassifier" and m["iterations"] > 0
        assert m["train_positives"] > 0 and m["test_positives"] > 0
    # the leaky baseline is evaluated the same way: same rows, same split, same labels
    for k in ("train_rows", "test_rows", "train_positives", "test_positives"):
        assert pit[k] == leak[k] == prod[k]
    assert pit["train_rows"] + pit["test_rows"] == t["weighted_rows"]
    assert t["leak_inflation"] == pytest.approx(leak["auc"] - pit["auc"])
    assert "the leak inflates the offline AUC by" in text


def test_report_in_the_store(tiny: tuple[Store, DemoResult, str]) -> None:
    store, result, text = tiny
    prefix = result.report_prefix
    assert prefix.startswith("reports/demo-")
    names = {o.key.rsplit("/", 1)[1] for o in store.list(prefix + "/")}
    pngs = {"facts_per_hour.png", "snapshot_confidence.png", "strata.png", "features.png",
            "roc.png", "leakage.png"}
    assert names == pngs | {"index.md", "summary.json", "labels.parquet",
                            "training_set.parquet"}
    assert store.read_parquet(f"{prefix}/labels.parquet").equals(result.labels)
    assert store.read_parquet(f"{prefix}/training_set.parquet").num_rows == (
        result.training_set.num_rows)
    for name in pngs:
        assert store.get(f"{prefix}/{name}")[:8] == b"\x89PNG\r\n\x1a\n"
    numbers = json.loads(store.get(f"{prefix}/summary.json"))
    assert numbers["training"]["models"]["point_in_time"]["auc"] == (
        result.summary["training"]["models"]["point_in_time"]["auc"])
    runs = numbers["snapshot_runs"]
    assert len(runs) == 4 * 3  # 4 slots in 2 days, 3 services each
    down = [r for r in runs if r["confidence"] < 1.0]
    assert [(r["service"], r["confidence"], r["fetched_ok"]) for r in down] == [
        ("my_list", 0.0, 0)]
    assert down[0]["run_id"] == numbers["simulation"]["outage"]["run"]
    page = store.get(f"{prefix}/index.md").decode()
    for name in pngs:
        assert f"({name})" in page
    assert prefix in text


def test_a_second_demo_into_the_same_store_is_refused(
    tiny: tuple[Store, DemoResult, str]
) -> None:
    from ttstore import TimetravelError

    store, _, _ = tiny
    before = [o.key for o in store.list("facts/")]
    with pytest.raises(TimetravelError) as exc:
        run_demo(store, TINY, out=io.StringIO())
    assert exc.value.code == "demo_store_not_empty" and "--store" in exc.value.message
    assert [o.key for o in store.list("facts/")] == before


def test_a_one_class_demo_reports_undefined_auc(tmp_path: Path) -> None:
    """One member, three requests a day: the test day holds one class; no crash, no number."""
    store = Store(str(tmp_path / "store"))
    out = io.StringIO()
    result = run_demo(store, DemoConfig(members=1, days=2, seed=7, requests_per_day=3), out=out)
    s = result.summary
    assert s["training"]["rows"] == 6
    for m in s["training"]["models"].values():
        assert m["auc"] is None and m["reason"] == "the test days hold only one class"
    assert s["training"]["leak_inflation"] is None
    assert "undefined (the test days hold only one class)" in out.getvalue()
    assert all(v == "ok" for v in s["steps"].values())
    assert store.exists(f"{result.report_prefix}/roc.png")


def test_one_class_split_is_undefined_not_a_crash() -> None:
    x = np.arange(20, dtype=np.float64).reshape(10, 2)
    y_one = np.zeros(10, np.int64)
    y_two = np.array([0, 1] * 5)
    w = np.ones(10)
    got = _fit_score(x, y_one, w, x, y_two, w, 0)
    assert got["auc"] is None and got["reason"] == "the training days hold only one class"
    got = _fit_score(x, y_two, w, x, y_one, w, 0)
    assert got["auc"] is None and got["reason"] == "the test days hold only one class"
    got = _fit_score(x[:0], y_two[:0], w[:0], x, y_two, w, 0)
    assert got["auc"] is None and got["reason"] == "no training rows"


def test_the_same_demo_on_s3_gives_the_same_numbers(
    s3_store: Store, tiny: tuple[Store, DemoResult, str]
) -> None:
    _, local, _ = tiny
    result = run_demo(s3_store, TINY, out=io.StringIO())
    s, ref = result.summary, local.summary

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("store", "timings_s", "report")}

    assert s["parity"]["fact_fed_mismatches"] == 0
    assert strip(s) == strip(ref)
    assert result.training_set.equals(local.training_set)
    assert math.isfinite(s["training"]["models"]["point_in_time"]["auc"])
    assert s3_store.exists(f"{result.report_prefix}/index.md")


def test_demo_cli_rejects_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ttstore._cli import main

    for flags in (["--days", "1"], ["--members", "0"], ["--requests-per-day", "0"]):
        assert main(["demo", "--store", str(tmp_path / "s"), *flags]) == 2
        err = capsys.readouterr().err
        assert flags[0] in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()
