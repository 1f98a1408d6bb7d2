"""The query server (``timetravel api serve``) on loopback: the same answers as the engine in JSON
and Arrow, auth, bad input (status, code, and the field or features named), the cache never
hiding new facts, training-set jobs across a restart, and /openapi.json covering every route."""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from factlog import FactReader
from tests.api_helpers import (
    ARROW,
    BIG,
    FEATURES,
    QUERIES,
    RW,
    R,
    W,
    add_late_object,
    auth,
    clock,
    rows_json,
    seed,
)
from tests.factdata import DAY, PLAY, T0, H
from timetravel_api._codec import arrow_from_ipc
from timetravel_api._engine import Engine
from timetravel_api._server import ApiConfig, make_api_app
from ttstore import TIMESTAMP_TYPE, Store, StoreUnavailable, format_timestamp


def make(store: Store, **config: Any) -> Any:
    return make_api_app(store=store, auth=auth(), clock=clock(), config=ApiConfig(**config))


@pytest.fixture
def seeded(local_store: Store) -> Store:
    seed(local_store)
    return local_store


@pytest.fixture
def seeded_any(store: Store) -> Store:
    """:func:`seeded` on every backend: a local directory, and S3 on a moto server."""
    seed(store)
    return store


@pytest.fixture
async def client(aiohttp_client: Any, seeded: Store) -> Any:
    return await aiohttp_client(make(seeded, max_rows=1000, max_body_bytes=1 << 20))


def same(a: Any, b: Any) -> bool:
    """Equal type and values, NaN equal to NaN (Arrow's equals says NaN != NaN)."""
    a = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
    b = b.combine_chunks() if isinstance(b, pa.ChunkedArray) else b
    return bool(a.type == b.type and repr(a.to_pylist()) == repr(b.to_pylist()))


def expected_json(v: Any, t: pa.DataType, json_text: bool) -> Any:
    """A value as the SPEC's JSON form, computed independently of the server's codec."""
    if v is None:
        return None
    if pa.types.is_timestamp(t):
        return format_timestamp(int(pa.scalar(v, t).cast(pa.int64()).as_py()))
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 2**53:
        return str(v)
    if json_text:
        return json.loads(v)
    if isinstance(v, list):
        return [str(x) if isinstance(x, int) and abs(x) > 2**53 else x for x in v]
    return v


@pytest.mark.parametrize("knowledge", ["as_known", "event"])
async def test_same_answers_as_the_engine_json_and_arrow(aiohttp_client: Any, seeded_any: Store,
                                                         knowledge: str) -> None:
    client = await aiohttp_client(make(seeded_any))
    ent = pa.array([e for e, _ in QUERIES], pa.int64())
    at = pa.array([t for _, t in QUERIES], TIMESTAMP_TYPE)
    res = Engine(seeded_any, clock=clock()).features(ent, at, FEATURES, knowledge=knowledge)
    body = {"rows": rows_json(), "features": FEATURES, "knowledge": knowledge}

    resp = await client.post("/v1/features", json=body, headers=R)
    assert resp.status == 200, await resp.text()
    got = await resp.json()
    assert got["complete"] is res.complete
    assert len(got["rows"]) == len(QUERIES)
    for i, row in enumerate(got["rows"]):
        e, t = QUERIES[i]
        assert row["entity_id"] == (str(e) if e > 2**53 else e)
        assert row["at"] == format_timestamp(t)
        assert list(row["features"]) == FEATURES
        for name in FEATURES:
            col = res.values.column(name)
            want = expected_json(col[i].as_py(), col.type, name == "play.meta.last")
            assert row["features"][name] == want, (i, name)
            assert row["status"][name] == res.status.column(name)[i].as_py()

    resp = await client.post("/v1/features", json=body, headers={**R, "Accept": ARROW})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(ARROW)
    table = arrow_from_ipc(await resp.read())
    assert table.column_names == ["entity_id", "at", *FEATURES, "status"]
    assert table.column("entity_id").to_pylist() == [e for e, _ in QUERIES]
    assert table.column("at").cast(pa.int64()).to_pylist() == [t for _, t in QUERIES]
    for name in FEATURES:
        assert same(table.column(name), res.values.column(name)), name
        st = table.column("status").combine_chunks().field(name)
        assert st.to_pylist() == res.status.column(name).to_pylist()


