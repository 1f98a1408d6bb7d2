"""What the query server needs to know about a request's features before it asks the engine:
their shared entity key type (to read JSON entity ids as that type, naming a bad one) and which
of them are ``json`` fields (answered as their JSON value)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from snapshotter import SnapshotReader

from ._features import check_entity_types


class FeatureResolver:
    """Parses a request's feature names with the engine's own parser (every bad name reported
    at once), and knows the services' entity key types."""

    #: Successful resolutions kept (a feature's key type and json-ness never change: a fact
    #: type's entity and field types cannot evolve), so a hot lookup parses once.
    MAX_CACHED = 4096

    def __init__(self, *, engine: Any, snapshots: SnapshotReader) -> None:
        self.engine = engine
        self.snapshots = snapshots
        self._cache: dict[tuple[str, ...], tuple[str | None, frozenset[str]]] = {}

    def service_entity_type(self, service: str) -> str | None:
        """The entity key type of ``service`` in its latest committed run (None: no run)."""
        found: str | None = None
        for m in self.snapshots.runs():
            stats = m.services.get(service)
            if stats is not None:
                found = str(stats.config.get("entity_type", "int64"))
        return found

    def resolve(self, names: Sequence[str]) -> tuple[str | None, frozenset[str]]:
        """``(entity key type, names of json-valued features)``.

        Raises:
            InvalidFeature: listing every malformed, unknown or type-invalid name.
            EntityTypeMismatch: the features do not share one entity key type.
        """
        k = tuple(names)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        specs = self.engine.parse(list(names))
        etype = check_entity_types(specs)
        json_cols = frozenset(s.name for s in specs
                              if s.kind == "fact_field" and s.field_type == "json")
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[k] = (etype, json_cols)
        return etype, json_cols
