"""Crash matrix: chronosd is SIGKILLed at every point of the fire flow, over and over.

Kinds of trial (one daemon life each, ended by SIGKILL):

- the five crash points of chronosd/faults.py (``CHRONOSD_CRASH_AT``): before the claim
  commits, after the claim (before the 202), after the 202 (before the job starts), after the
  job (before its run is recorded), in the middle of a reconcile;
- ``running``: the test SIGKILLs the daemon while a job runs;
- ``random``: the test SIGKILLs the daemon at a random moment of its life.

Two kinds of lane run side by side, each with its own state directory:

- timer lanes: the built-in local provider fires second-by-second cron jobs, so every life
  fires (and catches up) several occurrences before it dies;
- an HTTP lane: the test plays the NAS. It delivers one one-shot per trial, and after the
  crash it delivers the same occurrence again to a fresh daemon until it gets a 2xx, as the
  NAS retries. One-shots lie ~1 minute ahead, so the local timer never fires them itself.

After every crash: ``PRAGMA integrity_check`` is ok, jobs.json is byte-for-byte unchanged,
every job still has a planned next fire. Every few trials, and at the end, a clean life must
arm every job and see each fire again (no job stranded). Over all of it: no occurrence started
twice (per attempt), and every start is recorded as a run.
"""

from __future__ import annotations

import random
import secrets
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chronosd.faults import POINTS
from chronosd.timefmt import to_wire
from tests.daemon_support import Answer, wait_until
from tests.reliability.conftest import Report
from tests.reliability.support import (
    World,
    doubled,
    free_port,
    integrity_ok,
    read_starts,
    recording,
    rows,
    scaled,
    sigkill,
    started_or_exited,
    try_fire,
)

pytestmark = pytest.mark.slow

CRASH_POINTS = ("before-claim", "after-claim", "after-reply", "after-run", "mid-reconcile")
KINDS = (*CRASH_POINTS, "running", "random")
KILLED = -signal.SIGKILL
RESTART_CHECK_EVERY = 20

# What a delivered one-shot comes to when the daemon dies at each point and the NAS then
# delivers it again: how often the job starts (at most once per state database).
EXPECTED_STARTS = {
    "before-claim": 1,  # nothing was claimed: the redelivery claims and runs it
    "after-claim": 0,  # claimed, then lost: the redelivery is a duplicate
    "after-reply": 0,  # the 202 went out, the job never started; recorded as interrupted
    "after-run": 1,  # it ran; its run is recorded as interrupted
    "running": 1,  # it was running; the orphan finishes, its run is interrupted
}


@dataclass
class Tally:
    trials: Counter[str] = field(default_factory=Counter)
    restart_checks: int = 0
    stranded: list[str] = field(default_factory=list)
    integrity_failures: int = 0
    jobs_file_changed: int = 0
    unplanned: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def merge(self, other: Tally) -> None:
        self.trials.update(other.trials)
        self.restart_checks += other.restart_checks
        self.stranded += other.stranded
        self.integrity_failures += other.integrity_failures
        self.jobs_file_changed += other.jobs_file_changed
        self.unplanned += other.unplanned
        self.problems += other.problems


def _check_after_crash(world: World, jobs_bytes: bytes, tally: Tally, label: str) -> None:
    if not integrity_ok(world.state_dir):
        tally.integrity_failures += 1
    if world.jobs.read_bytes() != jobs_bytes:
        tally.jobs_file_changed += 1


def _died_by_sigkill(daemon_rc: int, label: str, tally: Tally, tail: str) -> None:
    if daemon_rc != KILLED:
        tally.problems.append(f"{label}: exit status {daemon_rc}, not SIGKILL:\n{tail}")


# ---------------------------------------------------------------------- timer lanes
TIMER_JOBS = ("tick", "pair", "slow", "retry")


