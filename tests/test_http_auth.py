from __future__ import annotations

import hashlib
import hmac
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute

from chronosd.config import AuthConfig
from chronosd.errors import ConfigError
from chronosd.http.auth import (
    AuthResult,
    FireAuthenticator,
    HmacAuth,
    NoAuth,
    check_none_allowed,
    make_authenticator,
    read_secret_file,
    sign_hmac,
)
from chronosd.http.server import HTTPServer, Request, Response, bind_listener
from chronosd.state import StateDB

pytestmark = pytest.mark.anyio

SECRET = b"s3cret-for-tests"
NOW = datetime(2026, 6, 18, 12, 34, 56, tzinfo=UTC)
T = int(NOW.timestamp())
BODY = b'{"job_id":"ab12cd34","fire_at":"2026-06-18T12:34:56+00:00"}'


@dataclass
class NonceMemory:
    """An in-memory replay cache with StateDB.remember_nonce's contract."""

    seen: dict[str, datetime] = field(default_factory=dict)
    calls: list[tuple[str, datetime, datetime]] = field(default_factory=list)

    def __call__(self, nonce: str, *, expires: datetime, now: datetime) -> bool:
        self.calls.append((nonce, expires, now))
        self.seen = {key: until for key, until in self.seen.items() if until > now}
        if nonce in self.seen:
            return False
        self.seen[nonce] = expires
        return True


def fire_request(body: bytes = BODY, signature: str | None = None) -> Request:
    headers = [("content-type", "application/json")]
    if signature is not None:
        headers.append(("chronos-signature", signature))
    return Request(
        method="POST",
        target="/api/cron/fire",
        path="/api/cron/fire",
        query="",
        headers=tuple(headers),
        body=body,
        client=("127.0.0.1", 40000),
    )


def hmac_auth(memory: NonceMemory | None = None, now: datetime = NOW) -> HmacAuth:
    return HmacAuth(SECRET, remember_nonce=memory or NonceMemory(), clock=lambda: now)


# -- hmac ------------------------------------------------------------------------------------


def test_sign_hmac_matches_the_documented_construction() -> None:
    digest = hmac.new(SECRET, f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign_hmac(SECRET, BODY, T) == f"t={T},v1={digest}"


async def test_valid_signature_is_accepted() -> None:
    result = await hmac_auth().verify(fire_request(signature=sign_hmac(SECRET, BODY, T)))
    assert result == AuthResult(True)


async def test_signature_with_wrong_secret_is_refused() -> None:
    result = await hmac_auth().verify(fire_request(signature=sign_hmac(b"other", BODY, T)))
    assert not result.ok
    assert result.reason == "signature mismatch"


async def test_tampered_body_is_refused() -> None:
    signature = sign_hmac(SECRET, BODY, T)
    tampered = BODY.replace(b"ab12cd34", b"ab12cd35")
    result = await hmac_auth().verify(fire_request(tampered, signature))
    assert (result.ok, result.reason) == (False, "signature mismatch")


@pytest.mark.parametrize("offset", [-301, 301, -100_000, 10**11])
async def test_timestamp_beyond_tolerance_either_way_is_refused(offset: int) -> None:
    memory = NonceMemory()
    signature = sign_hmac(SECRET, BODY, T + offset)
    result = await hmac_auth(memory).verify(fire_request(signature=signature))
    assert (result.ok, result.reason) == (False, "signature timestamp outside tolerance")
    assert memory.calls == []


@pytest.mark.parametrize("offset", [-300, 300, -1, 0])
async def test_timestamp_within_tolerance_is_accepted(offset: int) -> None:
    signature = sign_hmac(SECRET, BODY, T + offset)
    assert (await hmac_auth().verify(fire_request(signature=signature))).ok


async def test_custom_tolerance_is_applied() -> None:
    auth = HmacAuth(SECRET, remember_nonce=NonceMemory(), clock=lambda: NOW, tolerance=10)
    assert not (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, T - 11)))).ok
    assert (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, T - 9)))).ok


async def test_replayed_signature_is_refused() -> None:
    auth = hmac_auth()
    request = fire_request(signature=sign_hmac(SECRET, BODY, T))
    assert (await auth.verify(request)).ok
    replay = await auth.verify(request)
    assert (replay.ok, replay.reason) == (False, "replayed signature")
    # The same body signed at another second is another call, not a replay.
    assert (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, T + 1)))).ok


async def test_nonce_is_kept_until_the_signature_goes_stale() -> None:
    memory = NonceMemory()
    await hmac_auth(memory).verify(fire_request(signature=sign_hmac(SECRET, BODY, T - 20)))
    ((nonce, expires, now),) = memory.calls
    assert nonce.startswith("hmac:")
    assert SECRET.hex() not in nonce
    assert expires == NOW - timedelta(seconds=20) + timedelta(seconds=300)
    assert now == NOW


async def test_refused_signatures_do_not_reach_the_replay_cache() -> None:
    memory = NonceMemory()
    auth = hmac_auth(memory)
    await auth.verify(fire_request(signature=sign_hmac(b"forged", BODY, T)))
    await auth.verify(fire_request(signature="garbage"))
    assert memory.calls == []
    assert (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, T)))).ok


async def test_any_of_several_v1_signatures_may_match() -> None:
    good = sign_hmac(SECRET, BODY, T).split(",")[1]
    old = sign_hmac(b"previous secret", BODY, T).split(",")[1]
    header = f"t={T}, {old}, {good.upper().replace('V1', 'v1')}, v0=ignored"
    assert (await hmac_auth().verify(fire_request(signature=header))).ok


