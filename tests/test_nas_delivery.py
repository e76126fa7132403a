"""The reference NAS's fire calls: the kept-alive HTTP client and the dispatcher around it.

Real sockets on 127.0.0.1 throughout: agents are small h11 servers written here (so a test can
make them close connections, refuse keep-alive or speak TLS) or `chronosd.http.server`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import httpx
import pytest
from anyio.streams.tls import TLSListener

from chronosd.http.server import HTTPServer, Limits, Request, Response, bind_listener
from chronosd.nas.delivery import (
    AgentConnections,
    DeliveryError,
    DeliveryTimedOut,
    FireTarget,
    fire_target,
)
from chronosd.nas.serve import NASOptions, RunningNAS, run_nas
from chronosd.nas.store import NASStore
from chronosd.timefmt import to_wire

pytestmark = pytest.mark.anyio

WAIT = 15.0  # bound on every wait


# -- taking callback URLs apart ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://127.0.0.1:8787",
            FireTarget(False, "127.0.0.1", 8787, "127.0.0.1:8787", "/api/cron/fire"),
        ),
        (
            "https://agent.example/prefix/",
            FireTarget(True, "agent.example", 443, "agent.example", "/prefix/api/cron/fire"),
        ),
        (
            "http://agent.example:80",
            FireTarget(False, "agent.example", 80, "agent.example", "/api/cron/fire"),
        ),
        ("http://[::1]:9000/a", FireTarget(False, "::1", 9000, "[::1]:9000", "/a/api/cron/fire")),
        (
            "https://user:pw@agent.example:8443/x y",
            FireTarget(True, "agent.example", 8443, "agent.example:8443", "/x%20y/api/cron/fire"),
        ),
        (
            "http://bücher.example/ü",
            FireTarget(
                False, "xn--bcher-kva.example", 80, "xn--bcher-kva.example", "/%C3%BC/api/cron/fire"
            ),
        ),
    ],
)
def test_callback_url_becomes_host_port_and_fire_path(url: str, expected: FireTarget) -> None:
    assert fire_target(url) == expected


@pytest.mark.parametrize("url", ["ftp://agent.example", "http://", "http://agent.example:99999"])
def test_unusable_callback_url_is_a_delivery_error(url: str) -> None:
    with pytest.raises(DeliveryError):
        fire_target(url)


# -- an agent that can misbehave ---------------------------------------------------------------


@dataclass
class FakeAgent:
    """Answers every request with *status*; counts connections and records requests."""

    status: int = 202
    retry_after: str | None = None
    silent: bool = False  # read the request, never answer
    url: str = ""
    accepted: int = 0
    open: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, stream: anyio.abc.ByteStream) -> None:
        self.accepted += 1
        self.open += 1
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        data = b""
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    headers = {k.decode(): v.decode() for k, v in request.headers}
                    self.requests.append((request.target.decode(), headers, body))
                    if self.silent:
                        await anyio.sleep(WAIT)
                    await stream.send(self._response(conn))
                    if conn.our_state is not h11.DONE:
                        break
                    conn.start_next_cycle()
                else:
                    break
        finally:
            self.open -= 1
            await stream.aclose()

    def _response(self, conn: h11.Connection) -> bytes:
        payload = b'{"status":"accepted"}'
        headers = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        if self.retry_after is not None:
            headers.append(("retry-after", self.retry_after))
        head = conn.send(h11.Response(status_code=self.status, headers=headers)) or b""
        return (
            head
            + (conn.send(h11.Data(data=payload)) or b"")
            + (conn.send(h11.EndOfMessage()) or b"")
        )


@asynccontextmanager
async def fake_agent(
    agent: FakeAgent, tls: ssl.SSLContext | None = None
) -> AsyncIterator[FakeAgent]:
    listener: anyio.abc.Listener[Any] = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    if tls is not None:
        listener = TLSListener(listener, tls, standard_compatible=False)
    agent.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    async with anyio.create_task_group() as group:
        group.start_soon(listener.serve, agent.handle)
        try:
            yield agent
        finally:
            group.cancel_scope.cancel()
    await listener.aclose()


async def eventually(check: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT):
        while not check():
            await anyio.sleep(0.02)


def no_tls() -> ssl.SSLContext:
    raise AssertionError("no TLS context is needed for http")


def pool_for(tls_context: Callable[[], ssl.SSLContext] = no_tls) -> AgentConnections:
    return AgentConnections(tls_context=tls_context, timeout=WAIT)


async def post(pool: AgentConnections, agent: FakeAgent, job_id: str = "j1") -> int:
    body = json.dumps({"job_id": job_id, "fire_at": "2030-01-01T00:00:00+00:00"}).encode()
    with anyio.fail_after(WAIT):
        reply = await pool.post_json(fire_target(agent.url), body, "Bearer t0ken")
    return reply.status


# -- the fire calls (the HTTP itself is tested in test_http_client.py) --------------------------


async def test_consecutive_fires_to_an_agent_share_one_connection() -> None:
    async with fake_agent(FakeAgent()) as agent:
        pool = pool_for()
        statuses = [await post(pool, agent, f"j{i}") for i in range(5)]
        assert statuses == [202] * 5
        assert agent.accepted == 1
        target, headers, body = agent.requests[0]
        assert target == "/api/cron/fire"
        assert headers["host"] == agent.url.removeprefix("http://")
        assert headers["authorization"] == "Bearer t0ken"
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"] == "chronosd-nas"
        assert json.loads(body) == {"job_id": "j0", "fire_at": "2030-01-01T00:00:00+00:00"}
        await pool.aclose()
        await eventually(lambda: agent.open == 0)


async def test_callbacks_on_two_origins_get_their_own_connections_closed_together() -> None:
    async with fake_agent(FakeAgent()) as first, fake_agent(FakeAgent()) as second:
        pool = pool_for()
        assert [await post(pool, first), await post(pool, second), await post(pool, first)] == [
            202,
            202,
            202,
        ]
        assert (first.accepted, second.accepted, len(first.requests)) == (1, 1, 2)
        await pool.aclose()
        await eventually(lambda: first.open == second.open == 0)


async def test_status_of_a_failed_fire_is_reported_with_retry_after() -> None:
    async with fake_agent(FakeAgent(status=503, retry_after="30")) as agent:
        pool = pool_for()
        body = b'{"job_id":"j1","fire_at":"2030-01-01T00:00:00+00:00"}'
        reply = await pool.post_json(fire_target(agent.url), body, "Bearer x")
        assert (reply.status, reply.retry_after) == (503, "30")
        await pool.aclose()


async def test_refused_connection_is_a_delivery_error_naming_the_agent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = pool_for()
    with pytest.raises(DeliveryError, match=rf"127\.0\.0\.1:{port}: cannot connect") as caught:
        await pool.post_json(fire_target(f"http://127.0.0.1:{port}"), b"{}", "Bearer x")
    assert not isinstance(caught.value, DeliveryTimedOut)


async def test_an_agent_silent_past_the_timeout_is_a_timed_out_delivery() -> None:
    async with fake_agent(FakeAgent(silent=True)) as agent:
        pool = AgentConnections(tls_context=no_tls, timeout=0.2)
        with anyio.fail_after(WAIT), pytest.raises(DeliveryTimedOut, match=r"within 0\.2 s"):
            await pool.post_json(fire_target(agent.url), b"{}", "Bearer x")
        await pool.aclose()


async def test_an_authorization_that_would_break_the_head_is_a_delivery_error() -> None:
    async with fake_agent(FakeAgent()) as agent:
        pool = pool_for()
        with pytest.raises(DeliveryError, match="cannot send the request"):
            await pool.post_json(fire_target(agent.url), b"{}", "Bearer x\r\nx-evil: 1")
        assert agent.requests == []
        await pool.aclose()


def self_signed() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh certificate for 127.0.0.1, and a client trusting it."""
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chronosd test agent")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:
        cert_path, key_path = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