class TimerLane:
    def __init__(self, root: Path, seed: int) -> None:
        self.world = World(root)
        self.rng = random.Random(seed)
        starts = self.world.starts
        self.jobs_bytes = self.world.write_jobs(
            [
                {"id": "tick", "schedule": "* * * * * *", "command": recording(starts)},
                {"id": "pair", "schedule": "every 2s", "command": recording(starts)},
                {
                    "id": "slow",
                    "schedule": "* * * * * *",
                    "command": recording(starts, sleep=0.4),
                },
                {
                    "id": "retry",
                    "schedule": "*/2 * * * * *",
                    "retries": 1,
                    "command": recording(starts),
                },
            ]
        )
        # Every run must stay on record for the bookkeeping below: no pruning.
        self.world.write_config(extra='shutdown_grace = "10s"', runner={"keep_runs": 100_000})
        self.tally = Tally()

    def run(self, trials: int) -> Tally:
        for number in range(trials):
            kind = KINDS[number % len(KINDS)]
            self.trial(kind, number)
            if (number + 1) % RESTART_CHECK_EVERY == 0:
                self.restart_check()
        self.restart_check()
        return self.tally

    def trial(self, kind: str, number: int) -> None:
        world = self.world
        label = f"{world.root.name} trial {number} ({kind})"
        env = {"CHRONOSD_CRASH_AT": kind} if kind in CRASH_POINTS else {}
        daemon = world.daemon(env)
        try:
            if kind == "running":
                before = sum(1 for s in read_starts(world.starts) if s.job_id == "slow")
                wait_until(
                    lambda: (
                        sum(1 for s in read_starts(world.starts) if s.job_id == "slow") > before
                    ),
                    timeout=20,
                    what=f"{label}: a run of slow",
                )
                sigkill(daemon)
            elif kind == "random":
                time.sleep(self.rng.uniform(0.05, 1.5))
                sigkill(daemon)
            rc = daemon.wait(20)
            _died_by_sigkill(rc, label, self.tally, daemon.log.tail())
        finally:
            daemon.kill()
        self.tally.trials[kind] += 1
        _check_after_crash(world, self.jobs_bytes, self.tally, label)
        for js in rows(world.state_dir, "SELECT job_id, next_fire, completed FROM job_state"):
            if js["next_fire"] is None or js["completed"]:
                self.tally.unplanned.append(f"{label}: {js}")

    def restart_check(self) -> None:
        """A clean life arms every job and sees each one start again."""
        world = self.world
        marks = {job_id: "" for job_id in TIMER_JOBS}
        for start in read_starts(world.starts):
            marks[start.job_id] = max(marks[start.job_id], start.scheduled_at)
        daemon = world.daemon()
        try:

            def fired_again() -> set[str]:
                seen = {
                    s.job_id for s in read_starts(world.starts) if s.scheduled_at > marks[s.job_id]
                }
                return seen if seen >= set(TIMER_JOBS) else set()

            try:
                wait_until(fired_again, timeout=30, what="every job to fire again")
            except AssertionError:
                seen = {
                    s.job_id for s in read_starts(world.starts) if s.scheduled_at > marks[s.job_id]
                }
                self.tally.stranded += sorted(set(TIMER_JOBS) - seen)
            armed = {e["job_id"] for e in daemon.log.events("arm.confirmed")}
            self.tally.stranded += sorted(set(TIMER_JOBS) - armed)
            rc = daemon.stop(30)
            if rc != 0:
                self.tally.problems.append(f"clean life exited {rc}:\n{daemon.log.tail()}")
        finally:
            daemon.kill()
        self.tally.restart_checks += 1
        # A clean stop leaves nothing claimed or running.
        left = rows(
            world.state_dir,
            "SELECT job_id, scheduled_at, state FROM occurrences "
            "WHERE state IN ('claimed', 'running')",
        )
        if left:
            self.tally.problems.append(f"after a clean stop: {left}")


# ---------------------------------------------------------------------- the HTTP lane
PACE = 2.5  # seconds between the one-shots' instants
AHEAD = 58.0  # a one-shot is delivered this long before its instant (at most 60 s early)


