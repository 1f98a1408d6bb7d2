"""Online/offline parity: a simulated service assembles live views, runs the repo's encoders,
logs its facts and the served values with a real FactLogger; parity_report recomputes them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from factlog import FactLogger
from timetravel_api import (
    Encoder,
    FeatureRepo,
    View,
    log_served_features,
    parity_report,
    served_features_type,
)
from timetravel_api._parity import encode_value
from ttstore import ManualClock, Store, format_timestamp

from .logger_helpers import FAST

FIXTURE = Path(__file__).parent / "fixtures" / "feature_repo.py"
S = 1_000_000
DAY = 86_400 * S
T0 = 1_798_761_600_000_000  # 2027-01-01
FACT_FED = ("minutes_7d", "distinct_videos_1d", "last_query", "mean_stars_30d")


def make_repo() -> FeatureRepo:
    base = FeatureRepo.load(FIXTURE)
    return FeatureRepo.from_objects(
        [*base.fact_types.values(), served_features_type(("member_id", "int64")),
         *base.services.values(), *base.encoders.values()], source=str(FIXTURE))


class Service:
    """A compute app: per request it fetches the member's facts so far, adds the ones it is
    about to log, computes the features online, then logs the facts and the served values."""

    def __init__(self, logger: FactLogger, clock: ManualClock, repo: FeatureRepo,
                 online: dict[str, Encoder] | None = None) -> None:
        self.logger, self.clock, self.repo = logger, clock, repo
        self.online = online or {}
        self.history: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.n = 0
        self.served: list[dict[str, Any]] = []

    def _id(self) -> str:
        self.n += 1
        return f"svc-{self.n:08d}"

    def request(self, rng: random.Random, member: int) -> None:
        now = self.clock.now_us()
        new: dict[str, list[dict[str, Any]]] = {"playback": [], "search": [], "rating": []}
        for _ in range(rng.randint(0, 2)):
            row: dict[str, Any] = {"member_id": member, "fact_id": self._id(),
                                   "video_id": rng.randint(1, 6),
                                   "seconds": rng.choice([0.1, 1e-7, 3.3, 1e9, None]),
                                   "device": "tv", "meta": {"k": [1, "x"]}}
            if rng.random() < 0.3:  # a late report of an earlier play
                row["event_time"] = format_timestamp(now - rng.randint(1, 3 * DAY))
            new["playback"].append(row)
        if rng.random() < 0.5:
            new["search"].append({"member_id": member, "fact_id": self._id(),
                                  "query": rng.choice(["a", "b", None]), "results": 3})
        if rng.random() < 0.2:
            new["rating"].append({"member_id": member, "fact_id": self._id(),
                                  "stars": rng.choice([0, 3, 5])})
        fetched = {ft: list(self.history.get((ft, member), [])) for ft in new}
        view = View.live(member, now, facts={ft: fetched[ft] + new[ft] for ft in new},
                         snapshots={"viewing_history": {"titles": member % 7}})
        values: dict[str, Any] = {}
        for name, enc in self.repo.encoders.items():
            run = self.online.get(name, enc)
            value, _status = run.evaluate(view)
            values[name] = value
        # the facts first, then the served values: all logged at ``now``
        for ft, rows in new.items():
            for r in rows:
                assert self.logger.log(ft, r)
                stored = dict(r, logged_at=now, event_time=r.get("event_time", now))
                self.history.setdefault((ft, member), []).append(stored)
        rid = f"req-{len(self.served)}"
        assert log_served_features(self.logger, member, values, request_id=rid,
                                   versions=self.repo.versions, entity_name="member_id")
        self.served.append({"request_id": rid, "member": member, "at": now, "values": values})


def simulate(store: Store, tmp_path: Path, repo: FeatureRepo, *, requests: int, seed: int,
             online: dict[str, Encoder] | None = None) -> Service:
    clock = ManualClock(T0)
    rng = random.Random(seed)
    with FactLogger(store=store, producer="svc", fact_types=list(repo.fact_types.values()),
                    spool_dir=tmp_path / "spool", clock=clock, **FAST) as logger:
        svc = Service(logger, clock, repo, online)
        for _ in range(requests):
            clock.advance(rng.choice([1, 1000, 3_600 * S, DAY, 2 * DAY]))
            svc.request(rng, rng.randint(1, 5))
        logger.flush(timeout_s=30)
    return svc


def test_parity_holds_for_fact_fed_encoders(store: Store, tmp_path: Path) -> None:
    repo = make_repo()
    svc = simulate(store, tmp_path, repo, requests=60, seed=7)
    report = parity_report(store, repo)
    assert report.requests == 60
    assert report.fact_fed_mismatches == []
    assert report.ok
    for name in FACT_FED:
        assert report.compared[name] == 60
    # the simulation exercised what matters: values, nulls and errors were served
    served = [r["values"] for r in svc.served]
    assert any(v["minutes_7d"] not in (None, 0.0) for v in served)
    assert any(v["last_query"] is not None for v in served)
    assert any(v["distinct_videos_1d"] is None for v in served)
    # the snapshot-fed encoder approximates by design: no snapshot was ever taken here, so
    # offline it is not_sampled, and the report says so instead of failing parity
    hist = report.staleness["history_plus_today"]["viewing_history"]
    assert hist.statuses == {"not_sampled": 60} and hist.rows == 0 and hist.p50_s is None
    assert {m.feature for m in report.mismatches} <= {"history_plus_today"}
    assert all(not m.fact_fed for m in report.mismatches)
    assert report.versions == {n: e.version for n, e in repo.encoders.items()}
    doc = report.to_json()
    assert doc["ok"] is True and doc["fact_fed_mismatches"] == 0


def test_skewed_online_encoder_is_reported(local_store: Store, tmp_path: Path) -> None:
    repo = make_repo()
    real = repo.encoders["minutes_7d"]

    def skewed_fn(view: View) -> float:  # a "fix" deployed online only: +1 past two plays
        secs = [f["seconds"] for f in view.facts("playback") if f["seconds"] is not None]
        return float(sum(secs)) / 60 + (1.0 if len(secs) > 2 else 0.0)

    skewed = Encoder(skewed_fn, inputs=real.inputs, output="float64", name="minutes_7d")
    svc = simulate(local_store, tmp_path, repo, requests=40, seed=3,
                   online={"minutes_7d": skewed})
    report = parity_report(local_store, repo)
    bad = [m for m in report.fact_fed_mismatches if m.feature == "minutes_7d"]
    assert bad and not report.ok
    assert {m.feature for m in report.fact_fed_mismatches} == {"minutes_7d"}
    by_id = {r["request_id"]: r for r in svc.served}
    for m in bad:
        assert m.online == by_id[m.request_id]["values"]["minutes_7d"]
        assert m.online != m.offline and m.at_us == by_id[m.request_id]["at"]
    # only windows with more than two plays were skewed
    assert 0 < len(bad) < 40


def test_version_skew_is_not_compared(local_store: Store, tmp_path: Path) -> None:
    repo = make_repo()
    clock = ManualClock(T0)
    with FactLogger(store=local_store, producer="svc", fact_types=list(repo.fact_types.values()),
                    spool_dir=tmp_path / "spool", clock=clock, **FAST) as logger:
        log_served_features(logger, 1, {"minutes_7d": 99.0, "gone": 1},
                            request_id="r1", versions={"minutes_7d": "0000000000000000"},
                            entity_name="member_id")
        log_served_features(logger, 1, {"minutes_7d": 0.0}, request_id="r2",
                            versions=repo.versions, entity_name="member_id")
        logger.flush(timeout_s=30)
    report = parity_report(local_store, repo)
    assert report.version_skew == {"minutes_7d": 1}
    assert report.unknown == {"gone": 1}
    assert report.compared == {"minutes_7d": 1} and report.mismatches == []
    assert parity_report(local_store, repo, since=T0 + 1).requests == 0
    assert parity_report(local_store, repo, until=T0).requests == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.0, 1e-300, [1.5, None]])
def test_encode_value_survives_json(value: Any) -> None:
    import json
    import math

    from timetravel_api._parity import _decode_value

    back = _decode_value(json.loads(json.dumps(encode_value(value), allow_nan=False)))
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value and repr(back) == repr(value)


def test_snapshot_fed_staleness_from_real_runs(local_store: Store, tmp_path: Path) -> None:
    """Snapshot runs every 2 days (max_staleness 48h): the report's ages are exactly ``at`` minus
    the latest capture before it, and values match online whenever the snapshot was fresh."""
    import numpy as np
    import pyarrow as pa

    from snapshotter import LocalFetcher, SnapshotRunner, save_selection, select_contexts

    repo = make_repo()
    pop = pa.table({"entity_id": pa.array([1, 2, 3, 4, 5], pa.int64())})
    cs = select_contexts(pop, n=5, selected_at_us=T0 - DAY)
    save_selection(local_store, cs, report=False, clock=ManualClock(T0 - DAY))
    services = {"viewing_history": repo.services["viewing_history"]}
    captures = []
    for k in range(0, 8, 2):  # the requests run on past the last one: stale rows
        slot = T0 + k * DAY
        SnapshotRunner(local_store, services, clock=ManualClock(slot + 60 * S),
                       fetcher_factory=lambda cfg, q: LocalFetcher(lambda e: {"titles": e % 7}),
                       ).run(slot)
        captures.append(slot + 60 * S)
    svc = simulate(local_store, tmp_path, repo, requests=30, seed=11)
    report = parity_report(local_store, repo)
    assert report.ok and report.compared["history_plus_today"] == 30
    ages, statuses = [], []
    for r in svc.served:
        before = [c for c in captures if c <= r["at"]]
        if not before:
            statuses.append("not_sampled")
            continue
        age = (r["at"] - before[-1]) / S
        ages.append(age)
        statuses.append("stale" if age > 48 * 3600 else "ok")
    st = report.staleness["history_plus_today"]["viewing_history"]
    assert st.rows == len(ages) > 0
    assert st.p50_s == float(np.percentile(ages, 50))
    assert st.p90_s == float(np.percentile(ages, 90)) and st.max_s == max(ages)
    assert st.statuses == {s: statuses.count(s) for s in set(statuses)}
    assert st.statuses["ok"] > 0 and len(st.statuses) > 1  # fresh rows and stale/absent ones
    # fresh snapshots hold the same titles the service fetched live: values agree there
    wrong = {m.request_id for m in report.mismatches}
    fresh = {r["request_id"] for r, s in zip(svc.served, statuses, strict=True) if s == "ok"}
    assert wrong == {r["request_id"] for r in svc.served} - fresh


def test_parity_cli(local_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                    ) -> None:
    import json

    from ttstore._cli import main

    repo = make_repo()
    simulate(local_store, tmp_path, repo, requests=12, seed=5)
    args = ["parity", "--store", str(local_store.url), "--repo", str(FIXTURE)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "requests: 12" in text and "fact-fed mismatches: 0 (parity holds)" in text
    assert "minutes_7d [" in text and "12 compared, 0 differ" in text
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["requests"] == 12 and doc["fact_fed_mismatches"] == 0
    assert doc["compared"]["last_query"] == 12
    skewed = make_repo()
    real = skewed.encoders["last_query"]
    bad = Encoder(lambda v: "never", inputs=real.inputs, output="string", name="last_query")
    other = Store(str(tmp_path / "skewed-store"))
    simulate(other, tmp_path / "2", skewed, requests=3, seed=6, online={"last_query": bad})
    assert main(["parity", "--store", str(other.url), "--repo", str(FIXTURE)]) == 1
    out = capsys.readouterr().out
    assert "fact-fed mismatches: 3" in out and out.count("mismatch last_query") == 3


def test_parity_through_the_engine_matches(local_store: Store, tmp_path: Path) -> None:
    """The engine (the path the API, the SDK and training sets take) gives the same offline
    values as the encoders run here directly."""
    from timetravel_api import Engine

    repo = make_repo()
    simulate(local_store, tmp_path, repo, requests=30, seed=13)
    engine = Engine(local_store, repo=repo)
    direct = parity_report(local_store, repo)
    via_engine = parity_report(local_store, repo, engine=engine)
    assert via_engine.fact_fed_mismatches == [] and via_engine.compared == direct.compared
    assert via_engine.mismatches == direct.mismatches
    assert via_engine.staleness == direct.staleness
