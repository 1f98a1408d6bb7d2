"""Online/offline parity (SPEC §5): services log the feature values they served; the report
recomputes each one offline at the request's ``logged_at`` and compares.

The convention: a fact type ``served_features`` (see :func:`served_features_type`) with the
request's entity key and the fields ``request_id`` (string), ``values`` (json: encoder name →
value, see :func:`encode_value`) and ``encoder_versions`` (json: encoder name → version). A
service logs the facts it used FIRST, then the served values with
:func:`log_served_features`, so every fact it used was logged at or before the served fact's
``logged_at``, the instant parity is checked at (SPEC §3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from factlog import FactReader, FactType, UnknownFactType
from snapshotter import SnapshotReader
from ttstore import InvalidInput, Store, format_timestamp, parse_timestamp, to_datetime

from ._encoders import Encoder, evaluate_encoders

__all__ = [
    "SERVED_FEATURES",
    "Mismatch",
    "ParityReport",
    "Staleness",
    "encode_value",
    "log_served_features",
    "parity_report",
    "served_features_type",
]

SERVED_FEATURES = "served_features"


def served_features_type(
    entity: tuple[str, str] = ("entity_id", "int64"), *, name: str = SERVED_FEATURES,
) -> FactType:
    """The fact type services log their served feature values to (declare it in the repo and
    give it to the :class:`factlog.FactLogger`)."""
    return FactType(name, entity=entity, fields={
        "request_id": "string", "values": "json", "encoder_versions": "json"})


def encode_value(value: Any) -> Any:
    """A feature value as logged JSON: timestamps as RFC 3339 (``Z``, 6 digits), NaN and
    infinities as ``{"$float": "nan" | "inf" | "-inf"}`` (JSON has none), lists element-wise."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, datetime):
        return format_timestamp(parse_timestamp(value, field="value"))
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"$float"}:
        return float(value["$float"])
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


def log_served_features(
    logger: Any, entity: Any, values: Mapping[str, Any], *, request_id: str,
    versions: Mapping[str, str], fact_type: str = SERVED_FEATURES, entity_name: str = "entity_id",
) -> bool:
    """Log the feature values one request served (after the facts it used).

    Args:
        logger: a :class:`factlog.FactLogger` that declares ``fact_type``.
        entity: the request's entity key.
        values: encoder name → the value served (as :meth:`Encoder.evaluate` gave it).
        request_id: the request's id.
        versions: encoder name → :attr:`Encoder.version` of the code that ran.
        entity_name: the entity key's name in ``fact_type``.

    Returns:
        What ``logger.log`` returned (False: dropped, and counted by the logger).
    """
    row = {entity_name: entity, "request_id": request_id,
           "values": {k: encode_value(v) for k, v in values.items()},
           "encoder_versions": dict(versions)}
    return bool(logger.log(fact_type, row))


@dataclass(frozen=True)
class Mismatch:
    """One served value that the offline reconstruction does not reproduce."""

    request_id: str | None
    entity: Any
    at_us: int
    feature: str
    online: Any
    offline: Any
    offline_status: str
    fact_fed: bool

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "entity": self.entity,
                "at": format_timestamp(self.at_us), "feature": self.feature,
                "online": encode_value(self.online), "offline": encode_value(self.offline),
                "offline_status": self.offline_status, "fact_fed": self.fact_fed}


@dataclass(frozen=True)
class Staleness:
    """Ages (seconds, ``at - captured_at``) of the snapshot rows one encoder's requests used."""

    rows: int
    p50_s: float | None
    p90_s: float | None
    max_s: float | None
    statuses: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "p50_s": self.p50_s, "p90_s": self.p90_s,
                "max_s": self.max_s, "statuses": self.statuses}


