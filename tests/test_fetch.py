"""The services config and the fetcher, against the simulated world on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import tomllib

import numpy as np
import pytest
from aiohttp import web

from simworld import SimClock, World, running_world
from snapshotter import (
    QpsLimiter,
    ServiceConfig,
    ServiceConfigError,
    ServiceFetcher,
    load_services,
    parse_services,
)
from ttstore import US_PER_DAY, parse_timestamp

T0 = parse_timestamp("2026-11-01T00:00:00Z", field="t0")
NOW = T0 + 2 * US_PER_DAY
MEMBERS = 400

EXAMPLE = """
[services.viewing_history]
url = "http://127.0.0.1:9001/v1/history/{entity_id}"
batch_url = "http://127.0.0.1:9001/v1/history:batchGet"
entity_type = "int64"
timeout_s = 2.0
retries = 3
max_concurrency = 64
max_qps = 500
max_staleness = "48h"
headers = { Authorization = "Bearer ${HISTORY_TOKEN}", X-Price = "$$5" }

[services.profile]
url = "http://user:hunter2@127.0.0.1:9002/v1/profile/{entity_id}"
entity_type = "string"
"""


# -- the config ---------------------------------------------------------------------------------


def test_parse_the_spec_example(tmp_path) -> None:
    p = tmp_path / "services.toml"
    p.write_text(EXAMPLE)
    services = load_services(p, environ={"HISTORY_TOKEN": "s3cret-token"})
    assert list(services) == ["viewing_history", "profile"]
    vh = services["viewing_history"]
    assert (vh.timeout_s, vh.retries, vh.max_concurrency, vh.max_qps) == (2.0, 3, 64, 500.0)
    assert vh.max_staleness_us == 48 * 3600 * 10**6 and vh.uses_batch
    assert vh.resolve_headers({"HISTORY_TOKEN": "s3cret-token"}) == {
        "Authorization": "Bearer s3cret-token", "X-Price": "$5"}
    assert vh.entity_url(42) == "http://127.0.0.1:9001/v1/history/42"
    pr = services["profile"]
    assert pr.entity_type == "string" and not pr.uses_batch
    assert pr.max_staleness == "48h" and pr.retries == 3 and pr.max_qps is None
    assert pr.entity_url("a/b c") == "http://user:hunter2@127.0.0.1:9002/v1/profile/a%2Fb%20c"
    public = json.dumps({n: s.public_json() for n, s in services.items()})
    assert "s3cret" not in public and "hunter2" not in public and "HISTORY_TOKEN" not in public
    assert vh.public_json()["headers"] == {"Authorization": "<redacted>", "X-Price": "<redacted>"}
    assert pr.public_json()["url"] == "http://user@127.0.0.1:9002/v1/profile/{entity_id}"
    assert vh.public_json()["max_staleness_us"] == vh.max_staleness_us


def test_a_missing_header_variable_is_named(tmp_path) -> None:
    with pytest.raises(ServiceConfigError) as e:
        parse_services(tomllib.loads(EXAMPLE), environ={})
    assert e.value.code == "missing_env_var"
    assert "HISTORY_TOKEN" in e.value.message and "viewing_history" in e.value.message
    assert e.value.service == "viewing_history" and e.value.field == "headers.Authorization"


@pytest.mark.parametrize(
    ("body", "service", "needle"),
    [
        ('[services.a]\nurl = "http://h/{entity_id}"\nretry = 3\n', "a", "'retry'"),
        ('[services.a]\nurl = "http://h/{entity_id}"\n[other]\nx = 1\n', None, "'other'"),
        ('[services.Bad-Name]\nurl = "http://h/{entity_id}"\n', "Bad-Name", "Bad-Name"),
        ('[services.a]\nurl = "http://h/x"\n', "a", "{entity_id}"),
        ('[services.a]\nurl = "ftp://h/{entity_id}"\n', "a", "http"),
        ('[services.a]\nurl = "http://h/{entity_id}"\ntimeout_s = -1\n', "a", "timeout_s"),
        ('[services.a]\nurl = "http://h/{entity_id}"\nretries = 1.5\n', "a", "retries"),
        ('[services.a]\nurl = "http://h/{entity_id}"\nmax_qps = 0\n', "a", "max_qps"),
        ('[services.a]\nurl = "http://h/{entity_id}"\nmax_staleness = "2 days"\n', "a",
         "max_staleness"),
        ('[services.a]\nurl = "http://h/{entity_id}"\nentity_type = "uuid"\n', "a", "entity_type"),
        ('[services.a]\nurl = "http://h/{entity_id}"\nheaders = { A = "$HOME" }\n', "a",
         "headers.A"),
        ('[services.a]\nbatch_url = "http://h/b"\n', "a", "no url"),
        ("", None, "no services"),
    ],
)
def test_bad_configs_are_errors_naming_the_key(body: str, service, needle: str) -> None:
    with pytest.raises(ServiceConfigError) as e:
        parse_services(tomllib.loads(body), environ={})
    assert needle in e.value.message
    assert e.value.service == service
    assert e.value.http_status == 400


def test_config_is_typed_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        ServiceConfig("a", "http://h/{entity_id}")  # type: ignore[misc]
    c = ServiceConfig(name="a", url="http://h/{entity_id}", max_qps=10, timeout_s=1)
    assert isinstance(c.timeout_s, float) and c.max_qps == 10.0
    with pytest.raises(ServiceConfigError, match="not valid"):
        ServiceConfig(name="snapshot-x", url="http://h/{entity_id}")
    with pytest.raises(ServiceConfigError, match="not a file|cannot read"):
        load_services("/nonexistent/services.toml")


# -- the fetcher --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    w = World(seed=33, members=MEMBERS, start_us=T0)
    with running_world(w, clock=SimClock(NOW), fault_seed=2) as rw:
        yield w, rw


@pytest.fixture
def sim(world):
    w, rw = world
    rw.control.set_faults("*", error_rate=0.0, timeout_rate=0.0, down=False,
                          latency_median_ms=0.0, latency_p99_ms=None)
    rw.control.reset_stats()
    return w, rw


def _config(rw, service: str = "profile", *, batch: bool = False, **kw) -> ServiceConfig:
    return ServiceConfig(
        name=service,
        url=f"{rw.url}/v1/{service}/{{entity_id}}",
        batch_url=f"{rw.url}/v1/{service}:batchGet" if batch else None,
        **{"backoff_base_s": 0.01, "backoff_max_s": 0.05, **kw},
    )


@pytest.mark.parametrize("batch", [False, True])
async def test_fetch_answers_the_truth_in_input_order(sim, batch: bool) -> None:
    w, rw = sim
    ids = [5, 0, 42, 401, 7, 5, *range(100, 160)]
    truth = {"viewing_history": w.viewing_histories, "my_list": w.my_lists}
    for service, f in truth.items():
        async with ServiceFetcher(_config(rw, service, batch=batch, batch_size=16)) as fetcher:
            got = await fetcher.fetch(ids)
            if service == "viewing_history":  # (my_list's request counts are checked below)
                cols = await fetcher.fetch_answers(ids)
                assert fetcher.stats()["rows"]["ok"] == 2 * sum(r.status == "ok" for r in got)
                # The columns a run stages are the same answers as the rows.
                assert (cols.status, cols.payload, cols.raw_json, cols.attempts,
                        cols.error_kind) == ([r.status for r in got], [r.payload for r in got],
                                             [r.raw_json for r in got], [r.attempts for r in got],
                                             [r.error_kind for r in got])
        expected = f(ids, NOW)
        assert [r.entity for r in got] == ids
        assert [r.status for r in got] == ["missing" if e is None else "ok" for e in expected]
        assert [r.payload for r in got] == expected
        assert [None if r.raw_json is None else json.loads(r.raw_json) for r in got] == expected
        assert all(r.error_kind is None and r.attempts == 1 for r in got)
        assert all(r.latency_s > 0 for r in got)
    st = rw.control.stats()["services"]["my_list"]
    if batch:
        assert st["batch_requests"] == st["requests"] == -(-len(ids) // 16)
        assert st["ids_requested"] == len(ids)
    else:
        assert st["requests"] == len(ids) and st["batch_requests"] == 0


async def test_a_service_failing_20_percent_is_retried(sim) -> None:
    w, rw = sim
    rw.control.set_faults("profile", error_rate=0.2)
    ids = list(range(1, 301))
    async with ServiceFetcher(_config(rw, retries=5), seed=1) as fetcher:
        got = await fetcher.fetch(ids)
        stats = fetcher.stats()
    ok = [r for r in got if r.status == "ok"]
    assert len(ok) >= 295  # a row fails only if all 6 attempts fail: p = 0.2^6
    assert [r.payload for r in ok] == [w.profile(r.entity, NOW) for r in ok]
    assert any(r.attempts > 1 for r in ok)
    assert stats["retries"] > 20 and stats["attempt_errors"]["http_5xx"] == stats["retries"]
    assert stats["requests"] == len(ids) + stats["retries"]
    served = rw.control.stats()["services"]["profile"]
    assert served["requests"] == stats["requests"]
    assert served["by_status"]["500"] == stats["attempt_errors"]["http_5xx"]


async def test_a_service_down_gives_errors_not_an_exception(sim) -> None:
    _, rw = sim
    rw.control.set_faults("my_list", down=True)
    for batch in (False, True):
        async with ServiceFetcher(_config(rw, "my_list", batch=batch, retries=2)) as fetcher:
            got = await fetcher.fetch(list(range(1, 41)))
            stats = fetcher.stats()
        assert [r.status for r in got] == ["error"] * 40
        assert {r.error_kind for r in got} == {"http_5xx"}
        assert {r.attempts for r in got} == {3}
        assert stats["rows"] == {"ok": 0, "missing": 0, "error": 40}
        assert stats["errors"] == {"http_5xx": 40}


async def test_connection_refused_is_a_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now.
    config = ServiceConfig(name="gone", url=f"http://127.0.0.1:{port}/v1/x/{{entity_id}}",
                           retries=1, backoff_base_s=0.01)
    async with ServiceFetcher(config) as fetcher:
        got = await fetcher.fetch([1, 2, 3])
    assert [(r.status, r.error_kind, r.attempts) for r in got] == [("error", "connection", 2)] * 3


async def test_timeouts_are_honoured(sim) -> None:
    _, rw = sim
    rw.control.set_faults("profile", timeout_rate=1.0, hang_s=20.0)
    async with ServiceFetcher(_config(rw, timeout_s=0.2, retries=1)) as fetcher:
        got = await fetcher.fetch([1, 2, 3, 4])
        stats = fetcher.stats()
    assert [(r.status, r.error_kind, r.attempts) for r in got] == [("error", "timeout", 2)] * 4
    assert stats["attempt_errors"] == {"timeout": 8}
    assert rw.control.stats()["services"]["profile"]["hangs"] == 8


async def test_invalid_answers(aiohttp_server) -> None:
    async def one(request: web.Request) -> web.Response:
        e = request.match_info["id"]
        if e == "1":
            return web.Response(text="not json", content_type="application/json")
        if e == "2":
            return web.json_response([1, 2])
        if e == "3":
            return web.Response(status=403)
        return web.json_response({"id": e})

    async def batch(request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        return web.json_response({"results": {str(i): (7 if i == "b" else {"id": i})
                                              for i in ids if i != "c"}})

    async def batch_other_shape(request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        return web.json_response({"meta": {"n": len(ids)}, "results": {i: {"id": i} for i in ids}})

    app = web.Application()
    app.router.add_get("/x/{id}", one)
    app.router.add_post("/x:batch", batch)
    app.router.add_post("/x:batch2", batch_other_shape)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    config = ServiceConfig(name="x", url=base + "/x/{entity_id}", entity_type="string")
    async with ServiceFetcher(config) as fetcher:
        got = await fetcher.fetch(["1", "2", "3", "4"])
    assert [(r.status, r.error_kind, r.attempts) for r in got] == [
        ("error", "invalid_json", 1), ("error", "invalid_json", 1), ("error", "http_4xx", 1),
        ("ok", None, 1)]
    config = ServiceConfig(name="x", url=base + "/x/{entity_id}", batch_url=base + "/x:batch",
                           entity_type="string")
    async with ServiceFetcher(config) as fetcher:
        got = await fetcher.fetch(["a", "b", "c"])
    assert [(r.status, r.error_kind) for r in got] == [
        ("ok", None), ("error", "invalid_json"), ("missing", None)]
    assert got[0].payload == {"id": "a"}
    assert got[0].raw_json == '{"id": "a"}'  # the service's own text, not re-serialized
    config = ServiceConfig(name="x", url=base + "/x/{entity_id}", batch_url=base + "/x:batch2",
                           entity_type="string")
    async with ServiceFetcher(config) as fetcher:
        got = await fetcher.fetch(["a", "b"])
    assert [(r.status, r.payload, json.loads(r.raw_json)) for r in got] == [
        ("ok", {"id": "a"}, {"id": "a"}), ("ok", {"id": "b"}, {"id": "b"})]


async def test_compact_answers_keep_the_services_text_and_big_integers(aiohttp_server) -> None:
    """Compact JSON (what the world sends) takes the fast parse; its ``raw_json`` is still the
    service's own text, and an integer beyond 64 bits stays an int (a fast parser would read it
    as a float, which would change the field's type)."""
    big = 123456789012345678901234567890
    rows = {
        "a": b'{"id":"a","n":1,"x":1.5,"v":[1,{"k":null}],"s":"\\u00e9\xc3\xa9"}',
        "b": b'{"id":"b","n":%d}' % big,
        "c": b'{"id":"c","n":-0.0,"x":1e+16}',
    }

    async def one(request: web.Request) -> web.Response:
        return web.Response(body=rows[request.match_info["id"]], content_type="application/json")

    async def batch(request: web.Request) -> web.Response:
        ids = (await request.json())["ids"]
        items = b",".join(b'"%s":%s' % (i.encode(), rows[i]) for i in ids)
        return web.Response(body=b'{"results":{' + items + b"}}", content_type="application/json")

    app = web.Application()
    app.router.add_get("/x/{id}", one)
    app.router.add_post("/x:batch", batch)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    for batch_url in (None, base + "/x:batch"):
        config = ServiceConfig(name="x", url=base + "/x/{entity_id}", batch_url=batch_url,
                               entity_type="string")
        async with ServiceFetcher(config) as fetcher:
            got = await fetcher.fetch(["a", "b", "c"])
        assert [r.status for r in got] == ["ok", "ok", "ok"]
        assert [r.raw_json for r in got] == [rows[k].decode() for k in "abc"]
        assert [r.payload for r in got] == [json.loads(rows[k]) for k in "abc"]
        assert type(got[1].payload["n"]) is int and got[1].payload["n"] == big


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9001/v1/h/{entity_id}", "http://h:1/a/{entity_id}/b.json",
    "http://user:pw@h:8/p%20q/a;b/{entity_id}", "http://h/x?id={entity_id}", "http://H:80/{entity_id}",
    "https://h/é/{entity_id}", "http://h/a/{entity_id}?k=v",
])
def test_entity_urls_are_what_aiohttp_makes_of_the_strings(url: str) -> None:
    """The fetcher's ready-made URLs (integer keys in the path) are exactly what aiohttp would
    have parsed from the config's string; every other case is the string itself."""
    from yarl import URL

    from snapshotter._fetch import entity_urls

    config = ServiceConfig(name="x", url=url)
    make = entity_urls(config)
    for key in (1, -5, 0, 2**63 - 1, "a/b", "é", "x y", "%41", "..", "a;b", "+"):
        got, want = make(key), URL(config.entity_url(key))
        if isinstance(got, str):
            assert got == config.entity_url(key)
        else:
            assert isinstance(key, int)
            assert (str(got), got.raw_path, got.raw_query_string, got.host, got.port,
                    got.user, got.password) == (str(want), want.raw_path, want.raw_query_string,
                                                want.host, want.port, want.user, want.password)
    ready = isinstance(make(1), URL)
    assert ready == ("?" not in url and "é" not in url and "H:" not in url)


