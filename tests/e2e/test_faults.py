"""Faults in the scale-to-zero cycle: chronosd or the NAS killed, the NAS failing, the NAS gone.

Each test runs the real NAS and chronosd under the socket-activation harness and checks the
promise that survives the fault: no trigger is lost for good and no occurrence runs twice.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from datetime import datetime, timedelta

from tests.e2e.lab import Agent, Lab, next_occurrence, now_utc, sleep_until, summary, twice, wire


# ---------------------------------------------------------------------- chronosd killed
def test_chronosd_killed_mid_run_loses_no_trigger_and_the_run_is_recorded_interrupted(
    lab: Lab,
) -> None:
    agent = lab.agent()
    # Each run writes its line and then sleeps 3 s: the kill lands while it sleeps.
    agent.write_jobs([agent.job("sleeper", "*/5 * * * * *", sleep=3)])
    agent.start_as_path_unit()
    agent.wait_exited()

    for _ in range(3):  # a run that ended before the kill could land is not a kill mid-run
        killed = kill_during_next_run(agent)
        if killed is not None:
            break
    assert killed is not None, "every run ended before the kill could land"
    killed_at, following = killed
    agent.wait_for(lambda: -signal.SIGKILL in agent.activator.exit_codes, timeout=10, what="kill")

    # The NAS wakes a new chronosd for the next occurrence, which runs as usual.
    fired = agent.wait_fired(
        lambda f: any(x.scheduled_at == following for x in f),
        timeout=30,
        what=f"the occurrence after the kill ({wire(following)})",
    )
    agent.wait_for(
        lambda: [
            r for r in agent.runs() if r["occurrence"] == wire(following) and r["status"] == "ok"
        ],
        timeout=20,
        what="the run after the kill to finish",
    )
    agent.stop_between_fires()

    runs = {r["occurrence"]: r for r in agent.runs()}
    interrupted = runs[wire(killed_at)]
    assert interrupted["status"] == "interrupted", interrupted
    assert runs[wire(following)]["status"] == "ok"
    assert [e["run_id"] for e in agent.log.events("run.interrupted")][:1] == [interrupted["run_id"]]
    fired = agent.fired()
    assert not twice(fired), twice(fired)
    ats = [f.scheduled_at for f in fired]
    assert ats == sorted(ats)
    assert ats.count(killed_at) == ats.count(following) == 1
    assert not agent.errors()
    lab.assert_no_5xx()
    summary(
        "chronosd SIGKILL mid-run",
        killed_occurrence=wire(killed_at),
        killed_status=interrupted["status"],
        next_status=runs[wire(following)]["status"],
        activations=agent.activator.activations,
        exit_codes=agent.activator.exit_codes,
    )


def kill_during_next_run(agent: Agent) -> tuple[datetime, datetime] | None:
    """SIGKILL chronosd while the next run sleeps; (its occurrence, the next one), or None
    when the run had ended before the kill could land."""
    seen = len(agent.fired())
    run = agent.wait_fired(lambda f: len(f) > seen, timeout=20, what="a run")[-1]
    following = next_occurrence("*/5 * * * * *", run.scheduled_at)
    # The next occurrence is armed at the NAS while the run is still under way.
    rearm = {"job_id": "sleeper", "fire_at": wire(following)}
    agent.wait_for(
        lambda: agent.log.events("arm.confirmed", **rearm),
        timeout=10,
        what="the re-arm of the next occurrence",
    )
    running = [
        r
        for r in agent.state.runs("sleeper")
        if r["scheduled_at"] == wire(run.scheduled_at) and r["status"] == "running"
    ]
    if not (running and agent.activator.running()):
        return None
    os.kill(agent.activator.pids[-1], signal.SIGKILL)
    return run.scheduled_at, following


# ---------------------------------------------------------------------- the NAS killed
def test_nas_killed_and_restarted_delivers_what_came_due_once_per_job_policy(lab: Lab) -> None:
    """While the NAS is down several occurrences of each job come due. It holds one arm per
    job; when it is back it delivers them late: beyond the 4 s grace, the catch-up job runs
    once (trigger catch-up) for all of them, the other records a miss. Nothing runs twice.
    """
    agent = lab.agent(fallback_after="1m")  # this test is about the NAS's own recovery
    agent.write_jobs(
        [
            agent.job("catch-up", "*/4 * * * * *", catch_up=True, misfire_grace="4s"),
            agent.job("no-catch-up", "*/4 * * * * *", catch_up=False, misfire_grace="4s"),
        ]
    )
    agent.start_as_path_unit()
    agent.wait_exited()
    agent.wait_fired(
        lambda f: {x.job_id for x in f} == {"catch-up", "no-catch-up"},
        timeout=20,
        what="a run of each job",
    )

    def quiet() -> dict[str, str] | None:
        """The arms, at a moment chronosd is down and both arms are at least 1 s ahead."""
        if agent.activator.running():
            return None
        arms = _nas_arms(lab)
        soon = wire(now_utc() + timedelta(seconds=1))
        if agent.activator.running() or len(arms) != 2 or min(arms.values()) <= soon:
            return None
        return arms

    armed_when_killed = agent.wait_for(quiet, timeout=30, what="a quiet moment")
    lab.nas.kill()
    down_at = now_utc()
    time.sleep(9)  # two or three occurrences of each job come due
    up_at = now_utc()
    lab.nas.start()

    agent.wait_fired(
        lambda fired: (
            sum(1 for f in fired if f.job_id == "catch-up" and f.scheduled_at > up_at) >= 2
        ),
        timeout=40,
        what="the jobs to run again after the restart",
    )
    agent.stop_between_fires()

    fired = agent.fired()
    assert not twice(fired), f"occurrences run more than once: {twice(fired)}"
    for job_id in ("catch-up", "no-catch-up"):
        ats = [f.scheduled_at for f in fired if f.job_id == job_id]
        assert ats == sorted(ats), job_id

    # The arms the NAS held at the kill were delivered after the restart.
    delivered = [d for d in lab.nas.deliveries() if d["outcome"] == "delivered"]
    for job_id, fire_at in armed_when_killed.items():
        assert any(d["job_id"] == job_id and d["fire_at"] == fire_at for d in delivered), (
            job_id,
            fire_at,
        )
    outage = [f for f in fired if down_at < f.scheduled_at <= up_at]
    catch_up = [f for f in outage if f.job_id == "catch-up"]
    assert [(wire(f.scheduled_at), f.trigger) for f in catch_up] == [
        (armed_when_killed["catch-up"], "catch-up")
    ]
    assert not [f for f in outage if f.job_id == "no-catch-up"]
    missed = [o for o in agent.state.occurrences("no-catch-up") if o["state"] == "missed"]
    assert [o["scheduled_at"] for o in missed] == [armed_when_killed["no-catch-up"]]
    assert not lab.nas.dead()
    assert not agent.errors()
    lab.assert_no_5xx()
    summary(
        "NAS SIGKILL and restart",
        outage_runs=[f"{f.job_id}@{wire(f.scheduled_at)}:{f.trigger}" for f in outage],
        missed=len(missed),
        runs=len(fired),
        activations=agent.activator.activations,
    )


def _nas_arms(lab: Lab) -> dict[str, str]:
    return {job_id: arm["fire_at"] for job_id, arm in lab.nas.armed().items()}


# ---------------------------------------------------------------------- the NAS failing
def test_arms_converge_after_the_nas_answered_500_to_every_provision_for_10_s(lab: Lab) -> None:
    proxy = lab.proxy()
    agent = lab.agent(nas_url=proxy.url, fallback_after="1m")
    records = [
        agent.job("yearly", "0 0 1 1 *"),
        agent.job("daily", "30 2 * * *"),
    ]
    agent.write_jobs(records)
    agent.start_as_path_unit()
    agent.wait_exited()
    assert set(agent.armed()) == {"yearly", "daily"}

    proxy.failing.set()
    failing_since = now_utc()
    edited = [
        agent.job("yearly", "0 0 1 1 *"),
        agent.job("daily", "45 3 * * *"),
        agent.job("weekly", "0 9 * * 1"),
        agent.job("secondly", "7 8 9 * * *"),
    ]
    agent.write_jobs(edited)
    before = now_utc()
    number = agent.start_as_path_unit()
    agent.wait_for(lambda: proxy.refused >= 6, timeout=20, what="several refused provisions")
    sleep_until(failing_since + timedelta(seconds=10))
    proxy.failing.clear()
    refused = proxy.refused
    # While an arm is unconfirmed chronosd stays up; it leaves once the NAS took them all.
    assert agent.activator.running() and agent.activator.activations == number
    agent.wait_exited(number, timeout=60)

    want = {r["id"]: wire(next_occurrence(r["schedule"], before)) for r in edited}
    armed = {job_id: arm["fire_at"] for job_id, arm in agent.armed().items()}
    assert armed == want
    assert agent.activator.exit_codes == [0, 0]
    assert ("/api/agent-cron/provision", 200) in proxy.forwarded
    failures = agent.log.events("reconcile.failed")
    assert len(failures) >= 2
    # Backed off, not a tight loop: every retry sends the three changes once.
    assert refused <= 3 * len(failures)
    assert not agent.errors()
    lab.assert_no_5xx()
    summary(
        "NAS 500 on provision for 10 s",
        refused_provisions=refused,
        failed_passes=len(failures),
        retry_in=[e.get("retry_in") for e in failures],
        converged=len(armed),
    )


# ---------------------------------------------------------------------- the NAS unreachable
def test_nas_unreachable_past_fallback_after_fires_locally_then_hands_back(lab: Lab) -> None:
    agent = lab.agent(fallback_after="3s")
    agent.write_jobs([agent.job("steady", "*/4 * * * * *")])
    agent.start_as_path_unit()
    agent.wait_exited()

    lab.nas.kill()
    down_at = now_utc()
    # The file changes while the NAS is gone: the new jobs cannot be armed there.
    agent.write_jobs(
        [
            agent.job("steady", "*/4 * * * * *"),
            agent.job("local-2", "*/2 * * * * *"),
            agent.job("local-3", "1-59/3 * * * * *"),
        ]
    )
    number = agent.start_as_path_unit()
    agent.wait_for(
        lambda: {e["job_id"] for e in agent.log.events("arm.fallback")} >= {"local-2", "local-3"},
        timeout=20,
        what="the fall back to local timers",
    )
    # Timed locally: the same process runs them, it does not exit.
    agent.wait_fired(
        lambda f: (
            sum(1 for x in f if x.job_id == "local-2") >= 3
            and sum(1 for x in f if x.job_id == "local-3") >= 2
        ),
        timeout=20,
        what="runs from local timers",
    )
    assert agent.activator.running() and agent.activator.activations == number
    up_at = now_utc()
    lab.nas.start()

    agent.wait_for(
        lambda: (
            {e["job_id"] for e in agent.log.events("arm.handed_back")} >= {"local-2", "local-3"}
        ),
        timeout=60,
        what="the hand back to the NAS",
    )
    handed_at = now_utc()
    # Back on NAS arms: chronosd may scale to zero again, and the NAS wakes it.
    agent.wait_exited(number, timeout=30)
    agent.wait_fired(
        lambda f: sum(1 for x in f if x.job_id == "local-2" and x.scheduled_at > handed_at) >= 2,
        timeout=30,
        what="runs delivered by the NAS after the hand back",
    )
    agent.stop_between_fires()

    fired = agent.fired()
    assert not twice(fired), f"occurrences run more than once: {twice(fired)}"
    delivered = {
        (d["job_id"], d["fire_at"]) for d in lab.nas.deliveries() if d["outcome"] == "delivered"
    }
    local = [f for f in fired if (f.job_id, wire(f.scheduled_at)) not in delivered]
    by_nas = [f for f in fired if (f.job_id, wire(f.scheduled_at)) in delivered]
    assert {f.job_id for f in local} >= {"local-2", "local-3"}
    assert all(down_at < f.scheduled_at for f in local)
    assert any(f.job_id == "local-2" and f.scheduled_at > handed_at for f in by_nas)
    # Across the fall back and the hand back, each occurrence ran at most once, in order,
    # and the local timers kept every occurrence while they held the job (from their second
    # run: the first one catches up what came due before the fall back).
    for job_id in ("local-2", "local-3"):
        ats = [f.scheduled_at for f in fired if f.job_id == job_id]
        assert ats == sorted(ats), job_id
        first_local = min(f.scheduled_at for f in local if f.job_id == job_id)
        period = 2 if job_id == "local-2" else 3
        held = [a for a in ats if first_local < a <= handed_at]
        gaps = Counter(int((b - a).total_seconds()) for a, b in itertools.pairwise(held))
        assert set(gaps) <= {period}, (job_id, gaps, [wire(a) for a in ats], wire(first_local))
    assert len(agent.activator.exit_codes) >= number
    assert set(agent.activator.exit_codes) == {0}
    assert not agent.errors()
    lab.assert_no_5xx()
    summary(
        "NAS unreachable past fallback_after",
        local_runs=len(local),
        nas_runs=len(by_nas),
        activations=agent.activator.activations,
        outage_s=round((up_at - down_at).total_seconds()),
    )
