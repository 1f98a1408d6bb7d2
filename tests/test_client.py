"""The SDK (``timetravel_api.Client``) against a real query server on loopback (its own thread
and loop): the same answers as the engine through the async methods, the sync twins, and the
sync twins called inside a running event loop; errors as exceptions with code and status."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

from tests.api_helpers import BIG, FEATURES, QUERIES, auth, clock, seed
from tests.conftest import free_port
from tests.factdata import DAY, T0, H
from timetravel_api import ApiRequestError, ApiUnavailable, Client
from timetravel_api._client import is_complete
from timetravel_api._engine import Engine
from timetravel_api._server import ApiConfig, make_api_app
from ttstore import TIMESTAMP_TYPE, Store, format_timestamp, serve


def same(a: Any, b: Any) -> bool:
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    b = b.combine_chunks() if isinstance(b, pa.ChunkedArray) else b
    return bool(a.type == b.type and repr(a.to_pylist()) == repr(b.to_pylist()))


class _Server:
    """The query server on its own thread and event loop."""

    def __init__(self, store: Store) -> None:
        self.url = ""
        self._ready = threading.Event()
        self._store = store
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="api-server")
        self._thread.start()
        assert self._ready.wait(30), "server did not start"

    def _main(self) -> None:
        async def run() -> None:
            self._stop = asyncio.Event()
            app = make_api_app(store=self._store, auth=auth(), clock=clock(),
                               config=ApiConfig())

            def listening(url: str) -> None:
                self.url = url
                self._ready.set()
            await serve(app, host="127.0.0.1", port=free_port(), stop=self._stop,
                        on_listening=listening)
        self._loop.run_until_complete(run())
        self._loop.close()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module", params=["local", "s3"])
def server(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store]]:
    """A query server over a seeded store: a local directory, and S3 on a moto server."""
    if request.param == "s3":
        store = Store(f"s3://{request.getfixturevalue('moto_server').create_bucket()}/tt")
    else:
        store = Store(tmp_path_factory.mktemp("client") / "store")
    seed(store)
    s = _Server(store)
    try:
        yield s.url, store
    finally:
        s.close()


@pytest.fixture
def reference(server: tuple[str, Store]) -> Any:
    _, store = server
    ent = pa.array([e for e, _ in QUERIES], pa.int64())
    at = pa.array([t for _, t in QUERIES], TIMESTAMP_TYPE)
    return Engine(store, clock=clock()).features(ent, at, FEATURES, knowledge="as_known")


ENT = [e for e, _ in QUERIES]
AT = pa.array([t for _, t in QUERIES], TIMESTAMP_TYPE)


def check_table(table: pa.Table, ref: Any) -> None:
    assert table.column_names == ["entity_id", "at", *FEATURES, "status"]
    assert table.column("entity_id").to_pylist() == ENT
    assert table.column("at").cast(pa.int64()).to_pylist() == [t for _, t in QUERIES]
    for name in FEATURES:
        assert same(table.column(name), ref.values.column(name)), name
        assert table.column("status").combine_chunks().field(name).to_pylist() == \
            ref.status.column(name).to_pylist()
    assert is_complete(table) is ref.complete


async def test_async_methods(server: tuple[str, Store], reference: Any) -> None:
    url, store = server
    async with Client(url, token="rw-token") as c:
        check_table(await c.features(ENT, AT, FEATURES), reference)
        row = await c.feature_row(BIG, format_timestamp(T0 + DAY + 13 * H), FEATURES)
        assert row.num_rows == 1 and row.column("entity_id").to_pylist() == [BIG]
        for name in FEATURES:
            assert same(row.column(name), reference.values.column(name).slice(4, 1)), name
        facts = await c.facts("play", 1, format_timestamp(T0 + 5 * DAY))
        assert facts.column("video_id").to_pylist() == [9, 2**60, 7]
        snap = await c.snapshot("history", 1, format_timestamp(T0 + 8 * H))
        assert snap.column("status").to_pylist() == ["ok"]
        assert snap.column("payload").to_pylist() == [{"count": 3, "name": "a"}]
        cat = await c.catalog()
        assert sorted(ft["name"] for ft in cat["fact_types"]) == ["page", "play"]
        labels = pa.table({"entity_id": pa.array(ENT, pa.int64()), "at": AT})
        store.write_parquet("labels/client.parquet", labels)
        job = await c.start_training_set("labels/client.parquet", FEATURES[:3],
                                         "out/client.parquet")
        done = await c.wait_training_set(job, poll_s=0.05, timeout_s=60)
        assert done["state"] == "done" and done["progress"] == 1.0
        out = store.read_parquet("out/client.parquet")
        for name in FEATURES[:3]:
            assert same(out.column(name), reference.values.column(name))


def test_sync_twins(server: tuple[str, Store], reference: Any) -> None:
    url, _ = server
    with Client(url, token="r-token") as c:
        table = c.features_sync(ENT, AT, FEATURES)
        check_table(table, reference)
        df = table.to_pandas()
        assert list(df["entity_id"]) == ENT
        assert c.feature_row_sync(1, format_timestamp(T0 + 10 * H), ["play.count.1d"]) \
            .column("play.count.1d").to_pylist() == [2]
        assert c.catalog_sync()["services"]["history"]["entity_type"] == "int64"


async def test_sync_twins_inside_a_running_loop(server: tuple[str, Store],
                                                reference: Any) -> None:
    url, _ = server
    asyncio.get_running_loop()  # as in Jupyter: a loop is running in this thread
    c = Client(url, token="r-token")
    try:
        check_table(c.features_sync(ENT, AT, FEATURES), reference)
        # a single time for every row, as a string
        t = c.features_sync([1, 3], format_timestamp(T0 + 5 * DAY), ["play.count.7d"])
        assert t.column("play.count.7d").to_pylist() == [3, 0]
    finally:
        c.close()


def test_errors_raise_with_code_and_status(server: tuple[str, Store]) -> None:
    url, _ = server
    with Client(url, token="r-token") as c:
        with pytest.raises(ApiRequestError) as exc:
            c.features_sync([1], format_timestamp(T0), ["nope.x", "play.tag.sum.1d"])
        assert exc.value.status == 400 and exc.value.code == "invalid_feature"
        assert "nope.x" in exc.value.message and "play.tag.sum.1d" in exc.value.message
        with pytest.raises(ApiRequestError) as exc:
            c.start_training_set_sync("labels/x.parquet", ["play.count.1d"], "o.parquet")
        assert exc.value.status == 403 and exc.value.code == "forbidden"
    with Client(url) as anon, pytest.raises(ApiRequestError) as exc:
        anon.catalog_sync()
    assert exc.value.status == 401 and exc.value.code == "unauthorized"
    with Client(f"http://127.0.0.1:{free_port()}", token="r-token") as down, \
            pytest.raises(ApiUnavailable) as exc2:
        down.catalog_sync()
    assert exc2.value.status == 503
