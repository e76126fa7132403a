"""Storage faults: the state database read-only, or its disk full.

A fire call that cannot be recorded must answer 503 with ``Retry-After`` (the NAS retries),
must not leave anything claimed half-way (a claim without its run would make every retry a
"duplicate" and the job would never run), and chronosd must carry on by itself once it can
write again: no restart, no crash.

Two ways in:

- a real, small tmpfs under the state directory, filled to the last byte (root only; skipped
  otherwise), against the real daemon;
- an injected failing write in-process: the Engine, the routes and the HTTP server wired as
  the daemon wires them, with the state database switched to read-only
  (``PRAGMA query_only``) or made to fail one chosen write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from chronosd.config import Config, RunnerConfig
from chronosd.errors import StateError
from chronosd.fire import Engine
from chronosd.http.auth import FireAuthenticator, HmacAuth, NoAuth, sign_hmac
from chronosd.http.routes import DaemonRoutes
from chronosd.http.server import HTTPServer, bind_listener
from chronosd.jobs.model import Job
from chronosd.jobs.validate import JobDefaults, validate_job
from chronosd.providers.local import LocalProvider
from chronosd.reconcile import Reconciler
from chronosd.state import RunRecord, StateDB
from chronosd.timefmt import to_wire
from tests.daemon_support import fire_body, wait_until
from tests.reliability.conftest import Report
from tests.reliability.support import (
    World,
    can_mount,
    read_starts,
    recording,
    rows,
    tmpfs,
    try_fire,
)

pytestmark = pytest.mark.anyio

SECRET = b"storage-fault-secret"


def one_shot(job_id: str, at: datetime, command: list[str]) -> Job:
    record = {"id": job_id, "schedule": f"at {to_wire(at)}", "command": command}
    job, problems = validate_job(record, 0, defaults=JobDefaults(), now=datetime.now(UTC))
    assert job is not None, problems
    return job


def soon() -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=50)


class FlakyStateDB(StateDB):
    """A StateDB whose run records can be made to fail, as a disk that just filled up would."""

    fail_start_run = False

    def start_run(self, *args: Any, **kwargs: Any) -> RunRecord:
        if self.fail_start_run:
            raise StateError(
                f"state database {self.path}: recording a run failed: database or disk is full"
            )
        return super().start_run(*args, **kwargs)


def read_only(db: StateDB, on: bool) -> None:
    db._db.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


@dataclass
class Rig:
    engine: Engine
    db: FlakyStateDB
    client: httpx.AsyncClient
    starts: Path
    at: datetime
    reconciled: list[str] = field(default_factory=list)

    async def fire(self, job_id: str, *, signed: bool = False) -> httpx.Response:
        body = fire_body(job_id, self.at, nonce=os.urandom(8).hex())
        headers = {"content-type": "application/json"}
        if signed:
            headers["chronos-signature"] = sign_hmac(
                SECRET, body, int(datetime.now(UTC).timestamp())
            )
        return await self.client.post("/api/cron/fire", content=body, headers=headers)

    def claimed(self, job_id: str) -> bool:
        return bool(
            rows(self.db.state_dir, "SELECT 1 FROM occurrences WHERE job_id = ?", (job_id,))
        )


@asynccontextmanager
async def served(tmp_path: Path, job_ids: list[str], *, auth: str = "none") -> AsyncIterator[Rig]:
    """Engine + routes + HTTP server on 127.0.0.1, as chronosd/daemon/supervisor.py wires them."""
    state_dir = tmp_path / "state"
    starts = tmp_path / "starts"
    db = FlakyStateDB.open(state_dir)
    assert isinstance(db, FlakyStateDB)
    config = Config(jobs=tmp_path / "jobs.json", state_dir=state_dir, runner=RunnerConfig())
    reconciled: list[str] = []
    engine = Engine(config=config, db=db, owner="storage:1:x", request_reconcile=reconciled.extend)
    at = soon()
    authenticator: FireAuthenticator = (
        HmacAuth(SECRET, remember_nonce=db.remember_signature) if auth == "hmac" else NoAuth()
    )

    async def fire(job_id: str, fire_at: object) -> Any:
        assert isinstance(fire_at, datetime)
        return engine.handle_fire(job_id, fire_at)

    routes = DaemonRoutes(authenticator=authenticator, fire=fire, health=lambda: {})
    server = HTTPServer(routes)
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    try:
        async with anyio.create_task_group() as tg:
            engine.bind(tg)
            engine.apply_jobs([one_shot(job_id, at, recording(starts)) for job_id in job_ids])
            await tg.start(server.serve, [listener])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                yield Rig(engine, db, http, starts, at, reconciled)
            server.stop_accepting()
            with anyio.fail_after(20):
                await engine.wait_runs()
    finally:
        await listener.aclose()
        db.close()


def assert_unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, (answer.status_code, answer.text)
    assert answer.headers.get("retry-after", "").isdigit(), answer.headers
    assert "error" in answer.json()


# ---------------------------------------------------------------------- read-only
async def test_read_only_state_answers_503_with_retry_after_and_recovers_by_itself(
    tmp_path: Path, report: Report
) -> None:
    jobs = [f"ro-{n}" for n in range(5)]
    async with served(tmp_path, jobs) as rig:
        read_only(rig.db, True)
        refused = [await rig.fire(job_id) for job_id in jobs for _ in range(2)]
        for answer in refused:
            assert_unavailable(answer)
        claimed_while_read_only = [job_id for job_id in jobs if rig.claimed(job_id)]
        read_only(rig.db, False)
        # The NAS retries: the same deliveries now go through, once each.
        retried = [await rig.fire(job_id) for job_id in jobs]
        again = [await rig.fire(job_id) for job_id in jobs]
    starts = read_starts(rig.starts)
    report(
        refused=len(refused),
        refused_with_retry_after=sum(1 for a in refused if a.headers.get("retry-after")),
        claimed_while_read_only=len(claimed_while_read_only),
        accepted_after=sum(1 for a in retried if a.status_code == 202),
        duplicates_after=sum(1 for a in again if a.json().get("status") == "duplicate"),
        starts=len(starts),
    )
    assert claimed_while_read_only == []
    assert [a.status_code for a in retried] == [202] * len(jobs)
    assert [a.json()["status"] for a in again] == ["duplicate"] * len(jobs)
    assert sorted(s.job_id for s in starts) == sorted(jobs)


# ---------------------------------------------------------------------- full disk (tmpfs)
@contextlib.contextmanager
def filled(directory: Path) -> Iterator[Path]:
    """Fill the file system of *directory* to the last byte; free it again afterwards."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0")
    try:
        yield filler
    finally:
        filler.unlink(missing_ok=True)


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs")
def test_full_state_disk_answers_503_claims_nothing_and_recovers_when_space_returns(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path / "world")
    mount = tmp_path / "small-disk"
    jobs = [f"full-{n}" for n in range(6)]
    at = to_wire(soon())
    world.write_jobs(
        [
            {"id": job_id, "schedule": f"at {at}", "command": recording(world.starts)}
            for job_id in jobs
        ]
    )
    with tmpfs(mount, "2m"):
        world.state_dir = mount / "state"
        world.write_config()
        with world.running() as daemon:
            address = daemon.address()
            # The start-up reconcile writes too; the disk fills once it is done.
            daemon.log.wait_for("arm.confirmed", count=len(jobs), timeout=20)
            with filled(mount):
                refused = [try_fire(address, job_id, at) for job_id in jobs for _ in range(2)]
                claimed_while_full = rows(
                    world.state_dir, "SELECT job_id FROM occurrences WHERE job_id LIKE 'full-%'"
                )
                alive_while_full = daemon.process is not None and daemon.process.poll() is None
            retried = [try_fire(address, job_id, at) for job_id in jobs]
            wait_until(
                lambda: len(read_starts(world.starts)) == len(jobs),
                timeout=20,
                what="every job to run once space returned",
            )
            assert daemon.stop() == 0
    statuses = [None if a is None else a.status for a in refused]
    report(
        refused=len(refused),
        answered_503=statuses.count(503),
        with_retry_after=sum(1 for a in refused if a is not None and a.headers.get("retry-after")),
        claimed_while_full=len(claimed_while_full),
        accepted_after=sum(1 for a in retried if a is not None and a.status == 202),
        starts=len(read_starts(world.starts)),
    )
    assert statuses == [503] * len(refused)
    assert all(a is not None and a.headers.get("retry-after") for a in refused)
    assert claimed_while_full == []
    assert alive_while_full
    assert [None if a is None else a.status for a in retried] == [202] * len(jobs)


