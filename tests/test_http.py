"""The shared HTTP plumbing (ttstore._http, ttstore._auth) against a real aiohttp server on
loopback: tokens, scopes, the error shape, body limits, metrics, OpenAPI and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import ttstore
from ttstore import (
    PUBLIC,
    Authenticator,
    AuthNotConfigured,
    InvalidInput,
    InvalidTokensFile,
    Principal,
    RouteTable,
    json_response,
    make_app,
    principal,
    read_body,
    read_json,
)

TOKENS = """\
# TOKEN    SCOPES       NAME
tok-write  write        checkout   # a producer
tok-read   read         notebooks
tok-both   read,write
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the tokens file -------------------------------------------------------------------------

def test_parse_tokens_names_and_scopes() -> None:
    tokens = ttstore.parse_tokens(TOKENS)
    auth = Authenticator(tokens)
    assert auth.authenticate("Bearer tok-write") == Principal("checkout", frozenset({"write"}))
    assert auth.authenticate("bearer tok-read") == Principal("notebooks", frozenset({"read"}))
    both = auth.authenticate("Bearer tok-both")
    assert both.scopes == frozenset({"read", "write"})
    assert both.name.startswith("token-") and "tok-both" not in both.name
    assert both.name == auth.authenticate("Bearer tok-both").name  # stable


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("ok read a\nlonely\n", 2, "missing the scopes"),
        ("# c\n\nt1 read,admin x\n", 3, "unknown scope 'admin'"),
        ("t1 read a b\n", 1, "too many columns"),
        ("t1 read a\nt1 write b\n", 2, "same token as on line 1"),
        ("t1 read,,write\n", 1, "unknown scope ''"),
    ],
)
def test_parse_tokens_bad_lines_name_the_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(InvalidTokensFile) as err:
        ttstore.parse_tokens(text, source="tokens.txt")
    assert f"tokens.txt, line {line}: {reason}" in err.value.message


def test_tokens_file_without_tokens_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "tokens"
    p.write_text("# nothing here\n\n")
    with pytest.raises(InvalidTokensFile, match="has no tokens"):
        ttstore.load_tokens(p)
    with pytest.raises(InvalidTokensFile, match="cannot read"):
        ttstore.load_tokens(tmp_path / "missing")


def test_auth_options(tmp_path: Path) -> None:
    with pytest.raises(AuthNotConfigured) as err:
        Authenticator.from_options(tokens_file=None, no_auth=False, environ={})
    assert "--tokens-file" in err.value.message and "--no-auth" in err.value.message
    p = tmp_path / "tokens"
    p.write_text(TOKENS)
    from_env = Authenticator.from_options(
        tokens_file=None, no_auth=False, environ={ttstore.ENV_TOKENS_FILE: str(p)})
    assert from_env.authenticate("Bearer tok-read").name == "notebooks"
    with pytest.raises(AuthNotConfigured, match="contradict"):
        Authenticator.from_options(tokens_file=str(p), no_auth=True, environ={})
    off = Authenticator.from_options(tokens_file=None, no_auth=True,
                                     environ={ttstore.ENV_TOKENS_FILE: str(p)})
    assert off.authenticate(None) == ttstore.ANONYMOUS


def test_route_scope_is_checked() -> None:
    async def h(request: web.Request) -> web.Response:
        return json_response({})

    with pytest.raises(ValueError, match="scope"):
        RouteTable().add("GET", "/x", h, scope="admin", summary="x")


# --- a real server ---------------------------------------------------------------------------

