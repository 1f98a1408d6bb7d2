"""factlog's errors.

Hierarchy::

    TimetravelError (ttstore)
    └── FactlogError                 root of factlog's errors
        ├── FactTypeError            a bad or incompatible fact type declaration (400)
        ├── UnknownFactType          a fact type that was never declared (404)
        ├── FactValidationError      a fact that fails validation; names type, field, reason (400)
        ├── BufferFull               log_batch() waited its bound for buffer room (503)
        ├── FlushTimeout             flush()/close() did not finish in time (503)
        ├── LoggerClosed             the logger was closed (503)
        ├── PartitionInconsistent    a fact partition's listing stayed torn: a compaction record
        │                            names outputs that are missing (503)
        └── SpoolLocked              another FactLogger holds the spool directory (409)
"""

from __future__ import annotations

from ttstore import TimetravelError


class FactlogError(TimetravelError):
    code = "factlog_error"
    http_status = 500


class FactTypeError(FactlogError, ValueError):
    """A declaration is malformed or incompatible with the stored schema."""

    code = "invalid_fact_type"
    http_status = 400

    def __init__(
        self, message: str, *, fact_type: str | None = None, field: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.fact_type = fact_type
        self.field = field


class UnknownFactType(FactlogError, KeyError):
    code = "unknown_fact_type"
    http_status = 404

    def __str__(self) -> str:
        return self.message


class FactValidationError(FactlogError, ValueError):
    code = "invalid_fact"
    http_status = 400

    def __init__(self, message: str, *, fact_type: str, field: str | None, code: str) -> None:
        super().__init__(message, code=code)
        self.fact_type = fact_type
        self.field = field


class BufferFull(FactlogError):
    code = "buffer_full"
    http_status = 503


class FlushTimeout(FactlogError, TimeoutError):
    code = "flush_timeout"
    http_status = 503


class LoggerClosed(FactlogError):
    code = "logger_closed"
    http_status = 503


class PartitionInconsistent(FactlogError):
    code = "inconsistent_partition"
    http_status = 503


class SpoolLocked(FactlogError):
    """Another ``FactLogger`` (in this or another process) holds the spool directory's lock."""

    code = "spool_locked"
    http_status = 409
