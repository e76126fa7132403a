"""chronosd's HTTP/1.1 client (chronosd.http.client) against real servers on 127.0.0.1.

It serves the NAS provider and the reference NAS's fire calls; what is particular to those is
tested in test_nas_provider.py and test_nas_delivery.py, its bytes in test_http_wire.py.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.abc
import h11
import pytest
from anyio.abc import SocketAttribute
from anyio.streams.tls import TLSListener

from chronosd.config import NasConfig
from chronosd.http.client import ClientResponse, HTTPClient, RequestFailed, RequestTimedOut
from chronosd.http.server import HTTPServer, Request, Response, bind_listener
from chronosd.providers.base import ProviderRejected, ProviderUnavailable
from chronosd.providers.nas import NasProvider

pytestmark = pytest.mark.anyio

WAIT = 10.0
REPO = Path(__file__).resolve().parent.parent


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Served:
    """What a test server saw: one entry per request, with the connection it came on."""

    url: str = ""
    # (connection index, method, target, body)
    requests: list[tuple[int, str, str, bytes]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    connections: int = 0
    closed: anyio.Event = field(default_factory=anyio.Event)  # a connection saw the client's EOF
    hung_up: anyio.Event = field(default_factory=anyio.Event)  # the server closed a connection

    def connection_ids(self) -> list[int]:
        return [conn for conn, *_ in self.requests]


Script = Callable[["Conversation"], Awaitable[None]]


@dataclass
class Conversation:
    """One accepted connection, driven by a test's script with an h11 server state machine."""

    stream: anyio.abc.ByteStream
    index: int
    served: Served
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.SERVER))

    async def read_request(self) -> bool:
        """Read one whole request into ``served``; False when the client closed instead."""
        head: h11.Request | None = None
        body = b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                self.h11.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                self.served.requests.append(
                    (self.index, head.method.decode(), head.target.decode(), body)
                )
                self.served.headers.append(
                    {k.decode(): v.decode("latin-1") for k, v in head.headers}
                )
                return True
            elif isinstance(event, h11.ConnectionClosed):
                self.served.closed.set()
                return False

    async def answer(
        self,
        status: int,
        body: bytes = b"{}",
        headers: tuple[tuple[str, str], ...] = (),
        *,
        chunked: bool = False,
    ) -> None:
        framing = (
            [("transfer-encoding", "chunked")] if chunked else [("content-length", str(len(body)))]
        )
        out = self.h11.send(h11.Response(status_code=status, headers=[*framing, *headers]))
        if chunked:
            for part in (body[: len(body) // 2], body[len(body) // 2 :]):
                out = (out or b"") + (self.h11.send(h11.Data(data=part)) or b"")
        else:
            out = (out or b"") + (self.h11.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        await self.stream.send(out)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()


@asynccontextmanager
async def script_server(
    script: Script, *, tls: ssl.SSLContext | None = None
) -> AsyncIterator[Served]:
    """A server that runs *script* on each connection (the first connection is index 0)."""
    served = Served()
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(SocketAttribute.local_port)
    listener: anyio.abc.Listener[anyio.abc.ByteStream] = tcp
    if tls is not None:
        listener = TLSListener(tcp, tls, standard_compatible=False)
    served.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    async def handle(stream: anyio.abc.ByteStream) -> None:
        index, served.connections = served.connections, served.connections + 1
        async with stream:
            with anyio.move_on_after(WAIT):
                await script(Conversation(stream, index, served))
        served.hung_up.set()

    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, handle)
        try:
            yield served
        finally:
            group.cancel_scope.cancel()
    await listener.aclose()


def keep_answering(
    status: int = 200,
    body: bytes = b'{"ok": true}',
    headers: tuple[tuple[str, str], ...] = (),
) -> Script:
    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            await conv.answer(status, body, headers)

    return script


def client_for(url: str, **kwargs: object) -> HTTPClient:
    return HTTPClient(url, timeout=kwargs.pop("timeout", 5.0), **kwargs)  # type: ignore[arg-type]


# -- keep-alive --------------------------------------------------------------------------------


async def test_requests_reuse_one_kept_alive_connection_of_the_shared_server() -> None:
    seen: list[tuple[str, tuple[str, int] | None, bytes, str | None]] = []

    async def handle(request: Request) -> Response:
        seen.append((request.target, request.client, request.body, request.header("host")))
        return Response.json(200, {"n": len(seen)})

    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(SocketAttribute.local_port)
    server = HTTPServer(handle)
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            client = client_for(f"http://127.0.0.1:{port}")
            with anyio.fail_after(WAIT):
                answers = [
                    await client.request("POST", "/a", body=b'{"x": 1}'),
                    await client.request("GET", "/b?q=1"),
                    await client.request("POST", "/c", body=b""),
                ]
            await client.aclose()
            server.stop_accepting()
    finally:
        await listener.aclose()
    assert [json.loads(a.body) for a in answers] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert [(target, body) for target, _, body, _ in seen] == [
        ("/a", b'{"x": 1}'),
        ("/b?q=1", b""),
        ("/c", b""),
    ]
    assert len({client for _, client, _, _ in seen}) == 1
    assert {host for *_, host in seen} == {f"127.0.0.1:{port}"}


async def test_concurrent_requests_each_get_a_connection_and_the_pool_keeps_them() -> None:
    gate = anyio.Event()

    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            if len(conv.served.requests) < 3:
                await gate.wait()  # hold the first requests until all three are in flight
            gate.set()
            await conv.answer(200)

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for _ in range(3):
                    group.start_soon(client.request, "GET", "/x")
            for _ in range(3):
                await client.request("GET", "/y")
        await client.aclose()
    assert served.connections == 3
    assert sorted(served.connection_ids()[3:]) == served.connection_ids()[3:]
    assert set(served.connection_ids()[3:]) <= {0, 1, 2}


async def test_idle_pool_is_bounded() -> None:
    gate = anyio.Event()

    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            if len(conv.served.requests) < 3:
                await gate.wait()
            gate.set()
            await conv.answer(200)

    async with script_server(script) as served:
        client = client_for(served.url, max_idle=1)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                for _ in range(3):
                    group.start_soon(client.request, "GET", "/x")
            await client.request("GET", "/y")
            await client.request("GET", "/z")
        await client.aclose()
    assert served.connections == 3
    kept = served.connection_ids()[3:]
    assert len(set(kept)) == 1  # only one connection was kept for the later requests


async def test_a_server_closing_between_requests_costs_a_new_connection_not_an_error() -> None:
    async def script(conv: Conversation) -> None:
        if await conv.read_request():
            await conv.answer(200, b'{"n": 1}')  # kept alive as far as the client can tell

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            first = await client.request("GET", "/one")
            await served.hung_up.wait()
            second = await client.request("GET", "/two")
        await client.aclose()
    assert (first.status, second.status) == (200, 200)
    assert served.connection_ids() == [0, 1]


async def test_a_connection_idle_past_the_keepalive_expiry_is_closed_not_reused() -> None:
    async with script_server(keep_answering()) as served:
        client = client_for(served.url, keepalive_expiry=0.0)
        with anyio.fail_after(WAIT):
            await client.request("GET", "/1")
            await anyio.sleep(0.01)
            await client.request("GET", "/2")
            await served.closed.wait()  # the expired connection, closed by the client
        await client.aclose()
    assert served.connection_ids() == [0, 1]


async def test_a_reused_connection_closed_without_an_answer_is_retried_once_on_a_new_one() -> None:
    async def script(conv: Conversation) -> None:
        if not await conv.read_request():
            return
        await conv.answer(200, b'{"n": 1}')
        if conv.index == 0:
            await conv.read_request()  # the second request arrives; close without answering

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            await client.request("POST", "/p", body=b"1")
            again = await client.request("POST", "/p", body=b"2")
        await client.aclose()
    assert again.status == 200
    # The second request went out twice: on the reused connection, then on a new one.
    assert [(conn, body) for conn, _, _, body in served.requests] == [
        (0, b"1"),
        (0, b"2"),
        (1, b"2"),
    ]


async def test_a_new_connection_closed_without_an_answer_is_a_failure() -> None:
    async def script(conv: Conversation) -> None:
        await conv.read_request()  # and close without answering

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT), pytest.raises(RequestFailed) as caught:
            await client.request("GET", "/x")
        await client.aclose()
    assert not isinstance(caught.value, RequestTimedOut)
    assert served.connections == 1  # not retried: only a reused connection may be stale
    assert "\n" not in str(caught.value)


async def test_connection_close_from_the_server_is_honoured() -> None:
    async with script_server(keep_answering(headers=(("connection", "close"),))) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            for _ in range(3):
                assert (await client.request("GET", "/x")).status == 200
        await client.aclose()
    assert served.connection_ids() == [0, 1, 2]


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    async def script(conv: Conversation) -> None:
        if conv.index == 0:
            await conv.read_request()
            await conv.answer(200, b'{"chunked": true}', chunked=True)
            await conv.read_request()
            # An HTTP/1.0-style answer: the body ends where the connection does.
            await conv.stream.send(b"HTTP/1.0 200 OK\r\n\r\n" + b'{"until": "close"}')
        else:
            while await conv.read_request():
                await conv.answer(200, b'{"fresh": true}')

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            chunked = await client.request("GET", "/1")
            delimited = await client.request("GET", "/2")
            after = await client.request("GET", "/3")
        await client.aclose()
    assert json.loads(chunked.body) == {"chunked": True}
    assert json.loads(delimited.body) == {"until": "close"}
    assert json.loads(after.body) == {"fresh": True}
    assert served.connection_ids() == [0, 0, 1]  # a close-delimited body ends the connection


async def test_aclose_closes_idle_connections() -> None:
    async with script_server(keep_answering()) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            await client.request("GET", "/x")
            await client.aclose()
            await served.closed.wait()


async def test_a_cancelled_request_drops_its_connection() -> None:
    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            if conv.index == 0 and len(conv.served.requests) == 2:
                await anyio.sleep(WAIT)  # the second request never gets its answer here
            await conv.answer(200)

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            await client.request("GET", "/1")
            with anyio.move_on_after(0.2):
                await client.request("GET", "/2")
            third = await client.request("GET", "/3")
        await client.aclose()
    assert third.status == 200
    # Reusing connection 0 would have read the late answer to /2 as the answer to /3.
    assert served.connection_ids() == [0, 0, 1]


# -- timeouts and failures ---------------------------------------------------------------------


async def test_a_header_that_would_break_the_head_is_refused_before_sending() -> None:
    async with script_server(keep_answering()) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT), pytest.raises(RequestFailed, match="cannot send"):
            await client.request("GET", "/x", headers=[("authorization", "Bearer x\r\nx: 1")])
        await client.aclose()
    assert served.connections == 0


