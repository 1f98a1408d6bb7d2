"""factlog: services log the facts they used at serving time.

Public surface: fact type declarations, the catalog that keeps their versions in the store, the
validation that turns producer rows into stored facts, and the errors.
"""

from ._errors import (
    BufferFull,
    FactlogError,
    FactTypeError,
    FactValidationError,
    FlushTimeout,
    LoggerClosed,
    UnknownFactType,
)
from ._facttypes import Declared, FactType, FactTypeCatalog
from ._validate import DEFAULT_SKEW_US, Rejection, rows_to_table, table_to_facts

__all__ = [
    "DEFAULT_SKEW_US",
    "BufferFull",
    "Declared",
    "FactType",
    "FactTypeCatalog",
    "FactTypeError",
    "FactValidationError",
    "FactlogError",
    "FlushTimeout",
    "LoggerClosed",
    "Rejection",
    "UnknownFactType",
    "rows_to_table",
    "table_to_facts",
]