# -- the QPS limit ------------------------------------------------------------------------------


async def test_limiter_holds_in_every_window_bursts_included() -> None:
    """The limiter's own log of sends: no window of 1 s holds more than the limit, from the
    first burst on (a token bucket that starts full would let 2x through in the first second)."""
    lim = QpsLimiter(40)

    async def send() -> float:
        ticket = await lim.acquire()
        lim.started(ticket)
        assert ticket.sent_at is not None
        return ticket.sent_at

    starts = sorted(await asyncio.gather(*(send() for _ in range(100))))
    assert max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts) <= 40
    assert len(starts) == 100 and lim.pending == 0
    assert lim.capacity == 40 and QpsLimiter(2.5).capacity == 2
    with pytest.raises(ServiceConfigError, match="below 1"):
        QpsLimiter(0.5)


async def test_a_request_not_yet_sent_holds_its_place() -> None:
    """A granted request that goes out late (a slow new connection) still counts: while two
    are pending, a third is not granted, however long the window has passed."""
    lim = QpsLimiter(2, margin_s=0.0)
    a, b = await lim.acquire(), await lim.acquire()
    third = asyncio.ensure_future(lim.acquire())
    await asyncio.sleep(1.3)  # more than a window: a log of grant times would have let it in
    assert not third.done() and lim.pending == 2
    lim.started(a)
    lim.started(a)  # idempotent
    await asyncio.sleep(0.05)
    assert not third.done()  # a's send is in the window now: still 2 within it
    lim.started(b)
    assert a.sent_at is not None
    c = await asyncio.wait_for(third, 3.0)
    assert c.granted_at >= a.sent_at + lim.window_s  # granted once a's send left the window
    lim.started(c)


