"""Fact type declarations, their validation, and their versioned home in the store.

Each version of a fact type is one immutable JSON object,
``catalog/fact_types/<name>/v000001.json``, created with a conditional put. Two processes that
evolve the same type at once cannot both write the same version: the loser re-reads and retries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ttstore import (
    FIELD_TYPES,
    RESERVED_FACT_TYPE_NAMES,
    RESERVED_FIELD_NAMES,
    InvalidInput,
    ObjectExists,
    Store,
    SystemClock,
    arrow_type,
    check_name,
    entity_arrow_type,
    format_timestamp,
    key,
    parse_duration,
    system_fields,
)

from ._errors import FactTypeError, UnknownFactType

FACT_TYPES_PREFIX = "catalog/fact_types"


@dataclass(frozen=True)
class FactType:
    """A declared kind of fact.

    Args:
        name: matches ``^[a-z][a-z0-9_]{0,62}$``; ``snapshot`` is reserved.
        entity: the entity key's name and type (``"int64"`` or ``"string"``).
        fields: field name → type (``int64``, ``float64``, ``bool``, ``string``, ``timestamp``,
            ``json``, ``list<int64|float64|string>``), in column order.
        lookback: how far unwindowed features look back, such as ``"30d"``; unbounded if None.

    Raises:
        FactTypeError: naming the fact type and the field, for any invalid part.
    """

    name: str
    entity: tuple[str, str] = ("member_id", "int64")
    fields: Mapping[str, str] = field(default_factory=dict)
    lookback: str | None = None

    def __init__(
        self,
        name: str,
        *,
        entity: tuple[str, str] = ("member_id", "int64"),
        fields: Mapping[str, str] | None = None,
        lookback: str | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "entity", tuple(entity))
        object.__setattr__(self, "fields", dict(fields or {}))
        object.__setattr__(self, "lookback", lookback)
        self._validate()

    def _validate(self) -> None:
        name = self.name
        try:
            check_name(name, what="fact type")
        except InvalidInput as exc:
            raise FactTypeError(exc.message, fact_type=str(name), code="invalid_name") from None
        if name in RESERVED_FACT_TYPE_NAMES:
            raise FactTypeError(
                f"fact type {name!r}: the name is reserved", fact_type=name, code="reserved_name"
            )
        if len(self.entity) != 2:
            raise FactTypeError(
                f"fact type {name!r}: entity must be (name, type)", fact_type=name, field="entity"
            )
        ename, etype = self.entity
        self._check_field_name(ename, what="entity key")
        if etype not in ("int64", "string"):
            raise FactTypeError(
                f"fact type {name!r}, entity key {ename!r}: type {etype!r} is not int64 or string",
                fact_type=name, field=str(ename), code="invalid_type",
            )
        for fname, ftype in self.fields.items():
            self._check_field_name(fname, what="field")
            if fname == ename:
                raise FactTypeError(
                    f"fact type {name!r}, field {fname!r}: same name as the entity key",
                    fact_type=name, field=fname, code="reserved_name",
                )
            if ftype not in FIELD_TYPES:
                raise FactTypeError(
                    f"fact type {name!r}, field {fname!r}: unknown type {ftype!r}; one of "
                    + ", ".join(FIELD_TYPES),
                    fact_type=name, field=fname, code="invalid_type",
                )
        if self.lookback is not None:
            try:
                parse_duration(self.lookback, field="lookback")
            except InvalidInput as exc:
                raise FactTypeError(
                    f"fact type {name!r}: {exc.message}", fact_type=name, field="lookback",
                    code="invalid_duration",
                ) from None

    def _check_field_name(self, fname: object, *, what: str) -> None:
        try:
            check_name(fname, what=what)
        except InvalidInput as exc:
            raise FactTypeError(
                f"fact type {self.name!r}: {exc.message}", fact_type=self.name,
                field=str(fname), code="invalid_name",
            ) from None
        if fname in RESERVED_FIELD_NAMES:
            raise FactTypeError(
                f"fact type {self.name!r}, {what} {fname!r}: the name is reserved",
                fact_type=self.name, field=str(fname), code="reserved_name",
            )

    @property
    def entity_name(self) -> str:
        return self.entity[0]

    @property
    def entity_type(self) -> str:
        return self.entity[1]

    @property
    def lookback_us(self) -> int | None:
        return None if self.lookback is None else parse_duration(self.lookback)

    def arrow_schema(self) -> pa.Schema:
        """The stored schema: system columns, the entity key, then the fields in order."""
        fs = system_fields()
        fs.insert(1, pa.field(self.entity_name, entity_arrow_type(self.entity_type), False))
        fs.extend(pa.field(n, arrow_type(t)) for n, t in self.fields.items())
        return pa.schema(fs, metadata={b"timetravel.fact_type": self.name.encode()})

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "entity": {"name": self.entity_name, "type": self.entity_type},
            "fields": dict(self.fields),
        }
        if self.lookback is not None:
            d["lookback"] = self.lookback
        return d

    @classmethod
    def from_json(cls, name: str, body: Mapping[str, Any]) -> FactType:
        """Build from the HTTP/JSON form ``{"entity": {...}, "fields": {...}, "lookback": ...}``.

        Raises:
            FactTypeError: for unknown keys or malformed parts.
        """
        if not isinstance(body, Mapping):
            raise FactTypeError("a fact type declaration must be a JSON object", fact_type=name)
        unknown = set(body) - {"name", "entity", "fields", "lookback"}
        if unknown:
            raise FactTypeError(
                f"fact type {name!r}: unknown keys {sorted(unknown)}", fact_type=name,
                field=sorted(unknown)[0],
            )
        if "name" in body and body["name"] != name:
            raise FactTypeError(
                f"fact type {name!r}: body names a different type {body['name']!r}",
                fact_type=name, field="name",
            )
        ent = body.get("entity", {"name": "member_id", "type": "int64"})
        if not isinstance(ent, Mapping) or set(ent) - {"name", "type"}:
            raise FactTypeError(
                f"fact type {name!r}: entity must be {{\"name\": ..., \"type\": ...}}",
                fact_type=name, field="entity",
            )
        fields = body.get("fields", {})
        if not isinstance(fields, Mapping):
            raise FactTypeError(
                f"fact type {name!r}: fields must be an object", fact_type=name, field="fields"
            )
        return cls(
            name,
            entity=(ent.get("name", "member_id"), ent.get("type", "int64")),
            fields=fields,
            lookback=body.get("lookback"),
        )


@dataclass(frozen=True)
class Declared:
    """The result of declaring a fact type against the store."""

    fact_type: FactType  # the stored (possibly wider) schema now in force
    version: int
    created: bool  # whether this declaration wrote a new version


def merge(stored: FactType, declared: FactType) -> FactType | None:
    """The new schema version implied by ``declared`` over ``stored``, or None if compatible.

    Raises:
        FactTypeError: a changed entity key or a changed field type, naming the field.
    """
    name = stored.name
    if declared.entity != stored.entity:
        raise FactTypeError(
            f"fact type {name!r}: entity key {declared.entity_name}:{declared.entity_type} "
            f"differs from the stored {stored.entity_name}:{stored.entity_type}",
            fact_type=name, field=declared.entity_name, code="incompatible_schema",
        )
    added: dict[str, str] = {}
    for fname, ftype in declared.fields.items():
        old = stored.fields.get(fname)
        if old is None:
            added[fname] = ftype
        elif old != ftype:
            raise FactTypeError(
                f"fact type {name!r}, field {fname!r}: type change from {old} to {ftype} is not "
                "allowed (add a new field instead)",
                fact_type=name, field=fname, code="incompatible_schema",
            )
    lookback = stored.lookback if declared.lookback is None else declared.lookback
    if not added and lookback == stored.lookback:
        return None
    return FactType(
        name, entity=stored.entity, fields={**stored.fields, **added}, lookback=lookback
    )


class FactTypeCatalog:
    """Fact type declarations kept in a store, with every schema version.

    Thread-safe. Reads are cached per instance; :meth:`get` with ``refresh=True`` re-reads.
    """

    def __init__(self, store: Store, *, clock: Any = None) -> None:
        self.store = store
        self._clock = clock or SystemClock()
        self._cache: dict[str, tuple[int, FactType]] = {}
        self._lock = threading.Lock()

    def _versions(self, name: str) -> list[int]:
        out = []
        for k in self.store.iter_keys(key(FACT_TYPES_PREFIX, name) + "/", ".json"):
            stem = k.rsplit("/", 1)[-1][: -len(".json")]
            if stem.startswith("v") and stem[1:].isdigit():
                out.append(int(stem[1:]))
        return sorted(out)

    def _read(self, name: str, version: int) -> FactType:
        raw = json.loads(self.store.get(key(FACT_TYPES_PREFIX, name, f"v{version:06d}.json")))
        return FactType.from_json(name, {k: v for k, v in raw.items() if k in
                                          ("entity", "fields", "lookback")})

    def get(self, name: str, *, refresh: bool = False) -> FactType:
        """The latest stored version of ``name``.

        Raises:
            UnknownFactType: it was never declared.
        """
        return self.get_versioned(name, refresh=refresh)[1]

    def get_versioned(self, name: str, *, refresh: bool = False) -> tuple[int, FactType]:
        check_name(name, what="fact type")
        with self._lock:
            hit = self._cache.get(name)
        if hit is not None and not refresh:
            return hit
        versions = self._versions(name)
        if not versions:
            raise UnknownFactType(f"fact type {name!r} is not declared")
        got = (versions[-1], self._read(name, versions[-1]))
        with self._lock:
            self._cache[name] = got
        return got

    def history(self, name: str) -> list[FactType]:
        """Every stored version of ``name``, oldest first."""
        return [self._read(name, v) for v in self._versions(name)]

    def names(self) -> list[str]:
        names = set()
        for k in self.store.iter_keys(FACT_TYPES_PREFIX + "/", ".json"):
            parts = k.split("/")
            if len(parts) == 4:
                names.add(parts[2])
        return sorted(names)

    def all(self) -> list[FactType]:
        return [self.get(n, refresh=True) for n in self.names()]

    def declare(self, declared: FactType) -> Declared:
        """Declare ``declared``, or check it against what is stored.

        A new type is stored as version 1. A declaration that adds nullable fields (or sets a new
        lookback) stores a new version. A subset of the stored schema is compatible and writes
        nothing, so older producers keep working during a rolling deploy.

        Raises:
            FactTypeError: an incompatible change, naming the field.
        """
        for _attempt in range(20):
            try:
                version, stored = self.get_versioned(declared.name, refresh=True)
            except UnknownFactType:
                version, new = 0, declared
            else:
                maybe = merge(stored, declared)
                if maybe is None:
                    return Declared(stored, version, created=False)
                new = maybe
            body = {**new.to_json(), "version": version + 1,
                    "declared_at": format_timestamp(self._clock.now_us())}
            try:
                self.store.put_if_absent(
                    key(FACT_TYPES_PREFIX, new.name, f"v{version + 1:06d}.json"),
                    json.dumps(body, indent=1).encode(),
                )
            except ObjectExists:
                continue  # someone else evolved it first; merge against theirs
            with self._lock:
                self._cache[new.name] = (version + 1, new)
            return Declared(new, version + 1, created=True)
        raise FactTypeError(
            f"fact type {declared.name!r}: too many concurrent declarations",
            fact_type=declared.name,
        )

    def declare_all(self, fact_types: Iterable[FactType]) -> list[Declared]:
        return [self.declare(ft) for ft in fact_types]