async def test_https_callback_is_called_over_tls_verified_with_the_given_context() -> None:
    server_tls, client_tls = self_signed()
    async with fake_agent(FakeAgent(), tls=server_tls) as agent:
        pool = pool_for(lambda: client_tls)
        assert [await post(pool, agent) for _ in range(3)] == [202, 202, 202]
        assert agent.accepted == 1  # kept alive over TLS too
        await pool.aclose()

        untrusting = pool_for(ssl.create_default_context)
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(untrusting, agent)
        assert len(agent.requests) == 3


# -- the dispatcher ----------------------------------------------------------------------------


def add_agent(state_dir: Path, name: str, callback_url: str = "http://127.0.0.1:9") -> str:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = NASStore.open(state_dir)
    try:
        return store.add_agent(name, callback_url, now=time.time())
    finally:
        store.close()


def store_arms(state_dir: Path, agent: str, callback_url: str, job_ids: list[str]) -> None:
    """Arms that came due a moment ago, earliest first in the order given."""
    store = NASStore.open(state_dir)
    try:
        base = time.time() - 10
        for index, job_id in enumerate(job_ids):
            epoch = int(base) + index * 0.001
            store.provision(
                agent,
                job_id,
                fire_at=to_wire(dt.datetime.fromtimestamp(int(epoch), dt.UTC)),
                fire_epoch=epoch,
                callback_url=callback_url,
                dedup_key=None,
                now=time.time(),
            )
    finally:
        store.close()