# ---------------------------------------------------------------------- injected faults
# Regression test for a fixed bug: chronosd/fire.py Engine._claim_and_start commits the claim
# (claim_and_advance), then records the run (StateDB.start_run) in a second transaction; when that
# second write fails the answer is 503 but the occurrence stays claimed, so every retry of the NAS
# is a 'duplicate' and the job never runs


async def test_a_failed_run_record_after_the_claim_leaves_nothing_claimed(tmp_path: Path) -> None:
    async with served(tmp_path, ["half"]) as rig:
        rig.db.fail_start_run = True
        first = await rig.fire("half")
        rig.db.fail_start_run = False
        retried = await rig.fire("half")
        # Either the first answer was a 202 and the job runs, or it was a 503 and the
        # NAS's retry claims it now.
        assert (first.status_code, retried.status_code) in ((202, 200), (503, 202)), (
            first.text,
            retried.text,
        )
    assert [s.job_id for s in read_starts(rig.starts)] == ["half"]


# Regression test for a fixed bug: chronosd/reconcile.py Reconciler.drain: a StateError from the
# state write that follows provider.arm/cancel (Reconciler._apply) is raised inside the task
# group, reaches drain() as an ExceptionGroup that `except StateError` does not catch, and takes
# the daemon down (seen with a full disk: `chronosd: run: unexpected ExceptionGroup`)