async def test_answers_have_meaning(client: Any) -> None:
    """Spot checks against the seeded facts, so a server and engine agreeing on garbage fails."""
    body = {"rows": rows_json(), "features": ["play.secs.last", "play.count.1d",
                                              "play.video_id.last", "play.meta.last"]}
    got = (await (await client.post("/v1/features", json=body, headers=R)).json())["rows"]
    assert got[0]["features"]["play.count.1d"] == 0 and got[0]["status"]["play.secs.last"] == \
        "missing"
    assert got[1]["features"] == {"play.secs.last": "NaN", "play.count.1d": 2,
                                  "play.video_id.last": str(2**60), "play.meta.last": "text"}
    # the late fact (event day 1 10:00, logged day 3) is not known at day 1 11:00
    assert got[2]["features"]["play.video_id.last"] == str(2**60)
    assert got[3]["features"]["play.video_id.last"] == 9
    assert got[4]["entity_id"] == str(BIG) and got[4]["features"]["play.meta.last"] == 3
    assert got[6]["features"]["play.meta.last"] == {"a": [1, 2]}
    body["knowledge"] = "event"
    got = (await (await client.post("/v1/features", json=body, headers=R)).json())["rows"]
    assert got[2]["features"]["play.video_id.last"] == 9


async def test_one_row_get_matches_post(client: Any) -> None:
    e, t = QUERIES[1]
    feats = ",".join(FEATURES)
    resp = await client.get(f"/v1/features/{e}", params={"at": format_timestamp(t),
                                                         "features": feats}, headers=R)
    assert resp.status == 200, await resp.text()
    one = await resp.json()
    post = await (await client.post("/v1/features", json={
        "rows": [{"entity_id": e, "at": format_timestamp(t)}], "features": FEATURES},
        headers=R)).json()
    assert one == {**post["rows"][0], "complete": post["complete"]}
    # the offset form is echoed in Z form with 6 fractional digits
    resp = await client.get("/v1/features/1", params={"at": "1970-01-01T01:00:00+01:00",
                                                       "features": "play.count.1d"}, headers=R)
    assert (await resp.json())["at"] == "1970-01-01T00:00:00.000000Z"


async def test_string_keys_stay_strings(client: Any) -> None:
    body = {"rows": [{"entity_id": "007", "at": format_timestamp(T0 + 3 * H)},
                     {"entity_id": "7", "at": format_timestamp(T0 + 3 * H)}],
            "features": ["page.n.sum.1d", "page.path.last"]}
    got = (await (await client.post("/v1/features", json=body, headers=R)).json())["rows"]
    assert got[0]["entity_id"] == "007"
    assert got[0]["features"] == {"page.n.sum.1d": 3.0, "page.path.last": "/b"}
    assert got[1]["features"] == {"page.n.sum.1d": None, "page.path.last": None}


async def test_raw_facts_newest_first(client: Any) -> None:
    at = format_timestamp(T0 + 5 * DAY)
    resp = await client.get("/v1/facts/play/1", params={"at": at}, headers=R)
    assert resp.status == 200, await resp.text()
    facts = (await resp.json())["facts"]
    assert [f["video_id"] for f in facts] == [9, str(2**60), 7]
    assert facts[2]["meta"] == {"a": [1, 2]} and facts[1]["secs"] == "NaN"
    # as_known at day 1 11:00 hides the late fact; event mode shows it; a window bounds it
    at = format_timestamp(T0 + DAY + 11 * H)
    known = (await (await client.get("/v1/facts/play/1", params={"at": at},
                                     headers=R)).json())["facts"]
    assert [f["video_id"] for f in known] == [str(2**60), 7]
    event = (await (await client.get("/v1/facts/play/1", params={
        "at": at, "knowledge": "event", "window": "2h"}, headers=R)).json())["facts"]
    assert [f["video_id"] for f in event] == [9]
    arrow = await client.get("/v1/facts/play/1", params={"at": at}, headers={**R, "Accept": ARROW})
    assert arrow_from_ipc(await arrow.read()).column("video_id").to_pylist() == [2**60, 7]
    resp = await client.get("/v1/facts/nope/1", params={"at": at}, headers=R)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_fact_type"


