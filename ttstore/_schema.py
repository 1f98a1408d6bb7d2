"""Arrow schemas and names shared by the writers and the readers."""

from __future__ import annotations

import re

import pyarrow as pa

from ._errors import InvalidInput
from ._time import TIMESTAMP_TYPE

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
_NAME = re.compile(NAME_PATTERN)

#: Aggregations of built-in features (SPEC §4); also reserved as field names.
AGGREGATIONS = ("count", "sum", "mean", "min", "max", "first", "last", "distinct_count")

#: Columns every stored fact has, in this order, before the entity key and the fields.
SYSTEM_COLUMNS = ("fact_id", "event_time", "logged_at", "ingested_at", "producer")
RESERVED_FIELD_NAMES = frozenset((*AGGREGATIONS, "time_since_last", *SYSTEM_COLUMNS))
RESERVED_FACT_TYPE_NAMES = frozenset(("snapshot",))

ENTITY_TYPES = ("int64", "string")

FIELD_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "string": pa.string(),
    "timestamp": TIMESTAMP_TYPE,
    "json": pa.string(),  # any JSON value, stored as its text
    "list<int64>": pa.list_(pa.int64()),
    "list<float64>": pa.list_(pa.float64()),
    "list<string>": pa.list_(pa.string()),
}


def check_name(name: object, *, what: str) -> str:
    """Check a fact type, field or service name against ``^[a-z][a-z0-9_]{0,62}$``.

    Raises:
        InvalidInput: naming ``what``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):  # "$" alone allows "x\n"
        raise InvalidInput(
            f"{what} {name!r} is not a valid name (must match {NAME_PATTERN})",
            field=what,
            code="invalid_name",
        )
    return name


def arrow_type(type_name: str) -> pa.DataType:
    try:
        return FIELD_TYPES[type_name]
    except KeyError:
        raise InvalidInput(
            f"unknown type {type_name!r}; one of {', '.join(FIELD_TYPES)}", code="invalid_type"
        ) from None


def entity_arrow_type(type_name: str) -> pa.DataType:
    if type_name not in ENTITY_TYPES:
        raise InvalidInput(
            f"entity key type {type_name!r} is not int64 or string", code="invalid_type"
        )
    return FIELD_TYPES[type_name]


def system_fields() -> list[pa.Field]:
    return [
        pa.field("fact_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP_TYPE, nullable=False),
        pa.field("logged_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("ingested_at", TIMESTAMP_TYPE, nullable=False),
        pa.field("producer", pa.string()),
    ]
