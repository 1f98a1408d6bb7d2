"""Which schema a fact type name means to a logger: the declarations it was given (replaced by
the stored version once declared), else the store's catalog, cached."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from ttstore import InvalidInput, check_name

from ._errors import UnknownFactType
from ._facttypes import FactType, FactTypeCatalog

_NEGATIVE_TTL_S = 1.0
_REFRESH_EVERY_S = 1.0


class TypeResolver:
    """Thread-safe fact type lookup for a logger."""

    def __init__(self, catalog: FactTypeCatalog, given: Iterable[FactType]) -> None:
        self.catalog = catalog
        self._lock = threading.Lock()
        self._types: dict[str, FactType] = {}
        self._given: set[str] = set()
        self._missing: dict[str, float] = {}  # name -> when the catalog last said "unknown"
        self._refreshed: dict[str, float] = {}
        for ft in given:
            if ft.name in self._types and self._types[ft.name] != ft:
                raise InvalidInput(
                    f"fact_types: {ft.name!r} is given twice with different schemas",
                    field="fact_types",
                )
            self._types[ft.name] = ft
            self._given.add(ft.name)

    def set_stored(self, ft: FactType) -> None:
        """The store's version of a given declaration (it may be wider)."""
        with self._lock:
            self._types[ft.name] = ft

    def cached(self, name: str) -> FactType | None:
        return self._types.get(name)

    def resolve(self, name: object) -> FactType | None:
        """The schema for ``name``, or None if it is not a declared fact type.

        Raises:
            StoreError: the catalog could not be read (the answer is unknown; retry later).
        """
        if type(name) is not str:
            return None
        ft = self._types.get(name)
        if ft is not None:
            return ft
        try:
            check_name(name, what="fact type")
        except InvalidInput:
            return None
        now = time.monotonic()
        with self._lock:
            missed = self._missing.get(name)
        if missed is not None and now - missed < _NEGATIVE_TTL_S:
            return None
        try:
            ft = self.catalog.get(name, refresh=missed is not None)
        except UnknownFactType:
            with self._lock:
                self._missing[name] = now
            return None
        with self._lock:
            self._types[name] = ft
            self._missing.pop(name, None)
        return ft

    def refresh(self, name: str) -> FactType | None:
        """Re-read ``name`` from the catalog (at most about once a second), for producers that
        log a field another producer added. Returns the new schema if it changed."""
        if name in self._given:
            return None
        now = time.monotonic()
        with self._lock:
            if now - self._refreshed.get(name, -1e18) < _REFRESH_EVERY_S:
                return None
            self._refreshed[name] = now
            old = self._types.get(name)
        try:
            ft = self.catalog.get(name, refresh=True)
        except Exception:  # noqa: BLE001  (a refresh is best effort; the old schema stays)
            return None
        if ft == old:
            return None
        with self._lock:
            self._types[name] = ft
        return ft
