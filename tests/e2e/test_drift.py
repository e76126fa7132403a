"""Drift: the NAS lost arms or holds ones nobody wants; chronosd's list heals both.

Also: a first start with 1,000 new jobs arms every one of them (16 requests in flight).
"""

from __future__ import annotations

import httpx

from tests.e2e.lab import Lab, now_utc, summary
from tests.e2e.test_edit_cycle import assert_arms_match


def test_list_heals_lost_and_unwanted_arms(lab: Lab) -> None:
    agent = lab.agent(list_every="1s")
    records = [agent.job(f"j{n}", f"0 {n} * * *") for n in range(5)]
    agent.write_jobs(records)
    before = now_utc()
    agent.start_as_path_unit()
    agent.wait_exited()
    assert_arms_match(agent, records, before)

    # Behind chronosd's back: the NAS loses two arms and gains one for an unknown job.
    token = (agent.root / "nas-token").read_text().strip()
    headers = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=lab.nas.base_url, headers=headers, timeout=10) as nas:
        for lost in ("j1", "j3"):
            assert nas.post("/api/agent-cron/cancel", json={"job_id": lost}).status_code == 200
        stray = {
            "job_id": "stray",
            "fire_at": "2099-01-01T00:00:00+00:00",
            "agent_callback_url": f"http://127.0.0.1:{agent.activator.port}",
            "dedup_key": "stray:2099",
        }
        assert nas.post("/api/agent-cron/provision", json=stray).status_code == 200
    assert set(agent.armed()) == {"j0", "j2", "j4", "stray"}

    # The next start lists (list_every has passed) and makes the NAS match the file again.
    before = now_utc()
    number = agent.start_as_path_unit()
    agent.wait_exited(number)
    assert_arms_match(agent, records, before)
    listed = [e for e in agent.sessions()[-1] if e.get("event") == "arms.listed"]
    assert listed and listed[0]["drift"] == 3
    assert not agent.errors()
    summary("drift", lost=2, unwanted=1, healed=3, armed=len(agent.armed()))


def test_first_start_with_a_thousand_new_jobs_arms_them_all(lab: Lab) -> None:
    agent = lab.agent()
    records = [agent.job(f"bulk-{n:04d}", f"{n % 60} {n % 24} * * *") for n in range(1000)]
    agent.write_jobs(records)
    before = now_utc()
    agent.start_as_path_unit()
    agent.wait_exited(timeout=180)
    assert_arms_match(agent, records, before)
    assert not agent.errors()
    summary("thousand jobs", armed=len(agent.armed()))
