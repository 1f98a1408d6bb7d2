"""The typed record of a sample design, and the context set it produced.

A :class:`SelectionDesign` is what ``selection.json`` holds: everything needed to explain (and
reproduce) a context set. A :class:`ContextSet` pairs it with the selected rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ttstore import TIMESTAMP_TYPE, format_timestamp, parse_timestamp

from ._errors import SnapshotterError

DESIGN_FORMAT = 1
#: Columns every context set has, in this order; the strata columns follow ``stratum``.
CONTEXT_COLUMNS = ("entity_id", "stratum", "pi", "weight", "selection_id", "selected_at")


@dataclass(frozen=True)
class StratumDesign:
    """One stratum of a design.

    Attributes:
        name: ``col=value|col2=value2`` in the order of the strata columns (``all`` if none).
        values: the strata values as strings (``None`` for null), keyed by column.
        population_size: ``N_h``.
        sample_size: ``n_h``.
        pi: inclusion probability ``n_h / N_h``.
        weight: ``N_h / n_h``.
        std: the sample standard deviation (ddof=1) of the variability column, for Neyman.
    """

    name: str
    values: Mapping[str, str | None]
    population_size: int
    sample_size: int
    pi: float
    weight: float
    std: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "values": dict(self.values), "N_h": self.population_size,
            "n_h": self.sample_size, "pi": self.pi, "weight": self.weight,
        }
        if self.std is not None:
            out["std"] = self.std
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StratumDesign:
        return cls(
            name=str(d["name"]), values=dict(d["values"]), population_size=int(d["N_h"]),
            sample_size=int(d["n_h"]), pi=float(d["pi"]), weight=float(d["weight"]),
            std=None if d.get("std") is None else float(d["std"]),
        )


@dataclass(frozen=True)
class SelectionDesign:
    """The design of one context set, as stored in ``selection.json``.

    Attributes:
        selection_id: ``sel-<selected_at compact UTC>-<12 hex digest>``; see ``select_contexts``.
        selected_at_us: when the set was selected (µs since the epoch, UTC).
        entity: the population's entity column name; in the context set it is ``entity_id``.
        entity_type: ``int64`` or ``string``.
        strata: the strata columns, in order.
        allocation: the allocation asked for.
        allocation_used: the allocation applied (``proportional`` after a Neyman fallback).
        variability_col: the Neyman variability column, if any.
        min_per_stratum: the per-stratum floor.
        seed: the panel hash seed.
        n_requested: ``n`` as asked.
        sample_size: the total selected, ``min(n, N)``.
        population_size: ``N``.
        strata_detail: one :class:`StratumDesign` per non-empty stratum, sorted by values.
        notes: fallbacks and caps, in words.
        population_fingerprint: a digest of the population's keys per stratum.
        source: where the population came from, if known.
        committed_at_us: when it was committed to the store (None before it is saved).
        extra: keys of ``selection.json`` this version does not know, kept as read.
    """

    selection_id: str
    selected_at_us: int
    entity: str
    entity_type: str
    strata: tuple[str, ...]
    allocation: str
    allocation_used: str
    variability_col: str | None
    min_per_stratum: int
    seed: int
    n_requested: int
    sample_size: int
    population_size: int
    strata_detail: tuple[StratumDesign, ...]
    notes: tuple[str, ...] = ()
    population_fingerprint: str = ""
    source: str | None = None
    committed_at_us: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored as ``selection.json``."""
        return {
            "format": DESIGN_FORMAT,
            "selection_id": self.selection_id,
            "selected_at": format_timestamp(self.selected_at_us),
            "entity": {"name": self.entity, "type": self.entity_type},
            "strata": list(self.strata),
            "allocation": self.allocation,
            "allocation_used": self.allocation_used,
            "variability_col": self.variability_col,
            "min_per_stratum": self.min_per_stratum,
            "seed": self.seed,
            "n_requested": self.n_requested,
            "n": self.sample_size,
            "N": self.population_size,
            "strata_detail": [s.to_json() for s in self.strata_detail],
            "notes": list(self.notes),
            "population_fingerprint": self.population_fingerprint,
            "source": self.source,
            **({} if self.committed_at_us is None
               else {"committed_at": format_timestamp(self.committed_at_us)}),
            **dict(self.extra),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SelectionDesign:
        """Parse a stored ``selection.json``; keys this version does not know go to ``extra``."""
        known = {
            "format", "selection_id", "selected_at", "entity", "strata", "allocation",
            "allocation_used", "variability_col", "min_per_stratum", "seed", "n_requested", "n",
            "N", "strata_detail", "notes", "population_fingerprint", "source", "committed_at",
        }
        try:
            return cls(
                selection_id=str(d["selection_id"]),
                selected_at_us=parse_timestamp(d["selected_at"], field="selected_at"),
                entity=str(d["entity"]["name"]),
                entity_type=str(d["entity"]["type"]),
                strata=tuple(d["strata"]),
                allocation=str(d["allocation"]),
                allocation_used=str(d["allocation_used"]),
                variability_col=d.get("variability_col"),
                min_per_stratum=int(d["min_per_stratum"]),
                seed=int(d["seed"]),
                n_requested=int(d["n_requested"]),
                sample_size=int(d["n"]),
                population_size=int(d["N"]),
                strata_detail=tuple(StratumDesign.from_json(s) for s in d["strata_detail"]),
                notes=tuple(d.get("notes", ())),
                population_fingerprint=str(d.get("population_fingerprint", "")),
                source=d.get("source"),
                committed_at_us=None if d.get("committed_at") is None
                else parse_timestamp(d["committed_at"], field="committed_at"),
                extra={k: v for k, v in d.items() if k not in known},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotterError(
                f"selection design is malformed: {exc!r}", code="corrupt_selection"
            ) from exc


@dataclass(frozen=True)
class ContextSet:
    """A selected sample: one row per entity, and its design.

    ``table`` has :data:`CONTEXT_COLUMNS` with the strata columns after ``stratum``: ``entity_id``
    (int64 or string), ``stratum`` (string), the strata columns, ``pi`` and ``weight`` (float64),
    ``selection_id`` (string), ``selected_at`` (timestamp[us, UTC]). Rows are sorted by
    ``entity_id``.
    """

    table: pa.Table
    design: SelectionDesign

    @property
    def selection_id(self) -> str:
        return self.design.selection_id

    @property
    def selected_at_us(self) -> int:
        return self.design.selected_at_us

    def __len__(self) -> int:
        return int(self.table.num_rows)


def context_schema(entity_type: pa.DataType, strata_fields: list[pa.Field]) -> pa.Schema:
    """The schema of a context set with the given key type and strata columns."""
    return pa.schema([
        pa.field("entity_id", entity_type, nullable=False),
        pa.field("stratum", pa.string(), nullable=False),
        *strata_fields,
        pa.field("pi", pa.float64(), nullable=False),
        pa.field("weight", pa.float64(), nullable=False),
        pa.field("selection_id", pa.string(), nullable=False),
        pa.field("selected_at", TIMESTAMP_TYPE, nullable=False),
    ])