VALID_V1 = "v1=" + "a" * 64


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"t={T}",
        VALID_V1,
        f"t=abc,{VALID_V1}",
        f"t=-{T},{VALID_V1}",
        f"t={T}.5,{VALID_V1}",
        f"t=١٢٣,{VALID_V1}",  # non-ASCII digits
        f"t={T},t={T},{VALID_V1}",
        f"t={T},v1=abc",
        f"t={T},v1={'g' * 64}",
        f"t={T},v1={'a' * 66}",
        f"t={T},{VALID_V1},oops",
        f"t={T};{VALID_V1}",
    ],
)
async def test_malformed_signature_header_is_refused(header: str) -> None:
    result = await hmac_auth().verify(fire_request(signature=header))
    assert (result.ok, result.reason) == (False, "malformed Chronos-Signature header")


async def test_missing_signature_header_is_refused() -> None:
    result = await hmac_auth().verify(fire_request())
    assert (result.ok, result.reason) == (False, "missing Chronos-Signature header")


def test_empty_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret is empty"):
        HmacAuth(b"", remember_nonce=NonceMemory())


async def test_default_clock_is_the_wall_clock() -> None:
    auth = HmacAuth(SECRET, remember_nonce=NonceMemory())
    now = int(datetime.now(UTC).timestamp())
    assert (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, now)))).ok


# -- secret file ---------------------------------------------------------------------------


def test_secret_file_loses_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"abc def\n")
    assert read_secret_file(path) == b"abc def"


def test_missing_secret_file_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it") as caught:
        read_secret_file(tmp_path / "absent")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n"])
def test_empty_secret_file_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(path)


# -- the factory and mode none ----------------------------------------------------------------


async def test_factory_builds_hmac_from_a_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    auth = make_authenticator(
        "hmac",
        secret_file=path,
        remember_nonce=NonceMemory(),
        clock=lambda: NOW,
        listeners=[],  # keywords meant for other modes are ignored
        jwks_url="https://example.invalid/jwks.json",
    )
    assert isinstance(auth, HmacAuth)
    assert (await auth.verify(fire_request(signature=sign_hmac(SECRET, BODY, T)))).ok


async def test_factory_builds_hmac_from_auth_config_and_state_db(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    with StateDB.open(tmp_path / "state") as db:
        auth = make_authenticator(
            "hmac", config=AuthConfig(mode="hmac", hmac_secret_file=path), db=db, clock=lambda: NOW
        )
        request = fire_request(signature=sign_hmac(SECRET, BODY, T))
        assert (await auth.verify(request)).ok
        assert (await auth.verify(request)).reason == "replayed signature"


def test_factory_hmac_without_a_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hmac_secret_file"):
        make_authenticator("hmac", remember_nonce=NonceMemory())
    with pytest.raises(ConfigError, match="hmac_secret_file"):
        make_authenticator("hmac", config=AuthConfig(mode="hmac"), remember_nonce=NonceMemory())


def test_factory_hmac_without_replay_cache_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="remember_nonce"):
        make_authenticator("hmac", secret=SECRET)


def test_factory_unknown_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape('auth.mode "basic" is unknown')):
        make_authenticator("basic")


async def test_factory_none_on_loopback_accepts_everything() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    try:
        auth: FireAuthenticator = make_authenticator("none", listeners=[listener])
        assert isinstance(auth, NoAuth)
        assert (await auth.verify(fire_request())).ok
        check_none_allowed([listener])
    finally:
        await listener.aclose()


def test_factory_none_without_listeners_leaves_the_check_to_the_caller() -> None:
    assert isinstance(make_authenticator("none", config=AuthConfig(mode="none")), NoAuth)


async def test_mode_none_is_refused_when_a_listener_is_not_loopback() -> None:
    loopback = await bind_listener("127.0.0.1", 0)
    # Bound but never listening, so nothing outside can reach it during the test.
    wildcard_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    wildcard_socket.bind(("0.0.0.0", 0))
    wildcard = await anyio.abc.SocketListener.from_socket(wildcard_socket)
    try:
        port = wildcard.extra(SocketAttribute.local_port)
        with pytest.raises(ConfigError, match=f"listens on 0.0.0.0:{port}") as caught:
            check_none_allowed([loopback, wildcard])
        assert "127.0.0.1" not in str(caught.value).split("listens on")[1].split(";")[0]
        with pytest.raises(ConfigError):
            make_authenticator("none", listeners=[wildcard])
    finally:
        await loopback.aclose()
        await wildcard.aclose()


# -- through the real server ------------------------------------------------------------------


async def test_hmac_guards_a_route_on_a_real_server() -> None:
    auth = HmacAuth(SECRET, remember_nonce=NonceMemory())

    async def handler(request: Request) -> Response:
        result = await auth.verify(request)
        if not result.ok:
            return Response.json(401, {"error": "invalid fire token"})
        return Response.json(202, {"status": "accepted"})

    listener = await bind_listener("127.0.0.1", 0)
    server = HTTPServer(handler)
    port = listener.extra(SocketAttribute.local_port)

    async def call(signature: str) -> bytes:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            head = (
                f"POST /api/cron/fire HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                f"Content-Length: {len(BODY)}\r\nChronos-Signature: {signature}\r\n\r\n"
            )
            await stream.send(head.encode() + BODY)
            received = b""
            with anyio.fail_after(5):
                while True:
                    try:
                        received += await stream.receive()
                    except anyio.EndOfStream:
                        return received

    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as group:
                await group.start(server.serve, [listener])
                signature = sign_hmac(SECRET, BODY, int(datetime.now(UTC).timestamp()))
                assert b" 202 " in (await call(signature)).split(b"\r\n")[0]
                replay = await call(signature)
                assert b" 401 " in replay.split(b"\r\n")[0]
                assert replay.endswith(b'{"error":"invalid fire token"}')
                server.stop_accepting()
    finally:
        await listener.aclose()
