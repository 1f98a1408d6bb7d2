"""The demo's data-science half: labels from the logged facts, a point-in-time training set,
a time-split model with design weights, the leaky baseline, and the parity check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factlog import FactReader
from timetravel_api import Engine, FeatureRepo, build_training_set, parity_report
from ttstore import TIMESTAMP_TYPE, US_PER_DAY, US_PER_S, ManualClock, Store

LABEL_WINDOW_US = 3600 * US_PER_S
#: Built-in features (no code) next to the repo's encoders. A built-in snapshot feature also
#: brings the sample design's ``weight`` column into the training set.
BUILT_IN_FEATURES = ("impression.count.7d", "playback.seconds.mean.7d",
                     "snapshot.viewing_history.plays_30d")


def build_labels(store: Store, start_us: int) -> pa.Table:
    """One row per recommendation request: ``entity_id``, ``at`` (when it was served),
    ``request_id``, ``day`` (simulated day index) and ``played_1h`` (1 if the member played one of
    the titles shown within the hour after it, from the logged facts, by ``event_time``)."""
    reader = FactReader(store)
    req = reader.scan("recommendation_request", columns=["member_id", "event_time", "request_id"])
    imp = reader.scan("impression", columns=["member_id", "request_id", "video_id"])
    plays = reader.scan("playback", columns=["member_id", "video_id", "event_time"])
    req_df = req.to_pandas()
    req_df["at_us"] = req.column("event_time").cast(pa.int64()).to_numpy()
    shown = imp.to_pandas().merge(req_df[["request_id", "at_us"]], on="request_id")
    play_df = plays.to_pandas()
    play_df["play_us"] = plays.column("event_time").cast(pa.int64()).to_numpy()
    hits = shown.merge(play_df[["member_id", "video_id", "play_us"]],
                       on=["member_id", "video_id"])
    hits = hits[(hits.play_us > hits.at_us) & (hits.play_us <= hits.at_us + LABEL_WINDOW_US)]
    played = set(hits.request_id)
    req_df = req_df.sort_values(["at_us", "request_id"], kind="stable")
    at_us = req_df.at_us.to_numpy(np.int64)
    return pa.table({
        "entity_id": pa.array(req_df.member_id.to_numpy(np.int64), pa.int64()),
        "at": pa.array(at_us, pa.int64()).cast(TIMESTAMP_TYPE),
        "request_id": pa.array(req_df.request_id.tolist(), pa.string()),
        "day": pa.array((at_us - start_us) // US_PER_DAY, pa.int64()),
        "played_1h": pa.array([int(r in played) for r in req_df.request_id], pa.int64()),
    })


def _matrix(table: pa.Table, features: list[str]) -> np.ndarray:
    cols = [pc.cast(table.column(f), pa.float64()).to_numpy(zero_copy_only=False)
            for f in features]
    return np.column_stack([np.asarray(c, np.float64) for c in cols]) if cols else np.empty(
        (table.num_rows, 0))


def _fit_score(x_tr: np.ndarray, y_tr: np.ndarray, w_tr: np.ndarray, x_te: np.ndarray,
               y_te: np.ndarray, w_te: np.ndarray, seed: int) -> dict[str, Any]:
    """Train with ``sample_weight`` and score ROC AUC on the held-out rows (weighted too)."""
    from sklearn.ensemble import HistGradientBoostingClassifier  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score, roc_curve  # noqa: PLC0415

    base = {"train_rows": int(len(y_tr)), "test_rows": int(len(y_te)),
            "train_positives": int(y_tr.sum()), "test_positives": int(y_te.sum())}
    if len(y_tr) == 0 or len(np.unique(y_tr)) < 2:
        return {**base, "auc": None, "reason": "the training days hold only one class"
                if len(y_tr) else "no training rows"}
    if len(y_te) == 0 or len(np.unique(y_te)) < 2:
        return {**base, "auc": None, "reason": "the test days hold only one class"
                if len(y_te) else "no test rows"}
    keep = ~np.all(np.isnan(x_tr), axis=0)  # a feature with no value at all cannot be binned
    x_tr, x_te = x_tr[:, keep], x_te[:, keep]
    model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.05, max_leaf_nodes=15,
                                           min_samples_leaf=20, l2_regularization=1.0,
                                           early_stopping=False, random_state=seed)
    from threadpoolctl import threadpool_limits  # noqa: PLC0415  (a scikit-learn dependency)

    with threadpool_limits(limits=1):  # small data: OpenMP threads cost more than they give
        model.fit(x_tr, y_tr, sample_weight=w_tr)
        p = model.predict_proba(x_te)[:, 1]
    fpr, tpr, _ = roc_curve(y_te, p, sample_weight=w_te)
    return {**base, "auc": float(roc_auc_score(y_te, p, sample_weight=w_te)), "reason": None,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "model": type(model).__name__, "iterations": int(model.n_iter_)}


def train_and_score(store: Store, repo: FeatureRepo, cfg: Any, *, end_us: int,
                    clock_now_us: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Labels, the point-in-time training set, the leaky one, and three scores:

    - ``point_in_time``: trained and tested on features as of each request (as_known);
    - ``leaky_offline``: trained and tested on the latest values (event mode at the end);
    - ``leaky_in_production``: the leaky model scored on what serving really sees (the
      point-in-time test features): what the leak costs once deployed.
    """
    labels = build_labels(store, cfg.start_us)
    features = [*repo.encoders, *BUILT_IN_FEATURES]
    clock = ManualClock(clock_now_us)
    pit = build_training_set(labels, features, store=store, repo=repo, knowledge="as_known",
                             clock=clock)
    # The latest values: every feature as of the end of the simulated days, late facts included.
    leaky_labels = labels.set_column(
        1, "at", pa.array(np.full(labels.num_rows, end_us, np.int64)).cast(TIMESTAMP_TYPE))
    leaky = build_training_set(leaky_labels, features, store=store, repo=repo,
                               knowledge="event", clock=clock)
    # The same instants in event mode: late facts count as if known on time. The rows whose
    # values differ are the ones as_known protects.
    event = build_training_set(labels, features, store=store, repo=repo, knowledge="event",
                               clock=clock)
    late_changed = {f: int(sum(a != b for a, b in zip(pit.column(f).to_pylist(),
                                                       event.column(f).to_pylist(), strict=True)))
                    for f in features}
    y = labels.column("played_1h").to_numpy()
    day = labels.column("day").to_numpy()
    weight = pc.fill_null(pit.column("weight"), np.nan).to_numpy(zero_copy_only=False)
    sampled = ~np.isnan(weight)  # rows with snapshot features need the panel's design weight
    test = day >= cfg.days - cfg.held_out_days
    tr, te = sampled & ~test, sampled & test
    say(f"[5/7] training set: {pit.num_rows:,} rows (one per request), {len(features)} "
        f"features, {int(y.sum()):,} played within 1h; {int(sampled.sum()):,} rows of panel "
        f"members carry design weights; train days < {cfg.days - cfg.held_out_days}, "
        f"test days >= {cfg.days - cfg.held_out_days}")
    changed = {f: n for f, n in late_changed.items() if n}
    say("      late facts: as_known vs event mode at the same instants differ in "
        + (", ".join(f"{f} ({n:,} rows)" for f, n in changed.items()) or "no feature"))
    x_pit, x_leak = _matrix(pit, features), _matrix(leaky, features)
    models = {
        "point_in_time": _fit_score(x_pit[tr], y[tr], weight[tr], x_pit[te], y[te], weight[te],
                                    cfg.seed),
        "leaky_offline": _fit_score(x_leak[tr], y[tr], weight[tr], x_leak[te], y[te],
                                    weight[te], cfg.seed),
    }
    if models["leaky_offline"]["auc"] is not None:
        models["leaky_in_production"] = _fit_score(x_leak[tr], y[tr], weight[tr], x_pit[te],
                                                   y[te], weight[te], cfg.seed)
    else:
        models["leaky_in_production"] = {**models["leaky_offline"]}
    honest, leak = models["point_in_time"]["auc"], models["leaky_offline"]["auc"]
    inflation = None if honest is None or leak is None else leak - honest
    for name, m in models.items():
        say(f"      AUC {name}: " + (f"{m['auc']:.3f}" if m["auc"] is not None
                                     else f"undefined ({m['reason']})"))
    summary = {
        "rows": pit.num_rows, "positives": int(y.sum()), "weighted_rows": int(sampled.sum()),
        "features": features, "split": {"test_days_from": cfg.days - cfg.held_out_days},
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "roc"} for k, v in models.items()},
        "leak_inflation": inflation,
        "late_facts_changed_rows": late_changed,
        "weight_sum_by_day": {int(d): float(weight[sampled & (day == d)].sum())
                              for d in np.unique(day)},
    }
    return {"summary": summary, "models": models, "labels": labels, "training_set": pit,
            "leaky_set": leaky, "features": features}