async def test_a_body_over_the_cap_is_a_failure_and_drops_the_connection() -> None:
    async with script_server(keep_answering(body=b"x" * 100)) as served:
        client = client_for(served.url, max_body=99)
        with anyio.fail_after(WAIT):
            with pytest.raises(RequestFailed, match="over 99 bytes"):
                await client.request("GET", "/big")
            await served.closed.wait()
        await client.aclose()


async def test_a_slow_server_hits_the_timeout() -> None:
    async def script(conv: Conversation) -> None:
        await conv.read_request()
        await anyio.sleep(WAIT)

    async with script_server(script) as served:
        client = client_for(served.url, timeout=0.2)
        with anyio.fail_after(WAIT), pytest.raises(RequestTimedOut, match=r"within 0\.2 s"):
            await client.request("GET", "/slow")
        await client.aclose()


async def test_a_server_that_never_answers_the_handshake_hits_the_timeout() -> None:
    async def script(conv: Conversation) -> None:
        await anyio.sleep(WAIT)  # accepted at TCP level; the TLS handshake never completes

    async with script_server(script) as served:
        client = client_for(served.url.replace("http:", "https:"), timeout=0.2)
        with anyio.fail_after(WAIT), pytest.raises(RequestTimedOut, match="connection"):
            await client.request("GET", "/x")
        await client.aclose()


