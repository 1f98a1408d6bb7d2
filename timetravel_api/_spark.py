"""The Spark engine: the same pure partition function, inside ``mapInArrow``.

The driver tags every query row with its entity bucket (the ranges the local pool uses),
repartitions by it, and runs :func:`._partition.read_and_compute` on each Spark partition: the
executor reads that partition's facts through the store (only its entities, only the plan's
time range, with the same ``FactReader``) and computes the fact features. Results come back to
the driver as Arrow and are put back in query order, so the answer is byte for byte the local
engine's. Snapshot features and the rest of the answer are assembled on the driver, as locally.

The session is ``SparkSession.builder.getOrCreate()``: an active session (a cluster's) is used
as is; otherwise a local one with ``local[workers]``, or the master named by
``TIMETRAVEL_SPARK_MASTER``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from ttstore import InvalidInput

from ._partition import ENTITY, PartitionPlan, entity_buckets, read_and_compute, restore_order

#: The Spark master for sessions this engine creates (default ``local[<workers>]``).
ENV_SPARK_MASTER = "TIMETRAVEL_SPARK_MASTER"
BUCKET = "__bucket"


def spark_session(workers: int) -> Any:
    """The active Spark session, or a new local one.

    Raises:
        InvalidInput: pyspark is not installed (code ``spark_unavailable``).
    """
    try:
        from pyspark.sql import SparkSession  # noqa: PLC0415
    except ImportError as exc:
        raise InvalidInput(
            "the Spark engine needs pyspark: pip install 'timetravel[spark]' (and Java 17)",
            field="engine", code="spark_unavailable",
        ) from exc
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    master = os.environ.get(ENV_SPARK_MASTER, f"local[{max(1, workers)}]")
    return (
        SparkSession.builder.master(master)
        .appName("timetravel")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(max(2, workers)))
        .getOrCreate()
    )


def run_spark(store_url: str, queries: pa.Table, plan: PartitionPlan, *, workers: int
              ) -> pa.Table:
    """The wire table of ``queries`` (see :mod:`._partition`), computed on Spark."""
    from pyspark.sql.pandas.types import from_arrow_schema  # noqa: PLC0415

    spark = spark_session(workers)
    n_buckets = max(2, int(spark.sparkContext.defaultParallelism))
    bucket = entity_buckets(queries.column(ENTITY), n_buckets)
    tagged = queries.append_column(BUCKET, pa.array(bucket, pa.int64()))
    df = spark.createDataFrame(tagged).repartition(n_buckets, BUCKET)
    schema = from_arrow_schema(plan.wire_schema())

    def compute(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield from read_and_compute(store_url, plan, batches)

    out = df.mapInArrow(compute, schema).toArrow()
    out = pa.table([out.column(n).cast(f.type) for n, f in
                    zip(plan.wire_schema().names, plan.wire_schema(), strict=True)],
                   schema=plan.wire_schema())
    return restore_order([out], plan)