async def test_snapshot_row_with_provenance(client: Any) -> None:
    resp = await client.get("/v1/snapshots/history/2",
                            params={"at": format_timestamp(T0 + 8 * H)}, headers=R)
    assert resp.status == 200, await resp.text()
    got = await resp.json()
    assert got["status"] == "ok" and got["fields"] == {"count": 5, "name": "b"}
    assert got["provenance"]["captured_at"] == format_timestamp(T0 + 6 * H)
    assert got["provenance"]["age_s"] == 7200.0 and got["provenance"]["run_id"]
    # before the run committed, as_known sees nothing
    early = await (await client.get("/v1/snapshots/history/2", params={
        "at": format_timestamp(T0 + 6 * H + 1)}, headers=R)).json()
    assert early["status"] == "not_sampled" and early["fields"] is None
    resp = await client.get("/v1/snapshots/nope/2", params={"at": format_timestamp(T0)},
                            headers=R)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_service"


async def test_catalog(client: Any) -> None:
    resp = await client.get("/v1/catalog", headers=R)
    assert resp.status == 200
    cat = await resp.json()
    assert sorted(ft["name"] for ft in cat["fact_types"]) == ["page", "play"]
    assert cat["services"]["history"]["entity_type"] == "int64"
    assert len(cat["runs"]) == 1 and cat["runs"][0]["services"]["history"]["requested"] == 3
    assert cat["watermarks"] == {}


# -- auth ------------------------------------------------------------------------------------


async def test_auth(client: Any) -> None:
    body = {"rows": rows_json()[:1], "features": ["play.count.1d"]}
    resp = await client.post("/v1/features", json=body)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    resp = await client.post("/v1/features", json=body, headers={"Authorization": "Bearer x"})
    assert resp.status == 401
    resp = await client.post("/v1/features", json=body, headers=W)  # write only: no read
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    job = {"labels": "labels.parquet", "features": ["play.count.1d"], "out": "o.parquet"}
    resp = await client.post("/v1/training-sets", json=job, headers=R)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "forbidden"
    for path in ("/healthz", "/metrics"):
        assert (await client.get(path)).status == 200
    assert (await client.get("/openapi.json")).status == 401
    assert (await client.get("/v1/catalog", headers=R)).status == 200


# -- bad input -------------------------------------------------------------------------------


def _body(**over: Any) -> dict[str, Any]:
    return {"rows": rows_json()[:3], "features": ["play.count.1d"], **over}


BAD = [
    ("naive at", _body(rows=[{"entity_id": 1, "at": "2026-01-01T00:00:00Z"},
                             {"entity_id": 1, "at": "2026-01-01T00:00:00"}]),
     400, "invalid_timestamp", ["rows[1].at", "offset"]),
    ("7 digits", _body(rows=[{"entity_id": 1, "at": "2026-01-01T00:00:00.1234567Z"}]),
     400, "invalid_timestamp", ["rows[0].at", "6 fractional"]),
    ("unknown features", _body(features=["play.count.1d", "nope.x", "play.nofield.last"]),
     400, "invalid_feature", ["nope.x", "play.nofield.last"]),
    ("type-invalid", _body(features=["play.tag.sum.7d", "play.meta.max.1d"]),
     400, "invalid_feature", ["play.tag.sum.7d", "play.meta.max.1d"]),
    ("malformed window", _body(features=["play.secs.sum.7x", "play.count.0d"]),
     400, "invalid_feature", ["play.secs.sum.7x", "play.count.0d"]),
    ("wrong entity type", _body(rows=[{"entity_id": 1, "at": "2026-01-01T00:00:00Z"},
                                      {"entity_id": "abc", "at": "2026-01-01T00:00:00Z"}]),
     400, "entity_type_mismatch", ["rows[1].entity_id"]),
    ("mixed key types", _body(features=["play.count.1d", "page.count.1d"]),
     400, "entity_type_mismatch", ["play.count.1d", "page.count.1d"]),
    ("bad knowledge", _body(knowledge="later"), 400, "invalid_input", ["knowledge"]),
    ("no features", _body(features=[]), 400, "invalid_input", ["features"]),
    ("too many rows", _body(rows=[{"entity_id": 1, "at": "2026-01-01T00:00:00Z"}] * 1001),
     413, "too_many_rows", ["1001", "1000"]),
]


@pytest.mark.parametrize(("what", "body", "status", "code", "named"), BAD,
                         ids=[b[0] for b in BAD])
