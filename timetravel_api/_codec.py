"""JSON and Arrow encodings of the query service's requests and answers (SPEC §1, §4, §7).

JSON conventions, shared by the server and :class:`~timetravel_api.Client`:

- times are RFC 3339 strings; answers always use the ``Z`` form with 6 fractional digits. A time
  without an offset or with more than 6 fractional digits is a 400 naming the field
  (``rows[3].at``).
- ``int64`` values (entity ids and feature values alike) are JSON numbers up to 2^53 in
  magnitude and decimal strings above, where a JSON number would lose digits. A request may give
  an ``int64`` entity id as a number or a decimal string.
- ``float64`` NaN and infinities, which JSON cannot express, are the strings ``"NaN"``,
  ``"Infinity"`` and ``"-Infinity"`` (as in the protobuf JSON mapping). NaN is a value, not a
  null, so it is never encoded as ``null``.
- lists are arrays, ``json`` fields are their JSON value, and a null is ``null``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import TIMESTAMP_TYPE, InvalidInput, format_timestamp, parse_timestamp

#: int64 values larger than this in magnitude travel as decimal strings in JSON.
MAX_SAFE_INT = 2**53
KNOWLEDGE_MODES = ("as_known", "event")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class TooManyRows(InvalidInput):
    """A request with more query rows than the server's ``--max-rows`` (413)."""

    code = "too_many_rows"
    http_status = 413


@dataclass(frozen=True, kw_only=True)
class FeatureRequest:
    """A parsed ``POST /v1/features`` body.

    Attributes:
        entity_ids: the rows' entity ids as given (ints or strings), converted to the features'
            key type later with :func:`entity_array`.
        at_us: the rows' times, int64 microseconds.
        features: the feature names, in requested order.
        knowledge: ``as_known`` or ``event``.
        provenance: whether per-value provenance was asked for.
    """

    entity_ids: list[Any]
    at_us: np.ndarray
    features: list[str]
    knowledge: str
    provenance: bool
    id_field: str = "rows[{i}].entity_id"


