"""timetravel_api's errors.

Hierarchy::

    TimetravelError (ttstore)
    └── TimetravelApiError           root of timetravel_api's errors
        ├── InvalidFeature           malformed, unknown or type-invalid feature names; the
        │                            message lists every bad name with its reason (400)
        ├── EntityTypeMismatch       the features of one request (or the query entities) do not
        │                            share one entity key type; lists the features (400)
        ├── RepoError                the feature repo cannot be loaded: not found, a syntax or
        │                            import error (file:line), duplicate or clashing names (400)
        └── EncoderDefinitionError   an encoder's declaration is invalid: name, inputs, output
                                     type, or inputs of different entity key types (400)

``InvalidFeature`` and ``EntityTypeMismatch`` are also :class:`ttstore.InvalidInput`, so code that
maps every "the caller gave something malformed" error to a 400 catches them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ttstore import InvalidInput, TimetravelError


class TimetravelApiError(TimetravelError):
    """Root of every error timetravel_api raises on purpose."""

    code = "timetravel_api_error"
    http_status = 500


class InvalidFeature(TimetravelApiError, InvalidInput):
    """One or more requested feature names are malformed, unknown or type-invalid.

    Attributes:
        problems: ``(name, reason)`` for every bad name, in request order.
    """

    code = "invalid_feature"
    http_status = 400

    def __init__(self, problems: Sequence[tuple[str, str]], *, message: str | None = None) -> None:
        self.problems = list(problems)
        if message is None:
            n = len(self.problems)
            message = f"{n} invalid feature{'s' if n != 1 else ''}: " + "; ".join(
                f"{name!r}: {reason}" for name, reason in self.problems
            )
        InvalidInput.__init__(self, message, field="features")


class EntityTypeMismatch(TimetravelApiError, InvalidInput):
    """The requested features do not share one entity key type, or query entity keys are not of
    the features' key type.

    Attributes:
        by_type: entity key type → the features (or the query column) with that type.
    """

    code = "entity_type_mismatch"
    http_status = 400

    def __init__(self, by_type: Mapping[str, Sequence[str]], *, message: str | None = None) -> None:
        self.by_type = {k: list(v) for k, v in by_type.items()}
        if message is None:
            message = "features of one request must share an entity key type; got " + "; ".join(
                f"{etype}: {', '.join(names)}" for etype, names in self.by_type.items()
            )
        InvalidInput.__init__(self, message, field="features")


class RepoError(TimetravelApiError):
    """The feature repo cannot be loaded (codes ``repo_not_found``, ``repo_syntax_error``,
    ``repo_import_error``, ``repo_duplicate_name``, ``repo_invalid``)."""

    code = "repo_error"
    http_status = 400


class EncoderDefinitionError(TimetravelApiError):
    """An encoder's declaration is invalid (code ``invalid_encoder``)."""

    code = "invalid_encoder"
    http_status = 400
