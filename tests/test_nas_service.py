"""The reference NAS end to end in one process: real sockets on 127.0.0.1, real SQLite.

The NAS runs with `run_nas` in a task group; agents it calls back are `HTTPServer`s from
`chronosd.http.server` with handlers written here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest

from chronosd.http.server import HTTPServer, Limits, Request, Response, bind_listener
from chronosd.nas.dispatcher import DEFAULT_MAX_IN_FLIGHT_PER_AGENT
from chronosd.nas.serve import NASOptions, RunningNAS, run_nas
from chronosd.nas.store import NASStore
from chronosd.timefmt import to_wire

pytestmark = pytest.mark.anyio

WAIT = 15.0  # bound on every wait


def wire(offset: float = 0.0) -> str:
    return to_wire(datetime.now(UTC) + timedelta(seconds=offset))


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
class Call:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    request: Request


@dataclass
class Receiver:
    """An agent's listener: records every fire call and answers with `respond`."""

    url: str = ""
    respond: Callable[[Call], Awaitable[Response]] | None = None
    calls: list[Call] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, request: Request) -> Response:
        call = Call(
            request.path,
            dict(request.headers),
            json.loads(request.body),
            time.time(),
            request,
        )
        self.calls.append(call)
        self.arrived.set()
        self.arrived = anyio.Event()
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.respond is None:
                return Response.json(202, {"status": "accepted", "job_id": call.body["job_id"]})
            return await self.respond(call)
        finally:
            self.active -= 1

    async def wait_calls(self, count: int) -> list[Call]:
        with anyio.fail_after(WAIT):
            while len(self.calls) < count:
                await self.arrived.wait()
        return self.calls


@asynccontextmanager
async def receiver(
    respond: Callable[[Call], Awaitable[Response]] | None = None,
) -> AsyncIterator[Receiver]:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    agent = Receiver(url=f"http://127.0.0.1:{port}", respond=respond)
    server = HTTPServer(agent.handle, limits=Limits(max_connections=512))
    try:
        async with anyio.create_task_group() as group:
            await group.start(server.serve, [listener])
            try:
                yield agent
            finally:
                group.cancel_scope.cancel()
    finally:
        await listener.aclose()


async def eventually(check: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT):
        while not check():
            await anyio.sleep(0.02)


def add_agent(state_dir: Path, name: str, callback_url: str = "http://127.0.0.1:9") -> str:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = NASStore.open(state_dir)
    try:
        return store.add_agent(name, callback_url, now=time.time())
    finally:
        store.close()


