"""``timetravel demo``: the whole story, end to end, on a simulated clock.

1. The simulated world serves its microservices; ``snapshot select`` draws a stratified panel
   (Neyman over activity level × plan) from the world's population.
2. For each simulated day: members' organic plays, a fixed budget of recommendation requests to
   the compute app (:mod:`simworld._compute`), impressions logged by the client, plays of
   recommended titles (probability from the member's true state, so there is signal), and some
   plays reported hours late (offline devices), so ``as_known`` matters. Snapshots run at every
   12h slot through the scheduler's slot logic.
3. Every logged fact is read back exactly once; labels come from the logged facts; features from
   ``build_training_set`` (as_known, at each request); a model is trained and scored on the later
   days against a baseline that leaks the latest values (:mod:`simworld._demo_train`).
4. ``parity_report`` recomputes every served value at its ``logged_at``.
5. A report (Markdown, PNG plots, JSON numbers) goes to ``reports/demo-<time>/`` in the store.

Deterministic for a given seed: every random draw is made in one order by one thread.
"""

from __future__ import annotations

import heapq
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow.parquet as pq

from factlog import FactLogger, FactReader
from snapshotter import (
    Cadence,
    ContextSet,
    RunOutcome,
    Scheduler,
    SnapshotRunner,
    save_selection,
    select_contexts,
)
from timetravel_api import FeatureRepo
from ttstore import US_PER_DAY, US_PER_S, Store, TimetravelError, format_timestamp, parse_timestamp

from ._compute import ComputeApp, running_compute_app, sigmoid
from ._server import running_world
from ._services import SimClock
from ._world import DEVICES, GENRES, World

__all__ = ["DemoConfig", "DemoResult", "has_demo_run", "run_demo"]