async def test_a_reconcile_whose_state_write_fails_is_retried_not_fatal(tmp_path: Path) -> None:
    db = StateDB.open(tmp_path / "state")
    config = Config(jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state")
    requested: list[Reconciler] = []
    engine = Engine(
        config=config,
        db=db,
        owner="storage:1:x",
        request_reconcile=lambda ids: requested[0].request(ids),
    )
    provider = LocalProvider()
    reconciler = Reconciler(engine=engine, provider=provider, db=db)
    requested.append(reconciler)
    try:
        async with anyio.create_task_group() as tg:
            engine.bind(tg)
            engine.apply_jobs([one_shot("arm-me", soon(), ["true"])])
            # The provider takes the arm; recording it in state.db fails.
            read_only(db, True)
            await tg.start(reconciler.run)
            with anyio.fail_after(10):
                while not reconciler.last_error:
                    await anyio.sleep(0.02)
            read_only(db, False)
            # The pass after the backoff succeeds; the daemon never went down.
            with anyio.fail_after(15):
                while reconciler.last_error or not reconciler.idle_now:
                    await anyio.sleep(0.05)
            assert "arm-me" in provider.armed()
            tg.cancel_scope.cancel()
    finally:
        db.close()


# Regression test for a fixed bug: chronosd/fire.py Engine._run_once/_run_task: a StateError from
# recording the end of a run (StateDB.finish_run, prune_runs) escapes the run task into the
# supervisor's task group and takes the daemon down; it should be logged and left to recovery (the
# run stays 'running' and is marked interrupted at the next start)


async def test_a_run_whose_end_cannot_be_recorded_does_not_take_the_engine_down(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    command = ["sh", "-c", f'while [ ! -e "{gate}" ]; do sleep 0.02; done']
    db = StateDB.open(tmp_path / "state")
    config = Config(jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state")
    engine = Engine(config=config, db=db, owner="storage:1:x")
    try:
        async with anyio.create_task_group() as tg:
            engine.bind(tg)
            at = soon()
            engine.apply_jobs([one_shot("ends-read-only", at, command)])
            result = engine.handle_fire("ends-read-only", at)
            assert result.start is not None
            result.start()
            with anyio.fail_after(10):
                while not engine.running_jobs():
                    await anyio.sleep(0.02)
            read_only(db, True)
            gate.touch()
            with anyio.fail_after(20):
                await engine.wait_runs()
            read_only(db, False)
            tg.cancel_scope.cancel()
    finally:
        db.close()


# Regression test for a fixed bug: chronosd/http/routes.py DaemonRoutes._fire: with auth hmac (and
# jwt) the replay cache is written before the claim (StateDB.remember_signature); when that write
# fails the StateError escapes the route and the server answers 500 instead of 503 with Retry-
# After


async def test_a_signed_fire_with_read_only_state_answers_503_with_retry_after(
    tmp_path: Path,
) -> None:
    async with served(tmp_path, ["signed"], auth="hmac") as rig:
        read_only(rig.db, True)
        answer = await rig.fire("signed", signed=True)
        read_only(rig.db, False)
        assert_unavailable(answer)
        assert not rig.claimed("signed")
