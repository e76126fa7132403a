"""Four OS processes race to claim the same occurrences: each is won exactly once.

Three in four occurrences are claimed with the bare claim(), the rest with
claim_and_advance(), whose job-state counter must then count exactly the wins.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from chronosd.state import JobState, StateDB

PROCESSES = 4
OCCURRENCES = 2000
JOBS = 7
BASE = datetime(2025, 1, 1, tzinfo=UTC)

# Each child opens its own StateDB, waits for "go" on stdin so that all of
# them start together, claims every occurrence in its own random order, and
# prints the indexes it won as JSON.
_CLAIMER = """
import contextlib, json, random, sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from chronosd.state import StateDB, owner_token

state_dir, count, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
base = datetime(2025, 1, 1, tzinfo=UTC)
order = list(range(count))
random.Random(seed).shuffle(order)
db = StateDB.open(state_dir, busy_timeout=20.0)
# Power-loss durability is not what this test is about, and fsyncing every
# won claim would make it as slow as the disk; locking is the same without.
db._db.execute("PRAGMA synchronous = OFF")
db._synchronous = lambda durable: contextlib.nullcontext()
print("ready", flush=True)
sys.stdin.readline()
wins = []
for i in order:
    at = base + timedelta(seconds=i)
    job = "job-%d" % (i % 7)
    if i % 4 != 1:
        won = db.claim(job, at, owner=owner_token(), trigger="schedule", now=at)
    else:
        won = db.claim_and_advance(
            job, at, owner=owner_token(), trigger="schedule", now=at, next_fire=at
        )
    if won:
        wins.append(i)
db.close()
print(json.dumps({"owner": owner_token(), "wins": wins}), flush=True)
"""


def test_each_occurrence_is_claimed_exactly_once_across_processes(tmp_path: Path) -> None:
    with StateDB.open(tmp_path) as db:  # created and migrated before the race starts
        for k in range(JOBS):
            db.put_job(JobState(f"job-{k}", "h", "k", BASE, None, None, None, 0, None, None, False))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIMER, str(tmp_path), str(OCCURRENCES), str(seed)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in range(PROCESSES)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        results = []
        for child in children:
            out, _ = child.communicate(timeout=120)
            assert child.returncode == 0
            results.append(json.loads(out))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)

    won = [set(result["wins"]) for result in results]
    assert sum(len(w) for w in won) == OCCURRENCES
    assert set().union(*won) == set(range(OCCURRENCES))
    for i, mine in enumerate(won):
        for theirs in won[i + 1 :]:
            assert not mine & theirs

    # The database agrees with what each process was told.
    owner_of = {i: result["owner"] for result in results for i in result["wins"]}
    raw = sqlite3.connect(tmp_path / "state.db")
    rows = raw.execute("SELECT job_id, scheduled_at, owner FROM occurrences").fetchall()
    raw.close()
    assert len(rows) == OCCURRENCES
    with StateDB.open(tmp_path) as db:
        for i in range(0, OCCURRENCES, 7):
            at = BASE + timedelta(seconds=i)
            occurrence = db.get_occurrence(f"job-{i % JOBS}", at)
            assert occurrence is not None and occurrence.owner == owner_of[i]
        advanced = sum(js.runs_started for js in db.all_jobs().values())
        assert advanced == OCCURRENCES // 4  # one advance per claim_and_advance win, no more