async def test_a_body_trickling_slower_than_the_timeout_per_read_is_still_read() -> None:
    async def script(conv: Conversation) -> None:
        await conv.read_request()
        await conv.stream.send(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        for part in (b"a", b"b", b"c", b"d"):
            await anyio.sleep(0.3)
            await conv.stream.send(part)

    async with script_server(script) as served:
        client = client_for(served.url, timeout=1.0)  # shorter than the whole, not a gap
        with anyio.fail_after(WAIT):
            answer = await client.request("GET", "/x")
        await client.aclose()
    assert answer.body == b"abcd"


async def test_connection_refused_is_a_failure() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(SocketAttribute.local_port)
    await listener.aclose()
    client = client_for(f"http://127.0.0.1:{port}")
    with anyio.fail_after(WAIT), pytest.raises(RequestFailed, match="cannot connect") as caught:
        await client.request("GET", "/x")
    assert not isinstance(caught.value, RequestTimedOut)


async def test_garbage_instead_of_http_is_a_failure() -> None:
    async def script(conv: Conversation) -> None:
        await conv.read_request()
        await conv.stream.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT), pytest.raises(RequestFailed, match="invalid HTTP"):
            await client.request("GET", "/x")
        await client.aclose()


# -- statuses are answers, not failures ----------------------------------------------------------