REPO_PATH = Path(__file__).with_name("demo_repo.py")
TICK_US = 10 * 60 * US_PER_S          # plays are reported in 10-minute batches
SNAPSHOT_EVERY = "12h"
SNAPSHOT_DELAY_US = TICK_US           # the scheduler's run starts one tick after its slot
US_PER_H = 3600 * US_PER_S
OUTAGE_RUN = 3                        # the 4th snapshot run ...
OUTAGE_SERVICE = "my_list"            # ... finds this service down


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo simulates.

    Args:
        members: members of the simulated world.
        days: simulated days.
        seed: everything follows from it.
        start_us: when the simulation starts (UTC midnight recommended).
        requests_per_day: the recommendation request budget per simulated day (default:
            ``members // 3``, at least 150).
        panel_share: share of the population in the snapshot panel.
        late_share: share of plays reported late (6 to 30 hours after they happened).
        test_days: the later days held out for testing (default ``max(1, days // 3)``).
    """

    members: int = 4000
    days: int = 7
    seed: int = 7
    start_us: int = 1_793_491_200_000_000  # 2026-11-01T00:00:00Z
    requests_per_day: int | None = None
    panel_share: float = 0.5
    late_share: float = 0.1
    test_days: int | None = None

    @property
    def budget(self) -> int:
        return self.requests_per_day or max(150, self.members // 3)

    @property
    def held_out_days(self) -> int:
        return self.test_days or max(1, self.days // 3)


@dataclass
class DemoResult:
    """What the demo measured (``summary`` is what ``summary.json`` holds)."""

    summary: dict[str, Any]
    report_prefix: str
    training_set: Any = None
    leaky_set: Any = None
    labels: Any = None
    selection: ContextSet | None = None


class _Post:
    """A tiny JSON POST client of the compute app (the member's device)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __call__(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


def run_demo(store: Store, config: DemoConfig, *, out: TextIO | None = None) -> DemoResult:
    """Run the demo into ``store`` and return its numbers (see the module docstring)."""
    from ._demo_report import write_report  # noqa: PLC0415  (matplotlib on demand)
    from ._demo_train import evaluate_parity, train_and_score  # noqa: PLC0415

    stream = out if out is not None else sys.stdout
    if has_demo_run(store):
        raise TimetravelError(
            f"the store {store.url} already holds a demo run; the demo needs a store of its "
            "own: pass a fresh --store (e.g. --store ./timetravel-demo-2) or remove this one",
            code="demo_store_not_empty")
    t_start = time.perf_counter()
    cfg = config
    world = World(seed=cfg.seed, members=cfg.members, start_us=cfg.start_us)
    clock = SimClock(cfg.start_us - US_PER_H)
    steps: dict[str, str] = {}
    timings: dict[str, float] = {}
    _say(stream, f"Timetravel demo: {cfg.members:,} members, {cfg.days} simulated days from "
         f"{format_timestamp(cfg.start_us)}, {cfg.budget:,} recommendation requests a day, "
         f"seed {cfg.seed}. Store: {store.url}")
    with running_world(world, clock=clock, fault_seed=cfg.seed) as sim, \
            tempfile.TemporaryDirectory(prefix="tt-demo-spool-") as spool:
        old_env = os.environ.get("TIMETRAVEL_DEMO_WORLD")
        os.environ["TIMETRAVEL_DEMO_WORLD"] = sim.url
        try:
            repo = FeatureRepo.load(REPO_PATH)
        finally:
            if old_env is None:
                os.environ.pop("TIMETRAVEL_DEMO_WORLD", None)
            else:
                os.environ["TIMETRAVEL_DEMO_WORLD"] = old_env
        _say(stream, f"[1/7] simulated world at {sim.url}; feature repo {REPO_PATH.name}: "
             f"{len(repo.fact_types)} fact types, {len(repo.services)} snapshot services, "
             f"{len(repo.encoders)} encoders")

        # -- the panel: snapshot select over the world's population ----------------------------
        population = pq.read_table(io.BytesIO(sim.control.population_bytes("parquet")))
        n_panel = max(9, round(cfg.panel_share * cfg.members))
        selection = select_contexts(
            population, n=n_panel, selected_at_us=clock.now_us(), entity="member_id",
            strata=("activity_level", "plan"), allocation="neyman",
            variability_col="expected_minutes_per_day", seed=cfg.seed,
            source=f"{sim.url}/v1/population")
        save_selection(store, selection, report=False, clock=clock)
        steps["panel"] = "ok"
        _say(stream, f"[2/7] panel {selection.selection_id}: {selection.design.sample_size:,} of "
             f"{selection.design.population_size:,} members in "
             f"{len(selection.design.strata_detail)} strata (Neyman)")

        # -- the simulated days ------------------------------------------------------------------
        t0 = time.perf_counter()
        with FactLogger(store=store, producer="demo-recommender", spool_dir=spool, clock=clock,
                        fact_types=list(repo.fact_types.values()), full_policy="block",
                        block_timeout_s=10.0, segment_max_age_s=2.0) as logger:
            app = ComputeApp(repo=repo, logger=logger, clock=clock, world_url=sim.url,
                             world=world, producer_tag=f"demo{cfg.seed}")
            with running_compute_app(app) as running:
                state = sim.state
                assert state is not None

                def set_down(service: str, down: bool) -> None:
                    state.set_faults(service, down=down)

                sim_stats = _simulate(cfg, world, clock, _Post(running.url), store, repo, stream,
                                      set_down)
            logger.flush(timeout_s=120)
        end_us = clock.now_us()
        timings["simulate_s"] = time.perf_counter() - t0
        steps["simulate"] = "ok"

    # -- every logged fact read back exactly once ---------------------------------------------
    reader = FactReader(store)
    read_back: dict[str, dict[str, int]] = {}
    for ft in repo.fact_types:
        raw = reader.scan(ft, dedup=False, columns=["fact_id"]).num_rows
        unique = reader.scan(ft, columns=["fact_id"]).num_rows
        read_back[ft] = {"logged": app.logged.get(ft, 0), "stored_copies": raw, "facts": unique}
    exact = all(v["logged"] == v["stored_copies"] == v["facts"] for v in read_back.values())
    steps["read_back"] = "ok" if exact else "MISMATCH"
    _say(stream, "[4/7] read back: " + ", ".join(
        f"{ft} {v['facts']:,}/{v['logged']:,}" for ft, v in read_back.items())
        + (" - every logged fact exactly once" if exact else " - MISMATCH"))

    # -- training, leakage, parity -------------------------------------------------------------
    t0 = time.perf_counter()
    sim_end_us = cfg.start_us + cfg.days * US_PER_DAY - 1
    train = train_and_score(store, repo, cfg, end_us=sim_end_us, clock_now_us=end_us,
                            say=lambda s: _say(stream, s))
    timings["train_s"] = time.perf_counter() - t0
    steps["training"] = "ok"
    t0 = time.perf_counter()
    parity = evaluate_parity(store, repo, say=lambda s: _say(stream, s))
    timings["parity_s"] = time.perf_counter() - t0
    steps["parity"] = "ok" if parity["fact_fed_mismatches"] == 0 else "MISMATCH"

    timings["total_s"] = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "config": {**asdict(cfg), "requests_per_day": cfg.budget,
                   "test_days": cfg.held_out_days},
        "store": store.url,
        "start": format_timestamp(cfg.start_us),
        "end": format_timestamp(end_us),
        "selection_id": selection.selection_id,
        "panel_size": selection.design.sample_size,
        "simulation": sim_stats,
        "read_back": read_back,
        "training": train["summary"],
        "parity": parity,
        "steps": steps,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    prefix = write_report(store, summary, selection=selection, train=train,
                          population=population)
    summary["report"] = prefix
    _say(stream, f"[7/7] report: {store.url.rstrip('/')}/{prefix}/index.md "
         f"({timings['total_s']:.0f}s in all)")
    _print_summary(stream, summary)
    return DemoResult(summary=summary, report_prefix=prefix,
                      training_set=train["training_set"], leaky_set=train["leaky_set"],
                      labels=train["labels"], selection=selection)


def has_demo_run(store: Store) -> bool:
    """Whether ``store`` already holds a demo run (the demo needs a store of its own)."""
    return bool(store.list("catalog/fact_types/recommendation_request/"))


def _print_summary(out: TextIO, s: dict[str, Any]) -> None:
    t = s["training"]
    _say(out, "")
    _say(out, "Summary")
    _say(out, f"  facts logged        {sum(v['logged'] for v in s['read_back'].values()):,} "
         f"({s['simulation']['late_plays']:,} plays reported late)")
    _say(out, f"  snapshot runs       {s['simulation']['snapshot_runs']} "
         f"(panel of {s['panel_size']:,})")
    _say(out, f"  training rows       {t['rows']:,} requests, {t['positives']:,} played "
         f"within 1h; {t['weighted_rows']:,} with design weights")
    for name in ("point_in_time", "leaky_offline", "leaky_in_production"):
        m = t["models"][name]
        auc = f"{m['auc']:.3f}" if m["auc"] is not None else f"undefined ({m['reason']})"
        _say(out, f"  AUC {name:<20} {auc}")
    if t["leak_inflation"] is not None:
        _say(out, f"  the leak inflates the offline AUC by {t['leak_inflation']:+.3f}")
    p = s["parity"]
    _say(out, f"  parity              {p['requests']:,} requests, fact-fed mismatches "
         f"{p['fact_fed_mismatches']}")
    _say(out, "  steps               " + ", ".join(f"{k}={v}" for k, v in s["steps"].items()))


def _simulate(cfg: DemoConfig, world: World, clock: SimClock, post: _Post, store: Store,
              repo: FeatureRepo, out: TextIO,
              set_down: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
    """Run the simulated days; returns counts."""
    rng = np.random.default_rng(cfg.seed)
    members = np.arange(1, cfg.members + 1, dtype=np.int64)
    cadence = Cadence.parse(every=SNAPSHOT_EVERY)
    runner = SnapshotRunner(store, repo.services, clock=clock)
    outcomes: list[RunOutcome] = []

    def run_slot(slot_us: int) -> RunOutcome:
        # An outage: one service is down during one run. The run still commits (with that
        # service's confidence at 0); readers keep the older good rows, which age.
        outage = set_down if len(outcomes) == OUTAGE_RUN else None
        if outage is not None:
            outage(OUTAGE_SERVICE, True)
        try:
            outcome = runner.run(slot_us)
        finally:
            if outage is not None:
                outage(OUTAGE_SERVICE, False)
        outcomes.append(outcome)
        return outcome

    # Plays waiting to be reported: (report time, sequence, row)
    pending: list[tuple[int, int, dict[str, Any]]] = []
    seq = 0
    late = 0
    requests_by_member: dict[int, list[int]] = defaultdict(list)
    rec_plays_by_member: dict[int, list[int]] = defaultdict(list)
    counts = {"requests": 0, "rec_plays": 0, "organic_plays": 0}
    last_slot: int | None = None

    def schedule_play(row: dict[str, Any]) -> None:
        nonlocal seq, late
        et = int(row["event_time"])
        report = -(-et // TICK_US) * TICK_US  # the end of its 10-minute batch
        if rng.random() < cfg.late_share:  # an offline device: reported hours later
            report += int(rng.uniform(6, 30) * 6) * TICK_US
            late += 1
        seq += 1
        heapq.heappush(pending, (report, seq, row))

    def flush_plays(now_us: int) -> None:
        due = []
        while pending and pending[0][0] <= now_us:
            due.append(heapq.heappop(pending)[2])
        if due:
            due.sort(key=lambda r: (r["event_time"], r["member_id"]))
            post("/v1/events/playback", {"rows": due})

    for day in range(cfg.days):
        day_us = cfg.start_us + day * US_PER_DAY
        t_day = time.perf_counter()
        organic = world.plays(members, day_us, day_us + US_PER_DAY, with_device=True)
        for i in range(len(organic.pos)):
            schedule_play({
                "member_id": int(members[organic.pos[i]]),
                "event_time": int(organic.played_at_us[i]),
                "video_id": int(organic.video_id[i]), "genre": GENRES[int(organic.genre[i])],
                "seconds": float(organic.seconds[i]),
                "device": DEVICES[int(organic.device[i])] if organic.device is not None else None,
                "source": "organic", "request_id": None,
            })
        counts["organic_plays"] += len(organic.pos)
        # Requests on a 5-second grid, never in a batch's last 10 seconds.
        grid = np.arange(0, US_PER_DAY, 5 * US_PER_S)
        grid = grid[(grid % TICK_US) < TICK_US - 10 * US_PER_S]
        req_t = np.sort(rng.choice(grid, size=min(cfg.budget, len(grid)), replace=False)) + day_us
        req_m = rng.integers(1, cfg.members + 1, size=len(req_t))
        req_dev = rng.integers(0, len(DEVICES), size=len(req_t))
        r = 0
        for tick in range(1, US_PER_DAY // TICK_US + 1):
            tick_us = day_us + tick * TICK_US
            while r < len(req_t) and req_t[r] < tick_us:
                _one_request(cfg, world, clock, post, rng, int(req_t[r]), int(req_m[r]),
                             DEVICES[int(req_dev[r])], requests_by_member, rec_plays_by_member,
                             schedule_play, counts)
                r += 1
            clock.set(tick_us)
            flush_plays(tick_us)
            slot = cadence.slot_at_or_before(tick_us - SNAPSHOT_DELAY_US)
            if slot != last_slot and slot >= cfg.start_us - SNAPSHOT_DELAY_US:
                last_slot = slot
                # What a scheduler wakes up to at this moment: the slot at or before now.
                Scheduler(cadence=cadence, run_slot=run_slot, clock=clock,
                          stop=threading.Event(), max_ticks=1).run_forever()
        _say(out, f"[3/7] day {day + 1}/{cfg.days} {format_timestamp(day_us)[:10]}: "
             f"{counts['requests']:,} requests, {counts['rec_plays']:,} plays of recommended "
             f"titles, {counts['organic_plays']:,} organic plays so far; snapshot runs "
             f"{len(outcomes)} ({time.perf_counter() - t_day:.1f}s)")
    # The offline devices come back: report the late plays at their times.
    while pending:
        clock.set(max(clock.now_us(), pending[0][0]))
        flush_plays(clock.now_us())
    confid = [min((s.confidence for s in o.manifest.services.values()), default=1.0)
              for o in outcomes if o.manifest is not None]
    return {**counts, "late_plays": late, "snapshot_runs": len(outcomes),
            "outage": {"service": OUTAGE_SERVICE, "run": outcomes[OUTAGE_RUN].run_id}
            if len(outcomes) > OUTAGE_RUN else None,
            "snapshot_min_confidence": min(confid) if confid else None}


def _one_request(
    cfg: DemoConfig, world: World, clock: SimClock, post: Callable[[str, Any], Any],
    rng: np.random.Generator, t_us: int, member: int, device: str,
    requests_by_member: dict[int, list[int]], rec_plays_by_member: dict[int, list[int]],
    schedule_play: Callable[[dict[str, Any]], None], counts: dict[str, int],
) -> None:
    """One recommendation request, the client's impressions, and maybe a play."""
    clock.set(t_us)
    answer = post("/v1/recommend", {"member_id": member, "device": device})
    items = answer["items"]
    counts["requests"] += 1
    clock.set(t_us + 2 * US_PER_S)  # the client renders the titles and logs the impressions
    post("/v1/events/impression", {"rows": [
        {"member_id": member, "request_id": answer["request_id"], "video_id": it["video_id"],
         "genre": it["genre"], "position": it["position"], "score": it["score"]}
        for it in items]})
    # The member decides from their true state (what the services know right now).
    hist = world.viewing_history(member, t_us) or {}
    on_list = set((world.my_list(member, t_us) or {}).get("video_ids") or [])
    last = hist.get("last_played_at")
    recent = last is not None and t_us - _us(last) < US_PER_DAY
    reqs = [t for t in requests_by_member[member] if t > t_us - US_PER_DAY]
    habit = any(t > t_us - 7 * US_PER_DAY for t in rec_plays_by_member[member])
    listed = [it for it in items if it["video_id"] in on_list]
    x = (-2.3 + 0.45 * math.log1p(hist.get("plays_30d", 0)) + 0.9 * recent
         + 0.7 * bool(listed) + 0.5 * (bool(items) and items[0]["genre"] == hist.get(
             "top_genre_30d")) - 0.45 * len(reqs) + 0.8 * habit)
    requests_by_member[member].append(t_us)
    if not items or rng.random() >= sigmoid(x):
        return
    pick = listed[0] if listed else items[int(rng.choice(len(items), p=_position_p(len(items))))]
    delay_us = int((30 + rng.exponential(1800)) * US_PER_S)  # most within the hour
    play_us = t_us + delay_us
    rec_plays_by_member[member].append(play_us)
    counts["rec_plays"] += 1
    runtime = float(world.video_runtime_s[pick["video_id"] - 1])
    schedule_play({
        "member_id": member, "event_time": play_us, "video_id": pick["video_id"],
        "genre": pick["genre"], "seconds": round(runtime * float(rng.uniform(0.2, 1.0)), 1),
        "device": device, "source": "recommendation", "request_id": answer["request_id"],
    })


def _position_p(n: int) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1)
    out: np.ndarray = w / w.sum()
    return out


def _us(text: str) -> int:
    return parse_timestamp(text, field="played_at")
