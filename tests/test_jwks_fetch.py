"""JwtAuth fetching the JWKS with chronosd's own HTTP client, from a real server on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

from chronosd.http.jwt_auth import JwtAuth
from chronosd.http.server import HTTPServer, Request, Response, bind_listener
from chronosd.state import StateDB

pytestmark = pytest.mark.anyio
KEY = {
    "kty": "OKP",
    "crv": "Ed25519",
    "kid": "k1",
    "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
}


@asynccontextmanager
async def serving(body: bytes, seen: list[Request]) -> AsyncIterator[str]:
    async def handle(request: Request) -> Response:
        seen.append(request)
        return Response(200, body, (("content-type", "application/json"),))

    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    server = HTTPServer(handle)
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                server.stop_accepting()
    finally:
        await listener.aclose()


def auth(db: StateDB, url: str) -> JwtAuth:
    return JwtAuth(jwks_url=url, audience="agent:a", issuer="http://nas", db=db)


async def test_jwks_is_fetched_from_its_path_and_query(tmp_path: Path) -> None:
    seen: list[Request] = []
    with StateDB.open(tmp_path / "state") as db:
        async with serving(json.dumps({"keys": [KEY]}).encode(), seen) as base:
            with anyio.fail_after(10):
                document = await auth(db, f"{base}/keys/jwks.json?v=2")._download()
    assert document == {"keys": [KEY]}
    (request,) = seen
    assert (request.method, request.target) == ("GET", "/keys/jwks.json?v=2")
    assert request.header("accept") == "application/json"


async def test_jwks_over_a_megabyte_is_not_used(tmp_path: Path) -> None:
    seen: list[Request] = []
    padding = "x" * (1 << 20)
    body = json.dumps({"keys": [KEY], "padding": padding}).encode()
    with StateDB.open(tmp_path / "state") as db:
        async with serving(body, seen) as base:
            with anyio.fail_after(10):
                assert await auth(db, f"{base}/jwks.json")._download() is None


async def test_jwks_that_is_not_json_is_not_used(tmp_path: Path) -> None:
    seen: list[Request] = []
    with StateDB.open(tmp_path / "state") as db:
        async with serving(b"<html>", seen) as base:
            with anyio.fail_after(10):
                assert await auth(db, f"{base}/jwks.json")._download() is None
    assert len(seen) == 1
