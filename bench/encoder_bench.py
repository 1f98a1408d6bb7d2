"""Encoders offline, in memory (no store): ``timetravel_api._encoders.evaluate_encoders``.

    .venv/bin/python -m bench.encoder_bench [--facts 1000000] [--entities 10000]
        [--labels 100000] [--knowledge as_known]

Data as in ``bench.kernel_bench`` (one fact type over 30 days, 5% logged late). Encoder: the sum
of ``value`` over 7 days, with a vectorized batch form (np.add.reduceat over the gathered
windows) and without (the row form, one Python call per label row). Prints the wall time of
each and checks that both give the same values.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pyarrow as pa

from factlog import FactType
from timetravel_api import Batch, Encoder, FeatureRepo, View, encoder, facts
from timetravel_api._encoders import evaluate_encoders

from ._types import Result
from .kernel_bench import make_data

FT = FactType("t", entity=("member_id", "int64"), fields={"value": "float64"})


@encoder(inputs=[facts("t", window="7d")], output="float64")
def value_sum_7d(view: View) -> float:
    vals = [f["value"] for f in view.facts("t") if f["value"] is not None]
    return float(np.add.reduceat(np.array(vals), [0])[0]) if vals else 0.0


@value_sum_7d.batch
def _value_sum_7d(batch: Batch) -> pa.Array:
    flat, off = batch.facts_table("t")
    vals = flat.column("value").to_numpy()
    out = np.zeros(len(batch))
    nonempty = np.flatnonzero(off[1:] > off[:-1])
    if len(nonempty):
        out[nonempty] = np.add.reduceat(vals, off[:-1][nonempty])[: len(nonempty)]
    return pa.array(out)


def full_schema(table: pa.Table) -> pa.Table:
    n = table.num_rows
    ids = pa.array([f"{i:012d}" for i in range(n)])
    return table.append_column("fact_id", ids)


def measure(n_facts: int, n_entities: int, n_labels: int,
            knowledge: str = "as_known") -> dict[str, float | bool]:
    """Wall time of the batch form and the row form on the same data; whether they agree."""
    repo = FeatureRepo.from_objects([FT, value_sum_7d])
    enc = repo.encoders["value_sum_7d"]
    rowwise = Encoder(enc.fn, inputs=enc.inputs, output=enc.output, name=enc.name)
    table, ents, at = make_data(n_facts, n_entities, n_labels, 0.05)
    table = full_schema(table)
    results = {}
    out_figs: dict[str, float | bool] = {}
    for label, e in (("batch form", enc), ("row form", rowwise)):
        t0 = time.perf_counter()
        out = evaluate_encoders([e], ents, at, facts={"t": table}, snapshots={},
                                knowledge=knowledge, entity_cols={"t": "member_id"})
        out_figs[label] = time.perf_counter() - t0
        results[label] = out["value_sum_7d"][0]
    out_figs["same"] = results["batch form"].equals(results["row form"])
    return out_figs


def run(quick: bool) -> list[Result]:
    n_facts, n_entities, n_labels = ((200_000, 5_000, 20_000) if quick
                                     else (1_000_000, 10_000, 100_000))
    figs = measure(n_facts, n_entities, n_labels)
    if not figs["same"]:
        raise AssertionError("encoder batch and row forms give different values")
    note = (f"{n_labels:,} labels over {n_facts:,} facts, {n_entities:,} entities, "
            "sum over 7d, as_known; single run; batch == row checked")
    return [Result(
        metric="evaluate_encoders, batch form (7d sum)", unit="labels/s",
        value=n_labels / float(figs["batch form"]), baseline=n_labels / float(figs["row form"]),
        baseline_name="row form (one Python call per label)", note=note,
    )]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=1_000_000)
    p.add_argument("--entities", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=100_000)
    p.add_argument("--knowledge", default="as_known", choices=("as_known", "event"))
    args = p.parse_args(argv)
    figs = measure(args.facts, args.entities, args.labels, args.knowledge)
    for label in ("batch form", "row form"):
        secs = float(figs[label])
        print(f"{label}: {secs:.3f} s for {args.labels:,} labels over {args.facts:,} facts "
              f"({args.labels / secs:,.0f} labels/s)")
    same = figs["same"]
    print(f"batch == row: {same}")
    if not same:
        print("batch and row forms differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
