"""The ingest server (``timetravel facts serve``) against a real server on loopback: auth, bad
input (each a clear error, the valid rows of the same request kept), the three body formats,
schema evolution, and durability (202 only once durable; SIGKILL; SIGTERM)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from factlog import FactTypeCatalog
from factlog._server import IngestConfig, make_ingest_app
from tests.conftest import free_port
from ttstore import (
    TIMESTAMP_TYPE,
    Authenticator,
    OffsetClock,
    Store,
    format_timestamp,
    parse_timestamp,
    parse_tokens,
)

NOW = "2026-01-02T00:00:00Z"
NOW_US = parse_timestamp(NOW, field="now")
TOKENS = "w-token write checkout\nr-token read reader\nrw-token read,write importer\n"
W = {"Authorization": "Bearer w-token"}
R = {"Authorization": "Bearer r-token"}
PLAYBACK = {"entity": {"name": "member_id", "type": "int64"},
            "fields": {"video_id": "int64", "seconds": "float64", "device": "string"}}
ARROW = "application/vnd.apache.arrow.stream"


def make_client_app(store: Store, spool: Path, **config: Any):  # type: ignore[no-untyped-def]
    return make_ingest_app(
        store=store, spool_dir=spool, auth=Authenticator(parse_tokens(TOKENS)),
        clock=OffsetClock(NOW_US), config=IngestConfig(**config))


@pytest.fixture
async def client(aiohttp_client, local_store: Store, tmp_path: Path):  # type: ignore[no-untyped-def]
    c = await aiohttp_client(make_client_app(local_store, tmp_path / "spool",
                                             max_body_bytes=64 * 1024))
    resp = await c.put("/v1/fact-types/playback", json=PLAYBACK, headers=W)
    assert resp.status == 201, await resp.text()
    return c


def read_facts(store: Store, fact_type: str) -> pa.Table:
    """Every stored fact of ``fact_type``, read with plain pyarrow in the latest schema."""
    schema = FactTypeCatalog(store).get(fact_type, refresh=True).arrow_schema()
    fs, root = store.arrow_filesystem()
    base = f"{root.rstrip('/')}/facts/{fact_type}"
    try:
        dataset = ds.dataset(base, filesystem=fs, format="parquet", schema=schema,
                             partitioning="hive")
    except FileNotFoundError:
        return schema.empty_table()
    return dataset.to_table(columns=schema.names)


def rows_of(table: pa.Table, *cols: str) -> list[tuple[Any, ...]]:
    d = table.select(list(cols)).to_pylist()
    return sorted(tuple(r[c] for c in cols) for r in d)


async def post(client, fact_type: str, body: Any, *, ctype: str = "application/json",  # type: ignore[no-untyped-def]
               headers: dict[str, str] = W) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(f"/v1/facts/{fact_type}", data=data,
                             headers={**headers, "Content-Type": ctype})
    return resp.status, await resp.json()


async def flush(client) -> None:  # type: ignore[no-untyped-def]
    resp = await client.post("/v1/flush", headers=W)
    assert resp.status == 200, await resp.text()


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


# --- auth ------------------------------------------------------------------------------------

async def test_auth_and_producer_from_token_name(client, local_store: Store) -> None:  # type: ignore[no-untyped-def]
    fact = [{"member_id": 1, "event_time": "2026-01-01T10:00:00Z", "video_id": 5}]
    st, body = await post(client, "playback", fact, headers={})
    assert st == 401 and body["error"]["code"] == "unauthorized"
    st, body = await post(client, "playback", fact, headers={"Authorization": "Bearer nope"})
    assert st == 401
    st, body = await post(client, "playback", fact, headers=R)
    assert st == 403 and body["error"]["code"] == "forbidden"
    resp = await client.put("/v1/fact-types/other", json=PLAYBACK, headers=R)
    assert resp.status == 403
    assert (await client.post("/v1/flush", headers=R)).status == 403
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200
    resp = await client.get("/v1/fact-types/playback", headers=R)
    assert resp.status == 200 and (await resp.json())["version"] == 1

    st, body = await post(client, "playback", fact)
    assert (st, body) == (202, {"accepted": 1, "rejected": []})
    st, body = await post(client, "playback", [{**fact[0], "member_id": 2}],
                          headers={"Authorization": "Bearer rw-token"})
    assert st == 202
    await flush(client)
    got = read_facts(local_store, "playback")
    assert rows_of(got, "member_id", "producer") == [(1, "checkout"), (2, "importer")]
    # ingested_at and logged_at come from the server's clock.
    ing = got.column("ingested_at").cast(pa.int64()).to_pylist()
    assert all(NOW_US <= v < NOW_US + 600_000_000 for v in ing)
    assert got.column("logged_at").equals(got.column("ingested_at"))


def test_refuses_to_start_without_auth(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIMETRAVEL_TOKENS_FILE"}
    r = cli("facts", "serve", "--store", str(tmp_path / "s"), "--port", str(free_port()),
            env=env)
    assert r.returncode != 0
    assert "--tokens-file" in r.stderr and "--no-auth" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "tokens"
    bad.write_text("# ok\ngood write a\nbad admin b\n")
    r = cli("facts", "serve", "--store", str(tmp_path / "s"), "--tokens-file", str(bad),
            "--port", str(free_port()), env=env)
    assert r.returncode != 0 and "line 3" in r.stderr and "'admin'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()  # nothing was touched


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "timetravel"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60,
                          env=env)


# --- bad input -------------------------------------------------------------------------------

async def test_bad_rows_rejected_valid_rows_kept(client, local_store: Store) -> None:  # type: ignore[no-untyped-def]
    facts = [
        {"member_id": 1, "event_time": "2026-01-01T10:00:00Z", "video_id": 1},   # ok
        {"member_id": 2, "event_time": "2026-01-01T10:00:00", "video_id": 2},    # naive
        {"member_id": 3, "event_time": "2026-01-01T10:00:00.1234567Z"},          # 7 digits
        {"member_id": 4, "event_time": "2026-01-01T10:00:00Z", "video_id": "x"},  # type
        {"member_id": 5, "event_time": "2026-01-01T10:00:00Z", "colour": "red"},  # unknown
        {"member_id": 6, "event_time": "2026-01-03T00:00:00Z"},                  # future
        {"member_id": 7, "event_time": "2026-01-01T09:00:00Z",
         "logged_at": "2026-01-01T08:00:00Z"},                                   # after logged
        {"member_id": 8, "event_time": "2025-12-01T00:00:00Z", "seconds": 2.5,
         "logged_at": "2025-12-02T00:00:00Z"},                                   # ok import
        {"member_id": 9, "logged_at": "2026-01-05T00:00:00Z"},                   # logged future
        {"event_time": "2026-01-01T10:00:00Z", "video_id": 10},                  # no entity
        "not an object",
        {"member_id": "12", "video_id": 12},                                     # ok, key as str
    ]
    st, body = await post(client, "playback", facts)
    assert st == 202
    assert body["accepted"] == 3
    got = {(r["index"], r["field"], r["code"]) for r in body["rejected"]}
    assert got == {
        (1, "event_time", "invalid_timestamp"),
        (2, "event_time", "invalid_timestamp"),
        (3, "video_id", "invalid_type"),
        (4, "colour", "unknown_field"),
        (5, "event_time", "event_after_logged_at"),
        (6, "event_time", "event_after_logged_at"),
        (8, "logged_at", "logged_at_in_future"),
        (9, "member_id", "missing_entity"),
        (10, None, "invalid_fact"),
    }
    messages = {r["index"]: r["message"] for r in body["rejected"]}
    assert "playback" in messages[1] and "offset" in messages[1]
    assert "6 fractional digits" in messages[2]
    assert "colour" in messages[4]
    await flush(client)
    got_rows = read_facts(local_store, "playback")
    assert rows_of(got_rows, "member_id") == [(1,), (8,), (12,)]
    imp = got_rows.filter(pa.compute.equal(got_rows["member_id"], 8)).to_pylist()[0]
    assert format_timestamp(int(imp["logged_at"].timestamp() * 1e6)) == \
        "2025-12-02T00:00:00.000000Z"  # a supplied logged_at (an import) is kept
    assert imp["ingested_at"] > imp["logged_at"]


async def test_unknown_fact_type_is_404(client) -> None:  # type: ignore[no-untyped-def]
    st, body = await post(client, "nosuch", [{"member_id": 1}])
    assert st == 404 and body["error"]["code"] == "unknown_fact_type"
    assert "nosuch" in body["error"]["message"]


async def test_oversized_body_is_413(client, local_store: Store) -> None:  # type: ignore[no-untyped-def]
    facts = [{"member_id": i, "event_time": "2026-01-01T10:00:00Z", "device": "x" * 100}
             for i in range(1000)]
    st, body = await post(client, "playback", facts)
    assert st == 413 and body["error"]["code"] == "body_too_large"
    await flush(client)
    assert read_facts(local_store, "playback").num_rows == 0


async def test_bodies_that_do_not_parse_are_400(client) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (b"\x00\x01garbage\xff" * 10, ARROW, "invalid_body"),
        (b"", ARROW, "invalid_body"),
        (b"{not json", "application/json", "invalid_body"),
        (b'{"member_id": 1}', "application/json", "invalid_body"),  # an object, not an array
        (b"\xff\xfe", "application/json", "invalid_body"),
        (b"nope\n{bad\n", "application/x-ndjson", "invalid_body"),
        (b"a,b\n1,2\n", "text/csv", "unsupported_media_type"),
    ]
    for data, ctype, code in cases:
        st, body = await post(client, "playback", data, ctype=ctype)
        assert (st, body["error"]["code"]) == (400, code), (data, ctype, body)
    # A body that parses gets 202, even when nothing is accepted.
    assert await post(client, "playback", []) == (202, {"accepted": 0, "rejected": []})
    st, body = await post(client, "playback", [1, {"member_id": None}])
    assert st == 202 and body["accepted"] == 0
    assert [r["code"] for r in body["rejected"]] == ["invalid_fact", "missing_entity"]
    # A whole Arrow column that cannot be right is a 400 naming it.
    t = pa.table({"member_id": [1], "event_time": pa.array([NOW_US], TIMESTAMP_TYPE),
                  "colour": ["red"]})
    st, body = await post(client, "playback", arrow_bytes(t), ctype=ARROW)
    assert st == 400 and body["error"]["code"] == "unknown_field"
    assert body["error"]["field"] == "colour"
    t = pa.table({"member_id": [1], "event_time": pa.array([NOW_US], TIMESTAMP_TYPE),
                  "video_id": ["abc"]})
    st, body = await post(client, "playback", arrow_bytes(t), ctype=ARROW)
    assert st == 400 and body["error"]["code"] == "invalid_type"
    assert "video_id" in body["error"]["message"]


@pytest.mark.parametrize("name", ["..%2Fx", "%2E%2E", "x%2F..%2F..%2Fy", "..%2F..%2Fetc",
                                  "Upper", "a%00b", "snapshot"])
async def test_escaping_names_are_rejected(client, local_store: Store, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           name: str) -> None:
    from yarl import URL

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    url = URL(f"/v1/fact-types/{name}", encoded=True)
    resp = await client.put(url, json=PLAYBACK, headers=W)
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] in ("invalid_name", "reserved_name")
    resp = await client.post(URL(f"/v1/facts/{name}", encoded=True),
                             json=[{"member_id": 1}], headers=W)
    assert resp.status in (400, 404)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    new = [str(p) for p in after if p not in before]
    # Only the logger's own spool and heartbeat may appear; nothing escapes the store's prefixes.
    assert [p for p in new if not p.startswith(("spool", "store/catalog/heartbeats"))] == []
    assert {k.key.split("/")[0] for k in local_store.list("")} == {"catalog"}
    assert FactTypeCatalog(local_store).names() == ["playback"]


# --- the three formats -----------------------------------------------------------------------

async def test_json_ndjson_and_arrow_land_the_same_facts(aiohttp_client, store: Store,  # type: ignore[no-untyped-def]
                                                         tmp_path: Path) -> None:
    client = await aiohttp_client(make_client_app(store, tmp_path / "spool"))
    big = 2**53 + 1
    for ft in ("via_json", "via_ndjson", "via_arrow"):
        resp = await client.put(f"/v1/fact-types/{ft}", json=PLAYBACK, headers=W)
        assert resp.status == 201
    facts = [
        {"member_id": str(big), "event_time": "2026-01-01T10:00:00Z", "video_id": 7,
         "seconds": 31.5, "device": "tv"},
        {"member_id": 42, "event_time": "2026-01-01T23:59:59.999999+00:00", "video_id": 8},
        {"member_id": 42, "event_time": "2026-01-01T00:30:00+01:00", "seconds": 1.0,
         "device": "phone", "fact_id": "client-id-1"},
    ]
    st, body = await post(client, "via_json", facts)
    assert (st, body) == (202, {"accepted": 3, "rejected": []})
    lines = [json.dumps(f) for f in facts]
    nd = "\n".join([lines[0], "", lines[1], "{broken", lines[2]]) + "\n"
    st, body = await post(client, "via_ndjson", nd.encode(), ctype="application/x-ndjson")
    assert st == 202 and body["accepted"] == 3
    assert [(r["index"], r["code"]) for r in body["rejected"]] == [(2, "invalid_json")]
    assert "line 4" in body["rejected"][0]["message"]
    table = pa.table({
        "member_id": pa.array([big, 42, 42], pa.int64()),
        "event_time": pa.array([parse_timestamp(f["event_time"], field="e") for f in facts],
                               TIMESTAMP_TYPE),
        "video_id": pa.array([7, 8, None], pa.int64()),
        "seconds": pa.array([31.5, None, 1.0]),
        "device": pa.array(["tv", None, "phone"]),
        "fact_id": pa.array([None, None, "client-id-1"]),
    })
    st, body = await post(client, "via_arrow", arrow_bytes(table), ctype=ARROW)
    assert (st, body) == (202, {"accepted": 3, "rejected": []})
    await flush(client)
    cols = ("member_id", "event_time", "video_id", "seconds", "device", "producer")
    landed = {ft: read_facts(store, ft) for ft in ("via_json", "via_ndjson", "via_arrow")}
    expected = rows_of(landed["via_json"], *cols)
    assert len(expected) == 3 and expected[-1][0] == big
    for ft, t in landed.items():
        assert rows_of(t, *cols) == expected, ft
        assert "client-id-1" in t.column("fact_id").to_pylist()
        assert len(set(t.column("fact_id").to_pylist())) == 3
    # Files are partitioned by the UTC date of event_time: 00:30+01:00 is the day before.
    keys = [o.key for o in store.list("facts/via_json/")]
    assert any("/date=2026-01-01/" in k for k in keys)
    assert any("/date=2025-12-31/" in k for k in keys)


# --- schema evolution ------------------------------------------------------------------------

async def test_schema_evolution_over_http(client, local_store: Store) -> None:  # type: ignore[no-untyped-def]
    resp = await client.put("/v1/fact-types/playback", json=PLAYBACK, headers=W)
    assert resp.status == 200 and (await resp.json())["version"] == 1
    st, _ = await post(client, "playback", [{"member_id": 1, "event_time": NOW, "video_id": 1}])
    assert st == 202

    wider = {**PLAYBACK, "fields": {**PLAYBACK["fields"], "genre": "string"}, "lookback": "30d"}
    resp = await client.put("/v1/fact-types/playback", json=wider, headers=W)
    body = await resp.json()
    assert resp.status == 201 and body["version"] == 2 and body["created"] is True
    assert list(body["fields"]) == ["video_id", "seconds", "device", "genre"]
    assert body["lookback"] == "30d"

    changed = {**PLAYBACK, "fields": {"video_id": "string"}}
    resp = await client.put("/v1/fact-types/playback", json=changed, headers=W)
    body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "incompatible_schema"
    assert "'video_id'" in body["error"]["message"] and body["error"]["field"] == "video_id"

    subset = {"entity": PLAYBACK["entity"], "fields": {"video_id": "int64"}}
    resp = await client.put("/v1/fact-types/playback", json=subset, headers=W)
    body = await resp.json()
    assert resp.status == 200 and body["version"] == 2 and "genre" in body["fields"]

    st, body = await post(client, "playback", [
        {"member_id": 2, "event_time": NOW, "video_id": 2, "genre": "drama"},
        {"member_id": 3, "event_time": NOW, "video_id": 3},  # an older producer's shape
    ])
    assert (st, body) == (202, {"accepted": 2, "rejected": []})
    resp = await client.put("/v1/fact-types/playback",
                            json={"entity": {"name": "member_id", "type": "int64"},
                                  "fields": {"a": "int64"}, "extra": 1}, headers=W)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_fact_type"
    resp = await client.put("/v1/fact-types/playback", data=b"nope", headers=W)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_body"

    await flush(client)
    got = read_facts(local_store, "playback")
    assert rows_of(got, "member_id", "genre") == [(1, None), (2, "drama"), (3, None)]
    assert [ft.fields.get("genre") for ft in FactTypeCatalog(local_store).history("playback")] \
        == [None, "string"]


async def test_replica_sees_a_type_evolved_elsewhere(client, aiohttp_client,  # type: ignore[no-untyped-def]
                                                     local_store: Store, tmp_path: Path) -> None:
    st, _ = await post(client, "playback", [{"member_id": 1, "event_time": NOW}])
    assert st == 202  # this replica has cached version 1
    other = await aiohttp_client(make_client_app(local_store, tmp_path / "spool2"))
    wider = {**PLAYBACK, "fields": {**PLAYBACK["fields"], "genre": "string"}}
    assert (await other.put("/v1/fact-types/playback", json=wider, headers=W)).status == 201
    st, body = await post(client, "playback",
                          [{"member_id": 2, "event_time": NOW, "genre": "drama"}])
    assert (st, body) == (202, {"accepted": 1, "rejected": []})
    t = pa.table({"member_id": [3], "event_time": pa.array([NOW_US], TIMESTAMP_TYPE),
                  "genre": ["comedy"]})
    st, body = await post(client, "playback", arrow_bytes(t), ctype=ARROW)
    assert (st, body) == (202, {"accepted": 1, "rejected": []})
    await flush(client)
    got = read_facts(local_store, "playback")
    assert rows_of(got, "member_id", "genre") == [(1, None), (2, "drama"), (3, "comedy")]


async def test_metrics_and_openapi(client) -> None:  # type: ignore[no-untyped-def]
    st, _ = await post(client, "playback", [{"member_id": 1, "event_time": NOW},
                                            {"member_id": 2, "colour": 1}])
    assert st == 202
    text = await (await client.get("/metrics")).text()
    assert 'timetravel_ingest_facts_total{fact_type="playback",outcome="accepted"} 1.0' in text
    assert 'timetravel_ingest_rejected_total{code="unknown_field",fact_type="playback"} 1.0' \
        in text
    doc = await (await client.get("/openapi.json", headers=R)).json()
    assert {"/v1/fact-types/{name}", "/v1/facts/{fact_type}", "/v1/flush", "/healthz",
            "/metrics", "/openapi.json"} <= set(doc["paths"])
    post_facts = doc["paths"]["/v1/facts/{fact_type}"]["post"]
    assert set(post_facts["requestBody"]["content"]) == {
        "application/json", "application/x-ndjson", ARROW}
    assert post_facts["security"] == [{"bearer": ["write"]}]


# --- durability, as a real process -----------------------------------------------------------

class Server:
    """``timetravel facts serve`` as a subprocess on a free loopback port."""

    def __init__(self, store: str, spool: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "timetravel"
        with log.open("a") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [str(exe), "facts", "serve", "--store", store, "--spool-dir", str(spool),
                 "--no-auth", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(300):
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()}")
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError("server did not start")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


def test_sigkill_after_202_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    store, spool, log = str(tmp_path / "store"), tmp_path / "spool", tmp_path / "server.log"
    server = Server(store, spool, log)
    try:
        assert server.call("PUT", "/v1/fact-types/playback", PLAYBACK)[0] == 201
        for batch in range(3):
            facts = [{"member_id": batch * 100 + i, "event_time": "2026-01-01T10:00:00Z",
                      "video_id": i} for i in range(50)]
            assert server.call("POST", "/v1/facts/playback", facts) == \
                (202, {"accepted": 50, "rejected": []})
    finally:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server = Server(store, spool, log)
    try:
        assert server.call("POST", "/v1/flush", {})[0] == 200
    finally:
        assert server.stop() == 0
    got = read_facts(Store(store), "playback")
    ids = got.column("member_id").to_pylist()
    assert sorted(ids) == sorted(b * 100 + i for b in range(3) for i in range(50))
    assert len(set(got.column("fact_id").to_pylist())) == 150


def test_sigterm_flushes_then_exits_0(tmp_path: Path) -> None:
    store, spool, log = str(tmp_path / "store"), tmp_path / "spool", tmp_path / "server.log"
    server = Server(store, spool, log)
    try:
        assert server.call("PUT", "/v1/fact-types/playback", PLAYBACK)[0] == 201
        facts = [{"member_id": i, "event_time": "2026-01-01T10:00:00Z"} for i in range(20)]
        assert server.call("POST", "/v1/facts/playback", facts)[0] == 202
    finally:
        assert server.stop(signal.SIGTERM) == 0
    got = read_facts(Store(store), "playback")
    assert sorted(got.column("member_id").to_pylist()) == list(range(20))
    assert "Traceback" not in log.read_text()


@pytest.mark.s3
async def test_flush_timeout_is_503_while_s3_is_down(aiohttp_client, moto_server,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    store = Store(f"s3://{moto_server.create_bucket()}/tt")
    client = await aiohttp_client(make_client_app(store, tmp_path / "spool", flush_timeout_s=1.0))
    assert (await client.put("/v1/fact-types/playback", json=PLAYBACK, headers=W)).status == 201
    moto_server.stop()
    try:
        facts = [{"member_id": i, "event_time": "2026-01-01T10:00:00Z"} for i in range(30)]
        # Durable in the local spool: accepted although the store is down.
        st, body = await post(client, "playback", facts)
        assert (st, body) == (202, {"accepted": 30, "rejected": []})
        resp = await client.post("/v1/flush", headers=W)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "flush_timeout"
    finally:
        moto_server.start()
    for _ in range(60):  # the upload retries with backoff; each flush waits at most 1 s
        resp = await client.post("/v1/flush", headers=W)
        if resp.status == 200:
            break
        assert (await resp.json())["error"]["code"] == "flush_timeout"
    assert resp.status == 200
    got = read_facts(store, "playback")
    assert sorted(got.column("member_id").to_pylist()) == list(range(30))