@asynccontextmanager
async def nas_running(state_dir: Path, **options: Any) -> AsyncIterator[RunningNAS]:
    listener = await bind_listener("127.0.0.1", 0)
    try:
        async with anyio.create_task_group() as group:
            nas = await group.start(run_nas, NASOptions(state_dir=state_dir, **options), [listener])
            try:
                yield nas
            finally:
                group.cancel_scope.cancel()
    finally:
        await listener.aclose()


@dataclass
class Receiver:
    url: str = ""
    calls: list[str] = field(default_factory=list)
    accepted: int = 0
    open: int = 0
    respond: Callable[[str], Awaitable[None]] | None = None

    async def handle(self, request: Request) -> Response:
        job_id = json.loads(request.body)["job_id"]
        self.calls.append(job_id)
        if self.respond is not None:
            await self.respond(job_id)
        return Response.json(202, {"status": "accepted", "job_id": job_id})

    def connections(self, count: int) -> None:
        if count > self.open:
            self.accepted += count - self.open
        self.open = count


@asynccontextmanager
async def receiver(
    respond: Callable[[str], Awaitable[None]] | None = None,
    listener: anyio.abc.SocketListener | None = None,
) -> AsyncIterator[Receiver]:
    own = listener is None
    if listener is None:
        listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    agent = Receiver(url=f"http://127.0.0.1:{port}", respond=respond)
    server = HTTPServer(
        agent.handle,
        # Idle connections are kept far longer than any wait here: only the NAS closes them.
        limits=Limits(max_connections=512, keepalive_timeout=4 * WAIT),
        on_connections=agent.connections,
    )
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            try:
                yield agent
            finally:
                group.cancel_scope.cancel()
    finally:
        if own:
            await listener.aclose()


def delivered(nas: RunningNAS) -> list[str]:
    return [d.job_id for d in nas.store.deliveries() if d.outcome == "delivered"]


