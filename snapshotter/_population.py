"""Reading a population (Parquet or CSV, a local path or a key in the store) with typed keys.

Keys are read with their declared type everywhere (SPEC §2):

- CSV: the entity column is read as ``string`` unless the type is ``int64``, so ``"007"`` stays
  the string key ``"007"``; strata columns are read as strings too, exactly as written; the
  variability column is inferred.
- Parquet: the stored type, unless a type is declared, in which case the column is cast to it.

A ``.csv`` or ``.csv.gz`` name is CSV; anything else is Parquet (a file, or a directory of
Parquet files). A path that exists locally is read from there; otherwise it is a store key.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ttstore import ENTITY_TYPES, ObjectNotFound, Store, entity_arrow_type, key

from ._errors import PopulationError


def _is_csv(name: str) -> bool:
    lower = name.lower()
    return lower.endswith((".csv", ".csv.gz"))


def read_population(
    source: str,
    *,
    entity: str,
    strata: Sequence[str] = (),
    numeric: Sequence[str] = (),
    entity_type: str | None = None,
    store: Store | None = None,
) -> pa.Table:
    """Read the columns a selection needs from a population file.

    Args:
        source: a local path (file or directory), else a key (object or prefix) in ``store``.
        entity: the entity column.
        strata: the strata columns (read as strings from CSV).
        numeric: other columns to read, with inferred types (e.g. the variability column).
        entity_type: ``int64`` or ``string`` to declare the key type; None to infer (Parquet)
            or read as ``string`` (CSV).
        store: the store, for a source that is not a local path.

    Returns:
        A table with ``entity``, then ``strata``, then ``numeric`` columns.

    Raises:
        PopulationError: not found, unreadable, a missing column, or keys that do not fit the
            declared type.
    """
    if entity_type is not None and entity_type not in ENTITY_TYPES:
        raise PopulationError(
            f"entity type {entity_type!r} is not int64 or string", field="entity_type"
        )
    wanted = list(dict.fromkeys([entity, *strata, *numeric]))
    spec = _Wanted(wanted, entity, entity_type, tuple(c for c in numeric if c not in strata))
    try:
        if os.path.exists(source):
            table = _read_local(source, spec)
        elif store is not None:
            table = _read_store(store, source, spec)
        else:
            raise PopulationError(f"population {source!r} not found", field="population")
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as exc:
        raise PopulationError(
            f"cannot read population {source!r}: {exc}", field="population"
        ) from exc
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise PopulationError(
            f"population {source!r} has no column(s) {', '.join(map(repr, missing))}; "
            f"it has {', '.join(table.column_names)}", field=missing[0],
        )
    table = table.select(wanted)
    if entity_type is not None:
        target = entity_arrow_type(entity_type)
        if table.schema.field(entity).type != target:
            try:
                table = table.set_column(0, entity, table[entity].cast(target))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise PopulationError(
                    f"entity column {entity!r} does not hold {entity_type} keys: {exc}",
                    field=entity,
                ) from exc
    return table


@dataclass(frozen=True)
class _Wanted:
    columns: list[str]
    entity: str
    entity_type: str | None
    inferred: tuple[str, ...]  # CSV columns whose type pyarrow infers; the rest are strings


def _read_csv(source: str | io.BytesIO, spec: _Wanted) -> pa.Table:
    header = pacsv.open_csv(_rewind(source)).schema.names
    present = [c for c in spec.columns if c in header]
    types: dict[str, pa.DataType] = {c: pa.string() for c in present if c not in spec.inferred}
    types[spec.entity] = pa.int64() if spec.entity_type == "int64" else pa.string()
    opts = pacsv.ConvertOptions(column_types=types, include_columns=present,
                                strings_can_be_null=False)
    return pacsv.read_csv(_rewind(source), convert_options=opts)


def _rewind(source: str | io.BytesIO) -> str | io.BytesIO:
    if isinstance(source, io.BytesIO):
        source.seek(0)
    return source


def _read_local(path: str, spec: _Wanted) -> pa.Table:
    if _is_csv(path):
        return _read_csv(path, spec)
    dataset = ds.dataset(path, format="parquet")
    return dataset.to_table(columns=[c for c in spec.columns if c in dataset.schema.names])


def _read_store(store: Store, source: str, spec: _Wanted) -> pa.Table:
    k = key(source.strip("/"))
    try:
        if _is_csv(k):
            data = store.get(k)
            if k.lower().endswith(".gz"):
                data = gzip.decompress(data)
            return _read_csv(io.BytesIO(data), spec)
        if store.exists(k):
            data = store.get(k)
            names = pq.read_schema(io.BytesIO(data)).names
            return pq.read_table(io.BytesIO(data),
                                 columns=[c for c in spec.columns if c in names])
    except ObjectNotFound as exc:
        raise PopulationError(f"population {source!r} not found locally or in the store",
                              field="population") from exc
    if not store.list(k + "/"):
        raise PopulationError(f"population {source!r} not found locally or in the store",
                              field="population")
    fs, root = store.arrow_filesystem()
    dataset = ds.dataset(f"{root.rstrip('/')}/{k}", filesystem=fs, format="parquet")
    return dataset.to_table(columns=[c for c in spec.columns if c in dataset.schema.names])
