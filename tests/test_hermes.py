from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chronosd.jobs import hermes
from chronosd.jobs.file import read_jobs_file
from chronosd.jobs.model import Job
from chronosd.jobs.validate import JobDefaults, Validated, validate_document

NOW = datetime(2025, 5, 5, 12, 0, 0, tzinfo=UTC)
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hermes-jobs.json"


def hermes_job(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": "a1b2c3d4e5f6",
        "name": "Check the news",
        "prompt": "Summarise the news",
        "schedule": {"kind": "cron", "expr": "0 9 * * *", "display": "0 9 * * *"},
        "schedule_display": "0 9 * * *",
        "repeat": {"times": None, "completed": 0},
        "enabled": True,
        "state": "scheduled",
        "created_at": "2025-05-01T08:00:00+00:00",
        "next_run_at": "2025-05-06T09:00:00+00:00",
        "last_run_at": None,
        "last_status": None,
        "last_error": None,
        "deliver": "origin",
        "origin": {"platform": "telegram", "chat_id": "42"},
    }
    record.update(fields)
    return record


def check(*records: object) -> Validated:
    return validate_document(
        {"jobs": list(records), "updated_at": "2025-05-05T11:00:00+00:00"},
        defaults=JobDefaults(timezone="Europe/Berlin"),
        now=NOW,
    )


def one(**fields: Any) -> Job:
    result = check(hermes_job(**fields))
    assert result.problems == (), [str(p) for p in result.problems]
    (job,) = result.jobs
    return job


def test_example_hermes_file_loads_without_problems(tmp_path: Path) -> None:
    copy = tmp_path / "jobs.json"
    shutil.copyfile(EXAMPLE, copy)
    copy.chmod(0o600)
    loaded = read_jobs_file(copy, defaults=JobDefaults(), now=NOW)
    assert loaded.problems == ()
    jobs = {job.id: job for job in loaded.jobs}
    assert list(jobs) == ["3f9a1c7e52b4", "b71e04d2a9c3", "0c55d8e61f27", "e2d4a90b6c18"]

    briefing = jobs["3f9a1c7e52b4"]
    assert briefing.schedule_text == "0 7 * * 1-5"
    assert briefing.schedule.kind == "cron"
    assert briefing.timezone == "Europe/London"
    assert briefing.command is None
    assert briefing.active
    assert briefing.repeat is None
    assert briefing.record["prompt"].startswith("Summarise overnight email")

    status = jobs["b71e04d2a9c3"]
    assert status.schedule_text == "every 30m"
    assert status.schedule.interval == 1800.0

    weekly = jobs["0c55d8e61f27"]
    assert weekly.paused and not weekly.enabled
    assert weekly.repeat == 12

    reminder = jobs["e2d4a90b6c18"]
    assert reminder.schedule.kind == "at"
    assert reminder.schedule.at == datetime(2031, 6, 1, 9, 0, tzinfo=UTC)
    assert reminder.repeat == 1


def test_cron_object_becomes_its_expression() -> None:
    job = one(schedule={"kind": "cron", "expr": "*/10 * * * *"})
    assert job.schedule_text == "*/10 * * * *"
    assert job.schedule.kind == "cron"


@pytest.mark.parametrize(
    ("minutes", "text"), [(30, "every 30m"), (90, "every 1h30m"), (1, "every 1m")]
)
def test_interval_object_becomes_every(minutes: int, text: str) -> None:
    job = one(schedule={"kind": "interval", "minutes": minutes, "display": f"every {minutes}m"})
    assert job.schedule_text == text
    assert job.schedule.interval == minutes * 60.0


def test_once_object_becomes_at_and_a_naive_time_is_read_in_the_job_zone() -> None:
    job = one(schedule={"kind": "once", "run_at": "2030-01-01T09:00:00"}, timezone="Asia/Tokyo")
    assert job.schedule_text == "at 2030-01-01T09:00:00"
    assert job.schedule.at == datetime(2030, 1, 1, 0, 0, tzinfo=UTC)
    assert job.repeat == 1


def test_a_hermes_job_without_timezone_uses_the_configured_zone() -> None:
    assert one(timezone=None).timezone == "Europe/Berlin"


def test_state_paused_maps_to_paused() -> None:
    job = one(state="paused", enabled=False)
    assert job.paused and not job.enabled and not job.active


def test_an_explicit_paused_field_wins_over_hermes_state() -> None:
    # chronosd resume writes "paused": false; Hermes' stale state must not undo it.
    assert not one(state="paused", paused=False).paused
    assert one(state="scheduled", paused=True).paused


@pytest.mark.parametrize(("times", "repeat"), [(None, None), (3, 3), (1, 1), (0, None)])
def test_repeat_times_maps_to_repeat_and_completed_is_ignored(
    times: int | None, repeat: int | None
) -> None:
    assert one(repeat={"times": times, "completed": 2}).repeat == repeat


