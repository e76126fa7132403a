"""The edit cycle: jobs.json is edited while chronosd is not running; a path-unit start makes
the NAS's arms match the file exactly, and chronosd leaves again by itself.

The schedules lie hours to a year apart so nothing fires while the arms are compared.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tests.e2e.lab import Agent, Lab, next_occurrence, now_utc, summary, wire

LONDON = "Europe/London"


def expected_arms(records: list[dict[str, Any]], after: datetime) -> dict[str, str]:
    """job id -> the wire instant of its next occurrence, for every job that wants an arm."""
    return {
        r["id"]: wire(next_occurrence(r["schedule"], after, timezone=r.get("timezone", "UTC")))
        for r in records
        if r.get("enabled", True) and not r.get("paused", False)
    }


def assert_arms_match(agent: Agent, records: list[dict[str, Any]], before: datetime) -> None:
    # An occurrence boundary crossed while chronosd planned would move an arm; either side counts.
    low, high = expected_arms(records, before), expected_arms(records, now_utc())
    armed = {job_id: arm["fire_at"] for job_id, arm in agent.armed().items()}
    assert set(armed) == set(low), f"armed {sorted(armed)}, jobs.json wants {sorted(low)}"
    for job_id, fire_at in armed.items():
        assert fire_at in (low[job_id], high[job_id]), (job_id, fire_at, low[job_id])


def test_edits_made_while_chronosd_is_down_are_armed_exactly_by_one_path_unit_start(
    lab: Lab,
) -> None:
    agent = lab.agent()
    initial = [
        agent.job("keep", "0 0 1 1 *"),
        agent.job("reschedule", "30 2 * * *", timezone=LONDON),
        agent.job("to-pause", "15 45 3 * * *"),
        agent.job("to-remove", "0 12 * * 1-5"),
        agent.job("to-resume", "0 6 * * *", paused=True),
        agent.job("disabled", "0 7 * * *", enabled=False),
    ]
    agent.write_jobs(initial)
    before = now_utc()
    agent.start_as_path_unit()
    agent.wait_exited()
    assert_arms_match(agent, initial, before)
    keep_arm = agent.armed()["keep"]

    # chronosd is not running; the file changes under it.
    assert not agent.activator.running()
    edited = [
        agent.job("keep", "0 0 1 1 *"),
        agent.job("reschedule", "45 4 * * 0", timezone=LONDON),
        agent.job("to-pause", "15 45 3 * * *", paused=True),
        agent.job("to-resume", "0 6 * * *"),
        agent.job("disabled", "0 7 * * *", enabled=False),
        agent.job("added", "20 10 8 * * *"),
        agent.job("added-in-london", "0 9 * * 1", timezone=LONDON),
    ]
    agent.write_jobs(edited)
    before = now_utc()
    number = agent.start_as_path_unit()
    agent.wait_exited(number)

    assert_arms_match(agent, edited, before)
    assert agent.armed()["keep"]["schedule_id"] == keep_arm["schedule_id"]
    assert agent.activator.exit_codes == [0, 0]
    assert agent.activator.failure is None
    second = agent.sessions()[-1]
    stopping = [e for e in second if e.get("event") == "daemon.stopping"]
    assert [e.get("reason") for e in stopping] == ["idle"]
    # Only the difference went to the NAS.
    touched = sorted(
        {e["job_id"] for e in second if e.get("event") in ("arm.confirmed", "arm.cancelled")}
    )
    assert touched == sorted(
        ["reschedule", "to-pause", "to-remove", "to-resume", "added", "added-in-london"]
    )
    assert not agent.fired()
    assert not agent.errors()
    summary(
        "edit cycle",
        armed=len(agent.armed()),
        changed_at_nas=len(touched),
        activations=agent.activator.activations,
    )
