"""The command line as INTERFACE.md describes it.

Most tests call ``chronosd.cli.main`` in-process (fast); exit statuses that a
shell sees, one-line errors, concurrency, the daemon and start-up cost use real
``python -m chronosd`` subprocesses. Every test keeps jobs.json, the state
directory, HOME and the config file inside tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.cli import main
from chronosd.jobs.validate import JobDefaults, schedule_key, validate_job
from chronosd.state import JobState, RunRecord, StateDB, owner_token
from chronosd.timefmt import parse_instant, to_wire

WAIT = 30.0

LIST_FIELDS = {
    "id",
    "schedule",
    "timezone",
    "state",
    "next_fire",
    "next_fire_local",
    "next_fire_relative",
    "last_status",
    "armed",
}
STATUS_FIELDS = {
    "provider",
    "daemon",
    "last_reconcile_at",
    "last_reconcile_error",
    "unarmed",
    "jobs_valid",
    "jobs_error",
    "running",
    "healthy",
}


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Setup:
    tmp: Path
    jobs: Path
    state: Path
    env: dict[str, str]

    def base(self) -> list[str]:
        return ["--jobs", str(self.jobs), "--state-dir", str(self.state)]


def write_jobs(path: Path, records: list[dict[str, Any]], mode: int = 0o600) -> None:
    path.write_text(json.dumps({"jobs": records}, indent=2) + "\n")
    path.chmod(mode)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "chronosd.toml"
    config.write_text("")
    for name in list(os.environ):
        if name.startswith("CHRONOSD_") or name in ("STATE_DIRECTORY", "TZ"):
            monkeypatch.delenv(name)
    # An explicit (empty) config file: neither /etc nor the real home is consulted.
    monkeypatch.setenv("CHRONOSD_CONFIG", str(config))
    monkeypatch.setenv("HOME", str(home))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONOSD_")}
    env.pop("STATE_DIRECTORY", None)
    env.update(HOME=str(home), CHRONOSD_CONFIG=str(config))
    return Setup(tmp_path, tmp_path / "jobs.json", tmp_path / "state", env)


@pytest.fixture
def cli(setup: Setup, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """chronosd in-process, with --jobs and --state-dir of the test."""

    def call(*args: str, base: bool = True) -> Result:
        capsys.readouterr()
        code = main([*(setup.base() if base else []), *args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return call


@pytest.fixture
def sub(setup: Setup) -> Callable[..., Result]:
    """chronosd as a real process (``python -m chronosd``)."""

    def call(*args: str, base: bool = True) -> Result:
        done = subprocess.run(
            [sys.executable, "-m", "chronosd", *(setup.base() if base else []), *args],
            capture_output=True,
            text=True,
            timeout=WAIT,
            env=setup.env,
            check=False,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    return call


def assert_one_line_error(result: Result, prefix: str) -> None:
    assert result.err.endswith("\n")
    assert result.err.count("\n") == 1, result.err
    assert result.err.startswith(f"chronosd: {prefix}"), result.err
    assert "Traceback" not in result.err


SAMPLE = [
    {"id": "tick", "schedule": "every 10m", "command": ["true"]},
    {
        "id": "london",
        "schedule": "30 1 * * *",
        "timezone": "Europe/London",
        "command": "echo london",
    },
    {"id": "held", "schedule": "@daily", "command": ["true"], "paused": True},
    {"id": "off", "schedule": "@hourly", "command": ["true"], "enabled": False},
]


# ---------------------------------------------------------------------- validate
def test_validate_a_valid_file_exits_0(setup: Setup, cli: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = cli("validate")
    assert result.code == 0
    assert "valid: 4 job(s)" in result.out
    doc = cli("validate", "--json").json()
    assert doc["valid"] is True and doc["jobs"] == 4 and doc["errors"] == []


def test_validate_prints_every_error_with_job_and_field_and_exits_1(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    bad = setup.tmp / "bad.json"
    write_jobs(
        bad,
        [
            {"id": "a", "schedule": "30m", "command": "x"},
            {"id": "b", "schedule": "* * * * *", "timeout": "zz"},
            {"schedule": "* * * * *"},
        ],
    )
    result = cli("validate", str(bad))
    assert result.code == 1
    assert 'job a: schedule: "30m" is ambiguous' in result.err
    assert "job b: timeout: duration 'zz'" in result.err
    assert "job jobs[2]: id: is missing" in result.err
    assert "3 error(s)" in result.err
    doc = cli("validate", str(bad), "--json").json()
    assert doc["valid"] is False
    assert [(e["job"], e["field"]) for e in doc["errors"]] == [
        ("a", "schedule"),
        ("b", "timeout"),
        ("jobs[2]", "id"),
    ]


def test_validate_of_broken_json_exits_1_with_the_position(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    setup.jobs.write_text('{"jobs": [\n')
    setup.jobs.chmod(0o600)
    result = cli("validate")
    assert result.code == 1
    assert "invalid JSON at line 2" in result.err


@pytest.mark.parametrize("target", ["missing.json", "."])
def test_validate_of_an_unreadable_file_exits_2(
    setup: Setup, cli: Callable[..., Result], sub: Callable[..., Result], target: str
) -> None:
    path = str(setup.tmp / target)
    result = sub("validate", path)
    assert result.code == 2
    assert_one_line_error(result, "jobs.json ")
    doc = cli("validate", path, "--json")
    assert doc.code == 2
    assert doc.json()["valid"] is False
    assert doc.json()["errors"][0]["message"].startswith("jobs.json ")


def test_validate_refuses_a_group_writable_jobs_file_but_checks_a_draft_by_content(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE, mode=0o620)
    result = cli("validate")
    assert result.code == 1
    assert "chmod go-w" in result.err
    draft = setup.tmp / "draft.json"
    write_jobs(draft, SAMPLE, mode=0o666)
    assert cli("validate", str(draft)).code == 0


# ---------------------------------------------------------------------- list
def test_list_without_state_touches_no_state_directory(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    for args in (
        ["list"],
        ["list", "--json"],
        ["next", "tick"],
        ["status"],
        ["runs"],
        ["logs", "tick"],
        ["validate"],
    ):
        cli(*args)
    assert not setup.state.exists()
    assert not (setup.tmp / "home" / ".local").exists()


def test_list_table_is_aligned_and_shows_every_column(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = cli("list")
    assert result.code == 0
    header, *rows = result.out.rstrip("\n").split("\n")
    names = ["ID", "SCHEDULE", "TIMEZONE", "STATE", "NEXT FIRE", "LAST RUN", "ARMED"]
    starts = [header.index(name) for name in names]
    assert starts == sorted(starts)
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {"tick", "london", "held", "off"}
    expected = {
        "tick": ["tick", "every 10m", "UTC", "active"],
        "london": ["london", "30 1 * * *", "Europe/London", "active"],
        "held": ["held", "@daily", "UTC", "paused"],
        "off": ["off", "@hourly", "UTC", "disabled"],
    }
    for job_id, row in by_id.items():
        cells = [row[start:].split("  ")[0].strip() for start in starts]
        assert cells[:4] == expected[job_id], row
        assert cells[5] == "-"  # no run yet
        assert cells[6] == "no"
    # Local time in the job's own zone, then the relative form, in aligned columns.
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (GMT|BST) +in \S+", by_id["london"][starts[4] :]
    )
    assert by_id["held"][starts[4] :].startswith("-")


def test_list_json_has_the_interface_fields(setup: Setup, cli: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    before = datetime.now(UTC).replace(microsecond=0)
    rows = cli("list", "--json").json()
    after = datetime.now(UTC)
    assert isinstance(rows, list) and len(rows) == 4
    for row in rows:
        assert set(row) >= LIST_FIELDS
    tick = next(r for r in rows if r["id"] == "tick")
    nxt = parse_instant(tick["next_fire"])
    assert before + timedelta(minutes=10) <= nxt <= after + timedelta(minutes=10)
    assert tick["next_fire_relative"].startswith("in ")
    assert tick["next_fire_local"].endswith("UTC")
    assert tick["armed"] is False and tick["last_status"] is None
    held = next(r for r in rows if r["id"] == "held")
    assert held["state"] == "paused" and held["next_fire"] is None


def _job_state(record: dict[str, Any], now: datetime, **fields: Any) -> JobState:
    job, problems = validate_job(record, 0, defaults=JobDefaults(), now=now)
    assert job is not None, problems
    values: dict[str, Any] = {
        "job_id": job.id,
        "spec_hash": job.spec_hash,
        "schedule_key": schedule_key(job),
        "anchor": now,
        "next_fire": None,
        "armed_fire": None,
        "armed_confirmed_at": None,
        "runs_started": 0,
        "last_run_id": None,
        "last_status": None,
        "completed": False,
    }
    values.update(fields)
    return JobState(**values)


def test_list_reads_state_written_by_statedb(setup: Setup, cli: Callable[..., Result]) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    past = now - timedelta(hours=2)
    once = {"id": "once", "schedule": f"at {to_wire(past + timedelta(minutes=5))}"}
    tick = {"id": "tick", "schedule": "every 10m", "command": ["true"]}
    write_jobs(setup.jobs, [tick, once])
    planned = now + timedelta(minutes=3)
    with StateDB.open(setup.state) as db:
        db.put_job(
            _job_state(
                tick,
                past,
                next_fire=planned,
                armed_fire=planned,
                armed_confirmed_at=now,
                runs_started=4,
                last_run_id="r4",
                last_status="failed",
            )
        )
        db.put_job(_job_state(once, past, runs_started=1, last_status="ok", completed=True))
    rows = {r["id"]: r for r in cli("list", "--json").json()}
    assert rows["tick"]["next_fire"] == to_wire(planned)
    assert rows["tick"]["last_status"] == "failed"
    # Local provider and no daemon alive: its timers died with it.
    assert rows["tick"]["armed"] is False
    assert rows["once"]["state"] == "completed"
    assert rows["once"]["next_fire"] is None
    assert rows["once"]["last_status"] == "ok"

    with StateDB.open(setup.state) as db:
        daemon = {"owner": owner_token(), "pid": os.getpid(), "started": to_wire(now)}
        db.set_meta("daemon", json.dumps(daemon))
    rows = {r["id"]: r for r in cli("list", "--json").json()}
    assert rows["tick"]["armed"] is True
    tick_row = next(line for line in cli("list").out.splitlines() if line.startswith("tick "))
    assert tick_row.rstrip().endswith("yes")
    status = cli("status", "--json")
    assert status.code == 0, status.json()
    assert status.json()["daemon"]["pid"] == os.getpid()


@pytest.fixture
def daemon(setup: Setup) -> Iterator[subprocess.Popen[bytes]]:
    """``chronosd run`` with the local provider on a free loopback port."""
    log = (setup.tmp / "daemon.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronosd",
            *setup.base(),
            "run",
            "--listen",
            "127.0.0.1:0",
            "--provider",
            "local",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=setup.env,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=WAIT)
        log.close()


def test_list_and_status_follow_a_real_daemon(
    setup: Setup, cli: Callable[..., Result], daemon: subprocess.Popen[bytes]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    active = {"tick", "london"}
    deadline = time.monotonic() + WAIT
    while True:
        assert daemon.poll() is None, (setup.tmp / "daemon.log").read_text()
        if (setup.state / "state.db").exists():
            rows = {r["id"]: r for r in cli("list", "--json").json()}
            if all(rows[j]["armed"] for j in active):
                break
        assert time.monotonic() < deadline, "the daemon did not arm the jobs"
        time.sleep(0.1)
    assert not rows["held"]["armed"] and not rows["off"]["armed"]
    assert rows["tick"]["next_fire"] == rows["tick"]["armed_fire"]
    status = cli("status", "--json")
    assert status.code == 0, status.out
    info = status.json()
    assert info["healthy"] is True and info["unarmed"] == []
    assert info["daemon"]["pid"] == daemon.pid
    assert info["last_reconcile_at"] is not None

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=WAIT) == 0
    rows = {r["id"]: r for r in cli("list", "--json").json()}
    assert not any(r["armed"] for r in rows.values())
    after = cli("status", "--json")
    assert after.code == 1
    assert after.json()["daemon"] is None
    assert sorted(after.json()["unarmed"]) == sorted(active)


# ---------------------------------------------------------------------- next
def test_next_shows_dst_correct_instants_in_the_zone_and_utc(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = cli("next", "london", "-n", "3", "--after", "2026-03-28T00:00:00Z", "--json")
    assert result.code == 0
    doc = result.json()
    assert isinstance(doc, list) and len(doc) == 3
    assert {(r["job"], r["timezone"]) for r in doc} == {("london", "Europe/London")}
    # 01:30 does not exist on 29 March (clocks jump 01:00 GMT -> 02:00 BST): a
    # fixed-time job fires once, at the first instant after the gap.
    assert [r["utc"] for r in doc] == [
        "2026-03-28T01:30:00+00:00",
        "2026-03-29T01:00:00+00:00",
        "2026-03-30T00:30:00+00:00",
    ]
    assert [r["local"] for r in doc] == [
        "2026-03-28 01:30:00 GMT",
        "2026-03-29 02:00:00 BST",
        "2026-03-30 01:30:00 BST",
    ]
    assert doc[2]["local_iso"] == "2026-03-30T01:30:00+01:00"
    table = cli("next", "london", "-n", "3", "--after", "2026-03-28T00:00:00Z")
    lines = table.out.splitlines()
    assert lines[0].split() == ["EUROPE/LONDON", "UTC"]
    assert lines[2].split() == ["2026-03-29", "02:00:00", "BST", "2026-03-29T01:00:00+00:00"]


def test_next_reads_a_naive_after_in_the_jobs_zone(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    # 2026-06-01T01:00 London is 00:00 UTC; 01:30 BST that night is 00:30 UTC.
    doc = cli("next", "london", "-n", "1", "--after", "2026-06-01T01:00:00", "--json").json()
    assert doc[0]["utc"] == "2026-06-01T00:30:00+00:00"


def test_next_of_an_unknown_job_exits_1(setup: Setup, sub: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = sub("next", "nope")
    assert result.code == 1
    assert_one_line_error(result, "job 'nope': not in jobs.json")


def test_next_with_a_bad_after_is_a_usage_error(setup: Setup, cli: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = cli("next", "tick", "--after", "yesterday")
    assert result.code == 2
    assert result.err.startswith("chronosd: next: --after 'yesterday': not an ISO-8601 time")


# ---------------------------------------------------------------------- add
def test_add_in_duration_writes_an_absolute_at(setup: Setup, cli: Callable[..., Result]) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    result = cli("add", "soon", "--schedule", "in 10m", "--command", "echo hi")
    after = datetime.now(UTC)
    assert result.code == 0, result.err
    (record,) = json.loads(setup.jobs.read_text())["jobs"]
    assert record["schedule"].startswith("at ")
    instant = parse_instant(record["schedule"][3:])
    assert before + timedelta(minutes=10) <= instant <= after + timedelta(minutes=10)
    assert record["command"] == "echo hi"
    assert stat.S_IMODE(setup.jobs.stat().st_mode) == 0o600
    assert cli("validate").code == 0


def test_add_with_argv_after_double_dash_writes_a_list(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    # Global options after the sub-command; the job's own "--json" stays in its argv.
    result = cli(
        "add",
        "argv",
        "--schedule",
        "*/5 * * * *",
        "--timezone",
        "Europe/Paris",
        "--timeout",
        "90s",
        "--jobs",
        str(setup.jobs),
        "--json",
        "--",
        "printf",
        "%s\n",
        "--json",
        base=False,
    )
    assert result.code == 0, result.err
    assert result.json()["added"]["id"] == "argv"
    (record,) = json.loads(setup.jobs.read_text())["jobs"]
    assert record == {
        "id": "argv",
        "schedule": "*/5 * * * *",
        "timezone": "Europe/Paris",
        "command": ["printf", "%s\n", "--json"],
        "timeout": "90s",
    }


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("30m", 'schedule: "30m" is ambiguous; write "every 30m" or "in 30m"'),
        ("in 10x", "schedule: 'in 10x': duration '10x' is not understood"),
        ("61 * * * *", "schedule: "),
        ("at 2001-01-01T00:00:00Z", "schedule: "),
    ],
)
def test_add_with_an_invalid_schedule_exits_1_and_leaves_the_file_alone(
    setup: Setup, sub: Callable[..., Result], schedule: str, message: str
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    original = setup.jobs.read_bytes()
    result = sub("add", "bad", "--schedule", schedule, "--", "true")
    assert result.code == 1
    assert_one_line_error(result, f"add: job bad: {message}")
    assert setup.jobs.read_bytes() == original


def test_add_of_a_duplicate_id_exits_1_and_leaves_the_file_alone(
    setup: Setup, sub: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    original = setup.jobs.read_bytes()
    result = sub("add", "tick", "--schedule", "@daily", "--", "true")
    assert result.code == 1
    assert_one_line_error(result, "add: job tick: already in jobs.json")
    assert setup.jobs.read_bytes() == original


def test_add_rejects_both_command_forms(setup: Setup, cli: Callable[..., Result]) -> None:
    result = cli("add", "two", "--schedule", "@daily", "--command", "true", "--", "true")
    assert result.code == 1
    assert "either --command or an argv" in result.err
    assert not setup.jobs.exists()


def test_twenty_concurrent_adds_all_land(setup: Setup) -> None:
    write_jobs(setup.jobs, [])
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chronosd",
                *setup.base(),
                "add",
                f"job-{i:02d}",
                "--schedule",
                f"{i} * * * *",
                "--",
                "echo",
                str(i),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=setup.env,
        )
        for i in range(20)
    ]
    errors = []
    for process in processes:
        _, err = process.communicate(timeout=WAIT * 2)
        if process.returncode != 0:
            errors.append(err.decode())
    assert errors == []
    doc = json.loads(setup.jobs.read_text())
    ids = [job["id"] for job in doc["jobs"]]
    assert sorted(ids) == [f"job-{i:02d}" for i in range(20)]
    assert stat.S_IMODE(setup.jobs.stat().st_mode) == 0o600
    assert not list(setup.tmp.glob(".jobs.json.*.tmp"))


# ---------------------------------------------------------------------- edits
ODD_FILE = """{
  "x-owner": "ops",
  "jobs": [
    {
      "schedule": "every 1h",
      "id": "first",
      "x-note": "keep me",
      "command": [
        "true"
      ]
    },
    {
      "id": "second",
      "command": "true",
      "schedule": "@daily"
    }
  ],
  "x-trailer": {
    "b": 1,
    "a": 2
  }
}
"""


def test_edits_keep_unknown_fields_key_order_indentation_and_mode(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    setup.jobs.write_text(ODD_FILE)
    setup.jobs.chmod(0o640)
    assert cli("pause", "first").code == 0
    assert cli("add", "third", "--schedule", "every 5m", "--", "true").code == 0
    assert cli("resume", "first").code == 0
    assert cli("remove", "second").code == 0
    text = setup.jobs.read_text()
    doc = json.loads(text)
    assert list(doc) == ["x-owner", "jobs", "x-trailer"]
    assert list(doc["x-trailer"]) == ["b", "a"]
    first = doc["jobs"][0]
    assert list(first) == ["schedule", "id", "x-note", "command", "paused"]
    assert first["x-note"] == "keep me" and first["paused"] is False
    assert [j["id"] for j in doc["jobs"]] == ["first", "third"]
    assert text == json.dumps(doc, indent=2) + "\n"  # 2-space indentation
    assert stat.S_IMODE(setup.jobs.stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_edits_keep_the_owner_of_the_file(setup: Setup, cli: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    os.chown(setup.jobs, 4242, 4343)
    assert cli("pause", "tick").code == 0
    info = setup.jobs.stat()
    assert (info.st_uid, info.st_gid) == (4242, 4343)
    assert json.loads(setup.jobs.read_text())["jobs"][0]["paused"] is True


def test_pause_resume_remove_change_what_list_shows(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)

    def state_of(job_id: str) -> str | None:
        rows = {r["id"]: r for r in cli("list", "--json").json()}
        return rows[job_id]["state"] if job_id in rows else None

    assert cli("pause", "tick").code == 0
    assert state_of("tick") == "paused"
    assert cli("resume", "tick", "--json").json() == {"resumed": "tick"}
    assert state_of("tick") == "active"
    assert cli("remove", "tick").code == 0
    assert state_of("tick") is None


@pytest.mark.parametrize("action", ["remove", "pause", "resume"])
def test_editing_an_unknown_job_exits_1_and_leaves_the_file_alone(
    setup: Setup, sub: Callable[..., Result], action: str
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    original = setup.jobs.read_bytes()
    result = sub(action, "ghost")
    assert result.code == 1
    assert_one_line_error(result, "job 'ghost': not in jobs.json")
    assert setup.jobs.read_bytes() == original


# ---------------------------------------------------------------------- fire, runs, logs
def test_fire_runs_through_the_claim_path_and_exits_with_the_jobs_status(
    setup: Setup, sub: Callable[..., Result], cli: Callable[..., Result]
) -> None:
    write_jobs(
        setup.jobs,
        [
            *SAMPLE,
            {"id": "three", "schedule": "@daily", "command": "echo out-$CHRONOS_TRIGGER; exit 3"},
        ],
    )
    fired = sub("fire", "three")
    assert fired.code == 3
    assert fired.out == "out-manual\n"
    (run,) = cli("runs", "three", "--json").json()
    assert run["trigger"] == "manual"
    assert run["exit_code"] == 3 and run["status"] == "failed"
    assert run["job"] == "three"
    with StateDB.open(setup.state, read_only=True) as db:
        (occurrence,) = db.occurrences("three")
    assert occurrence.trigger == "manual"
    assert to_wire(occurrence.scheduled_at) == run["occurrence"]

    logs = sub("logs", "three")
    assert logs.code == 0 and logs.out == "out-manual\n"
    by_id = cli("logs", "three", run["run_id"], "--json")
    assert by_id.json()["output"] == "out-manual\n"
    assert by_id.json()["exit_code"] == 3

    as_json = sub("fire", "tick", "--json")
    assert as_json.code == 0
    doc = json.loads(as_json.out)
    assert doc["job"] == "tick" and doc["trigger"] == "manual" and doc["exit_code"] == 0
    assert doc["output"] == ""


def test_runs_lists_newest_first_and_honours_n(
    setup: Setup, sub: Callable[..., Result], cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    assert sub("fire", "london").code == 0
    assert sub("fire", "tick").code == 0
    runs = cli("runs", "--json").json()
    assert [r["job"] for r in runs] == ["tick", "london"]
    assert [r["job"] for r in cli("runs", "-n", "1", "--json").json()] == ["tick"]
    assert [r["job"] for r in cli("runs", "london", "--json").json()] == ["london"]
    table = cli("runs").out.splitlines()
    assert table[0].split() == [
        "RUN",
        "JOB",
        "OCCURRENCE",
        "TRIGGER",
        "STARTED",
        "DURATION",
        "STATUS",
        "EXIT",
    ]
    status_at = table[0].index("STATUS")
    assert [line[status_at:].split()[0] for line in table[1:]] == ["ok", "ok"]
    assert cli("logs", "london").out == "london\n"


def test_logs_of_a_job_without_runs_exits_1(
    setup: Setup, sub: Callable[..., Result], cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = sub("logs", "tick")
    assert result.code == 1
    assert_one_line_error(result, "logs: job tick: no runs recorded")
    assert sub("fire", "london").code == 0  # now there is a state.db, still no run of tick
    assert cli("logs", "tick").code == 1
    assert cli("logs", "london", "20000101T000000Z-00000000").code == 1


def claimed_run(setup: Setup, owner: str | None = None) -> tuple[RunRecord, datetime]:
    """A run of "tick" recorded as a claim records it (not started), and its instant."""
    write_jobs(setup.jobs, SAMPLE)
    now = datetime.now(UTC).replace(microsecond=0)
    with StateDB.open(setup.state, owner=owner) as db:
        run = db.start_run("tick", now, attempt=1, trigger="schedule", now=now)
    return run, now


def test_logs_and_runs_of_a_run_not_started_yet_show_empty_output(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    # A claim records the run and its log path; the runner creates the log when it starts.
    run, _now = claimed_run(setup)
    assert not run.output_path.exists()
    (listed,) = cli("runs", "tick", "--json").json()
    assert (listed["run_id"], listed["status"]) == (run.run_id, "running")
    assert run.run_id in cli("runs").out
    newest = cli("logs", "tick")
    assert (newest.code, newest.out, newest.err) == (0, "", "")
    by_id = cli("logs", "tick", run.run_id, "--json")
    assert by_id.code == 0
    assert by_id.json()["output"] == "" and by_id.json()["status"] == "running"


def test_logs_of_a_run_interrupted_before_it_started_show_empty_output(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    run, now = claimed_run(setup, owner="host:1:dead")
    with StateDB.open(setup.state) as db:
        (interrupted,) = db.recover_interrupted(now=now, is_alive=lambda owner: False)
    assert interrupted.run_id == run.run_id and interrupted.status == "interrupted"
    result = cli("logs", "tick", "--json")
    assert result.code == 0
    assert result.json()["output"] == "" and result.json()["status"] == "interrupted"


def test_logs_of_a_started_run_whose_log_was_deleted_still_exits_1(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    run, now = claimed_run(setup)
    with StateDB.open(setup.state) as db:
        db.set_run_pid(run.run_id, 4321, started_at=now)  # it started: it had a log
        db.finish_run(run.run_id, status="ok", exit_code=0, now=now, output_bytes=3)
    result = cli("logs", "tick")
    assert result.code == 1
    assert_one_line_error(result, f"logs: job tick: run {run.run_id}: its output is gone")


def test_fire_of_an_unknown_job_exits_1(setup: Setup, sub: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = sub("fire", "ghost")
    assert result.code == 1
    assert_one_line_error(result, "job 'ghost': not in jobs.json")


# ---------------------------------------------------------------------- status
def test_status_without_state_is_degraded_and_exits_1(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    result = cli("status", "--json")
    assert result.code == 1
    info = result.json()
    assert set(info) >= STATUS_FIELDS
    assert info["healthy"] is False
    assert info["provider"] == "local"
    assert info["daemon"] is None
    assert info["jobs_valid"] is True
    assert sorted(info["unarmed"]) == ["london", "tick"]
    assert info["running"] == []
    assert info["last_reconcile_at"] is None and info["last_reconcile_error"] is None
    text = cli("status")
    assert text.code == 1
    assert "unarmed jobs:    tick, london" in text.out
    assert "degraded" in text.out
    assert not setup.state.exists()


def test_status_reports_an_invalid_jobs_file(setup: Setup, cli: Callable[..., Result]) -> None:
    write_jobs(setup.jobs, [{"id": "a", "schedule": "30m", "command": "x"}])
    result = cli("status", "--json")
    assert result.code == 1
    info = result.json()
    assert info["jobs_valid"] is False
    assert '"30m" is ambiguous' in info["jobs_error"]
    assert "jobs.json is invalid" in info["problems"]
    assert "INVALID" in cli("status").out


def test_status_reports_the_last_reconcile_error_and_running_jobs(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    now = datetime.now(UTC).replace(microsecond=0)
    with StateDB.open(setup.state) as db:
        db.set_meta("last_reconcile_at", "2026-03-01T00:00:00+00:00")
        db.set_meta("last_reconcile_error", "NAS answered 503")
        run = db.start_run("tick", now, attempt=1, trigger="schedule", now=now)
        db.set_run_pid(run.run_id, 4321)
    result = cli("status", "--json")
    assert result.code == 1
    info = result.json()
    assert info["last_reconcile_at"] == "2026-03-01T00:00:00+00:00"
    assert info["last_reconcile_error"] == "NAS answered 503"
    assert "last reconcile failed" in info["problems"]
    assert info["running"] == [
        {"job": "tick", "run_id": run.run_id, "pid": 4321, "started": to_wire(now)}
    ]
    text = cli("status").out
    assert "reconcile error: NAS answered 503" in text
    assert "running:         tick (pid 4321)" in text


# ---------------------------------------------------------------------- errors and options
def test_global_options_work_before_and_after_the_sub_command(
    setup: Setup, cli: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    jobs, state = str(setup.jobs), str(setup.state)
    before = cli("--json", "--jobs", jobs, "--state-dir", state, "list", base=False)
    after = cli("list", "--jobs", jobs, "--state-dir", state, "--json", base=False)
    mixed = cli("--jobs", jobs, "list", "--json", base=False)
    assert before.code == after.code == mixed.code == 0
    assert [r["id"] for r in before.json()] == [r["id"] for r in after.json()]
    assert [r["id"] for r in mixed.json()] == [r["id"] for r in after.json()]


@pytest.mark.parametrize(
    ("args", "code", "prefix"),
    [
        (["list"], 1, "jobs.json "),  # jobs.json missing
        (["add", "x"], 2, "add: the following arguments are required: --schedule"),
        (["list", "--bogus"], 2, "list: unrecognized arguments: --bogus"),
        (["runs", "-n", "0"], 2, "runs: argument -n"),
        (["--config", "/nonexistent/chronosd.toml", "list"], 1, "config "),
    ],
)
def test_errors_are_one_line_on_stderr_without_traceback(
    setup: Setup, sub: Callable[..., Result], args: list[str], code: int, prefix: str
) -> None:
    result = sub(*args)
    assert result.code == code
    assert result.out == ""
    assert_one_line_error(result, prefix)


def test_a_broken_state_database_is_one_line_and_debug_shows_the_traceback(
    setup: Setup, sub: Callable[..., Result]
) -> None:
    write_jobs(setup.jobs, SAMPLE)
    setup.state.mkdir()
    (setup.state / "state.db").write_bytes(b"this is not a database" * 100)
    result = sub("list")
    assert result.code == 1
    assert_one_line_error(result, "state database ")
    debug = sub("list", "--log-level", "debug")
    assert debug.code != 0
    assert "Traceback" in debug.err


def test_list_imports_no_network_crypto_or_watch_modules(setup: Setup) -> None:
    write_jobs(setup.jobs, SAMPLE)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "chronosd", *setup.base(), "list"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=setup.env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"chronosd", "sqlite3", "zoneinfo", "json"} <= imported  # the probe sees imports
    assert imported.isdisjoint({"httpx", "jwt", "cryptography", "watchfiles"})


# ---------------------------------------------------------------------- the run fast path
# Tokens from which command lines are drawn: every option of `run` in both spellings, values
# good and bad, other commands, abbreviations, help, "--" and stray words.
RUN_TOKENS = [
    "run",
    "run",
    "list",
    "nas",
    "--config",
    "--config=/etc/c.toml",
    "--conf",
    "--jobs",
    "--jobs=j.json",
    "--state-dir",
    "--state-dir=",
    "--json",
    "--json=yes",
    "--log-level",
    "--log-level=debug",
    "--listen",
    "--listen=127.0.0.1:0",
    "--provider",
    "--provider=nas",
    "--idle-exit",
    "--idle-exit=never",
    "--help",
    "-h",
    "--version",
    "--",
    "debug",
    "loud",
    "local",
    "nas",
    "127.0.0.1:8787",
    "5s",
    "-1",
    "-",
    "",
    "a b",
    "x.toml",
]


def _full_parse(arguments: list[str]) -> dict[str, Any] | None:
    """What the complete parser makes of *arguments*, or None when it refuses or exits."""
    from chronosd import cli

    parser = cli.build_parser()
    options, job_argv = cli._split_argv(arguments)
    try:
        args, extra = parser.parse_known_args(options)
    except SystemExit:
        return None
    if extra or job_argv:
        return None
    return vars(args)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(RUN_TOKENS), max_size=8))
def test_run_fast_path_parses_exactly_as_argparse_or_leaves_it_to_argparse(
    arguments: list[str],
) -> None:
    from chronosd import cli

    fast = cli._parse_run(arguments)
    if fast is None:
        return
    assert vars(fast) == _full_parse(arguments)


@pytest.mark.parametrize(
    "arguments",
    [
        ["run"],
        ["--config", "/etc/chronosd/chronosd.toml", "run"],
        ["run", "--config", "c.toml", "--listen", "127.0.0.1:0", "--provider", "local"],
        ["--json", "--log-level", "debug", "run", "--idle-exit", "never", "--jobs=j.json"],
        ["--config", "run", "run"],  # a config file named "run"
        ["--state-dir", "/a", "run", "--state-dir", "/b"],  # the later one wins, as in argparse
    ],
)
def test_plain_run_command_lines_take_the_fast_path(
    capsys: pytest.CaptureFixture[str], arguments: list[str]
) -> None:
    from chronosd import cli

    fast = cli._parse_run(arguments)
    assert fast is not None
    assert vars(fast) == _full_parse(arguments)
    capsys.readouterr()  # building the full parser prints nothing, but keep the capture clean


@pytest.mark.parametrize(
    ("arguments", "prefix"),
    [
        (["run", "--provider", "cloud"], "run: argument --provider: invalid choice: 'cloud'"),
        (["run", "--bogus"], "run: unrecognized arguments: --bogus"),
        (["run", "extra"], "run: unrecognized arguments: extra"),
        (["run", "--listen"], "run: argument --listen: expected one argument"),
        (["run", "--", "x"], "run: unrecognized arguments: -- x"),
        (["--listen", "127.0.0.1:0", "run"], "usage: argument COMMAND: invalid choice"),
    ],
)
def test_run_errors_are_worded_by_argparse_as_before(
    setup: Setup, sub: Callable[..., Result], arguments: list[str], prefix: str
) -> None:
    result = sub(*arguments, base=False)
    assert result.code == 2
    assert_one_line_error(result, prefix)


def test_run_help_still_comes_from_argparse(setup: Setup, sub: Callable[..., Result]) -> None:
    result = sub("run", "--help", base=False)
    assert result.code == 0
    for option in ("--listen", "--provider", "--idle-exit", "--config", "--log-level"):
        assert option in result.out


def test_run_path_imports_neither_argparse_nor_other_commands(setup: Setup) -> None:
    # A config the daemon refuses before it starts: the command line has been parsed by then.
    bad = setup.tmp / "bad.toml"
    bad.write_text('listen = "nowhere"\n')
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "chronosd", "--config", str(bad), "run"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=setup.env,
        check=False,
    )
    assert done.returncode == 1
    assert "listen 'nowhere' is not HOST:PORT" in done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "chronosd.config" in imported  # the probe sees imports
    assert not {
        name
        for name in imported
        if name == "argparse" or name.startswith(("chronosd.nas", "chronosd.install"))
    }


def test_loading_the_daemon_pauses_the_collector_and_freezes_what_was_loaded() -> None:
    import gc

    from chronosd.gcpause import collection_paused

    assert gc.isenabled()
    gc.unfreeze()
    try:
        with collection_paused(freeze=True):
            assert not gc.isenabled()
            loaded = [{"n": n} for n in range(100)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(loaded)
        # A failed load turns the collector back on as well; one that was off stays off.
        with pytest.raises(ImportError), collection_paused(freeze=True):
            raise ImportError("no such module")
        assert gc.isenabled()
        gc.disable()
        with collection_paused(freeze=True):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_the_start_up_pause_lasts_until_it_is_ended_and_only_ends_its_own() -> None:
    import gc

    from chronosd.gcpause import end_startup_pause, pause_for_startup

    assert gc.isenabled()
    gc.unfreeze()
    try:
        pause_for_startup()
        assert not gc.isenabled()
        made = [{"n": n} for n in range(100)]
        end_startup_pause()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
        end_startup_pause()  # a second end (or one without a pause) changes nothing
        assert gc.isenabled()
        gc.disable()  # someone else's pause: not ours to end
        pause_for_startup()
        end_startup_pause()
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_python_m_chronosd_turns_the_collector_back_on_for_other_commands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import gc
    import runpy

    monkeypatch.setattr(sys, "argv", ["chronosd", "--version"])
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_module("chronosd", run_name="__main__")
        assert exited.value.code == 0
        assert gc.isenabled()  # paused by __main__, ended by main() for a command not `run`
    finally:
        gc.enable()
    assert capsys.readouterr().out.strip()
