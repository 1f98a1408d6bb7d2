"""snapshotter: stratified context selection and scheduled snapshots of microservice state."""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from ._allocate import ALLOCATIONS, Allocation, allocate
from ._design import CONTEXT_COLUMNS, ContextSet, SelectionDesign, StratumDesign
from ._errors import (
    InvalidRunOption,
    PopulationError,
    RunAlreadyCommitted,
    RunConflict,
    RunInterrupted,
    SelectionConflict,
    SelectionError,
    SelectionNotFound,
    ServiceConfigError,
    SnapshotterError,
)
from ._hashing import entity_hash
from ._manifest import RUNS_PREFIX, RunManifest, ServiceRunStats
from ._population import read_population
from ._ratelimit import QpsLimiter
from ._reader import SnapshotReader
from ._run import RunOutcome, SnapshotRunner
from ._schedule import Cadence, Scheduler
from ._select import select_contexts
from ._selections import (
    SELECTIONS_PREFIX,
    latest_selection,
    list_selections,
    load_design,
    load_selection,
    save_selection,
)
from ._services import ServiceConfig, load_services, parse_services, render_services
from ._stage import Fetcher, LocalFetcher

# The HTTP client pulls in aiohttp; it loads on first use, not with every ``import snapshotter``.
_FETCH_NAMES = frozenset(("ERROR_KINDS", "FetchResult", "ServiceFetcher"))

if _TYPE_CHECKING:
    from ._fetch import ERROR_KINDS, FetchResult, ServiceFetcher


def __getattr__(name: str) -> _Any:
    if name in _FETCH_NAMES:
        from . import _fetch

        value = getattr(_fetch, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # context selection (sample designs)
    "ALLOCATIONS",
    "CONTEXT_COLUMNS",
    "SELECTIONS_PREFIX",
    "Allocation",
    "ContextSet",
    "PopulationError",
    "SelectionConflict",
    "SelectionDesign",
    "SelectionError",
    "SelectionNotFound",
    "SnapshotterError",
    "StratumDesign",
    "allocate",
    "entity_hash",
    "latest_selection",
    "list_selections",
    "load_design",
    "load_selection",
    "read_population",
    "save_selection",
    "select_contexts",
    # snapshot runs, the scheduler and the as-of reader
    "RUNS_PREFIX",
    "Cadence",
    "Fetcher",
    "InvalidRunOption",
    "LocalFetcher",
    "RunAlreadyCommitted",
    "RunConflict",
    "RunInterrupted",
    "RunManifest",
    "RunOutcome",
    "Scheduler",
    "ServiceRunStats",
    "SnapshotReader",
    "SnapshotRunner",
    # the services config and the fetcher
    "ERROR_KINDS",
    "FetchResult",
    "QpsLimiter",
    "ServiceConfig",
    "ServiceConfigError",
    "ServiceFetcher",
    "load_services",
    "parse_services",
    "render_services",
]