async def test_qps_limit_holds_at_the_service(sim) -> None:
    _, rw = sim
    rw.control.set_faults("viewing_history", error_rate=0.2)  # retries count too
    # More in flight than the limit: the first burst opens 30 new connections at once, and a
    # request counts when it is sent, not when it was granted.
    config = _config(rw, "viewing_history", max_qps=30, retries=3, max_concurrency=64)
    async with ServiceFetcher(config) as fetcher:
        got = await fetcher.fetch(list(range(1, 71)))
        requests = fetcher.stats()["requests"]
    assert sum(r.status == "ok" for r in got) >= 65
    served = rw.control.stats()["services"]["viewing_history"]
    assert served["requests"] == requests > 70
    # every one-second window, sliding, not just the aligned ones
    assert served["max_started_in_any_1s"] <= 30
    assert max(served["started_per_s"].values()) <= 30
    assert len(served["started_per_s"]) >= 3  # the limit spread them out


async def test_qps_share_keeps_shards_within_the_total(sim) -> None:
    _, rw = sim
    config = _config(rw, "my_list", max_qps=30, batch=True, batch_size=1)
    async with (ServiceFetcher(config, qps_share=0.5) as a,
                ServiceFetcher(config, qps_share=0.5) as b):
        got = await asyncio.gather(a.fetch(list(range(1, 41))), b.fetch(list(range(41, 81))))
    assert all(r.status == "ok" for rs in got for r in rs)
    served = rw.control.stats()["services"]["my_list"]
    assert served["batch_requests"] == 80
    assert served["max_started_in_any_1s"] <= 30
    with pytest.raises(ServiceConfigError, match="below 1"):
        ServiceFetcher(_config(rw, max_qps=3), qps_share=0.25)


