"""snapshotter: stratified context selection and scheduled snapshots of microservice state."""

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
    SnapshotterError,
)
from ._hashing import entity_hash
from ._manifest import RUNS_PREFIX, RunManifest, ServiceRunStats
from ._population import read_population
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
from ._stage import Fetcher, LocalFetcher

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
]