async def test_error_statuses_are_returned_and_their_connection_is_reused() -> None:
    replies = iter(
        [
            (503, b'{"error": "busy"}', (("retry-after", "7"),)),
            (401, b'{"error": "invalid agent token"}', ()),
            (200, b"not json", (("content-type", "application/json"),)),
        ]
    )

    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            status, body, headers = next(replies)
            await conv.answer(status, body, headers)

    async with script_server(script) as served:
        client = client_for(served.url)
        with anyio.fail_after(WAIT):
            answers = [await client.request("POST", "/p", body=b"{}") for _ in range(3)]
        await client.aclose()
    assert [(a.status, a.reason, a.body) for a in answers] == [
        (503, "", b'{"error": "busy"}'),
        (401, "", b'{"error": "invalid agent token"}'),
        (200, "", b"not json"),
    ]
    assert answers[0].header("Retry-After") == "7"
    assert served.connection_ids() == [0, 0, 0]


def test_client_response_header_lookup_is_case_insensitive() -> None:
    response = ClientResponse(200, "OK", (("x-a", "1"), ("x-a", "2")), b"")
    assert (response.header("X-A"), response.header("x-b")) == ("1", None)


def test_only_http_urls_are_accepted() -> None:
    for url in ("ftp://nas.test", "nas.test", "http://"):
        with pytest.raises(ValueError, match="not an http"):
            HTTPClient(url, timeout=1.0)


# -- through the NAS provider --------------------------------------------------------------------

TOKEN = "agent-token-0123456789abcdef"
FIRE_AT = datetime(2026, 6, 18, 12, 34, 56, tzinfo=UTC)


def provider_for(url: str, tmp_path: Path, *, timeout: float = 5.0) -> NasProvider:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    now = datetime(2026, 6, 18, 12, 0, 0, tzinfo=UTC)
    config = NasConfig(
        url=url, callback_url="http://127.0.0.1:9", token_file=token, timeout=timeout
    )
    return NasProvider(config, clock=lambda: now)


