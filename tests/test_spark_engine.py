"""The Spark engine (local[2]) gives the local engine's answers, byte for byte: the same pure
partition function inside ``mapInArrow``, facts read by the executors through the store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from factlog import FactTypeCatalog
from timetravel_api import Engine, build_training_set
from ttstore import TIMESTAMP_TYPE, Store

from .factdata import DAY, PLAY, T0
from .test_engine import PAGE, PAGE_NAMES, PLAY_NAMES, page_copies, play_copies, write_split

pytestmark = [
    pytest.mark.slow,
    # pyspark warns that it does not fully support pandas >= 3; it does not use pandas here
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    from timetravel_api._spark import spark_session

    session = spark_session(2)
    try:
        yield session
    finally:
        session.stop()


def test_spark_answers_equal_local(spark: Any, local_store: Store) -> None:
    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    FactTypeCatalog(store).declare(PAGE)
    write_split(store, PLAY, play_copies(31, n=120), 32)
    write_split(store, PAGE, page_copies(33), 34)
    rng = np.random.default_rng(35)
    n = 200
    ents = pa.array(rng.integers(0, 7, n), pa.int64())
    at = pa.array(T0 + rng.integers(-DAY, 5 * DAY, n), pa.int64()).cast(TIMESTAMP_TYPE)
    engine = Engine(store, workers=2)
    for knowledge in ("as_known", "event"):
        got = engine.features(ents, at, PLAY_NAMES, knowledge=knowledge, engine="spark",
                              provenance=True)
        want = engine.features(ents, at, PLAY_NAMES, knowledge=knowledge, provenance=True)
        assert got.values.equals(want.values) and got.status.equals(want.status)
        assert got.provenance is not None and got.provenance.equals(want.provenance)
    users = pa.array(rng.choice(["a", "007", "7", "é", "zz"], n))
    got = engine.features(users, at, PAGE_NAMES, engine="spark")
    want = engine.features(users, at, PAGE_NAMES)
    assert got.values.equals(want.values) and got.status.equals(want.status)
    assert got.values.column("page.count.12h").to_pylist() != [0] * n  # real data behind it
    labels = pa.table({"entity_id": users, "at": at, "y": pa.array(np.arange(n))})
    a = build_training_set(labels, PAGE_NAMES, store=store, engine="spark", workers=2)
    b = build_training_set(labels, PAGE_NAMES, store=store, workers=2)
    assert a.equals(b)
