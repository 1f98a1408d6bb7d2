"""A chunk's answers from one service, column by column: what a run types and stages.

The HTTP fetcher fills these lists as answers arrive, so a run of 1M contexts x 3 services
makes no object per row on its way to Arrow; plug-in fetchers that answer row by row
(:class:`FetchResultLike`) are turned into columns once per chunk (:meth:`Answers.of`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class FetchResultLike(Protocol):
    """One answer from a service (``snapshotter._fetch.FetchResult`` has this shape)."""

    @property
    def entity(self) -> Any: ...
    @property
    def status(self) -> str: ...
    @property
    def payload(self) -> Mapping[str, Any] | None: ...
    @property
    def raw_json(self) -> str | None: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    @property
    def error_kind(self) -> str | None: ...


@dataclass(eq=False)
class Answers:
    """Answers aligned with the entities asked, one list per field of a
    :class:`FetchResultLike` (``status`` ``ok``/``missing``/``error``, the parsed ``payload``
    and its ``raw_json`` when ok, ``latency_s``, ``attempts``, ``error_kind``)."""

    status: list[str]
    payload: list[Mapping[str, Any] | None]
    raw_json: list[str | None]
    latency_s: list[float]
    attempts: list[int]
    error_kind: list[str | None]
    #: When each row's answer (or its last failed attempt) came back, by the run's clock; None
    #: when the fetcher does not say (the run then stamps the chunk with one reading).
    captured_us: list[int] | None = None

    @classmethod
    def blank(cls, n: int) -> Answers:
        """``n`` rows to be filled in (each one ``error`` until it is)."""
        return cls(["error"] * n, [None] * n, [None] * n, [0.0] * n, [0] * n, [None] * n)

    @classmethod
    def of(cls, results: Sequence[FetchResultLike]) -> Answers:
        """The columns of row-by-row answers."""
        return cls(
            [r.status for r in results],
            [r.payload if r.status == "ok" else None for r in results],
            [r.raw_json for r in results],
            [r.latency_s for r in results],
            [r.attempts for r in results],
            [r.error_kind for r in results],
        )

    def __len__(self) -> int:
        return len(self.status)


@runtime_checkable
class ColumnFetcher(Protocol):
    """A fetcher that also answers a chunk as columns (the HTTP fetcher does): a run takes
    :meth:`fetch_answers` where there is one, and ``fetch`` otherwise."""

    async def fetch_answers(
        self, entities: Sequence[Any], *, now: Callable[[], int] | None = None
    ) -> Answers: ...
