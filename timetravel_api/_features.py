"""Feature names (SPEC §4): parsing, type rules, and the typed :class:`FeatureSpec`.

Forms::

    T.F  /  T.F.last        last non-null value of field F of fact type T (within T's lookback)
    T.F.AGG.W               AGG of the non-null values of F in the window (t - W, t]
    T.count.W               number of visible facts of T in the window
    T.time_since_last       seconds from the last visible fact's event_time to t
    snapshot.S.F            field F of service S's as-of snapshot
    <encoder name>          a named encoder registered in the feature repo

``AGG`` is one of ``count, sum, mean, min, max, first, last, distinct_count`` and ``W`` matches
``^[1-9][0-9]*(s|m|h|d)$``. Every name of a request is checked before any work, and one
:class:`InvalidFeature` lists all the bad ones with their reasons.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from ttstore import AGGREGATIONS, NAME_PATTERN, TIMESTAMP_TYPE, arrow_type

from ._errors import EntityTypeMismatch, InvalidFeature

FeatureKind = Literal["fact_field", "fact_count", "time_since_last", "snapshot", "encoder"]

#: Kinds the fact kernels compute.
FACT_KINDS: frozenset[str] = frozenset(("fact_field", "fact_count", "time_since_last"))

WINDOW_PATTERN = r"^[1-9][0-9]*(s|m|h|d)$"
_WINDOW = re.compile(r"([1-9][0-9]*)(s|m|h|d)")
_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_NAME = re.compile(NAME_PATTERN.rstrip("$").lstrip("^"))

_NUMERIC = frozenset(("int64", "float64", "bool"))
_ORDERED = _NUMERIC | {"string", "timestamp"}
_OPAQUE_AGGS = frozenset(("last", "count"))  # all that json and list fields allow

FORMS = "T.F, T.F.last, T.F.AGG.W, T.count.W, T.time_since_last, snapshot.S.F"


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One parsed feature name.

    Attributes:
        name: the name exactly as requested (also the output column name).
        kind: ``fact_field`` (T.F, T.F.last, T.F.AGG.W), ``fact_count`` (T.count.W),
            ``time_since_last``, ``snapshot`` or ``encoder``.
        entity_type: ``"int64"`` or ``"string"``; None for an encoder that declares none.
        output_type: the Arrow type of the values; None where only the data tells (snapshot
            fields, encoders without a declared type).
        fact_type: T, for the fact kinds.
        entity_name: T's entity key column, for the fact kinds.
        field: F, for ``fact_field`` and ``snapshot``.
        field_type: F's declared type (``int64``, ..., ``list<string>``), for ``fact_field``.
        agg: the aggregation of a ``fact_field`` (``last`` for ``T.F``); ``count`` for
            ``fact_count``.
        window: ``W`` as written (``"7d"``), or None for the unwindowed forms.
        window_us: ``W`` in microseconds (may exceed int64 for absurd windows; kernels clamp).
        lookback_us: T's lookback for the unwindowed forms (None: unbounded).
        service: S, for ``snapshot``.
        encoder: the registered encoder object, for ``encoder``.
    """

    name: str
    kind: FeatureKind
    entity_type: str | None
    output_type: pa.DataType | None
    fact_type: str | None = None
    entity_name: str | None = None
    field: str | None = None
    field_type: str | None = None
    agg: str | None = None
    window: str | None = None
    window_us: int | None = None
    lookback_us: int | None = None
    service: str | None = None
    encoder: Any = None

    @property
    def windowed(self) -> bool:
        return self.window_us is not None

    @property
    def history_us(self) -> int | None:
        """How far before ``at`` a fact can still matter: the window, or for unwindowed forms
        the fact type's lookback. None means unbounded (read all history)."""
        return self.window_us if self.window_us is not None else self.lookback_us

    @property
    def always_ok(self) -> bool:
        """Counts (``count``, ``distinct_count``, ``T.count.W``) are always status ``ok``."""
        return self.kind == "fact_count" or self.agg in ("count", "distinct_count")


def window_us(window: str) -> int:
    """``"7d"`` → microseconds, for a window that matches ``^[1-9][0-9]*(s|m|h|d)$``.

    Raises:
        ValueError: the window is malformed.
    """
    m = _WINDOW.fullmatch(window) if isinstance(window, str) else None
    if m is None:
        raise ValueError(f"malformed window {window!r}: must match {WINDOW_PATTERN}")
    return int(m.group(1)) * _UNIT_US[m.group(2)]


def output_type(agg: str, field_type: str) -> pa.DataType:
    """The Arrow type of ``agg`` over a field of ``field_type`` (SPEC §4)."""
    if agg in ("sum", "mean"):
        return pa.float64()
    if agg in ("count", "distinct_count"):
        return pa.int64()
    if field_type == "timestamp":
        return TIMESTAMP_TYPE
    return arrow_type(field_type)


def agg_type_error(agg: str, field_type: str) -> str | None:
    """Why ``agg`` does not apply to a field of ``field_type``, or None if it does."""
    if field_type == "json" or field_type.startswith("list<"):
        if agg in _OPAQUE_AGGS:
            return None
        return f"{field_type} fields allow only last and count, not {agg}"
    if agg in ("sum", "mean"):
        ok = field_type in _NUMERIC
        allowed = "int64, float64 and bool"
    elif agg in ("min", "max"):
        ok = field_type in _ORDERED
        allowed = "int64, float64, bool, string and timestamp"
    else:
        return None
    return None if ok else f"{agg} applies to {allowed} fields, not to {field_type}"


