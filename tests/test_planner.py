from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd import planner
from tests.jobtools import T0, make_job

S = timedelta(seconds=1)


def test_jitter_is_stable_and_bounded() -> None:
    values = {planner.jitter_for("a", T0 + k * S, 30) for k in range(200)}
    assert all(0 <= v <= 30 for v in values)
    assert len(values) > 10
    assert planner.jitter_for("a", T0, 30) == planner.jitter_for("a", T0, 30)
    assert planner.jitter_for("a", T0, 0) == 0.0


@settings(max_examples=200, deadline=None)
@given(offset=st.integers(min_value=0, max_value=10_000), jitter=st.integers(0, 36))
def test_fire_maps_back_to_its_occurrence(offset: int, jitter: int) -> None:
    job = make_job(schedule="every 37s", jitter=f"{jitter}s")
    occurrence = job.schedule.next_after(T0 + offset * S, anchor=T0)
    assert occurrence is not None
    fire_at = planner.arm_instant(job, occurrence)
    assert planner.occurrence_for_fire(job, fire_at, anchor=T0) == occurrence


def test_jitter_longer_than_the_period_maps_to_the_planned_occurrence() -> None:
    job = make_job(schedule="every 37s", jitter="100s")
    # Two occurrences share this jittered instant; the planned one is the armed one.
    fire_at = T0 + 1387 * S
    first = T0 + 1332 * S
    second = T0 + 1369 * S
    assert planner.arm_instant(job, first) == planner.arm_instant(job, second) == fire_at
    assert planner.occurrence_for_fire(job, fire_at, anchor=T0, planned=second) == second
    assert planner.occurrence_for_fire(job, fire_at, anchor=T0, planned=first) == first


def test_fire_for_an_instant_outside_the_schedule_maps_to_nothing() -> None:
    job = make_job(schedule="every 60s")
    assert planner.occurrence_for_fire(job, T0 + 61 * S, anchor=T0) is None
    assert planner.occurrence_for_fire(job, T0 + 60 * S, anchor=T0) == T0 + 60 * S


def test_repeat_stops_after_n_starts() -> None:
    job = make_job(schedule="every 10s", repeat=2)
    assert planner.next_occurrence(job, T0, anchor=T0, runs_started=1) == T0 + 10 * S
    assert planner.next_occurrence(job, T0, anchor=T0, runs_started=2) is None


def test_one_shot_runs_once() -> None:
    job = make_job(schedule="in 30s")
    assert planner.next_occurrence(job, T0, anchor=T0, runs_started=0) == T0 + 30 * S
    assert planner.next_occurrence(job, T0, anchor=T0, runs_started=1) is None


def test_misfire_within_grace_runs_normally() -> None:
    job = make_job(schedule="every 1h")  # default grace: half the period, 30 min
    assert planner.misfire_action(job, T0, T0 + 29 * 60 * S, anchor=T0) == "run"
    assert planner.misfire_action(job, T0, T0 + 31 * 60 * S, anchor=T0) == "catch-up"


def test_misfire_without_catch_up_is_missed() -> None:
    job = make_job(schedule="every 1h", catch_up=False, misfire_grace="5m")
    assert planner.misfire_action(job, T0, T0 + 6 * 60 * S, anchor=T0) == "missed"


def test_many_missed_occurrences_coalesce_into_one_decision() -> None:
    job = make_job(schedule="every 10s")
    now = T0 + 3600 * S
    plan = planner.plan_overdue(job, T0 + 10 * S, now, anchor=T0, runs_started=0)
    assert plan.action == "catch-up"
    assert plan.coalesced == 359
    assert plan.next_fire == now + 10 * S


def test_overdue_job_planned_far_behind_stays_bounded() -> None:
    job = make_job(schedule="every 1s")
    now = T0 + 90 * 86400 * S
    plan = planner.plan_overdue(job, T0 + S, now, anchor=T0, runs_started=0)
    assert plan.next_fire is not None and plan.next_fire > now
    assert plan.coalesced == 10_000


def test_overlap_decisions() -> None:
    for overlap, running, queued, expected in [
        ("skip", 0, 0, "start"),
        ("skip", 1, 0, "skip"),
        ("allow", 3, 0, "start"),
        ("queue", 1, 0, "queue"),
        ("queue", 1, 1, "skip"),
        ("replace", 1, 0, "replace"),
    ]:
        job = make_job(overlap=overlap)
        assert planner.overlap_action(job, running=running, queued=queued) == expected


def test_retry_backoff_doubles_and_caps() -> None:
    assert [planner.retry_delay(a) for a in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert planner.retry_delay(30) == planner.RETRY_CAP
    job = make_job(retries=2)
    assert planner.should_retry(job, 1, "failed")
    assert planner.should_retry(job, 2, "timeout")
    assert not planner.should_retry(job, 3, "failed")
    assert not planner.should_retry(job, 1, "ok")
    assert not planner.should_retry(job, 1, "killed")


def test_waypoint_caps_arms_at_the_horizon() -> None:
    far = T0 + timedelta(days=30)
    assert planner.waypoint(far, T0, None) == far
    assert planner.waypoint(far, T0, 7 * 86400) == T0 + timedelta(days=7)
    assert planner.waypoint(T0 + S, T0, 7 * 86400) == T0 + S


def test_too_early_is_more_than_sixty_seconds_ahead() -> None:
    assert planner.too_early(T0 + 61 * S, T0)
    assert not planner.too_early(T0 + 60 * S, T0)
