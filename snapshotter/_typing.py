"""JSON answers to typed columns, with types frozen at a service's first committed run.

Top-level scalar fields of a service's JSON answer (numbers, booleans, strings) whose names match
``^[a-z][a-z0-9_]{0,62}$`` become typed Parquet columns named ``p_<field>``. The prefix keeps
payload columns apart from the system columns (:data:`SYSTEM_COLUMNS`), whatever the service
answers. Nested values, nulls and fields with other names stay only in ``raw_json``.

Types (SPEC §2):

- the first committed run that sees a field fixes its type: ``int64``, ``float64``, ``bool`` or
  ``string``;
- an ``int64`` field widens to ``float64`` when a later value is fractional (old files are read
  with a cast);
- any other value that does not fit its field's type (a string in a number field, an int beyond
  int64) is null in the column and stays in ``raw_json``.

Within one run, a chunk's kinds are inferred in row order (the first kind seen wins; int and float
unify to float), and the run unifies its chunks in (shard, chunk) order, on top of the frozen
types. The frozen types of service ``S`` are versioned objects at
``snapshots/services/S/types/v000001.json`` written (create-if-absent) by each run commit that
adds or widens a field, just before the run's manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ttstore import NAME_PATTERN, ObjectExists, Store, key

from ._errors import RunConflict

#: Columns every snapshot row has (payload columns are ``p_<field>`` and never collide).
SYSTEM_COLUMNS = (
    "run_id",
    "entity_id",
    "captured_at",
    "status",
    "error_kind",
    "attempts",
    "latency_ms",
    "weight",
    "raw_json",
)
PAYLOAD_PREFIX = "p_"
KINDS: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
}
_FIELD = re.compile(NAME_PATTERN)
_EMPTY: dict[str, Any] = {}
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
TYPES_PREFIX = "snapshots/services"


def column_name(field: str) -> str:
    """The stored column of payload field ``field``."""
    return PAYLOAD_PREFIX + field


def field_name(column: str) -> str | None:
    """The payload field stored in ``column``, or None for a system column."""
    return column[len(PAYLOAD_PREFIX) :] if column.startswith(PAYLOAD_PREFIX) else None


_KIND_OF: dict[type, str] = {bool: "bool", int: "int64", float: "float64", str: "string"}
#: Python types a column of each kind takes as is (anything else goes through ``_fits``).
_TAKES: dict[str, frozenset[type]] = {
    "int64": frozenset((int, type(None))),
    "float64": frozenset((float, int, type(None))),
    "bool": frozenset((bool, type(None))),
    "string": frozenset((str, type(None))),
}


def _merge_kind(have: str | None, seen: str) -> str:
    if have is None:
        return seen
    if have == "int64" and seen == "float64":
        return "float64"
    return have  # float stays float for ints; a conflicting kind does not change the type


def field_values(payloads: Sequence[Mapping[str, Any] | None]) -> dict[str, list[Any]]:
    """The values of every typed-name field, column by column (None where absent), fields in
    name order."""
    rows = [p if type(p) is dict else (dict(p) if p else _EMPTY) for p in payloads]
    names: set[str] = set().union(*rows)
    valid = sorted(n for n in names if isinstance(n, str) and _FIELD.fullmatch(n))
    # map over dict.get runs in C: this is the per-row cost of a run, so it matters.
    return {n: list(map(dict.get, rows, repeat(n, len(rows)))) for n in valid}


def _column_kind(values: list[Any]) -> str | None:
    """The kind of one field's values, in row order: the first scalar kind seen wins, and an
    int field with any float becomes float."""
    present = set(map(type, values)) & _KIND_OF.keys()
    if not present:
        return None
    if len(present) == 1:
        return _KIND_OF[next(iter(present))]
    first = next(_KIND_OF[type(v)] for v in values if type(v) in _KIND_OF)
    return _merge_kind(first, "float64") if float in present else first


def infer_kinds(
    payloads: Sequence[Mapping[str, Any] | None],
    *,
    values: Mapping[str, list[Any]] | None = None,
) -> dict[str, str]:
    """The kinds of the typed fields seen in ``payloads`` (first kind in row order wins; int
    and float unify to float), in field-name order."""
    cols = field_values(payloads) if values is None else values
    out = {}
    for name, vals in cols.items():
        k = _column_kind(vals)
        if k is not None:
            out[name] = k
    return out


def unify(frozen: Mapping[str, str], observed: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The run's types: ``frozen`` plus, in order, fields first seen in ``observed``; an int64
    field (frozen or not) widens to float64 when any observation is float64."""
    out = dict(frozen)
    for obs in observed:
        for name, k in obs.items():
            out[name] = _merge_kind(out.get(name), k)
    return out