@dataclass(frozen=True)
class ParityReport:
    """What :func:`parity_report` found.

    Attributes:
        requests: served requests examined.
        compared: encoder → values compared.
        mismatches: every value that differs (fact-fed and snapshot-fed).
        staleness: snapshot-fed encoder → service → the ages of the rows used.
        version_skew: encoder → requests served by another version of its code (not compared).
        unknown: logged names that are not encoders of the repo → requests.
        versions: encoder → the repo's current version.
    """

    requests: int
    compared: dict[str, int]
    mismatches: list[Mismatch]
    staleness: dict[str, dict[str, Staleness]]
    version_skew: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def fact_fed_mismatches(self) -> list[Mismatch]:
        """Mismatches of encoders that read only facts: parity requires none."""
        return [m for m in self.mismatches if m.fact_fed]

    @property
    def ok(self) -> bool:
        return not self.fact_fed_mismatches

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "compared": self.compared, "ok": self.ok,
                "fact_fed_mismatches": len(self.fact_fed_mismatches),
                "mismatches": [m.to_json() for m in self.mismatches],
                "staleness": {e: {s: st.to_json() for s, st in by.items()}
                              for e, by in self.staleness.items()},
                "version_skew": self.version_skew, "unknown": self.unknown,
                "versions": self.versions}


def parity_report(
    store: Store | str, repo: Any, *, fact_type: str = SERVED_FEATURES, engine: Any = None,
    since: Any = None, until: Any = None, knowledge: str = "as_known",
) -> ParityReport:
    """Recompute every logged served value at its request's ``logged_at`` and compare.

    Args:
        store: the store (or its URL).
        repo: the :class:`FeatureRepo` whose encoders served the values.
        fact_type: where the served values were logged.
        engine: an :class:`Engine` (anything with ``features(entities, at, names,
            knowledge=)`` returning ``values`` and ``status`` tables) to reconstruct with;
            None: the encoders run here on facts and snapshots read directly.
        since, until: only requests logged in ``[since, until]`` (RFC 3339, datetime or µs).
        knowledge: ``as_known`` (what parity means) or ``event``.

    Returns:
        A :class:`ParityReport`; values are equal when their canonical JSON is (floats exact).

    Raises:
        UnknownFactType: ``fact_type`` was never declared.
        StoreUnavailable: the store could not be read.
    """
    st = store if isinstance(store, Store) else Store(store)
    reader = FactReader(st)
    ft = reader.fact_type(fact_type)
    since_us = _time(since, "since")
    until_us = _time(until, "until")
    served = reader.scan(fact_type, end_us=until_us, logged_before_us=until_us)
    at_all = served.column("logged_at").combine_chunks().cast(pa.int64()).to_numpy()
    if since_us is not None:
        served = served.filter(pa.array(at_all >= since_us))
        at_all = at_all[at_all >= since_us]
    ents = served.column(ft.entity_name).combine_chunks()
    req_ids = served.column("request_id").to_pylist()
    values = [json.loads(v) if v else {} for v in served.column("values").to_pylist()]
    logged_versions = [json.loads(v) if v else {}
                       for v in served.column("encoder_versions").to_pylist()]

    encoders = dict(getattr(repo, "encoders", {}) or {})
    unknown: dict[str, int] = {}
    used: list[Encoder] = []
    for vals in values:
        for name in vals:
            if name in encoders:
                if encoders[name] not in used:
                    used.append(encoders[name])
            else:
                unknown[name] = unknown.get(name, 0) + 1
    offline, snaps = _reconstruct(st, repo, used, ents, at_all, knowledge, engine)

    compared: dict[str, int] = {}
    skew: dict[str, int] = {}
    mismatches: list[Mismatch] = []
    py_ents = ents.to_pylist()
    for enc in used:
        off_vals, off_status = offline[enc.name]
        off_py = off_vals.to_pylist()
        for q, vals in enumerate(values):
            if enc.name not in vals:
                continue
            if logged_versions[q].get(enc.name, enc.version) != enc.version:
                skew[enc.name] = skew.get(enc.name, 0) + 1
                continue
            compared[enc.name] = compared.get(enc.name, 0) + 1
            online = _decode_value(vals[enc.name])
            if not _same(enc, online, off_py[q]):
                mismatches.append(Mismatch(req_ids[q], py_ents[q], int(at_all[q]), enc.name,
                                           online, off_py[q], str(off_status[q]), enc.fact_fed))
    staleness = {
        enc.name: {s: _staleness(snaps[s], [enc.name in v for v in values]) for s in enc.services}
        for enc in used if not enc.fact_fed
    }
    return ParityReport(requests=served.num_rows, compared=compared, mismatches=mismatches,
                        staleness=staleness, version_skew=skew, unknown=unknown,
                        versions={e.name: e.version for e in used})