def demo_routes() -> RouteTable:
    routes = RouteTable()

    async def whoami(request: web.Request) -> web.Response:
        return json_response({"name": principal(request).name})

    async def echo(request: web.Request) -> web.Response:
        body = await read_body(request)
        return json_response({"name": principal(request).name, "bytes": len(body)}, status=201)

    async def parse(request: web.Request) -> web.Response:
        return json_response({"got": await read_json(request)})

    async def bad_input(request: web.Request) -> web.Response:
        raise InvalidInput("field 'x' is bad", field="x", code="invalid_x")

    async def boom(request: web.Request) -> web.Response:
        raise ZeroDivisionError("secret internal detail")

    routes.add("GET", "/v1/whoami/{thing}", whoami, scope="read", summary="who am I")
    routes.add("POST", "/v1/echo", echo, scope="write", summary="echo",
               request_types=("application/octet-stream",), responses={201: "echoed"})
    routes.add("POST", "/v1/parse", parse, scope="write", summary="parse JSON")
    routes.add("GET", "/v1/bad", bad_input, scope=PUBLIC, summary="bad input")
    routes.add("GET", "/v1/boom", boom, scope=PUBLIC, summary="a bug")
    return routes


@pytest.fixture
async def client(aiohttp_client):  # type: ignore[no-untyped-def]
    app = make_app(demo_routes(), auth=Authenticator(ttstore.parse_tokens(TOKENS)),
                   title="demo", max_body_bytes=1024)
    return await aiohttp_client(app)


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, str]:
    body = await resp.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and isinstance(body["error"]["message"], str)
    err: dict[str, str] = body["error"]
    return err


async def test_auth_over_http(client) -> None:  # type: ignore[no-untyped-def]
    resp = await client.get("/v1/whoami/me")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert (await error_of(resp))["code"] == "unauthorized"

    resp = await client.get("/v1/whoami/me", headers=bearer("nope"))
    assert resp.status == 401 and (await error_of(resp))["code"] == "unauthorized"
    resp = await client.get("/v1/whoami/me", headers={"Authorization": "Basic dG9rLXJlYWQ="})
    assert resp.status == 401

    resp = await client.get("/v1/whoami/me", headers=bearer("tok-read"))
    assert resp.status == 200 and (await resp.json()) == {"name": "notebooks"}

    # Scopes are independent: write does not imply read.
    resp = await client.get("/v1/whoami/me", headers=bearer("tok-write"))
    assert resp.status == 403
    err = await error_of(resp)
    assert err["code"] == "forbidden" and "'read'" in err["message"]

    resp = await client.post("/v1/echo", data=b"hello", headers=bearer("tok-read"))
    assert resp.status == 403
    resp = await client.post("/v1/echo", data=b"hello", headers=bearer("tok-write"))
    assert resp.status == 201 and (await resp.json()) == {"name": "checkout", "bytes": 5}

    for path in ("/healthz", "/metrics"):
        assert (await client.get(path)).status == 200
    assert (await client.get("/openapi.json")).status == 401
    assert (await client.get("/openapi.json", headers=bearer("tok-read"))).status == 200


async def test_no_auth_is_anonymous_with_both_scopes(aiohttp_client) -> None:  # type: ignore[no-untyped-def]
    app = make_app(demo_routes(), auth=Authenticator(no_auth=True), title="demo",
                   max_body_bytes=1024)
    client = await aiohttp_client(app)
    resp = await client.get("/v1/whoami/x")
    assert (await resp.json()) == {"name": "anonymous"}
    resp = await client.post("/v1/echo", data=b"abc")
    assert resp.status == 201 and (await resp.json())["name"] == "anonymous"


