"""Socket activation and idle exit with the reference NAS holding the arms.

Set-up (the cleanest real one found): the provider is the reference NAS (``chronosd nas
serve``), so the daemon need not stay resident and exits after ``idle_exit`` (1 s). The fire
calls are the test's own, HMAC-signed (``auth.mode = "hmac"``). They target one-shot jobs
whose instants lie 45-55 s after jobs.json is written: each fire comes less than 60 s before
its occurrence (so it is not "too early"), and the claim cancels the NAS's arm long before
the NAS would deliver it itself. Yearly cron jobs (armed at the NAS for next New Year) give
the "too early" answers, unknown ids the "gone" ones. Should the machine be so slow that the
NAS delivers a one-shot first, its JWT is refused (401) under hmac and nothing is claimed, so
every assertion below still holds.
"""

from __future__ import annotations

import random
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest

from chronosd.timefmt import to_wire
from tests.daemon_support import (
    Answer,
    EventLog,
    ReferenceNas,
    StateReader,
    child_env,
    fire,
    free_port,
    jobs_text,
    toml_config,
    wait_until,
    write_private,
)
from tests.harness import SocketActivator

SECRET = b"activation-test-secret"
AGENT = "agent-under-test"
YEARLY = ("yearly-a", "yearly-b")


@dataclass
class World:
    root: Path
    config: Path
    state: StateReader
    nas: ReferenceNas
    one_shots: dict[str, datetime]
    new_year: datetime


def make_world(root: Path, nas: ReferenceNas, callback_port: int, one_shots: int) -> World:
    """NAS agent, config and jobs.json for a daemon that will answer on *callback_port*."""
    token = nas.add_agent(AGENT, f"http://127.0.0.1:{callback_port}")
    nas.start()
    token_file = write_private(root / "nas-token", token + "\n")
    secret_file = write_private(root / "hmac-secret", SECRET.decode() + "\n")
    jobs = root / "jobs.json"
    state_dir = root / "state"
    config = write_private(
        root / "chronosd.toml",
        toml_config(
            jobs=jobs,
            state_dir=state_dir,
            listen=f"127.0.0.1:{callback_port}",
            extra='idle_exit = "1s"',
            provider={"kind": "nas"},
            nas={
                "url": nas.base_url,
                "callback_url": f"http://127.0.0.1:{callback_port}",
                "token_file": str(token_file),
            },
            auth={"mode": "hmac", "hmac_secret_file": str(secret_file)},
        ),
    )
    t0 = datetime.now(UTC).replace(microsecond=0)
    instants = {
        f"once-{n:02d}": t0 + timedelta(seconds=45 + n * 10 // one_shots) for n in range(one_shots)
    }
    records = [
        {"id": job_id, "schedule": f"at {to_wire(at)}", "command": ["echo", job_id]}
        for job_id, at in instants.items()
    ]
    records += [{"id": job_id, "schedule": "0 0 1 1 *", "command": ["true"]} for job_id in YEARLY]
    write_private(jobs, jobs_text(records))
    return World(
        root=root,
        config=config,
        state=StateReader(state_dir),
        nas=nas,
        one_shots=instants,
        new_year=datetime(t0.year + 1, 1, 1, tzinfo=UTC),
    )


def plan_requests(world: World, rng: random.Random, total: int) -> list[tuple[str, datetime]]:
    """Every one-shot at least once, some twice or more; the rest too early or unknown."""
    requests = list(world.one_shots.items())
    early = total // 5
    gone = total // 12
    duplicates = total - len(requests) - early - gone
    assert duplicates >= 0
    requests += [rng.choice(list(world.one_shots.items())) for _ in range(duplicates)]
    requests += [(rng.choice(YEARLY), world.new_year) for _ in range(early)]
    requests += [(f"ghost-{n}", world.new_year) for n in range(gone)]
    rng.shuffle(requests)
    return requests


def split(
    items: list[tuple[str, datetime]], parts: int, rng: random.Random
) -> list[list[tuple[str, datetime]]]:
    cuts = sorted(rng.sample(range(1, len(items)), parts - 1))
    return [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)], strict=True)]


def check_outcome(world: World, sent: list[tuple[str, Answer]]) -> None:
    """One answer per request, exactly one 202 per one-shot, nothing else claimed or run."""
    by_job: dict[str, list[Answer]] = defaultdict(list)
    for job_id, answer in sent:
        assert answer.status < 500, (job_id, answer)
        by_job[job_id].append(answer)
    for job_id in world.one_shots:
        if job_id not in by_job:
            continue
        statuses = Counter((a.status, a.body.get("status")) for a in by_job[job_id])
        assert statuses[(202, "accepted")] == 1, (job_id, statuses)
        assert sum(statuses.values()) == 1 + statuses[(200, "duplicate")], (job_id, statuses)
    for job_id in YEARLY:
        assert {(a.status, a.body.get("error")) for a in by_job.get(job_id, [])} <= {
            (409, "too early")
        }
    for job_id, answers in by_job.items():
        if job_id.startswith("ghost-"):
            assert {(a.status, a.body.get("status")) for a in answers} == {(200, "gone")}

    accepted = {job_id: a.body["run_id"] for job_id, a in sent if a.status == 202}
    runs = world.state.runs()
    assert sorted((r["job_id"], r["run_id"]) for r in runs) == sorted(accepted.items())
    assert {r["status"] for r in runs} == {"ok"}
    for run in runs:
        assert world.state.output(run) == run["job_id"] + "\n"
    occurrences = world.state.occurrences()
    assert sorted(o["job_id"] for o in occurrences) == sorted(accepted)
    assert {o["state"] for o in occurrences} == {"done"}