def evaluate_parity(store: Store, repo: FeatureRepo, *, say: Callable[[str], None]) -> dict[
    str, Any
]:
    """``parity_report`` over every served request, at its ``logged_at``, reconstructed by the
    same :class:`Engine` that builds training sets."""
    report = parity_report(store, repo, engine=Engine(store, repo=repo))
    fact_fed = [n for n, e in repo.encoders.items() if e.fact_fed]
    say(f"[6/7] parity over {report.requests:,} served requests at their logged_at: "
        f"fact-fed encoders ({', '.join(fact_fed)}) mismatches: "
        f"{len(report.fact_fed_mismatches)}")
    staleness: dict[str, Any] = {}
    for enc, by in report.staleness.items():
        for service, st in by.items():
            staleness[enc] = {"service": service, **st.to_json()}
            p50 = "-" if st.p50_s is None else f"{st.p50_s / 3600:.1f}h"
            p90 = "-" if st.p90_s is None else f"{st.p90_s / 3600:.1f}h"
            mx = "-" if st.max_s is None else f"{st.max_s / 3600:.1f}h"
            say(f"      {enc} ({service} snapshots): age p50 {p50}, p90 {p90}, max {mx}; "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(st.statuses.items())))
    snap_mismatch = sum(1 for m in report.mismatches if not m.fact_fed)
    return {"requests": report.requests, "compared": report.compared,
            "fact_fed_mismatches": len(report.fact_fed_mismatches),
            "snapshot_fed_differences": snap_mismatch, "staleness": staleness,
            "version_skew": report.version_skew,
            "examples": [m.to_json() for m in report.fact_fed_mismatches[:5]]}
