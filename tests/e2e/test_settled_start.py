"""Start-ups after a settled exit: the NAS, chronosd under the activation harness, state.db.

A clean exit with every arm confirmed leaves a mark in state.db; the next start then reconciles
only what jobs.json changed, and when the file is the one it applied, it loads the jobs on first
use. These tests show the mark is used, that what a start-up must still do it still does (a
fire after a deferred start runs its job once and re-arms it), and that anything the mark does
not describe (a write to job_state by anyone, other arm settings) costs a full pass instead.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Any

from tests.e2e.lab import Agent, Lab, next_occurrence, now_utc, wire

META_KEY = "arms_settled"


def events(session: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in session if e.get("event") == name]


def mark(agent: Agent) -> str | None:
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (META_KEY,)).fetchone()
    return None if row is None else str(row[0])


def start_and_wait(agent: Agent) -> list[dict[str, Any]]:
    """One path-unit start to its exit; that process's log events."""
    number = agent.start_as_path_unit()
    agent.wait_exited(number)
    assert agent.activator.exit_codes == [0] * number, agent.log.tail(40)
    return agent.sessions()[-1]


def far_jobs(agent: Agent) -> list[dict[str, Any]]:
    return [
        agent.job("yearly", "0 0 1 1 *"),
        agent.job("weekly", "0 3 * * 0"),
        agent.job("paused", "0 4 * * *", paused=True),
    ]


def test_a_start_with_the_file_it_applied_reads_no_job_and_calls_the_nas_for_nothing(
    lab: Lab,
) -> None:
    agent = lab.agent()
    # One job comes due a little after the second start: its fire wakes a third process.
    soon = (now_utc() + timedelta(seconds=12)).replace(microsecond=0)
    due = agent.job("due", f"{soon.second} {soon.minute} {soon.hour} * * *")
    agent.write_jobs([*far_jobs(agent), due])
    first = start_and_wait(agent)
    assert len(events(first, "arm.confirmed")) == 3
    assert mark(agent) is not None
    arms = agent.armed()

    second = start_and_wait(agent)
    loaded = events(second, "jobs.loaded")
    assert [(e.get("deferred"), e.get("jobs")) for e in loaded] == [(True, 4)]
    assert not events(second, "jobs.load_deferred")
    assert not events(second, "arm.confirmed") and not events(second, "arm.cancelled")
    assert agent.armed() == arms  # nothing provisioned again, nothing cancelled
    assert mark(agent) is not None

    # The NAS's call wakes chronosd: the fired job is validated alone (the file was applied as
    # it is), runs once and is armed for tomorrow, and the exit leaves a new mark.
    fired = agent.wait_fired(lambda f: len(f) >= 1, timeout=40, what="the due job to run")
    agent.wait_exited(3)
    third = agent.sessions()[-1]
    assert not events(third, "jobs.load_deferred")
    assert [(f.job_id, f.scheduled_at) for f in agent.fired()] == [("due", soon)]
    assert fired[0].trigger == "schedule"
    tomorrow = next_occurrence(due["schedule"], soon)
    assert agent.armed()["due"]["fire_at"] == wire(tomorrow)
    assert mark(agent) is not None
    assert not agent.errors()


def test_a_write_to_job_state_after_the_exit_costs_the_next_start_a_full_pass(
    lab: Lab,
) -> None:
    agent = lab.agent()
    agent.write_jobs(far_jobs(agent))
    start_and_wait(agent)
    assert mark(agent) is not None
    # As a process that died mid-way would leave it: state.db no longer believes in the arm.
    with sqlite3.connect(agent.state_dir / "state.db") as db:
        db.execute(
            "UPDATE job_state SET armed_fire = NULL, armed_confirmed_at = NULL "
            "WHERE job_id = 'weekly'"
        )
    assert mark(agent) is None  # the write removed the mark

    session = start_and_wait(agent)
    # The full pass finds the one job whose arm is not believed and arms it again; the file
    # is loaded at once (a full pass needs every job).
    assert [e["job_id"] for e in events(session, "arm.confirmed")] == ["weekly"]
    assert [e.get("deferred") for e in events(session, "jobs.loaded")] == [None]
    assert mark(agent) is not None


def test_other_arm_settings_cost_the_next_start_a_full_pass(lab: Lab) -> None:
    agent = lab.agent()
    records = far_jobs(agent)
    agent.write_jobs(records)
    start_and_wait(agent)
    before = {job_id: arm["fire_at"] for job_id, arm in agent.armed().items()}
    assert set(before) == {"yearly", "weekly"}

    # The pre-wake moves every arm; the mark was made without it, so it does not apply.
    text = agent.config.read_text()
    agent.config.write_text(text.replace('list_every = "1h"', 'list_every = "1h"\nprewake = "2s"'))
    session = start_and_wait(agent)
    assert sorted(e["job_id"] for e in events(session, "arm.confirmed")) == ["weekly", "yearly"]
    after = {job_id: arm["fire_at"] for job_id, arm in agent.armed().items()}
    for job_id, fire_at in before.items():
        earlier = (now_utc().fromisoformat(fire_at) - timedelta(seconds=2)).isoformat()
        assert after[job_id] == earlier


def test_an_edit_after_a_settled_exit_validates_and_arms_only_the_edited_job(
    lab: Lab,
) -> None:
    agent = lab.agent()
    records = far_jobs(agent)
    agent.write_jobs(records)
    start_and_wait(agent)
    records[1] = agent.job("weekly", "30 5 * * 1")
    agent.write_jobs(records)
    session = start_and_wait(agent)
    assert [e["job_id"] for e in events(session, "arm.confirmed")] == ["weekly"]
    # Compared with the file it applied last: only the edited record was validated.
    loaded = events(session, "jobs.loaded")
    assert [(e.get("deferred"), e.get("changed"), e.get("jobs")) for e in loaded] == [(True, 1, 3)]
    assert agent.armed()["weekly"]["fire_at"] == wire(
        next_occurrence("30 5 * * 1", now_utc() - timedelta(seconds=30))
    )
    # The next start finds the edited file applied: deferred again.
    session = start_and_wait(agent)
    assert [e.get("deferred") for e in events(session, "jobs.loaded")] == [True]