def test_runtime_and_agent_fields_are_ignored_without_warnings() -> None:
    job = one(
        paused_at="2025-05-01T00:00:00Z",
        paused_reason="holiday",
        last_delivery_error="timeout",
        skills=["web"],
        model="hermes-4",
        enabled_toolsets=["web"],
        workdir="/home/x",
        fire_claim={"by": "host:1"},
    )
    assert job.record["skills"] == ["web"]


def test_hermes_record_still_warns_about_keys_that_belong_to_no_one() -> None:
    result = check(hermes_job(timout="5m"))
    assert result.ok
    assert [(p.field, p.severity) for p in result.warnings] == [("timout", "warning")]
    assert 'did you mean "timeout"' in result.warnings[0].message


def test_native_fields_in_a_hermes_record_are_honoured() -> None:
    job = one(command=["echo", "hi"], timeout="5m", retries=2)
    assert job.command == ("echo", "hi")
    assert (job.timeout, job.retries) == (300.0, 2)


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ({"kind": "daily", "time": "09:00"}, "not one of cron, interval, once"),
        ({"expr": "0 9 * * *"}, "not one of cron, interval, once"),
        ({"kind": "cron"}, '"expr"'),
        ({"kind": "cron", "expr": 5}, '"expr"'),
        ({"kind": "interval", "minutes": 0}, '"minutes"'),
        ({"kind": "interval", "minutes": "30"}, '"minutes"'),
        ({"kind": "interval", "minutes": True}, '"minutes"'),
        ({"kind": "once"}, '"run_at"'),
        ({"kind": "once", "run_at": ""}, '"run_at"'),
    ],
)
def test_unusable_schedule_objects_give_one_schedule_error(
    schedule: dict[str, Any], words: str
) -> None:
    result = check(hermes_job(schedule=schedule))
    assert [(p.where, p.field) for p in result.errors] == [("a1b2c3d4e5f6", "schedule")]
    assert words in result.errors[0].message
    assert result.jobs == ()


def test_a_bad_cron_expression_in_an_object_is_reported_by_the_schedule_parser() -> None:
    result = check(hermes_job(schedule={"kind": "cron", "expr": "61 * * * *"}))
    assert [p.field for p in result.errors] == ["schedule"]


@pytest.mark.parametrize("times", [-1, "3", 2.5, True])
def test_bad_repeat_times_is_an_error(times: object) -> None:
    result = check(hermes_job(repeat={"times": times, "completed": 0}))
    assert [p.field for p in result.errors] == ["repeat"]


def test_once_in_the_past_of_an_active_job_is_an_error_but_not_when_paused() -> None:
    past = {"kind": "once", "run_at": "2025-05-04T12:00:00+00:00"}
    result = check(hermes_job(schedule=past))
    assert [p.field for p in result.errors] == ["schedule"]
    assert "in the past by 1d" in result.errors[0].message
    assert one(schedule=past, state="paused").paused


def test_hermes_ids_and_job_names_pass_through() -> None:
    job = one(id="0123456789ab", name="Daily digest")
    assert (job.id, job.name) == ("0123456789ab", "Daily digest")


def test_schedule_text_renders_each_kind() -> None:
    assert hermes.schedule_text({"kind": "cron", "expr": " 0 9 * * * "}) == "0 9 * * *"
    assert hermes.schedule_text({"kind": "interval", "minutes": 1440}) == "every 1d"
    assert hermes.schedule_text({"kind": "interval", "minutes": 0.5}) == "every 30s"
    assert hermes.schedule_text({"kind": "once", "run_at": "2030-01-01T00:00:00Z"}) == (
        "at 2030-01-01T00:00:00Z"
    )


def test_native_records_are_not_taken_for_hermes_ones() -> None:
    assert not hermes.is_hermes_record({"id": "x", "schedule": "every 1m", "state": "paused"})
    assert hermes.is_hermes_record({"id": "x", "schedule": {"kind": "cron"}})
    assert hermes.is_hermes_record({"id": "x", "schedule": "every 1m", "repeat": {"times": 1}})


def test_hermes_and_native_records_mix_in_one_file() -> None:
    result = check(hermes_job(), {"id": "native", "schedule": "every 5m", "command": ["true"]})
    assert result.problems == ()
    assert [j.id for j in result.jobs] == ["a1b2c3d4e5f6", "native"]


def test_the_same_schedule_hashes_alike_in_both_forms() -> None:
    from_hermes = one(schedule={"kind": "interval", "minutes": 30})
    native = check(
        {"id": "a1b2c3d4e5f6", "schedule": "every 30m", "timezone": "Europe/Berlin"}
    ).jobs[0]
    assert from_hermes.spec_hash == native.spec_hash


def test_example_file_is_json_with_hermes_shapes() -> None:
    doc = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    kinds = {job["schedule"]["kind"] for job in doc["jobs"]}
    assert kinds == {"cron", "interval", "once"}