async def test_bad_input(client: Any, what: str, body: Any, status: int, code: str,
                         named: list[str]) -> None:
    resp = await client.post("/v1/features", json=body, headers=R)
    assert resp.status == status, await resp.text()
    err = (await resp.json())["error"]
    assert err["code"] == code
    for n in named:
        assert n in err["message"], (n, err["message"])


async def test_one_row_get_bad_input(client: Any) -> None:
    cases = [({"features": "play.count.1d"}, "at", "invalid_input"),
             ({"at": "2027-01-01T00:00:00", "features": "play.count.1d"}, "at",
              "invalid_timestamp"),
             ({"at": "2027-01-01T00:00:00Z", "features": "play.count.1d,nope.x"}, "nope.x",
              "invalid_feature"),
             ({"at": "2027-01-01T00:00:00Z", "features": "play.count.1d", "x": "1"}, "x",
              "invalid_input")]
    for params, named, code in cases:
        resp = await client.get("/v1/features/1", params=params, headers=R)
        err = (await resp.json())["error"]
        assert resp.status == 400 and err["code"] == code and named in err["message"], err
    resp = await client.get("/v1/features/abc", params={
        "at": "2027-01-01T00:00:00Z", "features": "play.count.1d"}, headers=R)
    err = (await resp.json())["error"]
    assert resp.status == 400 and err["code"] == "entity_type_mismatch"
    assert err["field"] == "entity_id"


async def test_non_json_and_not_an_object(client: Any) -> None:
    resp = await client.post("/v1/features", data=b"rows=1", headers=R)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"
    resp = await client.post("/v1/features", json=[1, 2], headers=R)
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "body"