async def test_provider_classifies_503_401_and_malformed_200_on_one_connection(
    tmp_path: Path,
) -> None:
    replies = iter(
        [
            (503, b'{"error": "maintenance"}', (("retry-after", "Thu, 18 Jun 2026 12:01:00 GMT"),)),
            (401, b'{"error": "invalid agent token"}', ()),
            (200, b"<html>portal login</html>", (("content-type", "text/html"),)),
            (200, b'{"schedule_id": "s-9"}', ()),
        ]
    )

    async def script(conv: Conversation) -> None:
        while await conv.read_request():
            status, body, headers = next(replies)
            await conv.answer(status, body, headers)

    async with script_server(script) as served:
        provider = provider_for(served.url, tmp_path)
        try:
            with anyio.fail_after(WAIT):
                with pytest.raises(ProviderUnavailable) as unavailable:
                    await provider.arm("a", FIRE_AT, dedup_key="a:1")
                with pytest.raises(ProviderRejected) as rejected:
                    await provider.arm("a", FIRE_AT, dedup_key="a:1")
                with pytest.raises(ProviderUnavailable, match="malformed") as malformed:
                    await provider.arm("a", FIRE_AT, dedup_key="a:1")
                assert await provider.arm("a", FIRE_AT, dedup_key="a:1") == "s-9"
        finally:
            await provider.aclose()
    assert str(unavailable.value) == (
        f'NAS {served.url}: provision job "a": HTTP 503 Service Unavailable: maintenance'
    )
    assert unavailable.value.retry_after == 60.0
    assert rejected.value.status == 401
    assert str(rejected.value).endswith("HTTP 401 Unauthorized: invalid agent token")
    assert malformed.value.retry_after is None
    assert served.connection_ids() == [0, 0, 0, 0]
    assert {h["authorization"] for h in served.headers} == {f"Bearer {TOKEN}"}
    assert {h["content-type"] for h in served.headers} == {"application/json"}
    assert json.loads(served.requests[0][3]) == {
        "job_id": "a",
        "fire_at": "2026-06-18T12:34:56+00:00",
        "agent_callback_url": "http://127.0.0.1:9",
        "dedup_key": "a:1",
    }


async def test_provider_reports_a_timeout_as_unavailable(tmp_path: Path) -> None:
    async def script(conv: Conversation) -> None:
        await conv.read_request()
        await anyio.sleep(WAIT)

    async with script_server(script) as served:
        provider = provider_for(served.url, tmp_path, timeout=0.2)
        try:
            with anyio.fail_after(WAIT), pytest.raises(ProviderUnavailable) as caught:
                await provider.list_armed()
        finally:
            await provider.aclose()
    assert str(caught.value) == f"NAS {served.url}: list arms: no answer within 0.2 s"


async def test_provider_path_below_the_base_url_is_kept(tmp_path: Path) -> None:
    async with script_server(keep_answering(body=b'{"armed": []}')) as served:
        provider = provider_for(served.url + "/portal/", tmp_path)
        try:
            with anyio.fail_after(WAIT):
                assert await provider.list_armed() == []
        finally:
            await provider.aclose()
    assert served.requests[0][1:3] == ("GET", "/portal/api/agent-cron/list")


def test_the_provisioning_path_does_not_import_httpx(tmp_path: Path) -> None:
    code = f"""
import sys, anyio
from datetime import datetime, UTC
from pathlib import Path
from chronosd.config import NasConfig
from chronosd.providers.base import ProviderUnavailable
from chronosd.providers.nas import NasProvider
token = Path({str(tmp_path / "token")!r}); token.write_text("t")
provider = NasProvider(NasConfig(url="http://127.0.0.1:9", callback_url="http://127.0.0.1:9",
                                 token_file=token, timeout=5))
async def main():
    try:
        await provider.arm("a", datetime(2030, 1, 1, tzinfo=UTC), dedup_key="k")
    except ProviderUnavailable:
        pass
    await provider.aclose()
anyio.run(main)
print("httpx" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- TLS ---------------------------------------------------------------------------------------


def _self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key, PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chronosd test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = _self_signed()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client = ssl.create_default_context(cadata=cert.decode())
    return server, client


async def test_https_requests_are_kept_alive_over_tls(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, client_context = tls_pair
    async with script_server(keep_answering(), tls=server_context) as served:
        client = client_for(served.url, ssl_context=client_context)
        with anyio.fail_after(WAIT):
            for _ in range(3):
                assert json.loads((await client.request("GET", "/x")).body) == {"ok": True}
        await client.aclose()
    assert served.connection_ids() == [0, 0, 0]


async def test_an_untrusted_certificate_is_a_failure(
    tls_pair: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_context, _ = tls_pair
    async with script_server(keep_answering(), tls=server_context) as served:
        client = client_for(served.url)  # the default context does not trust the test cert
        with anyio.fail_after(WAIT), pytest.raises(RequestFailed, match="cannot connect"):
            await client.request("GET", "/x")
        await client.aclose()
