"""Engine.apply_jobs on an edit: only the jobs the edit made anew are compared with state.db.

An awake daemon re-validates jobs.json with the memo, which hands back the very Job objects it
applied before for unchanged records; apply_jobs then reads the stored state of the other jobs
only. The outcome must be what comparing every job gives: the same job_state, the same diff,
the same jobs asked of the reconciler.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta
from pathlib import Path

from chronosd.config import Config
from chronosd.fire import SMALL_APPLY, Engine
from chronosd.jobs.model import Job
from chronosd.state import StateDB
from tests.jobtools import T0, make_job


class Rig:
    def __init__(self, root: Path) -> None:
        self.db = StateDB.open(root)
        self.now = T0
        self.asked: list[str] = []
        self.engine = Engine(
            config=Config(jobs=root / "jobs.json", state_dir=root),
            db=self.db,
            owner="t:1:x",
            clock=lambda: self.now,
            request_reconcile=self.asked.extend,
        )
        self.statements: list[str] = []
        self.db._db.set_trace_callback(self.statements.append)

    def settle(self) -> None:
        """What the reconciler does once a removed job's arm is cancelled: forget the job."""
        for job_id in self.asked:
            if job_id not in self.engine.jobs:
                self.db.delete_job(job_id)

    def whole_table_reads(self) -> int:
        return sum(
            1
            for sql in self.statements
            if "FROM job_state" in sql and "WHERE" not in sql and sql.lstrip().startswith("SELECT")
        )


def jobs(count: int) -> list[Job]:
    return [make_job(id=f"job-{i:04d}", schedule=f"{i % 60} {i % 24} * * *") for i in range(count)]


def test_an_edit_of_a_few_jobs_gives_what_comparing_every_job_gives(tmp_path: Path) -> None:
    rng = random.Random(7)
    edits, full = Rig(tmp_path / "edits"), Rig(tmp_path / "full")
    current = jobs(400)
    for rig in (edits, full):
        rig.engine.apply_jobs(current, reconcile_all=True)
        rig.settle()
    for step in range(6):
        new = list(current)
        for index in rng.sample(range(len(new)), 3):
            old = new[index]
            kind = rng.choice(["schedule", "command", "paused", "enabled"])
            if kind == "schedule":
                new[index] = make_job(id=old.id, schedule=f"{step} {index % 24} * * 1")
            elif kind == "command":
                new[index] = make_job(id=old.id, schedule=old.schedule_text, command=f"echo {step}")
            else:
                flag = not getattr(old, kind)
                new[index] = make_job(id=old.id, schedule=old.schedule_text, **{kind: flag})
        del new[rng.randrange(len(new))]
        new.append(make_job(id=f"added-{step}", schedule=f"{step} 1 * * *"))
        for rig in (edits, full):
            rig.now += timedelta(minutes=7)
            rig.asked.clear()
            rig.statements.clear()
        diff = edits.engine.apply_jobs(new)
        # The full comparison, as on a start-up: new objects for every job.
        expected = full.engine.apply_jobs([dataclasses.replace(job) for job in new])
        assert edits.whole_table_reads() == 0  # the unchanged 395 were not read
        assert full.whole_table_reads() == 1
        assert diff == expected
        assert sorted(edits.asked) == sorted(full.asked)
        assert edits.db.all_jobs() == full.db.all_jobs()
        assert edits.engine.jobs == full.engine.jobs
        for rig in (edits, full):
            rig.settle()
        current = new
    for rig in (edits, full):
        rig.db.close()


def test_an_edit_of_many_jobs_reads_the_table_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    current = jobs(SMALL_APPLY + 50)
    rig.engine.apply_jobs(current)
    rig.statements.clear()
    edited = [make_job(id=job.id, schedule=job.schedule_text, command="echo x") for job in current]
    diff = rig.engine.apply_jobs(edited)
    assert len(diff.changed) == len(current)
    assert rig.whole_table_reads() == 1
    rig.db.close()
