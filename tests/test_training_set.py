"""build_training_set and ``timetravel training-set build``: column order, label order, weight,
collisions, lineage in the Parquet file, the same answers as the engine, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from factlog import FactTypeCatalog
from timetravel_api import Engine, build_training_set
from timetravel_api._errors import InvalidFeature
from timetravel_api._training import lineage, write_training_set
from ttstore import (
    TIMESTAMP_TYPE,
    US_PER_S,
    InvalidInput,
    ManualClock,
    Store,
    format_timestamp,
    parse_timestamp,
)

from .factdata import DAY, PLAY, T0, H, random_facts, write_facts
from .test_snapshot_reader import answer, commit_simple_run

FEATURES = ["play.count.1d", "snapshot.history.count", "play.secs.sum.2d", "play.video_id"]
NOW = T0 + 30 * DAY


def make_store(store: Store) -> tuple[Store, str]:
    FactTypeCatalog(store).declare(PLAY)
    rows = random_facts(np.random.default_rng(7), 60, n_entities=4, days=3)
    for r in rows:
        r["meta"] = None
    write_facts(store, PLAY, rows[:30], segment=1)
    write_facts(store, PLAY, rows[30:], segment=2)
    run = commit_simple_run(store, T0 + H, T0 + H + 60 * US_PER_S, "history", [
        answer(0, {"count": 3}), answer(1, {"count": 5}), answer(2, status="missing"),
    ], weight=2.5)
    return store, run.run_id


def labels_table(n: int = 40, seed: int = 3) -> pa.Table:
    rng = np.random.default_rng(seed)
    at = T0 + rng.integers(0, 3 * DAY, size=n)
    return pa.table({
        "y": pa.array(rng.random(n)),
        "entity_id": pa.array(rng.integers(0, 6, size=n), pa.int64()),
        "split": pa.array(rng.choice(["train", "test"], size=n)),
        "at": pa.array(at, pa.int64()).cast(TIMESTAMP_TYPE),
    })


def test_columns_order_weight_and_same_answers(local_store: Store) -> None:
    store, _ = make_store(local_store)
    labels = labels_table()
    out = build_training_set(labels, FEATURES, store=store, clock=ManualClock(NOW), workers=1)
    assert out.column_names == [*labels.column_names, *FEATURES, "weight"]
    for c in labels.column_names:
        assert out.column(c).equals(labels.column(c))  # unchanged, label order kept
    res = Engine(store, workers=1).features(labels.column("entity_id"), labels.column("at"),
                                            FEATURES)
    for name in FEATURES:
        assert out.column(name).combine_chunks().equals(res.values.column(name).combine_chunks())
    ents = labels.column("entity_id").to_pylist()
    at = labels.column("at").cast(pa.int64()).to_pylist()
    want_w = [2.5 if e in (0, 1, 2) and t >= T0 + H + 60 * US_PER_S else None
              for e, t in zip(ents, at, strict=True)]
    assert out.column("weight").to_pylist() == want_w
    assert any(w is not None for w in want_w) and any(w is None for w in want_w)
    fresh = [w is not None and t - (T0 + H) <= 48 * H for w, t in zip(want_w, at, strict=True)]
    want_count = [3 if f and e == 0 else 5 if f and e == 1 else None
                  for e, f in zip(ents, fresh, strict=True)]
    assert any(f and e in (0, 1) for e, f in zip(ents, fresh, strict=True))
    assert not all(fresh)  # some rows are stale (48h)
    assert out.column("snapshot.history.count").to_pylist() == want_count
    lin = lineage(out)
    assert lin["features"] == FEATURES and lin["knowledge"] == "as_known"
    assert lin["built_at"] == format_timestamp(NOW)
    assert len(lin["snapshot_runs"]) == 1
    assert lin["fact_partitions"]["play"] == [f"facts/play/date=2027-01-0{d}" for d in (1, 2, 3)]


def test_event_mode_and_no_weight_without_snapshots(local_store: Store) -> None:
    store, _ = make_store(local_store)
    labels = labels_table().rename_columns(["y", "entity_id", "weight", "at"])
    names = ["play.count.1d", "play.secs.sum.2d"]
    out = build_training_set(labels, names, store=store, knowledge="event", workers=1)
    assert out.column_names == ["y", "entity_id", "weight", "at", *names]
    res = Engine(store, workers=1).features(labels.column("entity_id"), labels.column("at"),
                                            names, knowledge="event")
    assert out.select(names).equals(res.values)
    assert lineage(out)["knowledge"] == "event"


def test_label_errors(local_store: Store) -> None:
    store, _ = make_store(local_store)
    labels = labels_table()
    with pytest.raises(InvalidInput, match="named like output"):
        build_training_set(labels.append_column("play.count.1d", labels.column("y")),
                           FEATURES, store=store, workers=1)
    with pytest.raises(InvalidInput, match="named like output"):
        build_training_set(labels.rename_columns(["weight", "entity_id", "split", "at"]),
                           FEATURES, store=store, workers=1)
    naive = labels.set_column(3, "at", labels.column("at").cast(pa.timestamp("us")))
    with pytest.raises(InvalidInput, match="'at'"):
        build_training_set(naive, FEATURES, store=store, workers=1)
    with pytest.raises(InvalidInput, match="entity_id"):
        build_training_set(labels.drop_columns(["entity_id"]), FEATURES, store=store)
    with pytest.raises(InvalidFeature):
        build_training_set(labels, ["play.nope", "snapshot.history.nope"], store=store)
    # different selections behind one row's snapshot features
    commit_simple_run(store, T0 + 2 * H, T0 + 2 * H + 60 * US_PER_S, "profile",
                      [answer(0, {"age": 30})], selection_id="sel-b")
    with pytest.raises(InvalidInput, match="different selections"):
        build_training_set(labels, ["snapshot.history.count", "snapshot.profile.age"],
                           store=store, workers=1)


def test_any_timestamp_unit_and_zone(local_store: Store) -> None:
    store, _ = make_store(local_store)
    labels = labels_table()
    ms_vals = labels.column("at").cast(pa.int64()).to_numpy() // 1000
    ms = labels.set_column(3, "at", pa.array(ms_vals, pa.timestamp("ms", tz="Asia/Tokyo")))
    us = labels.set_column(3, "at", pa.array(ms_vals * 1000, pa.int64()).cast(TIMESTAMP_TYPE))
    a = build_training_set(us, FEATURES, store=store, workers=1)
    b = build_training_set(ms, FEATURES, store=store, workers=1)
    assert b.select([*FEATURES, "weight"]).equals(a.select([*FEATURES, "weight"]))
    assert b.column("at").type == pa.timestamp("ms", tz="Asia/Tokyo")  # labels unchanged


def test_parquet_file_carries_the_lineage(tmp_path: Path, local_store: Store) -> None:
    store, _ = make_store(local_store)
    table = build_training_set(labels_table(), FEATURES, store=store,
                               clock=ManualClock(NOW), workers=1)
    path = write_training_set(table, tmp_path / "train.parquet", store=store)
    meta = pq.read_metadata(path)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    lin = lineage(path)
    assert lin["features"] == FEATURES and lin["built_at"] == format_timestamp(NOW)
    assert lin["store"] == store.url and lin["rows"] == table.num_rows
    assert set(lin) >= {"fact_partitions", "fact_files", "snapshot_runs", "encoder_versions",
                        "knowledge", "complete", "engine"}
    assert pq.read_table(path).equals(table)
    key = write_training_set(table, "store:training/train.parquet", store=store)
    assert key.endswith("training/train.parquet")
    assert store.read_parquet("training/train.parquet").equals(table)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("timetravel")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_builds_the_file(tmp_path: Path, local_store: Store) -> None:
    store, _ = make_store(local_store)
    labels = labels_table()
    pq.write_table(labels, tmp_path / "labels.parquet")
    out = tmp_path / "train.parquet"
    now = format_timestamp(NOW)
    r = _cli("training-set", "build", "--store", store.url, "--labels",
             str(tmp_path / "labels.parquet"), "--features", ",".join(FEATURES[:2]),
             "--features", ",".join(FEATURES[2:]), "--out", str(out), "--now", now,
             "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote 40 rows" in r.stdout
    assert f"event=progress build={out} done=1.00" in r.stderr  # not a terminal: log lines
    got = pq.read_table(out)
    want = build_training_set(labels, FEATURES, store=store, clock=ManualClock(NOW), workers=1)
    assert got.equals(want)
    built = parse_timestamp(lineage(out)["built_at"], field="built_at")
    assert NOW <= built < NOW + 60 * US_PER_S  # the --now clock starts there and advances
    # a user error: one line on stderr, exit 2, no traceback
    bad = _cli("training-set", "build", "--store", store.url, "--labels",
               str(tmp_path / "labels.parquet"), "--features", "play.nope,nope.x",
               "--out", str(tmp_path / "bad.parquet"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "play.nope" in bad.stderr and "nope.x" in bad.stderr
    assert not (tmp_path / "bad.parquet").exists()
    missing = _cli("training-set", "build", "--store", store.url, "--labels",
                   str(tmp_path / "none.parquet"), "--features", "play.count.1d",
                   "--out", str(tmp_path / "bad.parquet"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(
        caplog: pytest.LogCaptureFixture) -> None:
    import io

    from rich.console import Console

    from timetravel_api._training_cli import _progress

    screen = io.StringIO()
    with _progress("out.parquet", terminal=True,
                   console=Console(file=screen, force_terminal=True, width=100)) as update:
        update(0.25)
        update(1.0)
    assert "out.parquet" in screen.getvalue() and "100%" in screen.getvalue()
    with caplog.at_level("INFO", logger="timetravel_api.training_set"), _progress(
            "out.parquet", terminal=False) as update:
        update(0.1)  # within LOG_EVERY_S of the start: not logged
        update(1.0)
    assert [r.getMessage() for r in caplog.records] == [
        "event=progress build=out.parquet done=1.00"]


def test_snapshot_provenance_names_the_run(local_store: Store) -> None:
    store, run_id = make_store(local_store)
    at = [T0 + 2 * H, T0 + 2 * H, T0 + 2 * H, T0]
    res = Engine(store, workers=1).features([0, 2, 5, 0], at, ["snapshot.history.count"],
                                            provenance=True)
    assert res.status.column(0).to_pylist() == ["ok", "missing", "not_sampled", "not_sampled"]
    assert res.values.column(0).to_pylist() == [3, None, None, None]
    assert res.weight is not None and res.weight.to_pylist() == [2.5, 2.5, None, None]
    prov = res.provenance.column(0).to_pylist()
    assert [p["source"] for p in prov] == [run_id, run_id, None, None]
    assert prov[0]["time"].timestamp() * US_PER_S == T0 + H
    assert prov[0]["age_s"] == 3600.0
    assert res.lineage["snapshot_runs"] == [run_id]


def _history_count(view):  # type: ignore[no-untyped-def]
    row = view.snapshot("history")
    return None if row is None else row["count"]


def test_snapshot_fed_encoder_alone_brings_the_design_weight(local_store: Store) -> None:
    """An encoder that reads snapshot rows is a snapshot feature: its rows carry weight."""
    from snapshotter import ServiceConfig
    from timetravel_api import FeatureRepo, encoder, snapshot

    store, _ = make_store(local_store)
    enc = encoder(inputs=[snapshot("history")], output="int64", name="history_count")(
        _history_count)
    repo = FeatureRepo.from_objects(
        [PLAY, ServiceConfig(name="history", url="http://127.0.0.1:9/{entity_id}"), enc])
    labels = labels_table()
    out = build_training_set(labels, ["history_count"], store=store, repo=repo, workers=1)
    assert out.column_names == [*labels.column_names, "history_count", "weight"]
    ents = labels.column("entity_id").to_pylist()
    at = labels.column("at").cast(pa.int64()).to_pylist()
    want_w = [2.5 if e in (0, 1, 2) and t >= T0 + H + 60 * US_PER_S else None
              for e, t in zip(ents, at, strict=True)]
    assert out.column("weight").to_pylist() == want_w
    assert lineage(out)["snapshot_runs"]