async def test_concurrency_is_bounded(sim) -> None:
    _, rw = sim
    rw.control.set_faults("profile", latency_median_ms=30.0)
    async with ServiceFetcher(_config(rw, max_concurrency=4)) as fetcher:
        got = await fetcher.fetch(list(range(1, 41)))
    assert all(r.status == "ok" for r in got)
    served = rw.control.stats()["services"]["profile"]
    assert served["requests"] == 40
    assert 2 <= served["max_in_flight"] <= 4


async def test_backoff_is_exponential_capped_and_jittered(monkeypatch) -> None:
    """The wait before attempt k+1 is drawn from [cap/2, cap] with cap = min(max, base * 2^(k-1)):
    it doubles, stops at the cap, and is spread out (retries of many rows do not move in
    lockstep)."""
    fetcher = ServiceFetcher(ServiceConfig(name="a", url="http://127.0.0.1:9/{entity_id}",
                                           backoff_base_s=0.1, backoff_max_s=0.5), seed=3)
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    by_attempt = {}
    for attempts in (1, 2, 3, 4, 5):
        waits.clear()
        for _ in range(300):
            await fetcher._backoff(attempts)
        by_attempt[attempts] = list(waits)
    for attempts, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)):
        w = np.array(by_attempt[attempts])
        assert w.min() >= cap / 2 - 1e-12 and w.max() <= cap + 1e-12, attempts
        assert w.max() - w.min() > cap / 3  # jitter: spread over the upper half
        assert abs(float(np.median(w)) - 0.75 * cap) < 0.1 * cap
    assert fetcher.stats()["retries"] == 5 * 300