def _fits(value: object, kind: str) -> bool:
    if kind == "int64":
        return type(value) is int and _INT64_MIN <= value <= _INT64_MAX
    if kind == "float64":
        return type(value) is float or (type(value) is int and abs(value) < 2**1023)
    if kind == "bool":
        return type(value) is bool
    return type(value) is str


def _typed_array(values: list[Any], kind: str) -> pa.Array:
    target = KINDS[kind]
    if set(map(type, values)) <= _TAKES[kind]:
        try:
            return pa.array(values, type=target)
        except (OverflowError, pa.ArrowInvalid):
            pass  # an int beyond int64: the per-value path below nulls it
    return pa.array([v if v is not None and _fits(v, kind) else None for v in values], target)


def payload_columns(
    payloads: Sequence[Mapping[str, Any] | None],
    types: Mapping[str, str],
    *,
    values: Mapping[str, list[Any]] | None = None,
) -> dict[str, pa.Array]:
    """One typed Arrow column per field of ``types`` (named ``p_<field>``); values that do not
    fit, and absent fields, are null."""
    cols = field_values(payloads) if values is None else values
    n = len(payloads)
    out: dict[str, pa.Array] = {}
    for name, kind in types.items():
        vals = cols.get(name)
        out[column_name(name)] = (
            pa.nulls(n, KINDS[kind]) if vals is None else _typed_array(vals, kind)
        )
    return out


def conform(table: pa.Table, types: Mapping[str, str]) -> pa.Table:
    """``table`` with its payload columns made exactly ``types``, in that order: int64 widened
    to float64 where the type widened, absent or non-fitting columns null, others dropped."""
    system = [c for c in table.column_names if field_name(c) is None]
    cols = [table.column(c) for c in system]
    names = list(system)
    n = table.num_rows
    for name, kind in types.items():
        target = KINDS[kind]
        col = column_name(name)
        if col in table.column_names:
            have = table.column(col)
            if have.type == target:
                cols.append(have)
            elif pa.types.is_integer(have.type) and target == pa.float64():
                cols.append(pc.cast(have, target))
            else:
                cols.append(pa.nulls(n, target))
        else:
            cols.append(pa.nulls(n, target))
        names.append(col)
    return pa.Table.from_arrays(cols, names=names)


# -- the frozen types record ------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceTypes:
    """A version of a service's frozen payload types."""

    service: str
    version: int
    fields: dict[str, str]

    def to_json(self) -> bytes:
        body = {"service": self.service, "version": self.version, "fields": self.fields}
        return json.dumps(body, indent=1).encode()


def _types_key(service: str, version: int) -> str:
    return key(TYPES_PREFIX, service, "types", f"v{version:06d}.json")


def load_types(store: Store, service: str) -> ServiceTypes:
    """The latest frozen types of ``service`` (version 0, no fields, before its first run)."""
    keys = [o.key for o in store.list(key(TYPES_PREFIX, service, "types"))]
    keys = [k for k in keys if k.endswith(".json")]
    if not keys:
        return ServiceTypes(service, 0, {})
    body = json.loads(store.get(max(keys)))
    return ServiceTypes(service, int(body["version"]), dict(body["fields"]))


def freeze_types(
    store: Store, service: str, observed: Sequence[Mapping[str, str]], *, attempts: int = 20
) -> ServiceTypes:
    """Unify ``observed`` with the latest frozen types and record a new version if anything was
    added or widened. Concurrent committers race on create-if-absent; a loser re-reads."""
    for _ in range(attempts):
        current = load_types(store, service)
        fields = unify(current.fields, observed)
        if fields == current.fields:
            return current
        new = ServiceTypes(service, current.version + 1, fields)
        try:
            store.put_if_absent(_types_key(service, new.version), new.to_json())
        except ObjectExists:
            continue
        return new
    raise RunConflict(f"could not record the payload types of {service!r}: {attempts} concurrent "
                      "commits won the race; retry the run")
