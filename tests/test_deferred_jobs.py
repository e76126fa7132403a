"""The job table of a settled start-up: one job looked up alone, the whole file when needed.

DeferredJobs with plain callables for its rules, and a real Daemon (NAS provider configured but
never called, real state.db and jobs.json in tmp_path) for the lookup of one job: what it gives
must be what loading the whole file gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from chronosd.config import load_config
from chronosd.daemon.supervisor import Daemon, DeferredJobs, RunOptions
from chronosd.errors import JobsFileError
from chronosd.jobs.model import Job
from tests.daemon_support import jobs_text, replace_atomically, toml_config, write_private
from tests.jobtools import make_job

A, B = make_job(id="a", schedule="0 1 * * *"), make_job(id="b", schedule="0 2 * * *")


class Calls:
    def __init__(self, jobs: dict[str, Job], *, fail: bool = False) -> None:
        self.jobs = jobs
        self.fail = fail
        self.lookups: list[str] = []
        self.loads = 0

    def lookup(self, job_id: str) -> Job | None:
        self.lookups.append(job_id)
        if self.fail:
            raise JobsFileError("jobs.json changed since the start-up")
        return self.jobs.get(job_id)

    def load(self) -> dict[str, Job]:
        self.loads += 1
        return dict(self.jobs)

    def table(self) -> DeferredJobs:
        return DeferredJobs(self.load, self.lookup, count=len(self.jobs), active=1)


def test_one_job_is_looked_up_alone_and_remembered() -> None:
    calls = Calls({"a": A, "b": B})
    table = calls.table()
    assert len(table) == 2 and table.active == 1 and not table.loaded
    assert table["a"] is A and table.get("a") is A and "a" in table
    assert table.get("nope") is None and "nope" not in table
    assert calls.lookups == ["a", "nope"]  # each id asked once
    assert calls.loads == 0 and not table.loaded


def test_past_the_point_lookups_the_file_is_loaded_once() -> None:
    calls = Calls({f"j{i}": make_job(id=f"j{i}") for i in range(DeferredJobs.POINT_LOOKUPS + 5)})
    table = calls.table()
    for i in range(DeferredJobs.POINT_LOOKUPS):
        assert table[f"j{i}"].id == f"j{i}"
    assert calls.loads == 0
    assert table[f"j{DeferredJobs.POINT_LOOKUPS}"].id == f"j{DeferredJobs.POINT_LOOKUPS}"
    assert calls.loads == 1 and table.loaded
    assert len(calls.lookups) == DeferredJobs.POINT_LOOKUPS
    assert sorted(table) == sorted(calls.jobs)
    assert calls.loads == 1


@pytest.mark.parametrize("use", ["iterate", "values", "failing lookup"])
def test_what_a_lookup_cannot_answer_loads_the_file(use: str) -> None:
    calls = Calls({"a": A, "b": B}, fail=use == "failing lookup")
    table = calls.table()
    if use == "iterate":
        assert sorted(table) == ["a", "b"]
    elif use == "values":
        assert sorted(job.id for job in table.values()) == ["a", "b"]
    else:
        assert table["b"] is B
        assert calls.lookups == ["b"]
    assert calls.loads == 1 and table.loaded


# ------------------------------------------------------------------ the daemon's lookup
def records() -> list[dict[str, Any]]:
    return [
        {"id": "plain", "schedule": "15 3 * * *", "command": ["true"]},
        {"id": "zoned", "schedule": "0 9 * * 1-5", "timezone": "Europe/Berlin", "command": "x"},
        {"id": "every", "schedule": "every 90m", "command": ["true"], "jitter": "30s"},
        {"id": "off", "schedule": "0 0 1 1 *", "command": ["true"], "enabled": False},
        {"id": "bad", "schedule": "61 * * * *", "command": ["true"]},
    ]


def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    config = tmp_path / "chronosd.toml"
    token = write_private(tmp_path / "token", "t0ken\n")
    write_private(
        config,
        toml_config(
            jobs=tmp_path / "jobs.json",
            state_dir=tmp_path / "state",
            extra='on_invalid_job = "skip"',
            provider={"kind": "nas"},
            nas={
                "url": "http://127.0.0.1:9",
                "callback_url": "http://127.0.0.1:9",
                "token_file": str(token),
            },
            auth={"mode": "hmac", "hmac_secret_file": str(token)},
        ),
    )
    return Daemon(load_config(config_path=config), RunOptions(config))


def test_the_lookup_of_one_job_gives_what_loading_the_file_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replace_atomically(tmp_path / "jobs.json", jobs_text(records()))
    subject = daemon(tmp_path, monkeypatch)
    assert subject.load_jobs(startup=True)
    loaded = dict(subject.engine.jobs)
    assert sorted(loaded) == ["every", "off", "plain", "zoned"]  # "bad" skipped
    for job_id in [*loaded, "bad", "missing"]:
        job = subject._deferred_job(job_id)
        assert job == loaded.get(job_id)
        if job is not None:
            assert job.spec_hash == loaded[job_id].spec_hash
            assert dict(job.record) == dict(loaded[job_id].record)
    subject.db.close()


def test_the_lookup_refuses_a_file_other_than_the_one_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replace_atomically(tmp_path / "jobs.json", jobs_text(records()))
    subject = daemon(tmp_path, monkeypatch)
    assert subject.load_jobs(startup=True)
    edited = records()
    edited[0]["schedule"] = "16 3 * * *"
    replace_atomically(tmp_path / "jobs.json", json.dumps({"jobs": edited}))
    with pytest.raises(JobsFileError, match="changed since the start-up"):
        subject._deferred_job("plain")
    subject.db.close()
