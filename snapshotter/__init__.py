"""snapshotter: stratified context selection and scheduled snapshots of microservice state."""

from ._allocate import ALLOCATIONS, Allocation, allocate
from ._design import CONTEXT_COLUMNS, ContextSet, SelectionDesign, StratumDesign
from ._errors import (
    PopulationError,
    SelectionConflict,
    SelectionError,
    SelectionNotFound,
    SnapshotterError,
)
from ._hashing import entity_hash
from ._population import read_population
from ._select import select_contexts
from ._selections import (
    SELECTIONS_PREFIX,
    latest_selection,
    list_selections,
    load_design,
    load_selection,
    save_selection,
)

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
]
