"""Errors shared by every Timetravel package.

Hierarchy::

    TimetravelError              root of every error any Timetravel package raises on purpose
    ├── InvalidInput             the caller gave something malformed (HTTP 400)
    │   ├── InvalidTimestamp     a time without an offset, or with more than 6 fractional digits
    │   ├── InvalidDuration      a duration that does not match ^[1-9][0-9]*(s|m|h|d)$
    │   └── InvalidKey           a store key that could escape its prefix
    └── StoreError               the store failed or refused an operation
        ├── ObjectExists         a create-if-absent put found the key already there
        ├── ObjectNotFound       a read found no object at the key
        └── StoreUnavailable     the backend could not be reached; retrying may help

Each package (``factlog``, ``snapshotter``, ``timetravel_api``) roots its own errors in a subclass
of :class:`TimetravelError`, so a CLI or a server can catch one type and still report a precise
``code``. Errors from dependencies (botocore, OS errors, pyarrow) are translated at the store
boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class TimetravelError(Exception):
    """Root of every error raised on purpose by Timetravel.

    Attributes:
        code: a stable, machine-readable error code (listed in the README).
        http_status: the HTTP status a server answers with for this error.
    """

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidInput(TimetravelError, ValueError):
    """The caller gave something malformed. ``field`` names what, when known."""

    code = "invalid_input"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class InvalidTimestamp(InvalidInput):
    code = "invalid_timestamp"


class InvalidDuration(InvalidInput):
    code = "invalid_duration"


class InvalidKey(InvalidInput):
    code = "invalid_key"


class StoreError(TimetravelError):
    code = "store_error"
    http_status = 503


class ObjectExists(StoreError):
    code = "object_exists"
    http_status = 409


class ObjectNotFound(StoreError):
    code = "not_found"
    http_status = 404


class StoreUnavailable(StoreError):
    code = "store_unavailable"
    http_status = 503