def send_wave(
    address: tuple[str, int], wave: list[tuple[str, datetime]], pool: ThreadPoolExecutor
) -> list[tuple[str, Answer]]:
    futures = [(job_id, pool.submit(fire, address, SECRET, job_id, at)) for job_id, at in wave]
    return [(job_id, future.result(timeout=60)) for job_id, future in futures]


def wait_exited(activator: SocketActivator, log: EventLog) -> None:
    started = activator.activations
    assert activator.wait_for(lambda: len(activator.exit_codes) >= started, timeout=30), log.tail()


def wait_leaving(activator: SocketActivator, log: EventLog) -> None:
    """Until the running chronosd logs its idle exit (or is already gone)."""
    stopping = log.count("daemon.stopping")
    started = activator.activations

    def leaving() -> bool:
        return log.count("daemon.stopping") > stopping or len(activator.exit_codes) >= started

    wait_until(leaving, timeout=30, what="the idle exit")


def has_line(log: EventLog, text: str) -> bool:
    return any(text in line for line in log.lines())


# ---------------------------------------------------------------------- the harness
def test_fires_at_random_moments_around_idle_exits_get_one_answer_and_run_once(
    tmp_path: Path,
) -> None:
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    print(f"random seed {seed}")
    daemon_log = tmp_path / "daemon.log"
    nas = ReferenceNas(tmp_path / "nas", tmp_path, tmp_path / "nas.log")
    argv = [sys.executable, "-m", "chronosd", "run", "--config", str(tmp_path / "chronosd.toml")]
    activator = SocketActivator(argv, env=child_env(tmp_path), stdout_path=daemon_log)
    activator.start()
    try:
        world = make_world(tmp_path, nas, activator.port, one_shots=20)
        log = EventLog(daemon_log)

        # First start without a connection, as the path unit would: arm everything, then exit.
        assert activator.trigger()
        assert activator.wait_exited(1, timeout=30), log.tail()
        assert activator.exit_codes == [0], log.tail()
        armed = {arm["job_id"] for arm in nas.armed()}
        assert armed == set(world.one_shots) | set(YEARLY)

        requests = plan_requests(world, rng, total=50)
        bursts = split(requests, 5, rng)
        sent: list[tuple[str, Answer]] = []
        with ThreadPoolExecutor(max_workers=16) as pool:
            for number, burst in enumerate(bursts):
                if number % 2 == 0:
                    # Cold: chronosd has exited; the burst starts it.
                    wait_exited(activator, log)
                else:
                    # Right as chronosd is leaving: it no longer accepts, the kernel queues.
                    wait_leaving(activator, log)
                waves = split(burst, min(3, len(burst)), rng) if len(burst) >= 3 else [burst]
                for wave_number, wave in enumerate(waves):
                    if wave_number:
                        # Gaps up to a little past idle_exit: some land just before the
                        # exit, some while it happens, some after.
                        time.sleep(rng.uniform(0.0, 1.3))
                    sent += send_wave(activator.address, wave, pool)
        assert len(sent) == 50

        assert activator.wait_for(
            lambda: not activator.running() and len(activator.exit_codes) == activator.activations,
            timeout=30,
        ), log.tail()
        assert activator.failure is None
        assert activator.activations >= 1 + len(bursts)
        assert set(activator.exit_codes) == {0}, log.tail()
        check_outcome(world, sent)
        # Every claimed one-shot's arm was cancelled at the NAS; the yearly ones stay.
        assert {arm["job_id"] for arm in nas.armed()} == set(YEARLY) | (
            set(world.one_shots) - {job_id for job_id, a in sent if a.status == 202}
        )
    finally:
        activator.stop()
        nas.stop()


# ---------------------------------------------------------------------- systemd's own tool
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed")
def test_the_same_flow_under_systemd_socket_activate(tmp_path: Path) -> None:
    """systemd-socket-activate (without --accept) waits for a connection, then execs chronosd
    with the listening socket as fd 3; it serves one activation, so two rounds are run.
    """
    assert SOCKET_ACTIVATE is not None
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    print(f"random seed {seed}")
    port = free_port()
    nas = ReferenceNas(tmp_path / "nas", tmp_path, tmp_path / "nas.log")
    world = make_world(tmp_path, nas, port, one_shots=8)
    requests = plan_requests(world, rng, total=24)
    sent: list[tuple[str, Answer]] = []
    try:
        for round_number, batch in enumerate(split(requests, 2, rng)):
            log_path = tmp_path / f"round-{round_number}.log"
            with open(log_path, "wb") as output:
                process = subprocess.Popen(
                    [
                        SOCKET_ACTIVATE,
                        "--listen",
                        f"127.0.0.1:{port}",
                        "--fdname=chronosd",
                        "-E",
                        "HOME",
                        sys.executable,
                        "-m",
                        "chronosd",
                        "run",
                        "--config",
                        str(world.config),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=child_env(tmp_path),
                    start_new_session=True,
                )
            try:
                log = EventLog(log_path)
                wait_until(
                    partial(has_line, log, "Listening on"),
                    timeout=20,
                    what="systemd-socket-activate to listen",
                )
                with ThreadPoolExecutor(max_workers=16) as pool:
                    sent += send_wave(("127.0.0.1", port), batch, pool)
                assert process.wait(30) == 0, log.tail()
                (started,) = log.events("daemon.started")
                assert started["socket_activated"] is True
                assert log.count("daemon.stopping", reason="idle") == 1
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        check_outcome(world, sent)
    finally:
        nas.stop()