@asynccontextmanager
async def client(nas: RunningNAS, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    base_url = f"http://{nas.address}"
    async with httpx.AsyncClient(base_url=base_url, headers=headers, trust_env=False) as c:
        yield c


async def provision(
    api: httpx.AsyncClient,
    job_id: str,
    fire_at: str,
    callback: str,
    dedup_key: str | None = None,
) -> str:
    response = await api.post(
        "/api/agent-cron/provision",
        json={
            "job_id": job_id,
            "fire_at": fire_at,
            "agent_callback_url": callback,
            "dedup_key": dedup_key or f"{job_id}:{fire_at}",
        },
    )
    assert response.status_code == 200, response.text
    schedule_id = response.json()["schedule_id"]
    assert isinstance(schedule_id, str) and schedule_id
    return schedule_id


async def armed(api: httpx.AsyncClient) -> list[dict[str, str]]:
    response = await api.get("/api/agent-cron/list")
    assert response.status_code == 200
    result: list[dict[str, str]] = response.json()["armed"]
    return result


# -- the provisioning API ----------------------------------------------------------------------


async def test_missing_or_wrong_agent_token_is_refused_with_401(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")
    body = {"job_id": "j1", "fire_at": wire(3600), "agent_callback_url": "http://a.example"}
    async with nas_running(tmp_path) as nas:
        for token in (None, "not-the-token"):
            async with client(nas, token) as api:
                for method, path, payload in (
                    ("POST", "/api/agent-cron/provision", body),
                    ("POST", "/api/agent-cron/cancel", {"job_id": "j1"}),
                    ("GET", "/api/agent-cron/list", None),
                ):
                    response = await api.request(method, path, json=payload)
                    assert response.status_code == 401
                    assert "error" in response.json()
        async with httpx.AsyncClient(base_url=f"http://{nas.address}", trust_env=False) as api:
            basic = await api.get("/api/agent-cron/list", headers={"authorization": "Basic eDp5"})
            assert basic.status_code == 401
        assert nas.store.armed() == []


async def test_provisioned_arm_is_listed_with_its_schedule_id(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    fire_at = wire(3600)
    async with nas_running(tmp_path) as nas, client(nas, token) as api:
        schedule_id = await provision(api, "backup", fire_at, "https://agent.example")
        assert await armed(api) == [
            {"job_id": "backup", "fire_at": fire_at, "schedule_id": schedule_id}
        ]


async def test_new_fire_at_replaces_the_jobs_arm(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    first, second = wire(3600), wire(7200)
    async with nas_running(tmp_path) as nas, client(nas, token) as api:
        old = await provision(api, "backup", first, "https://agent.example")
        new = await provision(api, "backup", second, "https://agent.example")
        assert new != old
        assert await armed(api) == [{"job_id": "backup", "fire_at": second, "schedule_id": new}]


async def test_repeated_dedup_key_is_a_no_op(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    fire_at = wire(3600)
    async with nas_running(tmp_path) as nas, client(nas, token) as api:
        first = await provision(api, "backup", fire_at, "https://agent.example", "k1")
        again = await provision(api, "backup", wire(9000), "https://other.example", "k1")
        assert again == first
        assert await armed(api) == [{"job_id": "backup", "fire_at": fire_at, "schedule_id": first}]
        assert nas.store.armed()[0].callback_url == "https://agent.example"


async def test_cancel_removes_the_arm_and_unknown_job_is_a_no_op(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    async with nas_running(tmp_path) as nas, client(nas, token) as api:
        await provision(api, "keep", wire(3600), "https://agent.example")
        await provision(api, "drop", wire(3600), "https://agent.example")
        for job_id in ("drop", "never-armed"):
            response = await api.post("/api/agent-cron/cancel", json={"job_id": job_id})
            assert response.status_code == 200
            assert response.json() == {"ok": True}
        assert [arm["job_id"] for arm in await armed(api)] == ["keep"]


async def test_agents_see_and_change_only_their_own_arms(tmp_path: Path) -> None:
    alpha = add_agent(tmp_path, "alpha")
    beta = add_agent(tmp_path, "beta")
    async with nas_running(tmp_path) as nas, client(nas, alpha) as a, client(nas, beta) as b:
        a_id = await provision(a, "shared", wire(3600), "https://alpha.example")
        b_id = await provision(b, "shared", wire(7200), "https://beta.example")
        await provision(b, "beta-only", wire(3600), "https://beta.example")
        assert [arm["schedule_id"] for arm in await armed(a)] == [a_id]
        await a.post("/api/agent-cron/cancel", json={"job_id": "shared"})
        await a.post("/api/agent-cron/cancel", json={"job_id": "beta-only"})
        assert await armed(a) == []
        assert {arm["job_id"] for arm in await armed(b)} == {"shared", "beta-only"}
        assert b_id in {arm["schedule_id"] for arm in await armed(b)}


GOOD = {
    "job_id": "j1",
    "fire_at": "2030-01-01T00:00:00+00:00",
    "agent_callback_url": "https://agent.example",
    "dedup_key": "j1:2030",
}


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({k: v for k, v in GOOD.items() if k != "job_id"}).encode(),
        json.dumps({**GOOD, "job_id": "-leading-dash"}).encode(),
        json.dumps({**GOOD, "job_id": "x" * 65}).encode(),
        json.dumps({**GOOD, "job_id": "has space"}).encode(),
        json.dumps({**GOOD, "job_id": 7}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "fire_at"}).encode(),
        json.dumps({**GOOD, "fire_at": "2030-01-01T00:00:00"}).encode(),
        json.dumps({**GOOD, "fire_at": "tomorrow"}).encode(),
        json.dumps({**GOOD, "fire_at": 1893456000}).encode(),
        json.dumps({**GOOD, "agent_callback_url": "ftp://agent.example"}).encode(),
        json.dumps({**GOOD, "agent_callback_url": "https://"}).encode(),
        json.dumps({**GOOD, "agent_callback_url": "agent.example"}).encode(),
        json.dumps({**GOOD, "agent_callback_url": "https://a.example/?x=1"}).encode(),
        json.dumps({**GOOD, "dedup_key": 5}).encode(),
    ],
)
async def test_malformed_provision_is_refused_with_400(tmp_path: Path, body: bytes) -> None:
    token = add_agent(tmp_path, "alpha")
    async with nas_running(tmp_path) as nas, client(nas, token) as api:
        response = await api.post(
            "/api/agent-cron/provision",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]
        assert await armed(api) == []


async def test_oversized_body_is_refused_by_the_server_limit(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    limits = Limits(max_body=1024)
    async with nas_running(tmp_path, limits=limits) as nas, client(nas, token) as api:
        response = await api.post(
            "/api/agent-cron/provision", json={**GOOD, "dedup_key": "x" * 2000}
        )
        assert response.status_code == 413


async def test_unknown_path_is_404_and_wrong_method_is_405(tmp_path: Path) -> None:
    async with nas_running(tmp_path) as nas, client(nas, None) as api:
        assert (await api.get("/nope")).status_code == 404
        wrong = await api.get("/api/agent-cron/provision")
        assert wrong.status_code == 405
        assert wrong.headers["allow"] == "POST"


async def test_health_and_jwks_need_no_token(tmp_path: Path) -> None:
    async with nas_running(tmp_path) as nas, client(nas, None) as api:
        health = await api.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        jwks = (await api.get("/.well-known/jwks.json")).json()
        (key,) = jwks["keys"]
        assert key["kty"] == "OKP"
        assert key["crv"] == "Ed25519"
        assert key["alg"] == "EdDSA"
        assert key["use"] == "sig"
        assert key["kid"] == nas.keyring.current().kid
        assert "d" not in key  # never the private part
        token = nas.keyring.mint_fire_token(
            issuer=nas.base_url, audience="agent:alpha", job_id="j1"
        )
        public = jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(
            token,
            public.key,
            algorithms=["EdDSA"],
            audience="agent:alpha",
            issuer=nas.base_url,
        )
        assert claims["purpose"] == "cron_fire"


# -- the dispatcher ----------------------------------------------------------------------------


async def test_due_arm_is_delivered_with_a_valid_fire_token(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    async with receiver() as agent, nas_running(tmp_path) as nas, client(nas, token) as api:
        jwks = (await api.get("/.well-known/jwks.json")).json()
        first, second = wire(-1), wire(-2)
        await provision(api, "j1", first, agent.url + "/prefix/")
        await provision(api, "j2", second, agent.url)
        calls = await agent.wait_calls(2)
        await eventually(lambda: nas.store.armed() == [])
        by_job = {call.body["job_id"]: call for call in calls}
        assert by_job["j1"].path == "/prefix/api/cron/fire"
        assert by_job["j2"].path == "/api/cron/fire"
        assert by_job["j1"].body == {"job_id": "j1", "fire_at": first}
        assert by_job["j2"].body == {"job_id": "j2", "fire_at": second}
        jtis = set()
        for job_id, call in by_job.items():
            scheme, _, fire_token = call.headers["authorization"].partition(" ")
            assert scheme == "Bearer"
            header = jwt.get_unverified_header(fire_token)
            assert header["alg"] == "EdDSA"
            key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]].key
            claims = jwt.decode(
                fire_token,
                key,
                algorithms=["EdDSA"],
                audience="agent:alpha",
                issuer=nas.base_url,
                options={"require": ["exp", "iat", "jti"]},
            )
            assert claims["purpose"] == "cron_fire"
            assert claims["sub"] == job_id
            assert claims["exp"] - claims["iat"] == 90
            assert abs(claims["iat"] - call.at) < 60
            jtis.add(claims["jti"])
        assert len(jtis) == 2
        delivered = nas.store.deliveries(agent="alpha")
        assert sorted((d.job_id, d.outcome, d.status_code) for d in delivered) == [
            ("j1", "delivered", 202),
            ("j2", "delivered", 202),
        ]


async def test_public_url_is_the_issuer_without_a_trailing_slash(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    async with (
        receiver() as agent,
        nas_running(tmp_path, public_url="https://nas.example/") as nas,
        client(nas, token) as api,
    ):
        assert nas.base_url == "https://nas.example"
        await provision(api, "j1", wire(-1), agent.url)
        (call,) = await agent.wait_calls(1)
        fire_token = call.headers["authorization"].removeprefix("Bearer ")
        assert jwt.decode(fire_token, options={"verify_signature": False})["iss"] == (
            "https://nas.example"
        )


async def test_provision_wakes_a_dispatcher_sleeping_on_a_later_arm(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    async with receiver() as agent, nas_running(tmp_path) as nas, client(nas, token) as api:
        await provision(api, "far", wire(86400), agent.url)
        await anyio.sleep(0.1)  # let the dispatcher go to sleep until tomorrow
        await provision(api, "soon", wire(1), agent.url)
        (call,) = await agent.wait_calls(1)
        assert call.body["job_id"] == "soon"
        assert [arm["job_id"] for arm in await armed(api)] == ["far"]


async def test_503_with_retry_after_is_retried_after_that_delay(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    running: list[RunningNAS] = []
    planned_delays: list[float] = []

    async def busy_once(call: Call) -> Response:
        if len(agent.calls) == 1:
            return Response.json(503, {"error": "busy"}, headers=[("retry-after", "1")])
        # The retry is under way: the arm still shows when it was planned.
        (arm,) = running[0].store.armed()
        (failed,) = running[0].store.deliveries()
        planned_delays.append(arm.next_attempt_at - failed.attempted_at)
        return Response.json(202, {"status": "accepted"})

    async with (
        receiver(busy_once) as agent,
        nas_running(tmp_path, backoff_base=0.05) as nas,
        client(nas, token) as api,
    ):
        running.append(nas)
        await provision(api, "j1", wire(-1), agent.url)
        await agent.wait_calls(2)
        await eventually(lambda: nas.store.armed() == [])
        # Without Retry-After the backoff base (0.05 s) would have been used.
        assert planned_delays == [pytest.approx(1.0)]
        assert [(d.attempt, d.status_code, d.outcome) for d in nas.store.deliveries()] == [
            (1, 503, "retry"),
            (2, 202, "delivered"),
        ]


@pytest.mark.parametrize("failure", ["http-500", "connection-refused"])
async def test_undeliverable_arm_becomes_a_dead_letter(tmp_path: Path, failure: str) -> None:
    token = add_agent(tmp_path, "alpha")

    async def broken(call: Call) -> Response:
        return Response.json(500, {"error": "broken"})

    closed = await bind_listener("127.0.0.1", 0)
    closed_port = closed.extra(anyio.abc.SocketAttribute.local_port)
    await closed.aclose()
    options = {"backoff_base": 0.05, "max_delivery_age": 1.5}
    async with receiver(broken) as agent, nas_running(tmp_path, **options) as nas:
        callback = agent.url if failure == "http-500" else f"http://127.0.0.1:{closed_port}"
        async with client(nas, token) as api:
            await provision(api, "j1", wire(), callback)
            await eventually(lambda: nas.store.dead_letters() != [])
            assert await armed(api) == []
        (dead,) = nas.store.dead_letters()
        attempts = nas.store.deliveries()
        assert dead.job_id == "j1"
        assert dead.agent == "alpha"
        assert dead.attempts == len(attempts) > 1
        assert [d.outcome for d in attempts] == ["retry"] * (len(attempts) - 1) + ["dead"]
        if failure == "http-500":
            assert len(agent.calls) == len(attempts)
            assert dead.last_status == 500
        else:
            assert dead.last_status is None
            assert dead.last_error


@pytest.mark.parametrize("answer", [202, 500])
async def test_arm_replaced_during_its_delivery_is_kept(tmp_path: Path, answer: int) -> None:
    token = add_agent(tmp_path, "alpha")
    release = anyio.Event()

    async def slow(call: Call) -> Response:
        if call.body["fire_at"] == old_fire:
            await release.wait()
            return Response.json(answer, {})
        return Response.json(202, {"status": "accepted"})

    old_fire, new_fire = wire(-5), wire(3600)
    async with (
        receiver(slow) as agent,
        nas_running(tmp_path, backoff_base=0.05) as nas,
        client(nas, token) as api,
    ):
        await provision(api, "j1", old_fire, agent.url)
        await agent.wait_calls(1)
        new_id = await provision(api, "j1", new_fire, agent.url)
        release.set()
        await eventually(lambda: len(nas.store.deliveries()) == 1)
        assert nas.store.deliveries()[0].outcome == "superseded"
        assert await armed(api) == [{"job_id": "j1", "fire_at": new_fire, "schedule_id": new_id}]
        (arm,) = nas.store.armed()
        assert arm.attempts == 0
        assert arm.next_attempt_at == arm.fire_epoch
        assert nas.store.dead_letters() == []


async def test_arm_replaced_during_its_delivery_fires_again_when_due(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    release = anyio.Event()

    async def slow(call: Call) -> Response:
        if len(agent.calls) == 1:
            await release.wait()
        return Response.json(202, {"status": "accepted"})

    old_fire, new_fire = wire(-5), wire(-1)
    async with receiver(slow) as agent, nas_running(tmp_path) as nas, client(nas, token) as api:
        await provision(api, "j1", old_fire, agent.url)
        await agent.wait_calls(1)
        await provision(api, "j1", new_fire, agent.url)
        release.set()
        first, second = await agent.wait_calls(2)
        assert (first.body["fire_at"], second.body["fire_at"]) == (old_fire, new_fire)
        await eventually(lambda: nas.store.armed() == [])


async def test_arm_cancelled_during_a_failing_delivery_stays_cancelled(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    release = anyio.Event()

    async def slow_failure(call: Call) -> Response:
        await release.wait()
        return Response.json(500, {})

    async with (
        receiver(slow_failure) as agent,
        nas_running(tmp_path, max_delivery_age=0) as nas,
        client(nas, token) as api,
    ):
        await provision(api, "j1", wire(-1), agent.url)
        await agent.wait_calls(1)
        await api.post("/api/agent-cron/cancel", json={"job_id": "j1"})
        release.set()
        await eventually(lambda: len(nas.store.deliveries()) == 1)
        assert nas.store.deliveries()[0].outcome == "superseded"
        assert await armed(api) == []
        assert nas.store.dead_letters() == []


async def test_arm_that_came_due_while_stopped_is_delivered_at_start(tmp_path: Path) -> None:
    token = add_agent(tmp_path, "alpha")
    fire_epoch = int(time.time()) + 2
    fire_at = to_wire(datetime.fromtimestamp(fire_epoch, UTC))
    async with receiver() as agent:
        async with nas_running(tmp_path) as nas, client(nas, token) as api:
            await provision(api, "j1", fire_at, agent.url)
        assert agent.calls == []  # stopped before it came due
        with anyio.fail_after(WAIT):
            while time.time() < fire_epoch + 0.2:
                await anyio.sleep(0.1)
        async with nas_running(tmp_path) as nas:
            (call,) = await agent.wait_calls(1)
            assert call.body == {"job_id": "j1", "fire_at": fire_at}
            await eventually(lambda: nas.store.armed() == [])


def store_arms(state_dir: Path, agent: str, callback_url: str, count: int) -> None:
    """Arms that came due a second ago, written straight into the NAS database."""
    store = NASStore.open(state_dir)
    try:
        fire_at, epoch = wire(-1), time.time() - 1
        for index in range(count):
            store.provision(
                agent,
                f"job-{index}",
                fire_at=fire_at,
                fire_epoch=epoch,
                callback_url=callback_url,
                dedup_key=None,
                now=time.time(),
            )
    finally:
        store.close()


async def test_a_thousand_arms_due_at_once_are_all_delivered(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")

    async def slowish(call: Call) -> Response:
        await anyio.sleep(0.005)  # long enough for deliveries to overlap
        return Response.json(202, {"status": "accepted"})

    everything = {f"job-{i}" for i in range(1000)}
    async with receiver(slowish) as agent:
        store_arms(tmp_path, "alpha", agent.url, 1000)
        async with nas_running(tmp_path) as nas:
            # A generous bound: two busy cores shared with other test runs are slow.
            with anyio.fail_after(45):
                while {call.body["job_id"] for call in agent.calls} != everything:
                    await agent.arrived.wait()
                await eventually(lambda: nas.store.count_armed() == 0)
            delivered = [d.job_id for d in nas.store.deliveries() if d.outcome == "delivered"]
            assert sorted(delivered) == sorted(everything)
            assert 1 < agent.peak <= DEFAULT_MAX_IN_FLIGHT_PER_AGENT


async def test_deliveries_in_flight_are_bounded_overall_and_per_agent(tmp_path: Path) -> None:
    add_agent(tmp_path, "alpha")
    add_agent(tmp_path, "beta")
    active: dict[str, int] = {"alpha": 0, "beta": 0}
    peak: dict[str, int] = {"alpha": 0, "beta": 0, "all": 0}

    async def counting(call: Call) -> Response:
        who = call.path.split("/")[1]
        active[who] += 1
        peak[who] = max(peak[who], active[who])
        peak["all"] = max(peak["all"], sum(active.values()))
        await anyio.sleep(0.02)
        active[who] -= 1
        return Response.json(202, {"status": "accepted"})

    async with receiver(counting) as agent:
        store_arms(tmp_path, "alpha", agent.url + "/alpha", 20)
        store_arms(tmp_path, "beta", agent.url + "/beta", 20)
        async with nas_running(tmp_path, max_in_flight=3, max_in_flight_per_agent=2) as nas:
            await agent.wait_calls(40)
            await eventually(lambda: nas.store.count_armed() == 0)
    assert peak["alpha"] <= 2
    assert peak["beta"] <= 2
    assert 1 < peak["all"] <= 3


async def test_fire_token_passes_the_daemons_own_verifier(tmp_path: Path) -> None:
    from chronosd.http.jwt_auth import JwtAuth
    from chronosd.state import StateDB

    token = add_agent(tmp_path / "nas", "alpha")
    verifiers: list[JwtAuth] = []
    verdicts: list[bool] = []

    async def verifying(call: Call) -> Response:
        verdicts.append((await verifiers[0].verify(call.request)).ok)
        return Response.json(202 if verdicts[-1] else 401, {})

    with StateDB.open(tmp_path / "agent-state") as db:
        async with (
            receiver(verifying) as agent,
            nas_running(tmp_path / "nas") as nas,
            client(nas, token) as api,
        ):
            verifiers.append(
                JwtAuth(
                    jwks_url=f"http://{nas.address}/.well-known/jwks.json",
                    audience="agent:alpha",
                    issuer=nas.base_url,
                    db=db,
                )
            )
            await provision(api, "j1", wire(-1), agent.url)
            await agent.wait_calls(1)
            await eventually(lambda: nas.store.armed() == [])
    assert verdicts == [True]
