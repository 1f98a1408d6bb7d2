"""The demo's report: PNG plots (matplotlib), a Markdown page and the numbers as JSON, written to
``reports/demo-<time>/`` in the store."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from factlog import FactReader  # noqa: E402
from snapshotter import ContextSet, SnapshotReader  # noqa: E402
from ttstore import US_PER_S, ObjectExists, Store, key  # noqa: E402

US_PER_H = 3600 * US_PER_S


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _facts_per_hour(store: Store, start_us: int, fact_types: list[str]) -> bytes:
    reader = FactReader(store)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for ft in fact_types:
        t = reader.scan(ft, columns=["event_time"]).column("event_time").cast(pa.int64())
        hours = (t.to_numpy() - start_us) // US_PER_H
        if len(hours):
            counts = np.bincount(hours[hours >= 0])
            ax.plot(np.arange(len(counts)), counts, label=ft, lw=1)
    ax.set_xlabel("simulated hour")
    ax.set_ylabel("facts")
    ax.set_title("Facts per hour by type (event time)")
    if ax.get_lines():
        ax.legend(fontsize=8)
    return _png(fig)


def _snapshot_confidence(store: Store) -> tuple[bytes, list[dict[str, Any]]]:
    runs = SnapshotReader(store).runs()
    rows: list[dict[str, Any]] = [
        {"run_id": r.run_id, "slot_us": r.slot_us, "service": s, "confidence": st.confidence,
         "requested": st.requested, "fetched_ok": st.fetched_ok, "failed": st.failed}
        for r in runs for s, st in r.services.items()]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for service in sorted({r["service"] for r in rows}):
        mine = [r for r in rows if r["service"] == service]
        ax.plot(range(len(mine)), [r["confidence"] for r in mine], marker="o", label=service)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("snapshot run (12h slots)")
    ax.set_ylabel("confidence (ok / requested)")
    ax.set_title("Snapshot confidence per service per run")
    if rows:
        ax.legend(fontsize=8)
    return _png(fig), rows


def _strata(selection: ContextSet) -> bytes:
    d = selection.design
    names = [s.name for s in d.strata_detail]
    pop = np.array([s.population_size for s in d.strata_detail], np.float64)
    smp = np.array([s.sample_size for s in d.strata_detail], np.float64)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(x - 0.2, pop / pop.sum(), 0.4, label="population")
    ax.bar(x + 0.2, smp / smp.sum(), 0.4, label="panel")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share")
    ax.set_title(f"Stratum shares: population vs panel ({d.allocation_used} allocation)")
    ax.legend()
    return _png(fig)


def _features(table: pa.Table, features: list[str]) -> bytes:
    cols = 3
    rows = -(-len(features) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.4 * rows))
    for ax, name in zip(np.ravel(axes), features, strict=False):
        v = pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        v = np.asarray(v, np.float64)
        ok = v[~np.isnan(v)]
        ax.hist(ok, bins=30)
        ax.set_title(f"{name} (null {np.isnan(v).mean():.0%})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in np.ravel(axes)[len(features):]:
        ax.axis("off")
    fig.suptitle("Feature distributions (point-in-time training set)")
    fig.tight_layout()
    return _png(fig)


def _roc(models: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, m in models.items():
        if m.get("roc"):
            ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{name} (AUC {m['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC on the held-out later days")
    if any(m.get("roc") for m in models.values()):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "AUC undefined:\none class in a split", ha="center", va="center")
    return _png(fig)


def _leakage(models: dict[str, Any]) -> bytes:
    names = list(models)
    aucs = [models[n]["auc"] if models[n]["auc"] is not None else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(names, aucs, color=["tab:green", "tab:red", "tab:orange"][: len(names)])
    for b, n in zip(bars, names, strict=True):
        a = models[n]["auc"]
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01,
                f"{a:.3f}" if a is not None else "undefined", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_ylabel("ROC AUC (later days)")
    ax.set_title("What the leak does to the offline score")
    return _png(fig)


def write_report(store: Store, summary: dict[str, Any], *, selection: ContextSet,
                 train: dict[str, Any], population: pa.Table) -> str:
    """Render and store the report; returns its key prefix (``reports/demo-<time>``)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    prefix = key("reports", f"demo-{stamp}")
    start_us = summary["config"]["start_us"]
    plots: dict[str, bytes] = {}
    plots["facts_per_hour.png"] = _facts_per_hour(store, start_us, list(summary["read_back"]))
    plots["snapshot_confidence.png"], runs = _snapshot_confidence(store)
    plots["strata.png"] = _strata(selection)
    plots["features.png"] = _features(train["training_set"], train["features"])
    plots["roc.png"] = _roc(train["models"])
    plots["leakage.png"] = _leakage(train["models"])
    numbers = {**summary, "snapshot_runs": runs}
    files = {**plots, "summary.json": json.dumps(numbers, indent=2, default=str).encode(),
             "index.md": _markdown(summary).encode()}
    # The labels and the training set, to rebuild or extend with the CLI or the SDK.
    for name, table in (("labels.parquet", train["labels"]),
                        ("training_set.parquet", train["training_set"])):
        try:
            store.write_parquet(key(prefix, name), table)
        except ObjectExists:
            store.delete(key(prefix, name))
            store.write_parquet(key(prefix, name), table)
    for name, data in files.items():
        try:
            store.put_if_absent(key(prefix, name), data)
        except ObjectExists:
            store.put(key(prefix, name), data)  # a rerun within the same second
    return prefix


