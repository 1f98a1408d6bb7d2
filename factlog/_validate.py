"""Turning producer rows into stored Arrow facts, with per-row rejections.

The fast path converts each column in one ``pyarrow.array`` call. Only when a column fails does
a slow path look at that column row by row to find and reject the culprits; the valid rows of the
same call are always kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import (
    RFC3339_PATTERN,
    TIMESTAMP_TYPE,
    InvalidInput,
    arrow_type,
    entity_arrow_type,
    parse_timestamp,
)

from ._facttypes import FactType
from ._ids import uuid7_array

#: How far a producer's clock may run ahead of the logger's.
DEFAULT_SKEW_US = 5 * 1_000_000
_FACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
_INT = re.compile(r"^-?[0-9]{1,19}$")
_PRODUCER_KEYS = ("fact_id", "event_time", "logged_at")


@dataclass(frozen=True)
class Rejection:
    """One rejected row: its index in the call, the field, a code and a message."""

    index: int
    field: str | None
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "code": self.code,
                "message": self.message}


class _Rejects:
    def __init__(self, fact_type: str) -> None:
        self.fact_type = fact_type
        self.by_index: dict[int, Rejection] = {}

    def add(self, index: int, field: str | None, code: str, reason: str) -> None:
        if index not in self.by_index:  # the first problem of a row is the one reported
            where = f", field {field!r}" if field else ""
            self.by_index[index] = Rejection(
                index, field, code, f"fact type {self.fact_type!r}{where}: {reason}"
            )


def _ts_column(values: list[Any], name: str, idx: list[int], rej: _Rejects) -> pa.Array:
    """Strings (RFC 3339 with offset), aware datetimes, or None → timestamp[us, UTC]."""
    kinds = {type(v) for v in values}
    if kinds <= {str, type(None)}:
        arr = pa.array(values, pa.string())
        ok = pc.fill_null(pc.match_substring_regex(arr, RFC3339_PATTERN), True)
        if pc.all(ok).as_py():
            try:
                return arr.cast(TIMESTAMP_TYPE)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # e.g. month 13; found row by row below
    out: list[int | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(parse_timestamp(v, field=name))
        except InvalidInput as exc:
            rej.add(idx[i], name, "invalid_timestamp", exc.message.split(": ", 1)[-1])
            out.append(None)
    return pa.array(out, pa.int64()).cast(TIMESTAMP_TYPE)


def _json_text(v: Any) -> str | None:
    if v is None:
        return None
    return json.dumps(v, sort_keys=True, separators=(",", ":"), allow_nan=False)


# Converting to an explicit type, pyarrow coerces where a producer made a mistake (1.5 → int64 1,
# "ab" → list<string> ["a", "b"], True → float64 1.0). Its type inference does not, so the fast
# path converts by inference and accepts the declared type, or a lossless widening of it.
_WIDENINGS: dict[str, tuple[pa.DataType, ...]] = {
    "int64": (pa.null(),),
    "float64": (pa.null(), pa.int64()),
    "bool": (pa.null(),),
    "string": (pa.null(),),
    "list<int64>": (pa.null(), pa.list_(pa.null())),
    "list<float64>": (pa.null(), pa.list_(pa.null()), pa.list_(pa.int64())),
    "list<string>": (pa.null(), pa.list_(pa.null())),
}


def _inferred(values: list[Any], type_name: str, typ: pa.DataType) -> pa.Array | None:
    """The column, if pyarrow infers ``typ`` (or a lossless widening) for all of it."""
    try:
        arr = pa.array(values)
        if arr.type == typ:
            # Inference still reads a bool after a float as 1.0 ([1.5, True] → double).
            if type_name == "float64" and bool in set(map(type, values)):
                return None
            if type_name == "list<float64>" and bool in set(map(type, chain.from_iterable(
                    v for v in values if v is not None))):
                return None
            return arr
        if arr.type in _WIDENINGS[type_name]:
            return arr.cast(typ)  # a safe cast: raises on precision loss
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
        pass
    return None


def _fits(v: Any, type_name: str) -> bool:
    """Whether one value is of a kind ``type_name`` takes (numpy scalars included)."""
    if v is None:
        return True
    if type_name.startswith("list<"):
        return isinstance(v, list | tuple) and all(_fits(x, type_name[5:-1]) for x in v)
    if isinstance(v, bool | np.bool_):
        return type_name == "bool"
    if type_name == "int64":
        return isinstance(v, int | np.integer)
    if type_name == "float64":
        return isinstance(v, int | float | np.integer | np.floating)
    return isinstance(v, str)


def _value_column(
    values: list[Any], name: str, type_name: str, idx: list[int], rej: _Rejects
) -> pa.Array:
    if type_name == "timestamp":
        return _ts_column(values, name, idx, rej)
    if type_name == "json":
        out = []
        for i, v in enumerate(values):
            try:
                out.append(_json_text(v))
            except (TypeError, ValueError) as exc:
                rej.add(idx[i], name, "invalid_value", f"not a JSON value ({exc})")
                out.append(None)
        return pa.array(out, pa.string())
    typ = arrow_type(type_name)
    arr = _inferred(values, type_name, typ)
    if arr is not None:
        return arr
    fixed: list[Any] = []
    for i, v in enumerate(values):
        ok = _fits(v, type_name)
        if ok:
            try:
                pa.array([v], typ)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError, ValueError):
                ok = False
        if ok:
            fixed.append(v)
        else:
            rej.add(idx[i], name, "invalid_type",
                    f"{v!r} is not a valid {type_name}"[:300])
            fixed.append(None)
    return pa.array(fixed, typ)


def _entity_column(
    values: list[Any], name: str, type_name: str, idx: list[int], rej: _Rejects
) -> pa.Array:
    if type_name == "int64":
        if set(map(type, values)) <= {int}:
            try:
                return pa.array(values, pa.int64())
            except (OverflowError, pa.ArrowInvalid):
                pass
        out: list[int | None] = []
        for i, v in enumerate(values):
            if type(v) is int and -(2**63) <= v < 2**63:
                out.append(v)
            elif isinstance(v, str) and _INT.fullmatch(v) and -(2**63) <= int(v) < 2**63:
                out.append(int(v))  # JSON clients send keys above 2^53 as decimal strings
            else:
                code = "missing_entity" if v is None else "invalid_type"
                rej.add(idx[i], name, code,
                        "entity key is missing" if v is None else f"{v!r} is not an int64 key")
                out.append(None)
        return pa.array(out, pa.int64())
    out_s: list[str | None] = []
    for i, v in enumerate(values):
        if isinstance(v, str) and v:
            out_s.append(v)
        else:
            code = "missing_entity" if v is None else "invalid_type"
            rej.add(idx[i], name, code,
                    "entity key is missing" if v is None else f"{v!r} is not a string key")
            out_s.append(None)
    return pa.array(out_s, entity_arrow_type("string"))


def _get(row: Mapping[str, Any], name: str) -> Any:
    return row.get(name)


def rows_to_table(
    ft: FactType,
    rows: Sequence[Any],
    *,
    logged_at_us: np.ndarray | int,
    now_us: int,
    ingested_at_us: int | None = None,
    producer: str | None,
    allow_logged_at: bool = True,
    skew_us: int = DEFAULT_SKEW_US,
) -> tuple[pa.Table, list[Rejection]]:
    """Validate producer rows and build the stored table (schema :meth:`FactType.arrow_schema`).

    Args:
        ft: the fact type in force.
        rows: flat dicts: the entity key, ``event_time``, fields, optional ``fact_id`` and
            ``logged_at``.
        logged_at_us: when the logger accepted each row (an array), or one time for all.
        now_us: the logger's now, the bound for a producer-supplied ``logged_at``.
        ingested_at_us: this system's receive time; defaults to ``now_us``.
        producer: recorded in the ``producer`` column.
        allow_logged_at: whether a producer may supply ``logged_at`` (imports).
        skew_us: the clock-skew allowance.

    Returns:
        The valid rows as a table, in input order, and the rejections (index into ``rows``).
    """
    rej = _Rejects(ft.name)
    allowed = {ft.entity_name, *ft.fields, *_PRODUCER_KEYS}
    n = len(rows)
    acc = (np.full(n, logged_at_us, dtype=np.int64) if np.ndim(logged_at_us) == 0
           else np.asarray(logged_at_us, dtype=np.int64))
    # Fast path (the FactLogger writer's common case): plain dicts whose keys, all together,
    # are declared. Only otherwise is each row checked on its own.
    present: set[Any] | None = set().union(*rows) if n and set(map(type, rows)) == {dict} \
        else None
    if present is not None and present <= allowed:
        good: list[int] = list(range(n))
        grows: Sequence[Any] = rows
        get: Any = dict.get
    else:
        good = []
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                rej.add(i, None, "invalid_fact", "a fact must be a JSON object")
            elif not r.keys() <= allowed:
                extra = sorted(str(k) for k in r.keys() - allowed)
                rej.add(i, extra[0], "unknown_field", f"unknown field {extra[0]!r}")
            else:
                good.append(i)
        grows = [rows[i] for i in good]
        acc = acc[good]
        get = _get
        present = None

    def column(name: str) -> list[Any]:
        if present is not None and name not in present:
            return [None] * len(grows)
        return list(map(get, grows, repeat(name, len(grows))))

    entity = _entity_column(column(ft.entity_name), ft.entity_name, ft.entity_type, good, rej)
    columns: dict[str, pa.Array] = {}
    for fname, ftype in ft.fields.items():
        columns[fname] = _value_column(column(fname), fname, ftype, good, rej)

    # logged_at: the logger's acceptance time unless supplied (imports).
    sup_logged = column("logged_at")
    if sup_logged.count(None) != len(sup_logged):
        if not allow_logged_at:
            for i, v in enumerate(sup_logged):
                if v is not None:
                    rej.add(good[i], "logged_at", "forbidden",
                            "logged_at may only be supplied with the write scope")
        sup = _ts_column(sup_logged, "logged_at", good, rej).cast(pa.int64())
        sup_np = sup.fill_null(-(2**62)).to_numpy(zero_copy_only=False)
        has = ~np.asarray(sup.is_null().to_numpy(zero_copy_only=False))
        for j in np.nonzero(has & (sup_np > now_us + skew_us))[0]:
            rej.add(good[int(j)], "logged_at", "logged_at_in_future",
                    "logged_at is later than the logger's clock")
        logged = np.where(has, sup_np, acc)
    else:
        logged = acc

    sup_event = column("event_time")
    if sup_event.count(None) == len(sup_event):
        event = logged.copy()  # one reading of the clock (SPEC §1)
    else:
        ev = _ts_column(sup_event, "event_time", good, rej).cast(pa.int64())
        ev_np = ev.fill_null(-(2**62)).to_numpy(zero_copy_only=False)
        has_ev = ~np.asarray(ev.is_null().to_numpy(zero_copy_only=False))
        event = np.where(has_ev, ev_np, logged)
        for j in np.nonzero(event > logged + skew_us)[0]:
            rej.add(good[int(j)], "event_time", "event_after_logged_at",
                    "event_time is later than logged_at: nothing is logged before it happens")

    sup_ids = column("fact_id")
    ids = uuid7_array(logged)
    if sup_ids.count(None) != len(sup_ids):
        merged: list[str] = ids.to_pylist()
        for i, v in enumerate(sup_ids):
            if v is None:
                continue
            if isinstance(v, str) and _FACT_ID.fullmatch(v):
                merged[i] = v
            else:
                rej.add(good[i], "fact_id", "invalid_fact_id",
                        "fact_id must be a string of up to 128 letters, digits and ._:-")
        ids = pa.array(merged, pa.string())

    ing = now_us if ingested_at_us is None else ingested_at_us
    table = pa.Table.from_arrays(
        [
            ids,
            entity,
            pa.array(event, pa.int64()).cast(TIMESTAMP_TYPE),
            pa.array(logged, pa.int64()).cast(TIMESTAMP_TYPE),
            pa.array(np.full(len(grows), ing, dtype=np.int64)).cast(TIMESTAMP_TYPE),
            pa.repeat(pa.scalar(producer, pa.string()), len(grows)),
            *columns.values(),
        ],
        schema=_schema_without_metadata(ft),
    ) if grows else _schema_without_metadata(ft).empty_table()
    if rej.by_index and grows:
        keep = np.array([i not in rej.by_index for i in good], dtype=bool)
        table = table.filter(pa.array(keep))
    rejections = sorted(rej.by_index.values(), key=lambda r: r.index)
    return table, rejections


def _schema_without_metadata(ft: FactType) -> pa.Schema:
    return ft.arrow_schema().remove_metadata()


def table_to_facts(
    ft: FactType,
    table: pa.Table,
    *,
    logged_at_us: int,
    now_us: int,
    ingested_at_us: int | None = None,
    producer: str | None,
    allow_logged_at: bool = True,
    skew_us: int = DEFAULT_SKEW_US,
) -> tuple[pa.Table, list[Rejection]]:
    """The Arrow fast path: validate a producer table column-wise and build the stored table.

    The table needs the entity key and ``event_time`` (``timestamp[us, tz=UTC]``); it may have
    ``fact_id``, ``logged_at`` and any subset of the declared fields. Whole-table problems (a
    wrong column type, an unknown column) raise; per-row problems (null key, event after
    logged_at) reject rows.

    Raises:
        FactValidationError: naming the fact type and column.
    """
    from ._errors import FactValidationError  # noqa: PLC0415

    rej = _Rejects(ft.name)
    schema = ft.arrow_schema()
    cols = set(table.column_names)
    allowed = {ft.entity_name, *ft.fields, *_PRODUCER_KEYS}
    for c in table.column_names:
        if c not in allowed:
            raise FactValidationError(
                f"fact type {ft.name!r}, field {c!r}: unknown field", fact_type=ft.name,
                field=c, code="unknown_field")
    if "event_time" not in cols:
        raise FactValidationError(
            f"fact type {ft.name!r}, field 'event_time': the table needs an event_time column",
            fact_type=ft.name, field="event_time", code="missing_field")
    n = table.num_rows

    def typed(name: str, typ: pa.DataType) -> pa.Array:
        col = table.column(name).combine_chunks()
        if col.type == typ:
            return col
        if pa.types.is_timestamp(typ) and pa.types.is_timestamp(col.type) and col.type.tz:
            return col.cast(typ)  # another unit or zone: same instant
        if pa.types.is_timestamp(typ):
            raise FactValidationError(
                f"fact type {ft.name!r}, field {name!r}: timestamps must be "
                f"timestamp[us, tz=UTC], got {col.type}", fact_type=ft.name, field=name,
                code="invalid_timestamp")
        try:
            return col.cast(typ, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise FactValidationError(
                f"fact type {ft.name!r}, field {name!r}: cannot read {col.type} as {typ} ({exc})",
                fact_type=ft.name, field=name, code="invalid_type") from exc

    entity = typed(ft.entity_name, schema.field(ft.entity_name).type) if ft.entity_name in cols \
        else pa.nulls(n, schema.field(ft.entity_name).type)
    for i in np.nonzero(np.asarray(entity.is_null().to_numpy(zero_copy_only=False)))[0]:
        rej.add(int(i), ft.entity_name, "missing_entity", "entity key is missing")
    event = typed("event_time", TIMESTAMP_TYPE).cast(pa.int64())
    if "logged_at" in cols:
        sup = typed("logged_at", TIMESTAMP_TYPE).cast(pa.int64())
        if not allow_logged_at and sup.null_count < n:
            raise FactValidationError(
                f"fact type {ft.name!r}, field 'logged_at': only the write scope may supply it",
                fact_type=ft.name, field="logged_at", code="forbidden")
        logged = sup.fill_null(logged_at_us).to_numpy(zero_copy_only=False)
        for i in np.nonzero(logged > now_us + skew_us)[0]:
            rej.add(int(i), "logged_at", "logged_at_in_future",
                    "logged_at is later than the logger's clock")
    else:
        logged = np.full(n, logged_at_us, dtype=np.int64)
    ev = event.fill_null(-(2**62)).to_numpy(zero_copy_only=False)
    ev = np.where(np.asarray(event.is_null().to_numpy(zero_copy_only=False)), logged, ev)
    for i in np.nonzero(ev > logged + skew_us)[0]:
        rej.add(int(i), "event_time", "event_after_logged_at",
                "event_time is later than logged_at: nothing is logged before it happens")
    ids = uuid7_array(logged)
    if "fact_id" in cols:
        sup_ids = typed("fact_id", pa.string())
        ids = pc.if_else(sup_ids.is_null(), ids, sup_ids)
    ing = now_us if ingested_at_us is None else ingested_at_us
    arrays = [
        ids, entity, pa.array(ev).cast(TIMESTAMP_TYPE), pa.array(logged).cast(TIMESTAMP_TYPE),
        pa.array(np.full(n, ing, dtype=np.int64)).cast(TIMESTAMP_TYPE),
        pa.repeat(pa.scalar(producer, pa.string()), n),
    ]
    for fname in ft.fields:
        ftype = schema.field(fname).type
        arrays.append(typed(fname, ftype) if fname in cols else pa.nulls(n, ftype))
    out = pa.Table.from_arrays(arrays, schema=_schema_without_metadata(ft))
    if rej.by_index:
        keep = np.ones(n, dtype=bool)
        keep[list(rej.by_index)] = False
        out = out.filter(pa.array(keep))
    return out, sorted(rej.by_index.values(), key=lambda r: r.index)


