"""snapshotter's errors.

Hierarchy::

    TimetravelError (ttstore)
    └── SnapshotterError                 root of snapshotter's errors
        ├── SelectionError               a sample design that cannot be honoured (400), e.g.
        │                                ``n`` below the number of non-empty strata
        ├── PopulationError              a population that cannot be read or lacks a column (400)
        ├── SelectionNotFound            no context set with that id, or none selected by now (404)
        ├── InvalidRunOption             a bad --shard, --every, --cron or chunk size (400)
        ├── ServiceConfigError           a services TOML or ServiceConfig that cannot be used:
        │                                unknown key, bad name or value, a ``${VAR}`` not set
        │                                (400; code ``invalid_services_config`` or
        │                                ``missing_env_var``)
        ├── RunConflict                  a slot's pinned plan (selection, shards, services)
        │                                disagrees with this invocation (409)
        ├── RunAlreadyCommitted          the conditional put refused a second commit of a slot (409)
        └── RunInterrupted               a run stopped on request (SIGTERM) before committing;
                                         its staged chunks are kept for the resume (503)

Errors from dependencies (pyarrow, the store) are translated at the boundary with
``raise ... from exc``; store errors (:class:`ttstore.StoreError`) pass through unchanged.
"""

from __future__ import annotations

from ttstore import TimetravelError


class SnapshotterError(TimetravelError):
    """Root of every error the snapshotter raises on purpose."""

    code = "snapshotter_error"
    http_status = 500


class SelectionError(SnapshotterError, ValueError):
    """A sample design that cannot be honoured (bad ``n``, allocation or strata).

    Attributes:
        field: the option at fault (``n``, ``allocation``, ``strata``, ...), when known.
    """

    code = "invalid_selection"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class PopulationError(SnapshotterError, ValueError):
    """The population could not be read, or lacks a named column, or has bad keys."""

    code = "invalid_population"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class SelectionNotFound(SnapshotterError, KeyError):
    """No context set has that id, or none was selected at or before the given time."""

    code = "selection_not_found"
    http_status = 404

    def __str__(self) -> str:
        return self.message


class InvalidRunOption(SnapshotterError, ValueError):
    """A snapshot run or schedule option that cannot be honoured."""

    code = "invalid_run_option"
    http_status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RunConflict(SnapshotterError):
    """This invocation disagrees with the plan pinned for its slot by the first shard."""

    code = "run_conflict"
    http_status = 409


class RunAlreadyCommitted(SnapshotterError):
    """A slot's manifest already exists: the conditional put refused a second commit."""

    code = "run_already_committed"
    http_status = 409


class RunInterrupted(SnapshotterError):
    """The run stopped on request before committing; staged chunks are kept for the resume."""

    code = "run_interrupted"
    http_status = 503


class SelectionConflict(SnapshotterError):
    """A different context set is already committed under the same selection id."""

    code = "selection_conflict"
    http_status = 409


class ServiceConfigError(SnapshotterError, ValueError):
    """A services config (TOML or :class:`ServiceConfig`) that cannot be used.

    Attributes:
        service: the service at fault, when known.
        field: the key at fault (``max_qps``, ``headers.Authorization``, ...), when known.
    """

    code = "invalid_services_config"
    http_status = 400

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        field: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.service = service
        self.field = field