def _time(value: Any, name: str) -> int | None:
    if value is None:
        return None
    return int(value) if isinstance(value, int) else parse_timestamp(value, field=name)


def _canonical(enc: Encoder, value: Any) -> str:
    return json.dumps(encode_value(value), sort_keys=True, separators=(",", ":"))


def _same(enc: Encoder, online: Any, offline: Any) -> bool:
    if isinstance(online, str) and enc.output == "timestamp":
        online = to_datetime(parse_timestamp(online, field="value"))
    try:
        online = enc.coerce(online)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return _canonical(enc, online) == _canonical(enc, offline)


def _staleness(table: pa.Table, rows: Sequence[bool]) -> Staleness:
    mask = np.asarray(rows, dtype=bool)
    status = table.column("status").to_numpy(zero_copy_only=False)[mask]
    age = table.column("age_s").to_numpy(zero_copy_only=False)[mask]
    used = np.isin(status, ("ok", "missing", "stale"))
    ages = np.asarray(age[used], dtype=np.float64)
    ages = ages[~np.isnan(ages)]
    counts = {str(k): int(v) for k, v in zip(*np.unique(status.astype(str), return_counts=True),
                                             strict=True)}
    if len(ages) == 0:
        return Staleness(rows=0, p50_s=None, p90_s=None, max_s=None, statuses=counts)
    return Staleness(rows=len(ages), p50_s=float(np.percentile(ages, 50)),
                     p90_s=float(np.percentile(ages, 90)), max_s=float(ages.max()),
                     statuses=counts)


def _reconstruct(
    store: Store, repo: Any, encoders: Sequence[Encoder], entities: pa.Array, at_us: np.ndarray,
    knowledge: str, engine: Any,
) -> tuple[dict[str, tuple[pa.Array, np.ndarray]], dict[str, pa.Table]]:
    """Offline values of ``encoders`` at each (entity, at), and the snapshot rows behind them."""
    services = sorted({s for e in encoders for s in e.services})
    snaps = {s: _read_snapshot(store, s, entities, at_us, knowledge) for s in services}
    if not encoders or len(at_us) == 0:
        return {e.name: (pa.nulls(len(at_us)), np.full(len(at_us), "missing", dtype=object))
                for e in encoders}, snaps
    if engine is not None:
        res = engine.features(entities, at_us, [e.name for e in encoders], knowledge=knowledge)
        return {e.name: (res.values.column(e.name).combine_chunks(),
                         res.status.column(e.name).to_numpy(zero_copy_only=False))
                for e in encoders}, snaps
    reader = FactReader(store)
    facts: dict[str, pa.Table] = {}
    cols: dict[str, str] = {}
    for e in encoders:
        for inp in e.fact_inputs:
            cols[inp.fact_type] = repo.fact_types[inp.fact_type].entity_name
    for name in cols:
        spans = [i.span_us for e in encoders for i in e.fact_inputs if i.fact_type == name]
        span = None if any(s is None for s in spans) else max(s for s in spans if s is not None)
        start = None if span is None else max(int(at_us.min()) - span, -(2**62))
        ft: FactType = repo.fact_types[name]
        try:
            keys = entities.unique().cast(ft.arrow_schema().field(ft.entity_name).type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInput(f"served entity keys do not fit {name!r}'s key type",
                               field="entity") from exc
        try:
            facts[name] = reader.scan(name, entities=keys, start_us=start,
                                      end_us=int(at_us.max()))
        except UnknownFactType:
            facts[name] = ft.arrow_schema().empty_table()
    values = evaluate_encoders(encoders, entities, at_us, facts=facts, snapshots=snaps,
                               knowledge=knowledge, entity_cols=cols)
    return values, snaps


def _read_snapshot(
    store: Store, service: str, entities: pa.Array, at_us: np.ndarray, knowledge: str,
) -> pa.Table:
    reader = SnapshotReader(store)
    if service in reader.services():
        return reader.read(service, entities, at_us, knowledge=knowledge,  # type: ignore[arg-type]
                           raw_json=True)
    n = len(at_us)
    return pa.table({"status": pa.array(["not_sampled"] * n, pa.string()),
                     "age_s": pa.nulls(n, pa.float64()), "raw_json": pa.nulls(n, pa.string()),
                     "payload": pa.nulls(n, pa.struct([]))})
