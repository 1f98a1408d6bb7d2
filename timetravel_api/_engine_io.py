"""The engine's edges: normalizing query input (entity keys, times), and what it reports back
(provenance structs, fact file sources, lineage)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ttstore import TIMESTAMP_TYPE, US_PER_DAY, InvalidInput, parse_timestamp, timestamps_us

from ._errors import EntityTypeMismatch
from ._partition import PartitionPlan

PROVENANCE_TYPE = pa.struct([
    pa.field("source", pa.string()),
    pa.field("fact_id", pa.string()),
    pa.field("time", TIMESTAMP_TYPE),
    pa.field("age_s", pa.float64()),
])


def entity_array(entities: Any, entity_type: str | None) -> pa.Array:
    """The query entity keys as an Arrow array of the features' key type.

    Raises:
        EntityTypeMismatch: keys of another type (an int for a string key, or the reverse).
        InvalidInput: null keys, or keys that are neither int64 nor string.
    """
    if isinstance(entities, pa.ChunkedArray):
        entities = entities.combine_chunks()
    if not isinstance(entities, pa.Array):
        try:
            entities = pa.array(entities if isinstance(entities, np.ndarray) else list(entities))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise InvalidInput(f"entity keys must all be int64 or all strings: {exc}",
                               field="entity_id") from exc
    arr: pa.Array = entities
    if pa.types.is_dictionary(arr.type):  # e.g. categorical keys from pandas
        arr = arr.dictionary_decode()
    if arr.null_count and not pa.types.is_null(arr.type):
        raise InvalidInput("entity keys must not be null", field="entity_id")
    kind = ("int64" if pa.types.is_integer(arr.type)
            else "string" if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
            else "null" if pa.types.is_null(arr.type) else None)
    if kind is None:
        raise InvalidInput(f"entity keys must be int64 or string, not {arr.type}",
                           field="entity_id")
    want = entity_type or (kind if kind != "null" else "int64")
    if kind != "null" and kind != want:
        raise EntityTypeMismatch(
            {want: ["features"], kind: ["entity_id"]},
            message=f"the features' entity keys are {want}, the query's entity_id are {kind}",
        )
    target = pa.int64() if want == "int64" else pa.string()
    if arr.type == target:
        return arr
    try:
        out: pa.Array = arr.cast(target)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise InvalidInput(f"entity keys do not fit int64: {exc}", field="entity_id") from exc
    return out


def as_time_us(at: Any, n: int) -> np.ndarray:
    """Query times as int64 µs since the epoch, one per query row.

    ``at`` is a ``timestamp`` array with a time zone (any unit), an int64 array (µs), a list of
    time-zone-aware datetimes or RFC 3339 strings, or one such value for every row.

    Raises:
        InvalidInput: naive timestamps, precision finer than µs, nulls, or a length that is not
            the number of entities.
    """
    if isinstance(at, int | np.integer) and not isinstance(at, bool):
        return np.full(n, int(at), dtype=np.int64)
    if isinstance(at, dt.datetime | str):
        return np.full(n, _one_time(at), dtype=np.int64)
    if isinstance(at, pa.ChunkedArray):
        at = at.combine_chunks()
    if isinstance(at, np.ndarray) and at.dtype == np.int64 and at.ndim == 1:
        if len(at) != n:
            raise InvalidInput(f"{n} entities but {len(at)} times", field="at")
        return at
    if isinstance(at, np.ndarray):
        if np.issubdtype(at.dtype, np.datetime64):
            raise InvalidInput("at: naive timestamps (no time zone) are not allowed",
                               field="at")
        at = pa.array(at)
    elif not isinstance(at, pa.Array):
        items = list(at)
        if items and all(isinstance(x, str | dt.datetime) for x in items):
            at = pa.array([_one_time(x) for x in items], pa.int64())
        else:
            try:
                at = pa.array(items, pa.int64() if not items else None)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InvalidInput(f"at: {exc}", field="at") from exc
    arr: pa.Array = at
    if len(arr) != n:
        raise InvalidInput(f"{n} entities but {len(arr)} times", field="at")
    if arr.null_count:
        raise InvalidInput("at must not be null", field="at")
    if pa.types.is_timestamp(arr.type):
        if arr.type.tz is None:
            raise InvalidInput("at: naive timestamps (no time zone) are not allowed; "
                               "give timestamps with a time zone", field="at")
        if arr.type.unit != "us":
            try:
                arr = arr.cast(TIMESTAMP_TYPE, safe=True)
            except pa.ArrowInvalid as exc:
                raise InvalidInput(f"at: more precision than microseconds ({exc})",
                                   field="at") from exc
        return timestamps_us(arr)
    elif pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        arr = arr.cast(pa.int64())
    else:
        raise InvalidInput(f"at must be timestamps with a time zone or int64 µs, not {arr.type}",
                           field="at")
    out: np.ndarray = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)
    return out


def _one_time(x: str | dt.datetime) -> int:
    if isinstance(x, str):
        return parse_timestamp(x, field="at")
    if x.tzinfo is None:
        raise InvalidInput("at: naive datetime (no time zone) is not allowed", field="at")
    delta = x - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def provenance_struct(
    source: pa.Array, fact_id: pa.Array, time_us: pa.Array, at_us: np.ndarray
) -> pa.StructArray:
    """Provenance per row: ``source``, ``fact_id``, ``time`` and ``age_s`` (null without a
    source row)."""
    t = time_us.cast(pa.int64())
    valid = pc.is_valid(t).to_numpy(zero_copy_only=False)
    tv = np.asarray(t.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
    age = pa.array((at_us - tv) / 1e6, pa.float64(), mask=~valid)
    return pa.StructArray.from_arrays(
        [source.cast(pa.string()), fact_id.cast(pa.string()), t.cast(TIMESTAMP_TYPE), age],
        fields=list(PROVENANCE_TYPE),
    )


def fact_sources(
    reader: Any, plan: PartitionPlan, wire: pa.Table, entities: pa.Array
) -> dict[str, tuple[pa.Array, pa.Array]]:
    """Per fact type, (fact_id, file key) for every fact named in the provenance columns.

    A fact may have copies in several live files (retries not yet compacted); the source is the
    file of its counting copy (smallest ``logged_at``), the smallest key on a tie.
    """
    out: dict[str, tuple[pa.Array, pa.Array]] = {}
    for g in plan.groups:
        ids = pa.concat_arrays([wire.column(f"p{i}_id").combine_chunks() for i in g.indices])
        evs = pa.concat_arrays([wire.column(f"p{i}_ev").combine_chunks() for i in g.indices])
        ok = pc.is_valid(ids)
        ids, evs = pc.unique(ids.filter(ok)), evs.filter(ok)
        if len(ids) == 0:
            out[g.fact_type] = (pa.array([], pa.string()), pa.array([], pa.string()))
            continue
        ev = evs.to_numpy(zero_copy_only=False)
        days = set((ev // US_PER_DAY).tolist())
        files = [f for f in reader.live_files(g.fact_type, start_us=int(ev.min()),
                                              end_us=int(ev.max()))
                 if _day_of(f.date) in days]
        pieces = []
        fs, root = reader.store.arrow_filesystem()
        # the entity filter lets row groups of compacted (entity-sorted) files be skipped
        wanted = pc.field(g.entity_col).isin(entities) & pc.field("fact_id").isin(ids)
        for f in files:
            t = ds.dataset(f"{root}/{f.key}", filesystem=fs, format="parquet").to_table(
                columns=["fact_id", "logged_at"], filter=wanted)
            if t.num_rows:
                pieces.append(pa.table({
                    "fact_id": t.column("fact_id"),
                    "logged_at": t.column("logged_at").cast(pa.int64()),
                    "key": pa.array([f.key] * t.num_rows, pa.string()),
                }))
        if not pieces:
            out[g.fact_type] = (pa.array([], pa.string()), pa.array([], pa.string()))
            continue
        found = pa.concat_tables(pieces).sort_by(
            [("fact_id", "ascending"), ("logged_at", "ascending"), ("key", "ascending")])
        fid = found.column("fact_id").combine_chunks()
        first = np.ones(len(fid), dtype=bool)
        if len(fid) > 1:
            first[1:] = pc.not_equal(fid.slice(1), fid.slice(0, len(fid) - 1)).to_numpy(
                zero_copy_only=False)
        keep = pa.array(first)
        out[g.fact_type] = (fid.filter(keep), found.column("key").combine_chunks().filter(keep))
    return out


def _day_of(date: str) -> int:
    d = dt.date.fromisoformat(date)
    return (d - dt.date(1970, 1, 1)).days


def lineage_files(files: Sequence[Any]) -> tuple[list[str], list[str]]:
    """(sorted partition prefixes, sorted file keys) of the fact files a scan reads."""
    parts = sorted({f.key.rsplit("/", 1)[0] for f in files})
    return parts, sorted(f.key for f in files)