async def test_headers_from_environment_variables_reach_the_service(aiohttp_server) -> None:
    """``${VAR}`` header values are resolved from the environment the fetcher is given and sent
    on every GET and batch POST; the manifest's copy of the config still redacts them."""
    seen: list[dict[str, str]] = []

    async def one(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"id": request.match_info["id"]})

    async def batch(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        ids = (await request.json())["ids"]
        return web.json_response({"results": {str(i): {"id": i} for i in ids}})

    app = web.Application()
    app.router.add_get("/x/{id}", one)
    app.router.add_post("/x:batch", batch)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    body = (f'[services.x]\nurl = "{base}/x/{{entity_id}}"\nentity_type = "string"\n'
            'headers = { Authorization = "Bearer ${X_TOKEN}", X-Tenant = "t-$${X_TENANT}" }\n')
    [config] = parse_services(tomllib.loads(body), environ={"X_TOKEN": "s3cret"}).values()
    env = {"X_TOKEN": "s3cret"}
    async with ServiceFetcher(config, environ=env) as fetcher:
        assert [r.status for r in await fetcher.fetch(["a", "b"])] == ["ok", "ok"]
    batched = ServiceConfig(name="x", url=base + "/x/{entity_id}", batch_url=base + "/x:batch",
                            entity_type="string", headers=config.headers)
    async with ServiceFetcher(batched, environ=env) as fetcher:
        assert [r.status for r in await fetcher.fetch(["c", "d"])] == ["ok", "ok"]
    assert len(seen) == 3
    for h in seen:
        assert h["Authorization"] == "Bearer s3cret"
        assert h["X-Tenant"] == "t-${X_TENANT}"  # $$ is a literal $
    assert "s3cret" not in json.dumps(config.public_json())
