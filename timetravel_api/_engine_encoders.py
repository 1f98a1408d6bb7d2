"""The engine's side of encoder features: read what the encoders declare (facts within their
windows, snapshot rows), then hand it to :func:`._encoders.evaluate_encoders`, the same
callables that ran online."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._encoders import evaluate_encoders
from ._features import FeatureSpec
from ._kernels import UNBOUNDED_US


def encoder_columns(
    facts_reader: Any,
    snapshot_reader: Any,
    specs: Sequence[FeatureSpec],
    entities: pa.Array,
    at_us: np.ndarray,
    *,
    knowledge: str,
    lineage: dict[str, Any],
) -> tuple[dict[str, tuple[pa.Array, np.ndarray]], list[pa.Table]]:
    """Values and statuses of the encoder features ``specs`` for every query row, and the
    as-of snapshot rows the encoders read (the engine takes the design weight from them).

    Reads, per fact type an encoder declares, ``event_time`` in ``[min(at) - largest span,
    max(at)]`` (no lower bound when a span is unbounded) for the queried entities only, and
    per service the as-of rows; records the encoders' versions, fact files and snapshot runs in
    ``lineage``.
    """
    encoders = [s.encoder for s in specs]
    spans: dict[str, list[int | None]] = {}
    for enc in encoders:
        for inp in enc.fact_inputs:
            spans.setdefault(inp.fact_type, []).append(inp.span_us)
    lo = int(at_us.min()) if len(at_us) else 0
    hi = int(at_us.max()) if len(at_us) else 0
    uniq = pc.unique(entities)
    facts: dict[str, pa.Table] = {}
    entity_cols: dict[str, str] = {}
    for name, ss in spans.items():
        unbounded = any(s is None or s >= UNBOUNDED_US for s in ss)
        start = None if unbounded else lo - max(int(s) for s in ss if s is not None)
        ft = facts_reader.fact_type(name)
        entity_cols[name] = ft.entity_name
        facts[name], files = facts_reader.scan_with_files(
            name, entities=uniq, start_us=start, end_us=hi,
            logged_before_us=hi if knowledge == "as_known" else None,
        )
        if not len(uniq):  # nothing was read, but the lineage names what was there
            files = facts_reader.live_files(name, start_us=start, end_us=hi)
        parts = lineage["fact_partitions"].setdefault(name, [])
        keys = lineage["fact_files"].setdefault(name, [])
        parts[:] = sorted({*parts, *(f.key.rsplit("/", 1)[0] for f in files)})
        keys[:] = sorted({*keys, *(f.key for f in files)})
    snapshots: dict[str, pa.Table] = {}
    for service in sorted({s for enc in encoders for s in enc.services}):
        snapshots[service] = snapshot_reader.read(service, entities, at_us,
                                                  knowledge=knowledge, raw_json=True)
        runs = pc.unique(snapshots[service].column("run_id")).to_pylist()
        lineage["snapshot_runs"] = sorted({*lineage["snapshot_runs"],
                                           *(r for r in runs if r is not None)})
    out = evaluate_encoders(encoders, entities, at_us, facts=facts, snapshots=snapshots,
                            knowledge=knowledge, entity_cols=entity_cols)
    for enc in encoders:
        lineage["encoder_versions"][enc.name] = enc.version
    return out, list(snapshots.values())
