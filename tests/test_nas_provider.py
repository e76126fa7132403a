"""NasProvider against the reference NAS, and its error classification against real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path

import anyio
import anyio.abc
import pytest

from chronosd.config import NasConfig
from chronosd.errors import ConfigError
from chronosd.http.server import HTTPServer, Request, Response, bind_listener
from chronosd.providers.base import Arm, Provider, ProviderRejected, ProviderUnavailable
from chronosd.providers.nas import NasProvider, retry_after_seconds

pytestmark = pytest.mark.anyio

WAIT = 10.0
TOKEN = "agent-token-0123456789abcdef"
CALLBACK = "http://127.0.0.1:9/agent"
FIRE_AT = datetime(2026, 6, 18, 12, 34, 56, tzinfo=UTC)


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    path = tmp_path / "nas-token"
    path.write_text(token + "\n")
    return path


# -- a remote service speaking real HTTP, for error injection ------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: bytes
    client: tuple[str, int] | None


@dataclass
class FakeNas:
    reply: Callable[[Request], Awaitable[Response]]
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, request: Request) -> Response:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.header("authorization"),
                request.body,
                request.client,
            )
        )
        return await self.reply(request)


def answer(
    status: int,
    payload: object = None,
    *,
    raw: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> Callable[[Request], Awaitable[Response]]:
    async def reply(request: Request) -> Response:
        if raw is not None:
            return Response(status, raw, headers)
        if payload is None:
            return Response(status, b"", headers)
        return Response.json(status, payload, headers=headers)

    return reply


@asynccontextmanager
async def fake_nas(reply: Callable[[Request], Awaitable[Response]]) -> AsyncIterator[FakeNas]:
    nas = FakeNas(reply)
    listener = await bind_listener("127.0.0.1", 0)
    nas.url = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    server = HTTPServer(nas.handle)
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            try:
                yield nas
            finally:
                nas.release.set()
                server.stop_accepting()
    finally:
        await listener.aclose()


@asynccontextmanager
async def provider_for(
    url: str, tmp_path: Path, *, timeout: float = 5.0, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[NasProvider]:
    config = NasConfig(
        url=url, callback_url=CALLBACK, token_file=token_file(tmp_path), timeout=timeout
    )
    provider = NasProvider(config) if clock is None else NasProvider(config, clock=clock)
    try:
        yield provider
    finally:
        await provider.aclose()


# -- the contract's requests -------------------------------------------------------------------


def test_provider_shape() -> None:
    provider: Provider = NasProvider(NasConfig(url="http://nas.test", callback_url=CALLBACK))
    assert (provider.name, provider.persistent, provider.resident) == ("nas", True, False)


async def test_arm_cancel_and_list_send_the_contract_requests(tmp_path: Path) -> None:
    async def reply(request: Request) -> Response:
        if request.path.endswith("/provision"):
            return Response.json(200, {"schedule_id": "s-1"})
        if request.path.endswith("/cancel"):
            return Response.json(200, {"ok": True})
        armed = [{"job_id": "a", "fire_at": "2026-06-18T14:34:56+02:00", "schedule_id": "s-1"}]
        return Response.json(200, {"armed": armed})

    async with fake_nas(reply) as nas, provider_for(nas.url + "/", tmp_path) as provider:
        local = FIRE_AT.astimezone(timezone(timedelta(hours=-5))).replace(microsecond=123456)
        with anyio.fail_after(WAIT):
            assert await provider.arm("a", local, dedup_key="a:k") == "s-1"
            await provider.cancel("a")
            assert await provider.list_armed() == [Arm("a", FIRE_AT, "s-1")]

    provision, cancel, listing = nas.seen
    assert (provision.method, provision.path) == ("POST", "/api/agent-cron/provision")
    assert json.loads(provision.body) == {
        "job_id": "a",
        "fire_at": "2026-06-18T12:34:56+00:00",
        "agent_callback_url": CALLBACK,
        "dedup_key": "a:k",
    }
    assert (cancel.method, cancel.path, json.loads(cancel.body)) == (
        "POST",
        "/api/agent-cron/cancel",
        {"job_id": "a"},
    )
    assert (listing.method, listing.path) == ("GET", "/api/agent-cron/list")
    assert {each.authorization for each in nas.seen} == {f"Bearer {TOKEN}"}
    # One client, kept alive: every call came over the same connection.
    assert len({each.client for each in nas.seen}) == 1


async def test_callback_url_argument_overrides_the_config(tmp_path: Path) -> None:
    async with fake_nas(answer(200, {"schedule_id": "x"})) as nas:
        config = NasConfig(url=nas.url, callback_url=CALLBACK, token_file=token_file(tmp_path))
        provider = NasProvider(config, callback_url="https://agent.example.net")
        try:
            with anyio.fail_after(WAIT):
                await provider.arm("a", FIRE_AT, dedup_key="k")
        finally:
            await provider.aclose()
    assert json.loads(nas.seen[0].body)["agent_callback_url"] == "https://agent.example.net"


async def test_token_is_read_from_the_file_at_each_call(tmp_path: Path) -> None:
    async with (
        fake_nas(answer(200, {"ok": True})) as nas,
        provider_for(nas.url, tmp_path) as provider,
    ):
        with anyio.fail_after(WAIT):
            await provider.cancel("a")
            (tmp_path / "nas-token").write_text("  rotated-token \n")
            await provider.cancel("a")
    assert [each.authorization for each in nas.seen] == [f"Bearer {TOKEN}", "Bearer rotated-token"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read it"), ("", "is empty"), (" \n\t", "is empty"), ("two words", "one")],
)
async def test_unusable_token_file_is_rejected_before_any_request(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "nas-token"
    if content is not None:
        path.write_text(content)
    async with fake_nas(answer(200, {"ok": True})) as nas:
        provider = NasProvider(NasConfig(url=nas.url, callback_url=CALLBACK, token_file=path))
        with pytest.raises(ProviderRejected, match=expected) as caught:
            await provider.cancel("a")
        await provider.aclose()
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert nas.seen == []


async def test_unset_token_file_is_rejected(tmp_path: Path) -> None:
    provider = NasProvider(NasConfig(url="http://127.0.0.1:9", callback_url=CALLBACK))
    with pytest.raises(ProviderRejected, match="token_file is not set"):
        await provider.list_armed()


def test_bad_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"provider\.nas\.url"):
        NasProvider(NasConfig(url="", callback_url=CALLBACK))
    for url in ("nas.example.net", "http://", "ftp://nas.example.net", "http://nas:99999"):
        with pytest.raises(ConfigError, match=r"provider\.nas\.url"):
            NasProvider(NasConfig(url=url, callback_url=CALLBACK))
    with pytest.raises(ConfigError, match=r"provider\.nas\.callback_url"):
        NasProvider(NasConfig(url="http://nas.test"))


# -- error classification ----------------------------------------------------------------------


async def test_503_with_retry_after_is_unavailable(tmp_path: Path) -> None:
    reply = answer(503, headers=(("retry-after", "7"),))
    async with fake_nas(reply) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.arm("a", FIRE_AT, dedup_key="k")
    assert str(caught.value) == f'NAS {nas.url}: provision job "a": HTTP 503 Service Unavailable'
    assert caught.value.retry_after == 7.0


async def test_429_with_an_http_date_retry_after_is_unavailable(tmp_path: Path) -> None:
    now = datetime(2026, 6, 18, 12, 0, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=120), usegmt=True)
    reply = answer(429, {"error": "slow down"}, headers=(("retry-after", later),))
    async with (
        fake_nas(reply) as nas,
        provider_for(nas.url, tmp_path, clock=lambda: now) as provider,
    ):
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.list_armed()
    assert str(caught.value) == f"NAS {nas.url}: list arms: HTTP 429 Too Many Requests: slow down"
    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_server_errors_without_retry_after_are_unavailable(
    tmp_path: Path, status: int
) -> None:
    async with fake_nas(answer(status)) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderUnavailable) as caught:
            await provider.cancel("a")
    assert f"HTTP {status}" in str(caught.value)
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_are_rejected(tmp_path: Path, status: int) -> None:
    reply = answer(status, {"error": "invalid agent token"})
    async with fake_nas(reply) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderRejected) as caught:
            await provider.arm("a", FIRE_AT, dedup_key="k")
    assert caught.value.status == status
    assert TOKEN not in str(caught.value)
    assert str(caught.value).startswith(f'NAS {nas.url}: provision job "a": HTTP {status} ')


@pytest.mark.parametrize("status", [400, 404, 405, 409, 422])
async def test_other_client_errors_are_rejected(tmp_path: Path, status: int) -> None:
    reply = answer(status, {"error": "job_id must match\n[A-Za-z0-9]"})
    async with fake_nas(reply) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderRejected) as caught:
            await provider.arm("a", FIRE_AT, dedup_key="k")
    assert caught.value.status == status
    message = str(caught.value)
    assert "\n" not in message
    assert message.endswith(": job_id must match [A-Za-z0-9]")


async def test_redirect_is_not_followed_and_is_rejected(tmp_path: Path) -> None:
    reply = answer(302, headers=(("location", "http://elsewhere.test/"),))
    async with fake_nas(reply) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderRejected) as caught:
            await provider.list_armed()
    assert caught.value.status == 302
    assert len(nas.seen) == 1


@pytest.mark.parametrize(
    ("call", "body"),
    [
        ("arm", b"not json"),
        ("arm", b"[1, 2]"),
        ("arm", b'{"schedule": "x"}'),
        ("arm", b'{"schedule_id": 7}'),
        ("cancel", b"{}"),
        ("cancel", b'{"ok": false}'),
        ("list", b'{"armed": {}}'),
        ("list", b'{"armed": ["a"]}'),
        ("list", b'{"armed": [{"job_id": "a"}]}'),
        ("list", b'{"armed": [{"job_id": "a", "fire_at": "tomorrow"}]}'),
        ("list", b'{"armed": [{"job_id": "a", "fire_at": "2026-06-18T12:00:00"}]}'),
    ],
)
async def test_malformed_success_body_is_unavailable(
    tmp_path: Path, call: str, body: bytes
) -> None:
    reply = answer(200, raw=body, headers=(("content-type", "application/json"),))
    async with fake_nas(reply) as nas, provider_for(nas.url, tmp_path) as provider:
        with pytest.raises(ProviderUnavailable, match="malformed answer") as caught:
            if call == "arm":
                await provider.arm("a", FIRE_AT, dedup_key="k")
            elif call == "cancel":
                await provider.cancel("a")
            else:
                await provider.list_armed()
    assert caught.value.retry_after is None


async def test_connection_refused_is_unavailable(tmp_path: Path) -> None:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()  # nothing listens there now
    async with provider_for(f"http://127.0.0.1:{port}", tmp_path) as provider:
        with anyio.fail_after(WAIT), pytest.raises(ProviderUnavailable) as caught:
            await provider.cancel("a")
    assert str(caught.value).startswith(f'NAS http://127.0.0.1:{port}: cancel job "a": ')
    assert "\n" not in str(caught.value)


async def test_timeout_is_unavailable(tmp_path: Path) -> None:
    async def stall(request: Request) -> Response:
        with anyio.move_on_after(WAIT):
            await nas.release.wait()
        return Response.json(200, {"ok": True})

    async with fake_nas(stall) as nas, provider_for(nas.url, tmp_path, timeout=0.3) as provider:
        with anyio.fail_after(WAIT), pytest.raises(ProviderUnavailable) as caught:
            await provider.cancel("a")
    assert str(caught.value) == f'NAS {nas.url}: cancel job "a": no answer within 0.3 s'


async def test_client_is_recreated_after_aclose(tmp_path: Path) -> None:
    async with (
        fake_nas(answer(200, {"ok": True})) as nas,
        provider_for(nas.url, tmp_path) as provider,
    ):
        with anyio.fail_after(WAIT):
            await provider.cancel("a")
            await provider.aclose()
            await provider.cancel("b")
    assert len(nas.seen) == 2
    assert nas.seen[0].client != nas.seen[1].client


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("30", 30.0),
        (" 1.5 ", 1.5),
        ("-1", None),
        ("soon", None),
        ("nan", None),
        ("Thu, 18 Jun 2026 12:01:00 GMT", 60.0),
        ("Thu, 18 Jun 2026 11:00:00 GMT", 0.0),
    ],
)
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 6, 18, 12, 0, 0, tzinfo=UTC)
    assert retry_after_seconds(value, now) == expected


# -- against the reference NAS -----------------------------------------------------------------

AGENT = "box"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ReferenceNas:
    url: str
    token: str
    state_dir: Path


def _nas_env(home: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("CHRONOSD_")}
    env["HOME"] = str(home)  # no user config file leaks in
    env.pop("LISTEN_FDS", None)
    env.pop("LISTEN_PID", None)
    return env


@pytest.fixture
def reference_nas(tmp_path: Path) -> Iterator[ReferenceNas]:
    state_dir = tmp_path / "nas-state"
    ready = tmp_path / "nas-ready"
    env = _nas_env(tmp_path)
    added = subprocess.run(
        [sys.executable, "-m", "chronosd", "nas", "agent", "add", AGENT,
         "--callback-url", CALLBACK, "--state-dir", str(state_dir), "--json"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    token = json.loads(added.stdout)["token"]
    log = (tmp_path / "nas.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "chronosd", "nas", "serve", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"reference NAS did not start: {(tmp_path / 'nas.log').read_text()}"
                )
            time.sleep(0.02)
        yield ReferenceNas(f"http://{ready.read_text().strip()}", token, state_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


@asynccontextmanager
async def nas_provider(
    nas: ReferenceNas, tmp_path: Path, *, token: str | None = None, callback_url: str = CALLBACK
) -> AsyncIterator[NasProvider]:
    config = NasConfig(
        url=nas.url,
        callback_url=callback_url,
        token_file=token_file(tmp_path, nas.token if token is None else token),
    )
    provider = NasProvider(config)
    try:
        yield provider
    finally:
        await provider.aclose()


def _future(seconds: int) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)


async def test_reference_nas_arms_replaces_lists_and_cancels(
    reference_nas: ReferenceNas, tmp_path: Path
) -> None:
    first, second, moved = _future(86400), _future(2 * 86400), _future(3 * 86400)
    async with nas_provider(reference_nas, tmp_path) as provider:
        with anyio.fail_after(WAIT):
            id_a = await provider.arm("a", first, dedup_key=f"a:{first.isoformat()}")
            id_b = await provider.arm("b", second, dedup_key=f"b:{second.isoformat()}")
            assert sorted(await provider.list_armed(), key=lambda arm: arm.job_id) == [
                Arm("a", first, id_a),
                Arm("b", second, id_b),
            ]
            # The same dedup key again changes nothing.
            assert await provider.arm("a", first, dedup_key=f"a:{first.isoformat()}") == id_a
            # A new fire_at replaces the job's arm: still one arm per job.
            id_moved = await provider.arm("a", moved, dedup_key=f"a:{moved.isoformat()}")
            armed = {arm.job_id: arm for arm in await provider.list_armed()}
            assert armed["a"] == Arm("a", moved, id_moved)
            assert len(armed) == 2

            await provider.cancel("a")
            await provider.cancel("never-armed")  # a no-op, not an error
            assert await provider.list_armed() == [Arm("b", second, id_b)]


async def test_reference_nas_refuses_a_wrong_token(
    reference_nas: ReferenceNas, tmp_path: Path
) -> None:
    async with nas_provider(reference_nas, tmp_path, token="not-the-token") as provider:
        with anyio.fail_after(WAIT), pytest.raises(ProviderRejected) as caught:
            await provider.list_armed()
    assert caught.value.status == 401
    assert "not-the-token" not in str(caught.value)


async def test_reference_nas_refuses_a_bad_job_id(
    reference_nas: ReferenceNas, tmp_path: Path
) -> None:
    async with nas_provider(reference_nas, tmp_path) as provider:
        with anyio.fail_after(WAIT), pytest.raises(ProviderRejected) as caught:
            await provider.arm("not a job id", _future(60), dedup_key="k")
    assert caught.value.status == 400
    assert "job_id" in str(caught.value)


async def test_thousand_arms_with_sixteen_concurrent_calls(
    reference_nas: ReferenceNas, tmp_path: Path
) -> None:
    base = _future(86400)
    wanted = {f"job-{n:04d}": base + timedelta(seconds=n) for n in range(1000)}
    schedule_ids: dict[str, str] = {}
    in_flight = peak = 0
    send, receive = anyio.create_memory_object_stream[str](len(wanted))
    for job_id in wanted:
        send.send_nowait(job_id)
    send.close()

    async with nas_provider(reference_nas, tmp_path) as provider:

        async def worker() -> None:
            nonlocal in_flight, peak
            async for job_id in receive:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    fire_at = wanted[job_id]
                    key = f"{job_id}:{fire_at.isoformat()}"
                    schedule_ids[job_id] = await provider.arm(job_id, fire_at, dedup_key=key)
                finally:
                    in_flight -= 1

        with anyio.fail_after(120):
            async with receive, anyio.create_task_group() as group:
                for _ in range(16):
                    group.start_soon(worker)
            armed = await provider.list_armed()

    assert 1 < peak <= 16
    assert len(schedule_ids) == 1000
    assert {arm.job_id: (arm.fire_at, arm.schedule_id) for arm in armed} == {
        job_id: (fire_at, schedule_ids[job_id]) for job_id, fire_at in wanted.items()
    }


async def test_reference_nas_fire_token_passes_jwt_auth(
    reference_nas: ReferenceNas, tmp_path: Path
) -> None:
    from chronosd.http.jwt_auth import JwtAuth
    from chronosd.state import StateDB

    fired = anyio.Event()
    verdicts: list[tuple[bool, str, bytes]] = []

    with StateDB.open(tmp_path / "agent-state") as db:
        auth = JwtAuth(
            jwks_url=f"{reference_nas.url}/.well-known/jwks.json",
            audience=f"agent:{AGENT}",
            issuer=reference_nas.url,
            db=db,
        )

        async def agent(request: Request) -> Response:
            result = await auth.verify(request)
            verdicts.append((result.ok, result.reason, request.body))
            fired.set()
            return Response.json(202 if result.ok else 401, {"status": "accepted"})

        async with (
            fake_nas(agent) as callback,
            nas_provider(reference_nas, tmp_path, callback_url=callback.url) as provider,
        ):
            with anyio.fail_after(WAIT):
                await provider.arm("soon", _future(1), dedup_key="soon:1")
                await fired.wait()

    assert callback.seen[0].path == "/api/cron/fire"
    ok, reason, body = verdicts[0]
    assert (ok, reason) == (True, "")
    assert json.loads(body)["job_id"] == "soon"