async def test_a_million_rows_is_413(aiohttp_client: Any, seeded: Store) -> None:
    c = await aiohttp_client(make(seeded))  # the defaults
    row = b'{"entity_id":1,"at":"2026-01-01T00:00:00Z"},'
    body = b'{"features":["play.count.1d"],"rows":[' + row * (10**6 - 1) + row[:-1] + b"]}"
    resp = await c.post("/v1/features", data=io.BytesIO(body),
                        headers={**R, "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] in ("body_too_large", "too_many_rows")
    # the same rows under a raised body limit are refused by the row limit
    c2 = await aiohttp_client(make(seeded, max_body_bytes=64 << 20))
    resp = await c2.post("/v1/features", data=io.BytesIO(body),
                         headers={**R, "Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_many_rows"


# -- the cache never hides new data ----------------------------------------------------------


async def test_new_fact_object_is_seen_at_once(client: Any, seeded: Store) -> None:
    body = {"rows": [{"entity_id": 1, "at": format_timestamp(T0 + 6 * DAY)}],
            "features": ["play.secs.last", "play.count.7d"]}
    for _ in range(2):  # warm every cache
        first = await (await client.post("/v1/features", json=body, headers=R)).json()
    assert first["rows"][0]["features"] == {"play.secs.last": 4.0, "play.count.7d": 3}
    add_late_object(seeded)
    again = await (await client.post("/v1/features", json=body, headers=R)).json()
    assert again["rows"][0]["features"] == {"play.secs.last": 100.0, "play.count.7d": 4}


# -- training-set jobs -----------------------------------------------------------------------


async def _wait(c: Any, job_id: str) -> dict[str, Any]:
    for _ in range(400):
        doc: dict[str, Any] = await (await c.get(f"/v1/training-sets/{job_id}",
                                                 headers=R)).json()
        if doc["state"] in ("done", "failed"):
            return doc
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


def write_labels(store: Store, k: str = "labels/l.parquet") -> pa.Table:
    labels = pa.table({"entity_id": pa.array([e for e, _ in QUERIES], pa.int64()),
                       "at": pa.array([t for _, t in QUERIES], TIMESTAMP_TYPE),
                       "label": pa.array(np.arange(len(QUERIES), dtype=np.float64))})
    store.write_parquet(k, labels)
    return labels


async def test_training_set_job_survives_a_restart(aiohttp_client: Any, seeded: Store) -> None:
    labels = write_labels(seeded)
    feats = ["play.secs.sum.7d", "play.video_id.last"]
    c1 = await aiohttp_client(make(seeded))
    resp = await c1.post("/v1/training-sets", headers=RW, json={
        "labels": "labels/l.parquet", "features": feats, "out": "out/ts.parquet"})
    assert resp.status == 202, await resp.text()
    job_id = (await resp.json())["id"]
    doc = await _wait(c1, job_id)
    assert doc["state"] == "done" and doc["progress"] == 1.0 and doc["error"] is None
    await c1.close()  # the first server is gone

    c2 = await aiohttp_client(make(seeded))
    doc2 = await (await c2.get(f"/v1/training-sets/{job_id}", headers=R)).json()
    assert doc2 == doc
    out = seeded.read_parquet("out/ts.parquet")
    assert out.column_names == ["entity_id", "at", "label", *feats]
    res = Engine(seeded, clock=clock()).features(labels.column("entity_id"),
                                                 labels.column("at"), feats)
    for f in feats:
        assert same(out.column(f), res.values.column(f))
    # outputs are never overwritten; unknown jobs are 404
    resp = await c2.post("/v1/training-sets", headers=W, json={
        "labels": "labels/l.parquet", "features": feats, "out": "out/ts.parquet"})
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "output_exists"
    resp = await c2.get("/v1/training-sets/nope", headers=R)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "job_not_found"


async def test_unfinished_job_is_requeued_on_start(aiohttp_client: Any, seeded: Store) -> None:
    write_labels(seeded)
    doc = {"id": "left-running", "state": "running", "progress": 0.4, "out": "out/r.parquet",
           "error": None, "labels": "labels/l.parquet", "features": ["play.count.7d"],
           "knowledge": "event", "created_at": None, "started_at": None, "finished_at": None}
    seeded.put("jobs/training-sets/left-running.json", json.dumps(doc).encode())
    c = await aiohttp_client(make(seeded))
    got = await _wait(c, "left-running")
    assert got["state"] == "done" and got["progress"] == 1.0
    assert seeded.read_parquet("out/r.parquet").column("play.count.7d").to_pylist() == \
        [0, 2, 3, 3, 1, 0, 1]


async def test_a_read_replica_runs_and_requeues_no_jobs(aiohttp_client: Any,
                                                        seeded: Store) -> None:
    """``--no-jobs``: an unfinished job stays for the job server; a new one is a 503; any job's
    state is still answered (it lives in the store)."""
    write_labels(seeded)
    doc = {"id": "left-running", "state": "running", "progress": 0.4, "out": "out/r.parquet",
           "error": None, "labels": "labels/l.parquet", "features": ["play.count.7d"],
           "knowledge": "event", "created_at": None, "started_at": None, "finished_at": None}
    seeded.put("jobs/training-sets/left-running.json", json.dumps(doc).encode())
    c = await aiohttp_client(make(seeded, jobs=False))
    resp = await c.post("/v1/training-sets", headers=W, json={
        "labels": "labels/l.parquet", "features": ["play.count.7d"], "out": "out/x.parquet"})
    assert resp.status == 503 and (await resp.json())["error"]["code"] == "jobs_disabled"
    await asyncio.sleep(0.3)
    got = await (await c.get("/v1/training-sets/left-running", headers=R)).json()
    assert got["state"] == "running" and got["progress"] == 0.4
    assert not seeded.exists("out/r.parquet") and not seeded.exists("out/x.parquet")
    assert (await (await c.get("/healthz")).json())["jobs_active"] == 0


async def _warm_cache(c: Any) -> dict[str, Any]:
    for _ in range(200):
        cache: dict[str, Any] = (await (await c.get("/healthz")).json())["row_group_cache"]
        if cache["warm"] != "running":
            return cache
        await asyncio.sleep(0.05)
    raise AssertionError("the row-group cache never finished warming")


async def test_the_server_warms_its_row_group_cache_at_start(aiohttp_client: Any,
                                                             seeded: Store) -> None:
    c = await aiohttp_client(make(seeded))
    cache = await _warm_cache(c)
    assert cache["warm"] == "done" and cache["warmed_groups"] > 0
    assert cache["misses"] == cache["warmed_groups"] and 0 < cache["bytes"] <= cache["max_bytes"]
    resp = await c.get(f"/v1/features/1?at={format_timestamp(T0 + 6 * DAY)}"
                       "&features=play.secs.last,play.count.7d", headers=R)
    assert resp.status == 200
    after = await _warm_cache(c)
    assert after["misses"] == cache["misses"] and after["hits"] > cache["hits"]
    # off by config, and with no cache to fill
    for config in ({"warm": False}, {"cache_bytes": 0}):
        c2 = await aiohttp_client(make(seeded, **config))
        assert (await _warm_cache(c2))["warm"] == "off"


async def test_a_failed_warm_leaves_a_working_server(aiohttp_client: Any, seeded: Store,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(self: Any, **_: Any) -> int:
        raise StoreUnavailable("store down")

    monkeypatch.setattr(FactReader, "warm", unreadable)
    c = await aiohttp_client(make(seeded))
    assert (await _warm_cache(c))["warm"] == "failed"
    resp = await c.get(f"/v1/features/1?at={format_timestamp(T0 + 6 * DAY)}"
                       "&features=play.secs.last", headers=R)
    assert resp.status == 200
    assert (await resp.json())["features"]["play.secs.last"] == 4.0


async def test_job_request_errors_and_limit(aiohttp_client: Any, seeded: Store,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from timetravel_api import _server

    write_labels(seeded)
    release = threading.Event()
    real_build = _server._build

    def held_build(*args: Any, **kwargs: Any) -> Any:  # the first job stays active until told
        assert release.wait(30)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(_server, "_build", held_build)
    c = await aiohttp_client(make(seeded, max_jobs=1))
    try:
        ok = {"labels": "labels/l.parquet", "features": ["play.count.7d"], "out": "o/1.parquet"}
        for bad, code in [({**ok, "labels": "../x"}, "invalid_input"),
                          ({**ok, "features": ["nope.x"]}, "invalid_feature"),
                          ({**ok, "labels": "missing.parquet"}, "not_found"),
                          ({**ok, "extra": 1}, "invalid_input")]:
            resp = await c.post("/v1/training-sets", json=bad, headers=W)
            assert resp.status in (400, 404) and (await resp.json())["error"]["code"] == code, bad
        # with max_jobs=1, a second job while the first is active is 429; once it is done, 202
        r1 = await c.post("/v1/training-sets", json=ok, headers=W)
        r2 = await c.post("/v1/training-sets", json={**ok, "out": "o/2.parquet"}, headers=W)
        assert r1.status == 202
        assert r2.status == 429 and (await r2.json())["error"]["code"] == "too_many_jobs"
        release.set()
        assert (await _wait(c, (await r1.json())["id"]))["state"] == "done"
        r3 = await c.post("/v1/training-sets", json={**ok, "out": "o/2.parquet"}, headers=W)
        assert r3.status == 202
        assert (await _wait(c, (await r3.json())["id"]))["state"] == "done"
    finally:
        release.set()  # never leave the job thread waiting


# -- the documentation and metrics -----------------------------------------------------------


async def test_openapi_lists_every_route(client: Any) -> None:
    doc = await (await client.get("/openapi.json", headers=R)).json()
    served = set()
    for route in client.server.app.router.routes():
        if route.method == "HEAD":
            continue
        served.add((route.method.lower(), route.resource.canonical))
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    assert ("post", "/v1/features") in served and ("get", "/v1/catalog") in served


async def test_metrics_have_routes_and_engine_timings(client: Any) -> None:
    await client.post("/v1/features", json=_body(), headers=R)
    text = await (await client.get("/metrics")).text()
    assert 'route="/v1/features"' in text
    assert 'timetravel_api_engine_seconds_count{operation="features"} 1.0' in text
    assert "timetravel_api_row_group_cache_misses" in text


async def test_same_answers_after_compaction_through_the_cache(aiohttp_client: Any,
                                                               seeded_any: Store) -> None:
    from factlog import CompactionConfig, Compactor

    seeded = seeded_any
    client = await aiohttp_client(make(seeded))

    body = {"rows": rows_json(), "features": FEATURES, "knowledge": "event"}
    before = await (await client.post("/v1/features", json=body, headers=R)).json()
    one = {"at": format_timestamp(T0 + 5 * DAY), "features": ",".join(FEATURES),
           "knowledge": "event"}
    one_before = await (await client.get(f"/v1/features/{BIG}", params=one, headers=R)).json()
    report = Compactor(seeded, config=CompactionConfig(grace_us=0, min_files=1)).run()
    assert report.totals().get("files_out", 0) >= 1
    for _ in range(2):  # the second time from cached (sliced) row groups
        after = await (await client.post("/v1/features", json=body, headers=R)).json()
        assert after == before
        one_after = await (await client.get(f"/v1/features/{BIG}", params=one,
                                            headers=R)).json()
        assert one_after == one_before
    assert one_before["features"]["play.secs.last"] == 10.0
    health = await (await client.get("/healthz")).json()
    assert health["row_group_cache"]["hits"] > 0


async def test_a_logger_flush_after_compacted_groups_are_cached_is_seen_at_once(
        client: Any, seeded: Store, tmp_path: Any) -> None:
    """The cache holds decoded compacted row groups; a FactLogger then flushes a raw file for
    the same entity and date: the very next lookup (no wait, no restart) includes its fact."""
    from factlog import CompactionConfig, Compactor, FactLogger
    from ttstore import ManualClock
    from ttstore._listing import RACY_MARGIN_NS

    Compactor(seeded, config=CompactionConfig(grace_us=0, min_files=1)).run()
    # Quiet for longer than the listing cache's racy margin, so its listings are trusted (and
    # kept) from here on, as they are on a store that is not being written every second.
    await asyncio.sleep(RACY_MARGIN_NS / 1e9 + 0.2)
    one = {"at": format_timestamp(T0 + 3 * DAY + H), "features": "play.secs.last,play.count.7d"}
    for _ in range(2):  # the second answer comes from cached compacted row groups
        before = await (await client.get("/v1/features/1", params=one, headers=R)).json()
    assert before["features"] == {"play.secs.last": 4.0, "play.count.7d": 3}
    hits = (await (await client.get("/healthz")).json())["row_group_cache"]["hits"]
    assert hits > 0
    logger = FactLogger(store=seeded, producer="late-svc", spool_dir=tmp_path / "spool",
                        fact_types=[PLAY], clock=ManualClock(T0 + DAY + 20 * H))
    try:
        assert logger.log("play", {"member_id": 1, "video_id": 3, "secs": 42.0,
                                   "event_time": format_timestamp(T0 + DAY + 20 * H)})
        logger.flush()
        assert logger.stats().written == 1
    finally:
        logger.close()
    assert any(o.key.startswith("facts/play/date=2027-01-02/") and "/c-" not in o.key
               for o in seeded.list("facts/play"))  # a raw file beside the compacted one
    after = await (await client.get("/v1/features/1", params=one, headers=R)).json()
    assert after["features"] == {"play.secs.last": 42.0, "play.count.7d": 4}


async def test_provenance_on_request(client: Any) -> None:
    at = T0 + 10 * H
    body = {"rows": [{"entity_id": 1, "at": format_timestamp(at)}],
            "features": ["play.video_id.last", "play.count.1d"], "provenance": True}
    got = await (await client.post("/v1/features", json=body, headers=R)).json()
    prov = got["rows"][0]["provenance"]["play.video_id.last"]
    assert prov["time"] == format_timestamp(T0 + 5 * H)
    assert prov["age_s"] == 5 * 3600.0
    assert prov["source"].startswith("facts/play/date=2027-01-01/")
    arrow = await client.post("/v1/features", json=body, headers={**R, "Accept": ARROW})
    table = arrow_from_ipc(await arrow.read())
    assert table.column_names[-2:] == ["status", "provenance"]
    assert table.column("provenance")[0].as_py()["play.video_id.last"]["source"] == \
        prov["source"]
    plain = await (await client.post("/v1/features", json={**body, "provenance": False},
                                     headers=R)).json()
    assert "provenance" not in plain["rows"][0]


@pytest.mark.s3
async def test_same_answers_on_s3(aiohttp_client: Any, s3_store: Store) -> None:
    seed(s3_store)
    c = await aiohttp_client(make(s3_store))
    ent = pa.array([e for e, _ in QUERIES], pa.int64())
    at = pa.array([t for _, t in QUERIES], TIMESTAMP_TYPE)
    res = Engine(s3_store, clock=clock()).features(ent, at, FEATURES)
    body = {"rows": rows_json(), "features": FEATURES}
    for _ in range(2):  # cold, then through the caches
        resp = await c.post("/v1/features", json=body, headers={**R, "Accept": ARROW})
        assert resp.status == 200, await resp.text()
        table = arrow_from_ipc(await resp.read())
        for name in FEATURES:
            assert same(table.column(name), res.values.column(name)), name
    add_late_object(s3_store)
    one = await (await c.get("/v1/features/1", params={
        "at": format_timestamp(T0 + 6 * DAY), "features": "play.secs.last"}, headers=R)).json()
    assert one["features"] == {"play.secs.last": 100.0}
