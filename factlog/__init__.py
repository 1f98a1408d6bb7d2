"""factlog: services log the facts they used at serving time.

Public surface: fact type declarations, the catalog that keeps their versions in the store, the
validation that turns producer rows into stored facts, and the errors.
"""

from ._compact import CompactionConfig, CompactionReport, Compactor, PartitionCompaction
from ._errors import (
    BufferFull,
    FactlogError,
    FactTypeError,
    FactValidationError,
    FlushTimeout,
    LoggerClosed,
    PartitionInconsistent,
    SpoolLocked,
    UnknownFactType,
)
from ._facttypes import Declared, FactType, FactTypeCatalog
from ._heartbeat import Heartbeat, WatermarkCache, producer_watermarks, read_heartbeats
from ._logger import FactLogger, LoggerConfig
from ._metrics import LoggerStats
from ._parquetio import RowGroupCache
from ._partitions import CompactionRecord, FactFile
from ._reader import FactReader
from ._stats import StatsConfig, fact_stats
from ._validate import DEFAULT_SKEW_US, Rejection, rows_to_table, table_to_facts

__all__ = [
    "DEFAULT_SKEW_US",
    "BufferFull",
    "CompactionConfig",
    "CompactionRecord",
    "CompactionReport",
    "Compactor",
    "Declared",
    "FactFile",
    "RowGroupCache",
    "WatermarkCache",
    "FactLogger",
    "FactReader",
    "FactType",
    "FactTypeCatalog",
    "FactTypeError",
    "FactValidationError",
    "FactlogError",
    "FlushTimeout",
    "Heartbeat",
    "LoggerClosed",
    "LoggerConfig",
    "LoggerStats",
    "PartitionCompaction",
    "PartitionInconsistent",
    "Rejection",
    "SpoolLocked",
    "StatsConfig",
    "UnknownFactType",
    "fact_stats",
    "producer_watermarks",
    "read_heartbeats",
    "rows_to_table",
    "table_to_facts",
]
