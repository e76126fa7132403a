"""The job table of a settled start-up: one job looked up alone, the whole file when needed.

DeferredJobs with plain callables for its rules, and a real Daemon (NAS provider configured but
never called, real state.db and jobs.json in tmp_path) for the lookup of one job: what it gives
must be what loading the whole file gives.
"""

from __future__ import annotations

import dataclasses
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
            raise JobsFileError("jobs.json changed since it was applied")
        return self.jobs.get(job_id)

    def load(self) -> dict[str, Job]:
        self.loads += 1
        return dict(self.jobs)

    def table(self) -> DeferredJobs:
        return DeferredJobs(self.load, self.lookup, digest="0" * 64, count=len(self.jobs), active=1)


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


def loaded_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """A daemon that loaded records() as a start-up does."""
    replace_atomically(tmp_path / "jobs.json", jobs_text(records()))
    subject = daemon(tmp_path, monkeypatch)
    assert subject.load_jobs(startup=True)
    return subject


def test_the_lookup_of_one_job_gives_what_loading_the_file_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = loaded_daemon(tmp_path, monkeypatch)
    loaded = dict(subject.engine.jobs)
    assert sorted(loaded) == ["every", "off", "plain", "zoned"]  # "bad" skipped
    for job_id in [*loaded, "bad", "missing"]:
        job = subject._deferred_job(subject.jobs_digest or "", job_id)
        assert job == loaded.get(job_id)
        if job is not None:
            assert job.spec_hash == loaded[job_id].spec_hash
            assert dict(job.record) == dict(loaded[job_id].record)
    subject.db.close()


def test_the_lookup_refuses_a_file_other_than_the_one_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = loaded_daemon(tmp_path, monkeypatch)
    edited = records()
    edited[0]["schedule"] = "16 3 * * *"
    replace_atomically(tmp_path / "jobs.json", json.dumps({"jobs": edited}))
    with pytest.raises(JobsFileError, match="changed since it was applied"):
        subject._deferred_job(subject.jobs_digest or "", "plain")
    subject.db.close()


# ------------------------------------------------------------------ an edit at start-up
def settle(subject: Daemon, *, layout: bool = True) -> None:
    """What a clean exit with every arm confirmed leaves: the mark (arms are not our subject),
    and the applied text's layout unless *layout* is False (as a chronosd before it left)."""
    subject.reconciler._pending.clear()
    assert subject.reconciler.settled
    if layout:
        subject._save_layout()
    subject._save_settled()
    subject.db.close()


@pytest.mark.parametrize("layout", [True, False])
def test_an_edit_applied_by_its_changed_records_leaves_what_a_full_load_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: bool
) -> None:
    before = [*records(), *({"id": f"n{i}", "schedule": f"{i} 5 * * *"} for i in range(40))]
    for record in before[5:]:
        record["command"] = ["true"]
    after = [dict(record) for record in before]
    after[0]["schedule"] = "16 3 * * *"  # rescheduled
    after[1]["command"] = "y"  # edited
    after[2]["schedule"] = "every 0s"  # made invalid: skipped, so it leaves
    del after[10]  # removed
    after.append({"id": "new", "schedule": "0 6 * * *", "command": ["true"]})  # added
    subjects = {}
    for name in ("edit", "full"):
        root = tmp_path / name
        root.mkdir()
        replace_atomically(root / "jobs.json", jobs_text(before))
        first = daemon(root, monkeypatch)
        assert first.load_jobs(startup=True)
        settle(first, layout=layout)
        replace_atomically(root / "jobs.json", jobs_text(after))
        subjects[name] = daemon(root, monkeypatch)
    edit, full = subjects["edit"], subjects["full"]
    if layout:  # the changed part is found from the layout: the files are not compared whole

        def whole(before_text: str) -> None:
            raise AssertionError("compared whole files")

        monkeypatch.setattr(edit, "_compare_whole", whole)
    edit._load_at_startup()
    assert full.load_jobs(startup=True, reconcile_all=False)
    table = edit.engine.jobs
    assert isinstance(table, DeferredJobs) and not table.loaded
    assert len(table) == len(full.engine.jobs) and table.active == sum(
        job.active for job in full.engine.jobs.values()
    )
    assert edit.status_line() == full.status_line()
    assert (
        edit.reconciler._pending
        == full.reconciler._pending
        == {"plain", "zoned", "every", "n5", "new"}
    )
    assert edit.jobs_digest == full.jobs_digest

    def rows(subject: Daemon) -> dict[str, tuple[object, ...]]:
        return {
            job_id: (js.spec_hash, js.schedule_key, js.next_fire is None, js.completed)
            for job_id, js in subject.db.all_jobs().items()
        }

    assert rows(edit) == rows(full)
    assert dict(table) == dict(full.engine.jobs)  # loading the whole file agrees
    for subject in (edit, full):
        subject.db.close()