class HttpLane:
    def __init__(self, root: Path, seed: int, trials: int) -> None:
        self.world = World(root)
        self.rng = random.Random(seed)
        self.port = free_port()
        self.kinds = [KINDS[n % len(KINDS)] for n in range(trials)]
        t0 = datetime.now(UTC).replace(microsecond=0)
        self.instants = [t0 + timedelta(seconds=AHEAD + 2 + n * PACE) for n in range(trials)]
        starts = self.world.starts
        self.jobs_bytes = self.world.write_jobs(
            [
                {
                    "id": f"once-{n:03d}",
                    "schedule": f"at {to_wire(at)}",
                    "command": recording(starts, sleep=1.0 if kind == "running" else 0.0),
                }
                for n, (kind, at) in enumerate(zip(self.kinds, self.instants, strict=True))
            ]
        )
        self.world.write_config(
            listen=f"127.0.0.1:{self.port}",
            extra='shutdown_grace = "10s"',
            runner={"keep_runs": 100_000},
        )
        self.tally = Tally()
        self.claimed_not_started: Counter[str] = Counter()
        self.late = 0

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def run(self) -> Tally:
        for number, kind in enumerate(self.kinds):
            self.trial(number, kind)
        return self.tally

    def trial(self, number: int, kind: str) -> None:
        world = self.world
        job_id = f"once-{number:03d}"
        instant = self.instants[number]
        fire_at = to_wire(instant)
        label = f"http trial {number} ({kind})"
        wait_for = (instant - timedelta(seconds=AHEAD) - datetime.now(UTC)).total_seconds()
        if wait_for > 0:
            time.sleep(wait_for)
        late = datetime.now(UTC) > instant - timedelta(seconds=10)
        self.late += late

        answers: list[Answer | None] = []
        env = {"CHRONOSD_CRASH_AT": kind} if kind in CRASH_POINTS else {}
        daemon = world.daemon(env)
        try:
            started_or_exited(daemon)
            if kind == "random":
                with ThreadPoolExecutor(max_workers=1) as pool:
                    pending = pool.submit(try_fire, self.address, job_id, fire_at)
                    time.sleep(self.rng.uniform(0.0, 0.15))
                    sigkill(daemon)
                    answers.append(pending.result(timeout=30))
            else:
                answers.append(try_fire(self.address, job_id, fire_at))
            if kind == "running":
                wait_until(
                    lambda: any(s.job_id == job_id for s in read_starts(world.starts)),
                    timeout=20,
                    what=f"{label}: the job to start",
                )
                sigkill(daemon)
            rc = daemon.wait(20)
            _died_by_sigkill(rc, label, self.tally, daemon.log.tail())
        finally:
            daemon.kill()
        self.tally.trials[kind] += 1
        _check_after_crash(world, self.jobs_bytes, self.tally, label)

        # The NAS delivers again until it gets a 2xx, then once more.
        clean = world.daemon()
        try:
            clean.wait_started()
            for _ in range(5):
                answer = try_fire(self.address, job_id, fire_at)
                answers.append(answer)
                if answer is not None and answer.status < 300:
                    break
                time.sleep(0.2)
            answers.append(try_fire(self.address, job_id, fire_at))
            rc = clean.stop(30)
            if rc != 0:
                self.tally.problems.append(f"{label}: clean life exited {rc}")
        finally:
            clean.kill()
        self._judge(label, kind, job_id, answers, late)

    def _judge(
        self, label: str, kind: str, job_id: str, answers: list[Answer | None], late: bool
    ) -> None:
        world = self.world
        statuses = [None if a is None else (a.status, a.body.get("status")) for a in answers]
        if answers[-1] is None or answers[-1].status >= 300:
            self.tally.problems.append(f"{label}: never acknowledged: {statuses}")
        if answers[-1] is not None and answers[-1].body.get("status") != "duplicate":
            self.tally.problems.append(f"{label}: last redelivery not a duplicate: {statuses}")
        accepted = sum(1 for a in answers if a is not None and a.status == 202)
        if accepted > 1:
            self.tally.problems.append(f"{label}: accepted {accepted} times: {statuses}")
        starts = [s for s in read_starts(world.starts) if s.job_id == job_id]
        occurrence = rows(
            world.state_dir, "SELECT state FROM occurrences WHERE job_id = ?", (job_id,)
        )
        if len(occurrence) != 1:
            self.tally.problems.append(f"{label}: occurrence rows {occurrence}")
        if not starts:
            self.claimed_not_started[kind] += 1
        expected = EXPECTED_STARTS.get(kind)
        if expected is not None and not late and len(starts) != expected:
            self.tally.problems.append(
                f"{label}: started {len(starts)} times, expected {expected}: {statuses}"
            )


