"""NAS delivery burst: 1,000 arms due in the same second, delivered to a socket-activated chronosd.

chronosd holds 1,000 jobs ``S M H * * *`` all due at the same instant T (about 25 s after the
start); its first start (triggered as a path unit would) arms them on the reference NAS and idles
out. At T the NAS mints a JWT per arm and calls back; the first call starts chronosd through the
socket (tests/harness.py's SocketActivator), which verifies each token, claims, answers 202,
starts the job (``/bin/true``) and re-arms for tomorrow. Figures from the NAS's deliveries table:
time from T to the last acknowledged delivery, and deliveries per second over the burst.

Baseline in the same run: the same NAS delivering 1,000 arms due together to the minimal stdlib
asyncio responder (awake; it answers 202 without looking), provisioned by a bare client.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import (
    BENCH_DIR,
    PYTHON,
    Nas,
    Row,
    Section,
    Settings,
    base_env,
    free_port,
    make_chronosd,
    ms,
    nas_available,
    ratio,
    running_nas,
    stop_popen,
    verdict,
    wait_port,
    wait_until,
)

# Seconds from the start to T: arming them all (~120/s here) must be done by then.
LEAD = 20
QUICK_LEAD = 9


def _delivered(nas: Nas, agent: str) -> tuple[int, float | None, float | None, int]:
    with contextlib.closing(nas.db()) as db:
        count, first, last = db.execute(
            "SELECT COUNT(*), MIN(attempted_at), MAX(attempted_at) FROM deliveries "
            "WHERE agent = ? AND status_code BETWEEN 200 AND 299",
            (agent,),
        ).fetchone()
        failed = db.execute(
            "SELECT COUNT(*) FROM deliveries "
            "WHERE agent = ? AND (status_code IS NULL OR status_code NOT BETWEEN 200 AND 299)",
            (agent,),
        ).fetchone()[0]
    return int(count), first, last, int(failed)


def _burst_to_minimal(nas: Nas, due: int, arms: int) -> tuple[float, float, int]:
    """Provision *arms* arms due at *due* for an agent whose callback is the minimal responder."""
    import anyio
    import httpx

    port = free_port()
    server = subprocess.Popen(
        [PYTHON, str(BENCH_DIR / "minimal_server.py"), "--port", str(port)], env=base_env()
    )
    try:
        wait_port("127.0.0.1", port)
        callback = f"http://127.0.0.1:{port}"
        token = nas.add_agent("minimal", callback)
        fire_at = datetime.fromtimestamp(due, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")

        async def provision() -> None:
            limiter = anyio.CapacityLimiter(16)
            async with httpx.AsyncClient(
                base_url=nas.url, headers={"authorization": f"Bearer {token}"}, timeout=30
            ) as client:

                async def one(i: int) -> None:
                    async with limiter:
                        response = await client.post(
                            "/api/agent-cron/provision",
                            json={"job_id": f"m{i:04d}", "fire_at": fire_at},
                        )
                        response.raise_for_status()

                async with anyio.create_task_group() as tg:
                    for i in range(arms):
                        tg.start_soon(one, i)

        anyio.run(provision)
        wait_until(lambda: _delivered(nas, "minimal")[0] >= arms, due - time.time() + 60, 0.2)
        count, first, last, _failed = _delivered(nas, "minimal")
        if not count or last is None or first is None:
            return float("nan"), float("nan"), count
        return last - due, count / max(last - first, 1e-6), count
    finally:
        stop_popen(server)


def run(settings: Settings) -> Section:
    from tests.harness import SocketActivator

    arms = 300 if settings.quick else 1000
    lead = QUICK_LEAD if settings.quick else LEAD
    section = Section("nas_delivery", f"{arms:,} arms due in the same second")
    have_nas, why = nas_available()
    if not have_nas:
        section.error = f"the reference NAS is unavailable: {why}"
        return section
    work = settings.workdir
    with running_nas(work) as nas:
        activator = SocketActivator(["true"], env=base_env(), stdout_path=work / "chronosd.log")
        activator.start()
        try:
            due = int(time.time()) + lead
            at = time.gmtime(due)
            jobs: list[dict[str, Any]] = [
                {
                    "id": f"burst-{i:04d}",
                    "schedule": f"{at.tm_sec} {at.tm_min} {at.tm_hour} * * *",
                    "command": ["/bin/true"],
                }
                for i in range(arms)
            ]
            setup = make_chronosd(
                work / "chronosd",
                jobs=jobs,
                nas=nas,
                callback_url=f"http://127.0.0.1:{activator.port}",
                auth="jwt",
                idle_exit="2s",
            )
            activator.argv = setup.argv()
            activator.trigger()
            armed_in_time = wait_until(
                lambda: int(nas.stats()["provisions"]) >= arms, due - time.time() - 1, 0.2
            )
            wait_until(lambda: _delivered(nas, nas.agent)[0] >= arms, due - time.time() + 60, 0.2)
            count, first, last, failed = _delivered(nas, nas.agent)
            wait_until(lambda: not activator.running(), 30, 0.2)
        finally:
            activator.stop()
        if not armed_in_time:
            section.notes.append(
                f"Arming {arms:,} jobs took longer than the {lead} s lead: some arms were "
                "provisioned after T and their lateness counts in."
            )
        base_last, base_rate, base_count = _burst_to_minimal(nas, int(time.time()) + lead, arms)
    if count and last is not None and first is not None:
        to_last = last - due
        rate = count / max(last - first, 1e-6)
    else:
        to_last = rate = float("nan")
    section.rows += [
        Row(
            f"T → last of {arms:,} acknowledged ({count} delivered)",
            ms(to_last),
            f"asyncio responder {ms(base_last)}",
            ratio(to_last, base_last),
            "≤ 2 s",
            verdict(to_last <= 2.0) if to_last == to_last else "n/a",
        ),
        Row(
            "sustained deliveries per second over the burst",
            f"{rate:,.0f}/s",
            f"asyncio responder {base_rate:,.0f}/s",
            ratio(rate, base_rate),
        ),
    ]
    section.notes += [
        f"chronosd: {count} of {arms:,} delivered, {failed} attempts not acknowledged (retried "
        f"by the NAS), {activator.activations} socket activations (the first is the arming "
        f"start). Baseline: {base_count} delivered to the asyncio responder.",
        "The NAS delivers at most 32 at a time to one agent (its max_in_flight_per_agent). "
        "A delivery counts when the agent answered 2xx, including one the NAS records as "
        "superseded because chronosd re-armed the job before the NAS had read its 202."
        + (" Quick run: 300 arms instead of 1,000." if settings.quick else ""),
    ]
    return section