@pytest.mark.parametrize(
    "edit",
    ["an invalid job", "a repeated id", "a new top-level field", "every job", "a bad file"],
)
def test_an_edit_the_comparison_cannot_decide_gets_the_full_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    many = [
        {"id": f"n{i}", "schedule": f"{i % 60} 5 * * *", "command": ["true"]} for i in range(300)
    ]
    replace_atomically(tmp_path / "jobs.json", jobs_text(many))
    first = daemon(tmp_path, monkeypatch)
    first.config = dataclasses.replace(first.config, on_invalid_job="reject")
    assert first.load_jobs(startup=True)
    settle(first)
    text: str
    if edit == "an invalid job":
        text = jobs_text([*many[:-1], {"id": "n299", "schedule": "61 * * * *"}])
    elif edit == "a repeated id":
        text = jobs_text([*many, many[0]])
    elif edit == "a new top-level field":
        text = json.dumps({"jobs": many, "version": 2})
    elif edit == "every job":
        text = jobs_text([{**record, "command": ["false"]} for record in many])
    else:
        text = '{"jobs": ['
    replace_atomically(tmp_path / "jobs.json", text)
    subject = daemon(tmp_path, monkeypatch)
    subject.config = dataclasses.replace(subject.config, on_invalid_job="reject")
    subject._load_at_startup()
    assert not isinstance(subject.engine.jobs, DeferredJobs)  # the full load ran
    if edit in ("an invalid job", "a repeated id", "a bad file"):
        assert subject.jobs_error  # rejected as a full load rejects it; the last good kept
        assert len(subject.engine.jobs) == 300
    subject.db.close()


def deferred_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Daemon:
    """A daemon whose start-up found the file it applied last (the jobs are deferred)."""
    settle(loaded_daemon(tmp_path, monkeypatch))
    subject = daemon(tmp_path, monkeypatch)
    subject._load_at_startup()
    assert isinstance(subject.engine.jobs, DeferredJobs)
    return subject


def test_an_edit_while_deferred_is_applied_by_its_changed_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = deferred_start(tmp_path, monkeypatch)
    assert subject.engine.jobs["plain"].schedule_text == "15 3 * * *"  # a point lookup
    for minute in (16, 17):  # twice: the second compares with the first edit
        edited = records()
        edited[0]["schedule"] = f"{minute} 3 * * *"
        replace_atomically(tmp_path / "jobs.json", jobs_text(edited))
        assert subject.load_jobs()  # what the watcher calls
        table = subject.engine.jobs
        assert isinstance(table, DeferredJobs) and not table.loaded
        assert subject.reconciler._pending >= {"plain"}
        assert table["plain"].schedule_text == f"{minute} 3 * * *"
        assert table["zoned"].timezone == "Europe/Berlin"  # unchanged: looked up in the new file
        state = subject.db.get_job("plain")
        assert state is not None and state.spec_hash == table["plain"].spec_hash
    subject.db.close()


def test_a_rejected_edit_while_deferred_keeps_the_applied_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = deferred_start(tmp_path, monkeypatch)
    broken = records()
    broken[0]["schedule"] = "16 3 * * *"
    broken.append(broken[1])  # a repeated id: the whole file is refused
    replace_atomically(tmp_path / "jobs.json", jobs_text(broken))
    assert not subject.load_jobs()
    assert subject.jobs_error and "zoned" in subject.jobs_error
    # A lookup now must not read the refused file: the applied jobs are what counts.
    assert subject.engine.jobs["plain"].schedule_text == "15 3 * * *"
    assert subject.db.get_job("plain") is not None
    subject.db.close()


def test_an_edit_that_only_changes_a_value_s_json_type_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # false == 0 and 1 == 1.0 in Python: the comparison must still see these edits.
    subject = deferred_start(tmp_path, monkeypatch)
    edited = records()
    assert edited[3]["id"] == "off" and edited[3]["enabled"] is False
    edited[3]["enabled"] = 0  # not a boolean: the job is invalid now (skipped)
    replace_atomically(tmp_path / "jobs.json", jobs_text(edited))
    assert subject.load_jobs()
    table = subject.engine.jobs
    assert isinstance(table, DeferredJobs) and not table.loaded
    assert "off" not in table
    assert "off" in subject.reconciler._pending
    assert subject.db.get_job("off") is not None  # until the reconciler cancels and forgets it
    subject.db.close()