async def test_error_shapes(client, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    resp = await client.get("/v1/nothing-here")
    assert resp.status == 404 and (await error_of(resp))["code"] == "not_found"

    resp = await client.delete("/v1/echo", headers=bearer("tok-write"))
    assert resp.status == 405
    assert (await error_of(resp))["code"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]

    resp = await client.get("/v1/bad")
    assert resp.status == 400
    body = await resp.json()
    assert body == {"error": {"code": "invalid_x", "message": "field 'x' is bad", "field": "x"}}

    resp = await client.post("/v1/parse", data=b"{not json", headers=bearer("tok-write"))
    assert resp.status == 400 and (await error_of(resp))["code"] == "invalid_body"
    resp = await client.post("/v1/parse", data=b'{"a": [1]}', headers=bearer("tok-write"))
    assert (await resp.json()) == {"got": {"a": [1]}}

    with caplog.at_level(logging.ERROR, logger="ttstore._http"):
        resp = await client.get("/v1/boom")
    assert resp.status == 500
    text = await resp.text()
    err = await error_of(resp)
    assert err["code"] == "internal"
    assert "secret internal detail" not in text and "Traceback" not in text
    assert "ZeroDivisionError" not in text
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and logged[0].exc_info is not None
    assert logged[0].exc_info[0] is ZeroDivisionError


async def test_body_limit(client) -> None:  # type: ignore[no-untyped-def]
    ok = await client.post("/v1/echo", data=b"x" * 1024, headers=bearer("tok-write"))
    assert ok.status == 201 and (await ok.json())["bytes"] == 1024
    # Announced with Content-Length: refused before reading.
    resp = await client.post("/v1/echo", data=b"x" * 1025, headers=bearer("tok-write"))
    assert resp.status == 413
    err = await error_of(resp)
    assert err["code"] == "body_too_large" and "1024" in err["message"]

    # Chunked, with no Content-Length: refused while reading.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 512

    resp = await client.post("/v1/echo", data=chunks(), headers=bearer("tok-write"))
    assert resp.status == 413 and (await error_of(resp))["code"] == "body_too_large"


async def test_metrics_count_requests_by_route(client) -> None:  # type: ignore[no-untyped-def]
    for _ in range(3):
        await client.get("/v1/whoami/a", headers=bearer("tok-read"))
    await client.get("/v1/whoami/b")  # 401
    await client.get("/nope")
    text = await (await client.get("/metrics")).text()
    assert ('timetravel_http_requests_total{method="GET",route="/v1/whoami/{thing}",'
            'status="200"} 3.0') in text
    assert ('timetravel_http_requests_total{method="GET",route="/v1/whoami/{thing}",'
            'status="401"} 1.0') in text
    assert 'route="unmatched",status="404"} 1.0' in text
    assert 'timetravel_http_request_duration_seconds_count{method="GET",' \
           'route="/v1/whoami/{thing}"} 4.0' in text


async def test_openapi_describes_the_routes(client) -> None:  # type: ignore[no-untyped-def]
    doc = await (await client.get("/openapi.json", headers=bearer("tok-read"))).json()
    paths = doc["paths"]
    assert set(paths) == {"/healthz", "/metrics", "/openapi.json", "/v1/whoami/{thing}",
                          "/v1/echo", "/v1/parse", "/v1/bad", "/v1/boom"}
    assert paths["/v1/echo"]["post"]["security"] == [{"bearer": ["write"]}]
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/v1/whoami/{thing}"]["get"]["parameters"][0]["name"] == "thing"
    assert "application/octet-stream" in paths["/v1/echo"]["post"]["requestBody"]["content"]


async def test_serve_shuts_down_gracefully_running_cleanup_hooks() -> None:
    events: list[str] = []
    routes = RouteTable()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        events.append("slow request done")
        return json_response({"done": True})

    routes.add("GET", "/slow", slow, scope=PUBLIC, summary="slow")
    app = make_app(routes, auth=Authenticator(no_auth=True), title="t", max_body_bytes=10)

    async def on_cleanup(app: web.Application) -> None:
        events.append("cleanup")

    app.on_cleanup.append(on_cleanup)
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(ttstore.serve(app, host="127.0.0.1", port=0, stop=stop,
                                             on_listening=listening.set_result))
    url = await asyncio.wait_for(listening, 10)
    async with aiohttp.ClientSession() as session:
        req = asyncio.create_task(session.get(url + "/slow"))
        await asyncio.sleep(0.1)  # the request is in flight when the stop comes
        stop.set()
        resp = await req
        assert resp.status == 200 and (await resp.json()) == {"done": True}
        resp.release()
    await asyncio.wait_for(task, 10)
    assert events == ["slow request done", "cleanup"]
