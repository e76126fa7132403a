"""The scale-to-zero cycle: the NAS wakes chronosd for every fire, chronosd exits in between.

Ten jobs every 2 to 5 seconds for 30 seconds. Their instants fall on even seconds and on
multiples of 3 and 5, so the minute keeps quiet gaps in which chronosd (idle_exit 1 s) exits
and must be started again by the next callback.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from datetime import datetime, timedelta

from chronosd.timefmt import parse_instant
from tests.e2e.lab import Agent, Fired, Lab, now_utc, occurrences, sleep_until, summary, twice, wire

SCHEDULES = {
    "every2": "*/2 * * * * *",
    "every2-range": "0-58/2 * * * * *",
    "every3": "*/3 * * * * *",
    "every3-range": "0-57/3 * * * * *",
    "every4": "*/4 * * * * *",
    "every4-off2": "2-59/4 * * * * *",
    "every4-list": "0,4,8,12,16,20,24,28,32,36,40,44,48,52,56 * * * * *",
    "every4-off2-range": "2-58/4 * * * * *",
    "every5": "*/5 * * * * *",
    "every5-range": "0-55/5 * * * * *",
}
WINDOW = timedelta(seconds=30)
FUZZ = timedelta(seconds=3)  # occurrences this close to either end of the window are not judged


def test_every_occurrence_runs_once_in_order_while_chronosd_comes_and_goes(lab: Lab) -> None:
    agent = lab.agent()
    agent.write_jobs([agent.job(job_id, schedule) for job_id, schedule in SCHEDULES.items()])
    # First start as the path unit would: arm all ten at the NAS, then exit.
    agent.start_as_path_unit()
    agent.wait_exited()
    assert set(agent.armed()) == set(SCHEDULES)

    start = now_utc()
    end = start + WINDOW
    judged_from, judged_to = start + FUZZ, end - FUZZ
    expected = {
        job_id: occurrences(schedule, judged_from, judged_to)
        for job_id, schedule in SCHEDULES.items()
    }
    total = sum(len(instants) for instants in expected.values())
    sleep_until(end)

    def all_ran(fired: list[Fired]) -> bool:
        seen = {(f.job_id, f.scheduled_at) for f in fired}
        return all((job_id, at) in seen for job_id, ats in expected.items() for at in ats)

    with contextlib.suppress(AssertionError):  # the comparison below says what is missing
        agent.wait_fired(all_ran, timeout=20, what=f"the {total} occurrences of the window")
    agent.stop_between_fires()  # no more fires: what ran is final

    fired = agent.fired()
    assert not twice(fired), f"occurrences run more than once: {twice(fired)}"
    per_job: dict[str, list[datetime]] = defaultdict(list)
    for f in fired:
        per_job[f.job_id].append(f.scheduled_at)
    problems = []
    for job_id in SCHEDULES:
        ran = per_job[job_id]
        if ran != sorted(ran):
            problems.append(f"{job_id} ran out of order: {[wire(a) for a in ran]}")
        in_window = [a for a in ran if judged_from < a <= judged_to]
        missing = sorted(set(expected[job_id]) - set(in_window))
        extra = sorted(set(in_window) - set(expected[job_id]))
        if missing or extra:
            problems.append(
                f"{job_id}: missing {[wire(a) for a in missing]}, "
                f"not scheduled {[wire(a) for a in extra]}"
            )
            problems += [f"  {m}: {skipped_by(agent, job_id, m)}" for m in missing]
    assert not problems, "\n".join(problems)

    # The NAS woke chronosd again and again, and each time it left by itself.
    sessions = agent.sessions()
    firing = [s for s in sessions if any(e.get("event") == "fire.claimed" for e in s)]
    assert agent.activator.failure is None
    assert set(agent.activator.exit_codes) == {0}, agent.activator.exit_codes  # no crash
    assert len(firing) >= 3, (
        f"chronosd handled fires in {len(firing)} processes only "
        f"({agent.activator.activations} activations): it never scaled to zero between fires"
    )
    for session in sessions[:-1]:
        reasons = [e.get("reason") for e in session if e.get("event") == "daemon.stopping"]
        assert reasons == ["idle"], reasons

    statuses = lab.delivery_statuses()
    lab.assert_no_5xx()
    assert not agent.errors(), agent.errors()
    assert not lab.nas.dead()
    summary(
        "cycle",
        jobs=len(SCHEDULES),
        judged_occurrences=total,
        runs=len(fired),
        activations=agent.activator.activations,
        processes_that_fired=len(firing),
        delivery_statuses=statuses,
    )


def skipped_by(agent: Agent, job_id: str, missing: datetime) -> str:
    """Which claim planned past *missing*, and how late its own fire was handled."""
    for event in agent.log.events("fire.claimed", job_id=job_id):
        occurrence = parse_instant(event["occurrence"])
        next_fire = parse_instant(event["next_fire"]) if event.get("next_fire") else None
        if occurrence < missing and (next_fire is None or next_fire > missing):
            handled = parse_instant(event["timestamp"])
            return (
                f"the claim of {event['occurrence']} planned {event['next_fire']} next "
                f"(handled {(handled - occurrence).total_seconds():.1f} s after its instant)"
            )
    return "no claim planned past it (never delivered?)"