def parse_features(
    names: Sequence[Any],
    *,
    fact_types: Mapping[str, Any],
    services: Mapping[str, Any] | None = None,
    encoders: Mapping[str, Any] | None = None,
) -> list[FeatureSpec]:
    """Parse and check every feature name of one request, before any work.

    Args:
        names: the requested names, in order.
        fact_types: fact type name → :class:`factlog.FactType` (anything with ``name``,
            ``entity``, ``fields`` and ``lookback_us``).
        services: snapshot service name → anything with an ``entity_type`` attribute (or key).
        encoders: encoder name → the registered encoder (its ``entity_type``, and
            ``output_type`` if it declares one, are read when present). An exact match of an
            encoder name wins over the built-in forms.

    Returns:
        One :class:`FeatureSpec` per name, in order.

    Raises:
        InvalidFeature: listing every malformed, unknown, duplicated or type-invalid name with
            its reason.
        EntityTypeMismatch: the features do not share one entity key type; lists them by type.
    """
    if isinstance(names, str):
        names = [names]
    if len(names) == 0:
        raise InvalidFeature([], message="no features requested")
    specs: list[FeatureSpec] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in names:
        if not isinstance(raw, str):
            problems.append((repr(raw), "a feature name must be a string"))
            continue
        if raw in seen:
            problems.append((raw, "requested more than once"))
            continue
        seen.add(raw)
        try:
            specs.append(_parse_one(raw, fact_types, services or {}, encoders or {}))
        except _Bad as bad:
            problems.append((raw, str(bad)))
    if problems:
        raise InvalidFeature(problems)
    check_entity_types(specs)
    return specs


def check_entity_types(specs: Sequence[FeatureSpec]) -> str | None:
    """The one entity key type that ``specs`` share (None if none declares one).

    Raises:
        EntityTypeMismatch: listing the features per key type.
    """
    by_type: dict[str, list[str]] = {}
    for s in specs:
        if s.entity_type is not None:
            by_type.setdefault(s.entity_type, []).append(s.name)
    if len(by_type) > 1:
        raise EntityTypeMismatch(by_type)
    return next(iter(by_type), None)


class _Bad(Exception):
    """One name's problem (internal; collected into InvalidFeature)."""


def _attr(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _parse_one(
    name: str, fact_types: Mapping[str, Any], services: Mapping[str, Any],
    encoders: Mapping[str, Any],
) -> FeatureSpec:
    if name in encoders:
        enc = encoders[name]
        return FeatureSpec(name=name, kind="encoder", entity_type=_attr(enc, "entity_type"),
                           output_type=_attr(enc, "output_type"), encoder=enc)
    parts = name.split(".")
    if len(parts) < 2 or not all(parts):
        raise _Bad(f"malformed feature name; the forms are {FORMS} or a named encoder")
    head = parts[0]
    if head == "snapshot":
        return _parse_snapshot(name, parts, services)
    ft = fact_types.get(head)
    if ft is None:
        raise _Bad(f"unknown fact type {head!r}")
    ename, etype = ft.entity
    base: dict[str, Any] = {"name": name, "entity_type": etype, "fact_type": head,
                            "entity_name": ename}
    second = parts[1]
    if second == "time_since_last":
        if len(parts) != 2:
            raise _Bad("time_since_last takes no window or aggregation")
        return FeatureSpec(kind="time_since_last", output_type=pa.float64(),
                           lookback_us=ft.lookback_us, agg="last", **base)
    if second == "count":
        if len(parts) != 3:
            raise _Bad(f"{head}.count needs one window, as in {head}.count.7d")
        return FeatureSpec(kind="fact_count", output_type=pa.int64(), agg="count",
                           **_window(parts[2]), **base)
    if second not in ft.fields:
        raise _Bad(f"fact type {head!r} has no field {second!r}")
    ftype: str = ft.fields[second]
    agg = "last" if len(parts) == 2 else parts[2]
    if agg not in AGGREGATIONS:
        raise _Bad(f"unknown aggregation {agg!r}; one of {', '.join(AGGREGATIONS)}")
    win: dict[str, Any] = {"lookback_us": ft.lookback_us}
    if len(parts) == 4:
        win = _window(parts[3])
    elif len(parts) == 3 and agg != "last":
        raise _Bad(f"{agg} needs a window, as in {head}.{second}.{agg}.7d")
    elif len(parts) > 4:
        raise _Bad(f"malformed feature name; the forms are {FORMS}")
    why = agg_type_error(agg, ftype)
    if why is not None:
        raise _Bad(f"field {second!r}: {why}")
    return FeatureSpec(kind="fact_field", output_type=output_type(agg, ftype), field=second,
                       field_type=ftype, agg=agg, **win, **base)


def _window(text: str) -> dict[str, Any]:
    try:
        return {"window": text, "window_us": window_us(text)}
    except ValueError as exc:
        raise _Bad(str(exc)) from None


def _parse_snapshot(name: str, parts: list[str], services: Mapping[str, Any]) -> FeatureSpec:
    if len(parts) != 3:
        raise _Bad("a snapshot feature is snapshot.S.F")
    service, field = parts[1], parts[2]
    if service not in services:
        raise _Bad(f"unknown snapshot service {service!r}")
    if not _NAME.fullmatch(field):
        raise _Bad(f"snapshot field {field!r} is not a valid name")
    return FeatureSpec(name=name, kind="snapshot",
                       entity_type=_attr(services[service], "entity_type"), output_type=None,
                       service=service, field=field)
