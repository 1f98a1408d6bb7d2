"""Training sets (SPEC §7): labels (entity, ``at``, label columns) joined point-in-time with
features, and written as Parquet with the lineage in the file's key-value metadata.

Lineage keys (JSON values) in the output's schema metadata, and so in the Parquet file::

    timetravel.features          ["T.F.sum.7d", ...]          requested order
    timetravel.knowledge         "as_known" | "event"
    timetravel.engine            "local" | "spark"
    timetravel.built_at          "2026-11-20T10:00:00.000000Z" (the clock's now)
    timetravel.store             the store URL
    timetravel.fact_partitions   {"T": ["facts/T/date=2026-11-13", ...]}
    timetravel.fact_files        {"T": ["facts/T/date=.../c-....parquet", ...]}
    timetravel.snapshot_runs     ["run id", ...]
    timetravel.encoder_versions  {"encoder name": "version hash"}
    timetravel.complete          true | false
    timetravel.rows              number of rows
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ttstore import Clock, InvalidInput, Store, SystemClock, format_timestamp

from ._engine import Engine, FeatureResult, uses_snapshots

LINEAGE_PREFIX = "timetravel."
#: ``--labels``/``--out`` values with this prefix name a key inside the store.
STORE_PREFIX = "store:"
ENTITY_COLUMN = "entity_id"
AT_COLUMN = "at"


def build_training_set(
    labels: pa.Table | str | os.PathLike[str],
    features: Sequence[str],
    *,
    store: Store | str | None = None,
    repo: Any = None,
    knowledge: str = "as_known",
    engine: str = "local",
    workers: int | None = None,
    clock: Clock | None = None,
    progress: Callable[[float], None] | None = None,
) -> pa.Table:
    """Join ``labels`` with point-in-time-correct ``features`` (SPEC §7).

    Args:
        labels: a table, a local Parquet path, or ``store:KEY`` (a Parquet object in the store),
            with columns ``entity_id`` and ``at`` (a timestamp with a time zone, any unit) plus
            any label columns.
        features: feature names, in output order.
        store: the store (default ``./timetravel-data``).
        repo: a feature repo, for its fact types, services and encoders.
        knowledge: ``as_known`` (default) or ``event``.
        engine: ``local`` (in-process, or a process pool over all cores for big label sets)
            or ``spark``.
        workers: processes for the local engine (default: the number of cores).
        clock: "now", for the build time and the completeness flag.
        progress: called with the fraction done, 0.0 to 1.0.

    Returns:
        The label columns unchanged and in order, one column per feature named exactly as
        requested in the requested order, then ``weight`` (1/pi) when snapshot features are
        requested. Rows keep the label order. The lineage is in the schema metadata (see the
        module docstring).

    Raises:
        InvalidInput: no ``entity_id`` or ``at`` column, a naive or non-timestamp ``at``, or a
            label column named like an output column.
        InvalidFeature: malformed or unknown feature names (all listed), before any work.
        EntityTypeMismatch: ``entity_id`` is not of the features' key type.
    """
    st = store if isinstance(store, Store) else Store(store)
    clock = clock or SystemClock()
    built_at_us = clock.now_us()
    table = read_labels(labels, st)
    eng = Engine(st, repo=repo, clock=clock, workers=workers)
    names = [features] if isinstance(features, str) else list(features)
    specs = eng.parse(names)
    snapshot = uses_snapshots(specs)
    check_label_columns(table, names, weight=snapshot)
    at = table.column(AT_COLUMN)
    res = eng.features(table.column(ENTITY_COLUMN), at, names, knowledge=knowledge,
                       engine=engine, progress=progress)
    return assemble(table, res, engine=engine, built_at_us=built_at_us)


def read_labels(labels: pa.Table | str | os.PathLike[str], store: Store) -> pa.Table:
    """The labels table from a table, a local Parquet path or ``store:KEY``."""
    if isinstance(labels, pa.Table):
        return labels
    text = os.fspath(labels)
    try:
        if text.startswith(STORE_PREFIX):
            return store.read_parquet(text[len(STORE_PREFIX):])
        return pq.read_table(text)
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
        raise InvalidInput(f"cannot read labels {text!r}: {exc}", field="labels") from exc


def check_label_columns(table: pa.Table, features: Sequence[str], *, weight: bool) -> None:
    """Raise :class:`InvalidInput` unless the labels can carry these features."""
    cols = table.column_names
    for need in (ENTITY_COLUMN, AT_COLUMN):
        if need not in cols:
            raise InvalidInput(f"labels need an {need!r} column; they have {cols}",
                               field="labels")
    at_type = table.schema.field(AT_COLUMN).type
    if not pa.types.is_timestamp(at_type):
        raise InvalidInput(f"labels column 'at' must be a timestamp with a time zone, "
                           f"not {at_type}", field="at")
    if at_type.tz is None:
        raise InvalidInput("labels column 'at' holds naive timestamps (no time zone); "
                           "store them as timestamp[us, tz=UTC]", field="at")
    reserved = list(features) + (["weight"] if weight else [])
    clash = [c for c in cols if c in reserved]
    if clash:
        raise InvalidInput(f"label column(s) {clash} are named like output columns; "
                           "rename them", field="labels")
    if len(set(cols)) != len(cols):
        raise InvalidInput("labels have duplicate column names", field="labels")


def assemble(labels: pa.Table, res: FeatureResult, *, engine: str, built_at_us: int) -> pa.Table:
    """Label columns, then the feature columns, then ``weight``; lineage as metadata."""
    arrays = [labels.column(c) for c in labels.column_names]
    names = list(labels.column_names)
    for name in res.values.column_names:
        arrays.append(res.values.column(name))
        names.append(name)
    if res.weight is not None:
        arrays.append(res.weight)
        names.append("weight")
    lin = res.lineage
    meta = {
        "features": lin.get("features", []),
        "knowledge": lin.get("knowledge"),
        "engine": engine,
        "built_at": format_timestamp(built_at_us),
        "store": lin.get("store"),
        "fact_partitions": lin.get("fact_partitions", {}),
        "fact_files": lin.get("fact_files", {}),
        "snapshot_runs": lin.get("snapshot_runs", []),
        "encoder_versions": lin.get("encoder_versions", {}),
        "complete": res.complete,
        "rows": labels.num_rows,
    }
    table = pa.table(arrays, names=names)
    existing = dict(labels.schema.metadata or {})
    existing.update({(LINEAGE_PREFIX + k).encode(): json.dumps(v).encode()
                     for k, v in meta.items()})
    return table.replace_schema_metadata(existing)


def lineage(table_or_path: pa.Table | pa.Schema | str | os.PathLike[str]) -> dict[str, Any]:
    """The lineage of a training set (a table, its schema, or a local Parquet path)."""
    if isinstance(table_or_path, pa.Table):
        schema = table_or_path.schema
    elif isinstance(table_or_path, pa.Schema):
        schema = table_or_path
    else:
        schema = pq.read_schema(os.fspath(table_or_path))
    out = {}
    for k, v in (schema.metadata or {}).items():
        key = k.decode()
        if key.startswith(LINEAGE_PREFIX):
            out[key[len(LINEAGE_PREFIX):]] = json.loads(v)
    return out


def write_training_set(table: pa.Table, out: str | os.PathLike[str], *, store: Store) -> str:
    """Write ``table`` as zstd Parquet to a local path (atomically, by rename) or to
    ``store:KEY`` (create-if-absent). Returns where it went."""
    text = os.fspath(out)
    if text.startswith(STORE_PREFIX):
        k = text[len(STORE_PREFIX):]
        store.write_parquet(k, table)
        return f"{store.url.rstrip('/')}/{k}"
    path = Path(text)
    if path.parent and not path.parent.exists():
        raise InvalidInput(f"the directory of --out {text!r} does not exist", field="out")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)