# ---------------------------------------------------------------------- the test
def test_sigkill_at_every_point_never_starts_an_occurrence_twice_nor_strands_a_job(
    tmp_path: Path, report: Report
) -> None:
    seed = secrets.randbits(32)
    print(f"random seed {seed}")
    per_lane = scaled(13 * len(KINDS))
    http_trials = scaled(5 * len(KINDS))
    began = time.monotonic()
    lanes = [TimerLane(tmp_path / f"timer-{n}", seed + n) for n in range(2)]
    http = HttpLane(tmp_path / "http", seed + 99, http_trials)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(lane.run, per_lane) for lane in lanes]
        futures.append(pool.submit(http.run))
        tallies = [future.result(timeout=1800) for future in futures]
    total = Tally()
    for tally in tallies:
        total.merge(tally)

    # Over every lane: no occurrence started twice, every start recorded as a run.
    doubles = 0
    unrecorded: list[str] = []
    retried = interrupted_retry_runs = 0
    interrupted = 0
    for world in [lane.world for lane in lanes] + [http.world]:
        starts = read_starts(world.starts)
        doubles += doubled(starts, per_attempt=True)
        doubles += doubled([s for s in starts if s.job_id != "retry"], per_attempt=False)
        recorded = {
            (r["job_id"], r["scheduled_at"], r["attempt"])
            for r in rows(world.state_dir, "SELECT job_id, scheduled_at, attempt FROM runs")
        }
        unrecorded += [
            f"{world.root.name}: {s}"
            for s in starts
            if (s.job_id, s.scheduled_at, s.attempt) not in recorded
        ]
        run_keys = Counter(
            (r["job_id"], r["scheduled_at"], r["attempt"])
            for r in rows(world.state_dir, "SELECT job_id, scheduled_at, attempt FROM runs")
        )
        doubles += sum(n - 1 for n in run_keys.values() if n > 1)
        retried += sum(1 for s in starts if s.attempt > 1)
        interrupted_retry_runs += len(
            rows(
                world.state_dir,
                "SELECT 1 FROM runs WHERE job_id = 'retry' AND status = 'interrupted'",
            )
        )
        interrupted += len(
            rows(world.state_dir, "SELECT 1 FROM occurrences WHERE state = 'interrupted'")
        )
        assert integrity_ok(world.state_dir)
    occurrences_started = sum(
        len({(s.job_id, s.scheduled_at) for s in read_starts(w.starts)})
        for w in [lane.world for lane in lanes] + [http.world]
    )
    trials = sum(total.trials.values())
    report(
        trials=trials,
        **{kind.replace("-", "_"): total.trials[kind] for kind in KINDS},
        occurrences_started=occurrences_started,
        doubled=doubles,
        stranded=len(total.stranded),
        restart_checks=total.restart_checks,
        integrity_failures=total.integrity_failures,
        jobs_json_changed=total.jobs_file_changed,
        interrupted=interrupted,
        http_claimed_not_started=sum(http.claimed_not_started.values()),
        retry_runs_interrupted=interrupted_retry_runs,
        retried=retried,
        seconds=round(time.monotonic() - began),
    )
    assert set(total.trials) == set(KINDS)
    assert set(CRASH_POINTS) == POINTS
    assert doubles == 0
    assert not unrecorded, unrecorded[:10]
    assert total.stranded == [], total.stranded
    assert total.unplanned == [], total.unplanned[:10]
    assert total.integrity_failures == 0
    assert total.jobs_file_changed == 0
    assert not total.problems, "\n".join(total.problems[:10])


# Regression test for a fixed bug: chronosd/daemon/supervisor.py Daemon.run calls engine.recover()
# before load_jobs(): Engine.jobs is still empty, so Engine.recover never finds the job of an
# interrupted run and never queues its retry, whatever the job's `retries`


def test_a_run_interrupted_by_a_crash_is_retried_after_restart_when_the_job_has_retries(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    at = to_wire(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=50))
    world.write_jobs(
        [
            {
                "id": "retried",
                "schedule": f"at {at}",
                "retries": 2,
                "command": recording(world.starts),
            }
        ]
    )
    world.write_config()
    crashing = world.daemon({"CHRONOSD_CRASH_AT": "after-reply"})
    try:
        answer = try_fire(crashing.address(), "retried", at)
        assert answer is not None and answer.status == 202, answer
        assert crashing.wait(20) == KILLED
    finally:
        crashing.kill()
    with world.running() as daemon:
        daemon.wait_started()
        daemon.log.wait_for("run.interrupted", timeout=20)
        wait_until(
            lambda: read_starts(world.starts), timeout=10, what="the retry of the interrupted run"
        )
        assert daemon.stop() == 0
    (start,) = read_starts(world.starts)
    assert (start.attempt, start.trigger) == (2, "retry")