def _auc(m: dict[str, Any]) -> str:
    return f"{m['auc']:.3f}" if m["auc"] is not None else f"undefined: {m['reason']}"


def _markdown(s: dict[str, Any]) -> str:
    t, p, sim = s["training"], s["parity"], s["simulation"]
    lines = [
        "# Timetravel demo report", "",
        f"{s['config']['members']:,} members, {s['config']['days']} simulated days from "
        f"{s['start']} to {s['end']}, {s['config']['requests_per_day']:,} recommendation "
        f"requests a day, seed {s['config']['seed']}. Store: `{s['store']}`.", "",
        "## Services logging facts", "",
        "| fact type | logged | read back |", "| --- | ---: | ---: |",
        *[f"| {ft} | {v['logged']:,} | {v['facts']:,} |" for ft, v in s["read_back"].items()],
        "", f"{sim['late_plays']:,} plays were reported 6-30 hours late (offline devices).", "",
        "![facts per hour](facts_per_hour.png)", "",
        "## Snapshots on a schedule", "",
        f"{sim['snapshot_runs']} runs (every 12h) on panel `{s['selection_id']}` of "
        f"{s['panel_size']:,} members.", "",
        (f"The {sim['outage']['service']} service was down during run "
         f"`{sim['outage']['run']}`: that run committed with its confidence at 0, and readers "
         "kept the older rows (see the staleness below)." if sim.get("outage") else ""), "",
        "![snapshot confidence](snapshot_confidence.png)", "", "![strata](strata.png)", "",
        "## A point-in-time training set", "",
        f"{t['rows']:,} rows, one per recommendation request; label: a recommended title "
        f"played within 1 hour ({t['positives']:,} positives). Features as known at each "
        f"request (`build_training_set`, knowledge `as_known`); {t['weighted_rows']:,} rows "
        "of panel members carry the design weight 1/pi and train the model.", "",
        "Late plays: in event mode at the same instants these features would differ (rows): "
        + (", ".join(f"{f} {n:,}" for f, n in t["late_facts_changed_rows"].items() if n)
           or "none") + ". `as_known` keeps them as the service knew them.", "",
        "![features](features.png)", "",
        "The labels and the training set are next to this page (`labels.parquet`, "
        "`training_set.parquet`). Rebuild it, or add features, with "
        "`timetravel training-set build --repo simworld.demo_repo --labels "
        "store:<this directory>/labels.parquet --features ... --out ts.parquet`.", "",
        "## A model, and what a leak does", "",
        f"Split by time: test days from day {t['split']['test_days_from']}. "
        "HistGradientBoostingClassifier with `sample_weight`.", "",
        "| model | ROC AUC on the later days |", "| --- | --- |",
        *[f"| {n} | {_auc(m)} |" for n, m in t["models"].items()], "",
        ("The leaky baseline (the latest values, event mode at the end of the simulation) "
         f"inflates the offline AUC by {t['leak_inflation']:+.3f}."
         if t["leak_inflation"] is not None else "The leak inflation is undefined here."), "",
        "![roc](roc.png)", "", "![leakage](leakage.png)", "",
        "## Online = offline", "",
        f"Parity over {p['requests']:,} served requests at their `logged_at`: fact-fed "
        f"mismatches **{p['fact_fed_mismatches']}**.", "",
        "| snapshot-fed encoder | service | age p50 (h) | age p90 (h) | statuses |",
        "| --- | --- | ---: | ---: | --- |",
        *[f"| {e} | {v['service']} | {_h(v['p50_s'])} | {_h(v['p90_s'])} | "
          f"{', '.join(f'{k} {n}' for k, n in sorted(v['statuses'].items()))} |"
          for e, v in p["staleness"].items()], "",
    ]
    return "\n".join(lines)


def _h(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.1f}"