async def test_burst_reuses_connections_and_lets_go_of_them_afterwards(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")
    jobs = [f"job-{i:03d}" for i in range(300)]
    async with receiver() as agent:
        store_arms(tmp_path, "alpha", agent.url, jobs)
        async with nas_running(tmp_path, max_in_flight_per_agent=8) as nas:
            await eventually(lambda: sorted(delivered(nas)) == jobs)
            assert nas.store.count_armed() == 0
            assert [d.outcome for d in nas.store.deliveries()] == ["delivered"] * len(jobs)
            # Kept alive through the burst: far fewer connections than fires ...
            assert agent.accepted < len(jobs) // 4
            # ... and none left open once nothing is in flight, so the agent may idle out.
            await eventually(lambda: agent.open == 0)
            assert sorted(agent.calls) == jobs


async def test_arm_cancelled_while_queued_is_not_delivered(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    release = anyio.Event()

    async def hold_first(job_id: str) -> None:
        if job_id == "first":
            await release.wait()

    async with receiver(hold_first) as agent:
        store_arms(tmp_path, "alpha", agent.url, ["first", "cancelled", "moved", "last"])
        async with nas_running(tmp_path, max_in_flight_per_agent=1) as nas:
            await eventually(lambda: agent.calls == ["first"])
            async with httpx.AsyncClient(
                base_url=f"http://{nas.address}",
                headers={"authorization": f"Bearer {token}"},
                trust_env=False,
            ) as api:
                response = await api.post("/api/agent-cron/cancel", json={"job_id": "cancelled"})
                assert response.status_code == 200
                later = to_wire(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
                response = await api.post(
                    "/api/agent-cron/provision",
                    json={"job_id": "moved", "fire_at": later, "agent_callback_url": agent.url},
                )
                assert response.status_code == 200
            release.set()
            # One at a time, in fire order: had "cancelled" or "moved" stayed queued, they
            # would have been called before "last".
            await eventually(lambda: sorted(delivered(nas)) == ["first", "last"])
            assert agent.calls == ["first", "last"]
            assert [(a.job_id, a.fire_at) for a in nas.store.armed()] == [("moved", later)]


async def test_agent_removed_by_another_process_gets_no_more_fires(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")
    add_agent(tmp_path, "beta")
    release = anyio.Event()

    async def hold_first(job_id: str) -> None:
        if job_id == "a-first":
            await release.wait()

    async with receiver(hold_first) as agent:
        store_arms(tmp_path, "alpha", agent.url, ["a-first", "a-second", "a-third"])
        store_arms(tmp_path, "beta", agent.url, ["b-only"])
        async with nas_running(tmp_path, max_in_flight=1) as nas:
            await eventually(lambda: agent.calls == ["a-first"])
            cli = NASStore.open(tmp_path)  # what `chronosd nas agent remove alpha` does
            try:
                assert cli.remove_agent("alpha")
            finally:
                cli.close()
            release.set()
            # One delivery at a time overall; alpha's queued arms would have come first.
            await eventually(lambda: "b-only" in delivered(nas))
            assert agent.calls == ["a-first", "b-only"]
            outcomes = {d.job_id: d.outcome for d in nas.store.deliveries()}
            assert outcomes == {"a-first": "superseded", "b-only": "delivered"}


async def test_agent_tokens_follow_changes_made_by_another_process(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    body = {"job_id": "j1", "fire_at": to_wire(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))}

    async with nas_running(tmp_path) as nas, httpx.AsyncClient(trust_env=False) as api:

        async def provision(token: str) -> int:
            response = await api.post(
                f"http://{nas.address}/api/agent-cron/provision",
                json={**body, "agent_callback_url": "http://agent.example"},
                headers={"authorization": f"Bearer {token}"},
            )
            return response.status_code

        assert await provision("not-yet") == 401
        cli = NASStore.open(tmp_path)  # `chronosd nas agent ...` while the NAS runs
        try:
            first = cli.add_agent("alpha", "http://agent.example", now=time.time())
            assert await provision(first) == 200
            second = cli.add_agent(
                "alpha", "http://agent.example", now=time.time(), rotate_token=True
            )
            assert await provision(first) == 401
            assert await provision(second) == 200
            cli.remove_agent("alpha")
            assert await provision(second) == 401
        finally:
            cli.close()


async def test_fires_waiting_in_a_full_listen_backlog_are_delivered_once_accepted(
    tmp_path: Path,
) -> None:
    # An agent that is still starting (socket activation): its socket listens with a tiny
    # backlog and nobody accepts yet. Connections beyond the backlog wait in SYN retries.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    sock.setblocking(False)
    listener = await anyio.abc.SocketListener.from_socket(sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    add_agent(tmp_path, "alpha")
    jobs = [f"job-{i:02d}" for i in range(12)]
    store_arms(tmp_path, "alpha", url, jobs)
    try:
        async with nas_running(tmp_path, max_in_flight_per_agent=12) as nas:
            await anyio.sleep(0.3)  # the NAS has started its calls; none can be answered
            assert delivered(nas) == []
            async with receiver(listener=listener):
                await eventually(lambda: sorted(delivered(nas)) == jobs)
            assert [d.outcome for d in nas.store.deliveries()] == ["delivered"] * len(jobs)
    finally:
        await listener.aclose()


@pytest.mark.parametrize("rearm_in", [86_400.0, 0.0])
async def test_agent_re_arming_as_soon_as_it_answered_is_recorded_as_delivered(
    tmp_path: Path, rearm_in: float
) -> None:
    # chronosd answers 202 and re-arms the job straight away, often before the NAS has written
    # the delivery. A re-arm that is due at once must be delivered too.
    token = add_agent(tmp_path, "alpha")
    jobs = [f"job-{i:02d}" for i in range(30)]
    first_fire = to_wire(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=10))
    next_fire = to_wire(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=rearm_in))
    fires: list[tuple[str, str]] = []

    async with anyio.create_task_group() as rearms:

        async def rearm(nas: RunningNAS, job_id: str, callback: str) -> None:
            async with httpx.AsyncClient(trust_env=False) as api:
                response = await api.post(
                    f"http://{nas.address}/api/agent-cron/provision",
                    headers={"authorization": f"Bearer {token}"},
                    json={
                        "job_id": job_id,
                        "fire_at": next_fire,
                        "agent_callback_url": callback,
                        "dedup_key": f"{job_id}:{next_fire}",
                    },
                )
                assert response.status_code == 200
                rearmed.append(job_id)

        running: list[RunningNAS] = []
        rearmed: list[str] = []

        async def handle(request: Request) -> Response:
            body = json.loads(request.body)
            fires.append((body["job_id"], body["fire_at"]))

            def after() -> None:
                if body["fire_at"] == first_fire:
                    rearms.start_soon(rearm, running[0], body["job_id"], agent_url)

            return Response.json(202, {"status": "accepted"}, on_sent=after)

        listener = await bind_listener("127.0.0.1", 0)
        agent_url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        server = HTTPServer(handle)
        async with anyio.create_task_group() as agent:
            await agent.start(server.serve, [listener])
            store = NASStore.open(tmp_path)
            try:
                for job_id in jobs:
                    store.provision(
                        "alpha",
                        job_id,
                        fire_at=first_fire,
                        fire_epoch=dt.datetime.fromisoformat(first_fire).timestamp(),
                        callback_url=agent_url,
                        dedup_key=f"{job_id}:{first_fire}",
                        now=time.time(),
                    )
            finally:
                store.close()
            async with nas_running(tmp_path) as nas:
                running.append(nas)
                expected = len(jobs) * (2 if rearm_in == 0 else 1)
                await eventually(lambda: len(delivered(nas)) == expected)
                await eventually(lambda: len(rearmed) == len(jobs))
                outcomes = {d.outcome for d in nas.store.deliveries()}
                assert outcomes == {"delivered"}
                if rearm_in:
                    assert {(a.job_id, a.fire_at) for a in nas.store.armed()} == {
                        (job_id, next_fire) for job_id in jobs
                    }
                else:
                    await eventually(lambda: nas.store.count_armed() == 0)
                    assert sorted(fires) == sorted(
                        [(j, first_fire) for j in jobs] + [(j, next_fire) for j in jobs]
                    )
            agent.cancel_scope.cancel()
        await listener.aclose()


async def test_agent_that_never_answers_is_retried_after_the_timeout(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")
    answer = anyio.Event()

    async def silent_once(job_id: str) -> None:
        if not answer.is_set():
            answer.set()
            await anyio.sleep(WAIT)  # the NAS gives up long before

    async with receiver(silent_once) as agent:
        store_arms(tmp_path, "alpha", agent.url, ["j1"])
        options = {"delivery_timeout": 0.3, "backoff_base": 0.05}
        async with nas_running(tmp_path, **options) as nas:
            await eventually(lambda: delivered(nas) == ["j1"])
            first, second = nas.store.deliveries()
            assert (first.outcome, first.status_code) == ("retry", None)
            assert first.error == "no answer within 0.3s"
            assert (second.outcome, second.status_code) == ("delivered", 202)
            assert agent.calls == ["j1", "j1"]