def _obj_field(body: Mapping[str, Any], name: str, default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise InvalidInput(f"{name}: required", field=name)
        return default
    return body[name]


def parse_knowledge(value: Any, *, field: str = "knowledge") -> str:
    if value not in KNOWLEDGE_MODES:
        raise InvalidInput(f"{field}: must be as_known or event, not {value!r}", field=field)
    return str(value)


def parse_feature_names(value: Any, *, field: str = "features") -> list[str]:
    """A non-empty list of feature names without duplicates."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value:
        raise InvalidInput(f"{field}: must be a non-empty list of feature names", field=field)
    bad = [i for i, v in enumerate(value) if not isinstance(v, str) or not v]
    if bad:
        raise InvalidInput(f"{field}[{bad[0]}]: a feature name must be a non-empty string",
                           field=f"{field}[{bad[0]}]")
    dups = sorted({v for v in value if value.count(v) > 1})
    if dups:
        raise InvalidInput(f"{field}: requested more than once: {', '.join(dups)}", field=field)
    return list(value)


def parse_feature_request(body: Any, *, max_rows: int) -> FeatureRequest:
    """Check and parse a ``POST /v1/features`` body.

    Raises:
        InvalidInput: naming the offending field (``rows[3].at``, ``features``, ...).
        TooManyRows: more than ``max_rows`` rows (413).
    """
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object with rows and features", field="body")
    unknown = sorted(set(body) - {"rows", "features", "knowledge", "provenance"})
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}", field=unknown[0])
    rows = _obj_field(body, "rows")
    if not isinstance(rows, list):
        raise InvalidInput("rows: must be a list of {entity_id, at}", field="rows")
    if len(rows) > max_rows:
        raise TooManyRows(f"rows: {len(rows)} rows is more than this server's limit of "
                          f"{max_rows} per request; split the request or build a training set",
                          field="rows")
    features = parse_feature_names(_obj_field(body, "features"))
    knowledge = parse_knowledge(body.get("knowledge", "as_known"))
    provenance = body.get("provenance", False)
    if not isinstance(provenance, bool):
        raise InvalidInput("provenance: must be true or false", field="provenance")
    ids: list[Any] = []
    at = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "entity_id" not in row or "at" not in row:
            raise InvalidInput(f"rows[{i}]: must be an object with entity_id and at",
                               field=f"rows[{i}]")
        eid = row["entity_id"]
        if isinstance(eid, bool) or not isinstance(eid, int | str):
            raise InvalidInput(f"rows[{i}].entity_id: must be an integer or a string",
                               field=f"rows[{i}].entity_id")
        ids.append(eid)
        at[i] = parse_timestamp(row["at"], field=f"rows[{i}].at")
    return FeatureRequest(entity_ids=ids, at_us=at, features=features, knowledge=knowledge,
                          provenance=provenance)


def entity_array(values: Sequence[Any], entity_type: str | None, *,
                 field: str = "rows[{i}].entity_id") -> pa.Array:
    """Entity ids from JSON as an Arrow array of the features' key type.

    An ``int64`` key may be a number or a decimal string; a ``string`` key must be a string
    (``"007"`` stays ``"007"``). With no declared type (encoders only), the ids' own JSON type
    decides.

    Raises:
        InvalidInput: an id of the wrong type, naming it (``rows[i].entity_id``); code
            ``entity_type_mismatch``.
    """
    if entity_type is None:
        entity_type = "string" if any(isinstance(v, str) for v in values) else "int64"
    if entity_type == "string":
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise _wrong_entity(field.format(i=i), v, "string")
        return pa.array(values, pa.string())
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        n = v
        if isinstance(v, str):
            s = v.strip()
            body = s[1:] if s[:1] in "+-" else s
            if not body.isdigit() or not body.isascii():
                raise _wrong_entity(field.format(i=i), v, "int64")
            n = int(s)
        if isinstance(n, bool) or not isinstance(n, int) or not _INT64_MIN <= n <= _INT64_MAX:
            raise _wrong_entity(field.format(i=i), v, "int64")
        out[i] = n
    return pa.array(out, pa.int64())


def _wrong_entity(field: str, value: Any, etype: str) -> InvalidInput:
    what = "an integer (or a decimal string)" if etype == "int64" else "a string"
    return InvalidInput(f"{field}: {value!r} is not {what}; the features' entity key type is "
                        f"{etype}", field=field, code="entity_type_mismatch")


# -- JSON answers ---------------------------------------------------------------------------------


def json_float(v: float) -> float | str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def json_int(v: int) -> int | str:
    return v if -MAX_SAFE_INT <= v <= MAX_SAFE_INT else str(v)


def column_to_json(col: pa.Array | pa.ChunkedArray, *, json_text: bool = False) -> list[Any]:
    """An Arrow column as JSON-ready Python values, per the module's conventions.

    Args:
        json_text: the column holds ``json`` field text: answer the parsed JSON value.
    """
    t = col.type
    if pa.types.is_timestamp(t):
        ints = col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64()).to_pylist()
        return [None if v is None else format_timestamp(v) for v in ints]
    if pa.types.is_dictionary(t):
        return column_to_json(col.cast(t.value_type), json_text=json_text)
    if pa.types.is_floating(t):
        return [None if v is None else json_float(v) for v in col.to_pylist()]
    if pa.types.is_integer(t) and t.bit_width == 64:
        return [None if v is None else json_int(v) for v in col.to_pylist()]
    if pa.types.is_struct(t):
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        fields = {t.field(i).name: column_to_json(arr.field(i)) for i in range(t.num_fields)}
        valid = arr.is_valid().to_pylist()
        return [{k: v[r] for k, v in fields.items()} if ok else None
                for r, ok in enumerate(valid)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [None if v is None else [_scalar_json(x) for x in v] for v in col.to_pylist()]
    values = col.to_pylist()
    if json_text:
        return [None if v is None else json.loads(v) for v in values]
    return [_scalar_json(v) for v in values]


def _scalar_json(v: Any) -> Any:
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return json_int(v)
    if hasattr(v, "isoformat") and getattr(v, "tzinfo", None) is not None:
        from datetime import UTC
        return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return v


def table_to_json_rows(table: pa.Table, *, json_columns: frozenset[str] = frozenset()) -> list[
        dict[str, Any]]:
    """Every row of ``table`` as a JSON-ready dict (column → value)."""
    cols = {name: column_to_json(table.column(name), json_text=name in json_columns)
            for name in table.column_names}
    return [{k: v[i] for k, v in cols.items()} for i in range(table.num_rows)]


def feature_rows_json(
    entities: pa.Array,
    at_us: np.ndarray,
    values: pa.Table,
    status: pa.Table,
    *,
    json_columns: frozenset[str] = frozenset(),
    provenance: pa.Table | None = None,
) -> list[dict[str, Any]]:
    """The ``rows`` of a ``POST /v1/features`` answer, in query order."""
    ids = column_to_json(entities)
    ats = [format_timestamp(int(v)) for v in at_us]
    names = values.column_names
    vals = {n: column_to_json(values.column(n), json_text=n in json_columns) for n in names}
    stats = {n: status.column(n).to_pylist() for n in names}
    prov = None if provenance is None else table_to_json_rows(provenance)
    out = []
    for i in range(len(ids)):
        row: dict[str, Any] = {
            "entity_id": ids[i], "at": ats[i],
            "features": {n: vals[n][i] for n in names},
            "status": {n: stats[n][i] for n in names},
        }
        if prov is not None:
            row["provenance"] = prov[i]
        out.append(row)
    return out


# -- Arrow answers --------------------------------------------------------------------------------


def feature_table_arrow(
    entities: pa.Array,
    at_us: np.ndarray,
    values: pa.Table,
    status: pa.Table,
    *,
    provenance: pa.Table | None = None,
) -> pa.Table:
    """The Arrow form of a features answer: ``entity_id``, ``at``, one column per feature in
    requested order, then a ``status`` struct with one string field per feature (and a
    ``provenance`` struct when asked)."""
    names = values.column_names
    cols: dict[str, Any] = {"entity_id": entities, "at": pa.array(at_us, TIMESTAMP_TYPE)}
    for n in names:
        cols[n] = values.column(n)
    arrays = [pa.chunked_array(c) if isinstance(c, pa.Array) else c for c in cols.values()]
    fields = list(cols)
    st = pa.StructArray.from_arrays(
        [status.column(n).combine_chunks().cast(pa.string()) for n in names], names=names) \
        if names else pa.array([{}] * len(at_us), pa.struct([]))
    arrays.append(pa.chunked_array([st]))
    fields.append("status")
    if provenance is not None:
        arrays.append(pa.chunked_array([pa.StructArray.from_arrays(
            [c.combine_chunks() for c in provenance.columns], names=provenance.column_names)]))
        fields.append("provenance")
    return pa.Table.from_arrays(arrays, names=fields)


def arrow_from_ipc(data: bytes) -> pa.Table:
    """An Arrow IPC stream's table."""
    with pa.ipc.open_stream(pa.BufferReader(data)) as reader:
        return reader.read_all()
