"""The real daemon as a subprocess: start-up, the watcher, signals, the HTTP contract, the
environment of its jobs and the command line around it (local provider throughout).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chronosd.timefmt import parse_instant, to_wire
from tests.daemon_support import (
    DaemonProcess,
    StateReader,
    child_env,
    fire,
    fire_body,
    hmac_headers,
    http_request,
    jobs_text,
    replace_atomically,
    run_cli,
    toml_config,
    wait_until,
    write_private,
)
from tests.harness import SocketActivator

SECRET = b"integration-test-secret"


class Setup:
    """Files of one daemon in tmp_path: jobs.json, config, state dir, log."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs = root / "jobs.json"
        self.config = root / "chronosd.toml"
        self.state_dir = root / "state"
        self.log_path = root / "daemon.log"
        self.secret_file = write_private(root / "hmac-secret", SECRET.decode() + "\n")
        self.state = StateReader(self.state_dir)

    def write_jobs(self, jobs: list[dict[str, Any]]) -> None:
        write_private(self.jobs, jobs_text(jobs))

    def write_config(self, *, hmac: bool = True, **kwargs: Any) -> None:
        auth = (
            {"mode": "hmac", "hmac_secret_file": str(self.secret_file)}
            if hmac
            else {"mode": "none"}
        )
        kwargs.setdefault("auth", auth)
        write_private(self.config, toml_config(jobs=self.jobs, state_dir=self.state_dir, **kwargs))

    def daemon(self, **kwargs: Any) -> DaemonProcess:
        return DaemonProcess(config=self.config, home=self.root, log_path=self.log_path, **kwargs)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config, home=self.root)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def soon(seconds: int) -> datetime:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0)


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"chronosd-test-{secrets.token_hex(8)}"
    sock.bind("\0" + name)
    sock.settimeout(20)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


# ---------------------------------------------------------------------- 1. start-up
def test_startup_notifies_ready_then_fires_each_occurrence_once(
    setup: Setup, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, address = notify_socket
    setup.write_jobs([{"id": "tick", "schedule": "every 2s", "command": ["true"]}])
    setup.write_config()
    with setup.daemon(env={"NOTIFY_SOCKET": address}) as daemon:
        ready = sock.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1"
        status = [line for line in ready.splitlines() if line.startswith("STATUS=")]
        assert status == ["STATUS=1 jobs active, provider local"]
        # jobs.json was loaded before READY=1 went out.
        assert daemon.log.count("jobs.loaded") == 1
        daemon.wait_started()

        wait_until(
            lambda: len(setup.state.finished_runs("tick")) >= 4, timeout=30, what="4 runs of tick"
        )
        assert daemon.stop() == 0
        stopping = sock.recv(4096).decode()
        assert stopping.startswith("STOPPING=1\nSTATUS=")

    runs = setup.state.runs("tick")
    occurrences = setup.state.occurrences("tick")
    instants = [parse_instant(r["scheduled_at"]) for r in runs]
    # Each occurrence ran once, none was skipped, and every one came from the timer itself.
    assert len(set(instants)) == len(instants) == len(occurrences)
    assert [b - a for a, b in itertools.pairwise(instants)] == [timedelta(seconds=2)] * (
        len(instants) - 1
    )
    assert {r["trigger"] for r in runs} == {"schedule"}
    assert {r["status"] for r in runs} == {"ok"}
    assert {o["state"] for o in occurrences} == {"done"}


# ---------------------------------------------------------------------- 2. watcher
def test_each_kind_of_jobs_file_edit_reloads_once_and_broken_edits_change_nothing(
    setup: Setup,
) -> None:
    def job(job_id: str, **extra: Any) -> dict[str, Any]:
        return {"id": job_id, "schedule": "every 1s", "command": ["true"], **extra}

    def ran(job_id: str, *, more_than: int = 0) -> int:
        count = len(setup.state.finished_runs(job_id))
        return count if count > more_than else 0

    def wait_ran(job_id: str, *, more_than: int = 0) -> int:
        return wait_until(
            lambda: ran(job_id, more_than=more_than),
            timeout=20,
            what=f"a run of {job_id} beyond {more_than}",
        )

    setup.write_jobs([job("a")])
    setup.write_config()
    with setup.daemon() as daemon:
        log = daemon.log
        log.wait_for("watch.started")
        assert log.count("jobs.loaded") == 1

        # Atomic rename, as editors and the CLI write.
        replace_atomically(setup.jobs, jobs_text([job("a"), job("b")]))
        log.wait_for("jobs.loaded", count=2)
        wait_ran("b")
        assert log.count("jobs.loaded") == 2

        # In-place rewrite: same inode, truncated and written again.
        with open(setup.jobs, "w", encoding="utf-8") as handle:
            handle.write(jobs_text([job("a"), job("c")]))
        log.wait_for("jobs.loaded", count=3)
        wait_ran("c")
        assert log.count("jobs.loaded") == 3

        # sed -i: a temporary file renamed over jobs.json by another program.
        subprocess.run(
            ["sed", "-i", 's/"id": "c"/"id": "d"/', str(setup.jobs)], check=True, timeout=10
        )
        log.wait_for("jobs.loaded", count=4)
        wait_ran("d")
        assert log.count("jobs.loaded") == 4
        armed_before = log.count("arm.confirmed")

        # A file that does not parse changes nothing that is armed.
        with open(setup.jobs, "w", encoding="utf-8") as handle:
            handle.write('{"jobs": [{"id": "a", ')
        assert "invalid JSON" in log.wait_for("jobs.rejected", count=1)[0]["error"]
        status = setup.cli("status")
        assert status.returncode == 1
        assert "jobs.json error:" in status.stdout
        assert "INVALID" in status.stdout
        before = ran("a")
        wait_ran("a", more_than=before + 1)
        wait_ran("d", more_than=ran("d"))

        # Valid JSON with an invalid job: rejected as a whole (on_invalid_job = reject).
        replace_atomically(setup.jobs, jobs_text([job("a"), job("e", schedule="30m")]))
        rejected = log.wait_for("jobs.rejected", count=2)[-1]
        assert 'job e: schedule: "30m" is ambiguous' in rejected["error"]
        status = setup.cli("status", "--json")
        assert status.returncode == 1
        report = json.loads(status.stdout)
        assert report["jobs_valid"] is False
        assert "30m" in report["jobs_error"]
        before = ran("a")
        wait_ran("a", more_than=before + 1)
        assert setup.state.job_state("e") is None
        assert log.count("jobs.loaded") == 4
        # Only re-arms of the jobs already armed, never a job of a rejected file.
        assert {e["job_id"] for e in log.events("arm.confirmed")[armed_before:]} <= {"a", "d"}

        # The next valid edit is applied.
        replace_atomically(setup.jobs, jobs_text([job("a"), job("f")]))
        log.wait_for("jobs.loaded", count=5)
        wait_ran("f")
        status = setup.cli("status")
        assert status.returncode == 0, status.stdout
        assert log.count("jobs.loaded") == 5
        assert log.count("jobs.rejected") == 2
        assert daemon.stop() == 0

    # d was removed by the last edit; it never ran after that.
    assert setup.state.job_state("d") is None


# ---------------------------------------------------------------------- 3. signals
def test_sigterm_lets_running_jobs_finish_and_starts_no_new_ones(setup: Setup) -> None:
    # Due every second and allowed to overlap: the timers keep coming during shutdown.
    setup.write_jobs(
        [
            {
                "id": "slow",
                "schedule": "* * * * * *",
                "overlap": "allow",
                "command": ["sh", "-c", "sleep 2; echo finished"],
            }
        ]
    )
    setup.write_config(extra='shutdown_grace = "5s"')
    with setup.daemon() as daemon:
        daemon.log.wait_for("run.started", job_id="slow")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        names = [e["event"] for e in daemon.log.events()]
    stopping = names.index("daemon.stopping")
    assert "run.finished" in names[stopping:]
    assert "fire.claimed" not in names[stopping:]
    assert "run.started" not in names[stopping:]
    runs = setup.state.runs("slow")
    assert runs
    for run in runs:
        assert (run["status"], run["exit_code"]) == ("ok", 0)
        assert setup.state.output(run) == "finished\n"


def test_sigterm_stops_a_job_that_outlasts_shutdown_grace(setup: Setup) -> None:
    setup.write_jobs(
        [
            {
                "id": "stubborn",
                "schedule": "* * * * * *",
                "repeat": 1,
                "command": ["sh", "-c", "trap '' TERM; echo started; sleep 60"],
            }
        ]
    )
    setup.write_config(extra='shutdown_grace = "1s"')
    with setup.daemon() as daemon:
        daemon.log.wait_for("run.started", job_id="stubborn")
        wait_until(lambda: setup.state.runs("stubborn")[0]["pid"], timeout=10, what="the job's pid")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(40) == 0
        assert daemon.log.count("daemon.stopping_runs") == 1
    (run,) = setup.state.runs("stubborn")
    assert run["status"] in ("killed", "timeout")
    # Nothing of the job's process group survived the daemon (zombies waiting for init aside).
    assert live_group_members(run["pid"]) == []


def live_group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


def test_sighup_reloads_config_and_jobs_file(setup: Setup) -> None:
    command = ["sh", "-c", 'echo "greeting=$GREETING"']
    setup.write_jobs([{"id": "env", "schedule": "every 1s", "command": command}])
    setup.write_config()
    with setup.daemon(env={"GREETING": "hello"}) as daemon:
        daemon.log.wait_for("watch.started")
        wait_until(lambda: setup.state.finished_runs("env"), timeout=20, what="a run of env")
        assert setup.state.output(setup.state.finished_runs("env")[0]) == ("greeting=\n")
        # The watcher does not look at the config file; only SIGHUP brings this in.
        setup.write_config(runner={"pass_env": ["GREETING"]})
        daemon.send_signal(signal.SIGHUP)
        daemon.log.wait_for("config.reloaded")
        daemon.log.wait_for("jobs.loaded", count=2)
        seen = len(setup.state.finished_runs("env"))

        def greeted() -> bool:
            runs = setup.state.finished_runs("env")[seen:]
            return any(setup.state.output(r) == "greeting=hello\n" for r in runs)

        wait_until(greeted, timeout=20, what="a run with GREETING passed")
        assert daemon.stop() == 0


# ---------------------------------------------------------------------- 4. HTTP
def test_fire_endpoint_answers_every_case_and_runs_only_the_accepted(setup: Setup) -> None:
    at = soon(40)
    setup.write_jobs(
        [
            {"id": "soon", "schedule": f"at {to_wire(at)}", "command": ["echo", "ran"]},
            {"id": "far", "schedule": "0 0 1 1 *", "command": ["echo", "far"]},
            {"id": "held", "schedule": "every 1h", "paused": True, "command": ["true"]},
        ]
    )
    setup.write_config()
    with setup.daemon() as daemon:
        address = daemon.address()

        health = http_request(address, "GET", "/healthz")
        assert health.status == 200
        assert health.body["status"] == "ok"
        assert (health.body["provider"], health.body["jobs"]) == ("local", 3)

        accepted_body = fire_body("soon", at, nonce="first")
        accepted_headers = hmac_headers(SECRET, accepted_body)
        accepted = http_request(address, "POST", "/api/cron/fire", accepted_body, accepted_headers)
        assert accepted.status == 202, accepted.body
        assert accepted.body["status"] == "accepted"
        assert accepted.body["job_id"] == "soon"
        run_id = accepted.body["run_id"]
        wait_until(lambda: setup.state.finished_runs("soon"), timeout=20, what="the run")

        duplicate = fire(address, SECRET, "soon", at)
        assert (duplicate.status, duplicate.body) == (
            200,
            {"status": "duplicate", "job_id": "soon"},
        )
        gone = fire(address, SECRET, "nobody", at)
        assert (gone.status, gone.body) == (200, {"status": "gone", "job_id": "nobody"})
        stale = fire(address, SECRET, "held", soon(3600))
        assert (stale.status, stale.body) == (200, {"status": "stale", "job_id": "held"})
        next_new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC)
        early = fire(address, SECRET, "far", next_new_year)
        assert early.status == 409
        assert early.body == {"error": "too early", "expected": to_wire(next_new_year)}

        def signed(body: bytes) -> int:
            return http_request(
                address, "POST", "/api/cron/fire", body, hmac_headers(SECRET, body)
            ).status

        assert signed(b"this is not json") == 400
        assert signed(b'["a", "list"]') == 400
        assert signed(json.dumps({"fire_at": to_wire(at)}).encode()) == 400
        assert signed(json.dumps({"job_id": "soon", "fire_at": "tomorrow"}).encode()) == 400
        assert signed(json.dumps({"job_id": "soon"}).encode()) == 400

        body = fire_body("soon", at, nonce="unsigned")
        refused = [
            http_request(address, "POST", "/api/cron/fire", body),
            http_request(
                address, "POST", "/api/cron/fire", body, hmac_headers(b"wrong secret", body)
            ),
            http_request(
                address,
                "POST",
                "/api/cron/fire",
                body,
                hmac_headers(SECRET, body, t=int(datetime.now(UTC).timestamp()) - 3600),
            ),
            # The very request that was accepted, sent again: a replay.
            http_request(address, "POST", "/api/cron/fire", accepted_body, accepted_headers),
        ]
        for answer in refused:
            assert (answer.status, answer.body) == (401, {"error": "invalid fire token"})

        big = json.dumps({"job_id": "soon", "fire_at": to_wire(at), "pad": "x" * 70000})
        too_big = http_request(
            address, "POST", "/api/cron/fire", big.encode(), hmac_headers(SECRET, big.encode())
        )
        assert too_big.status == 413

        # Only the 202 started anything.
        assert [r["run_id"] for r in setup.state.runs()] == [run_id]
        assert [(o["job_id"], o["state"]) for o in setup.state.occurrences()] == [("soon", "done")]
        assert daemon.log.count("run.started") == 1
        assert daemon.stop() == 0


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def test_a_fire_still_arriving_at_sigterm_is_answered_503_and_claims_nothing(
    setup: Setup,
) -> None:
    at = soon(40)
    setup.write_jobs([{"id": "soon", "schedule": f"at {to_wire(at)}", "command": ["true"]}])
    setup.write_config()
    with setup.daemon() as daemon:
        address = daemon.address()
        body = fire_body("soon", at)
        head = (
            "POST /api/cron/fire HTTP/1.1\r\nHost: chronosd\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Chronos-Signature: {hmac_headers(SECRET, body)['chronos-signature']}\r\n\r\n"
        )
        before = socket_inodes(daemon.pid)
        with socket.create_connection(address, timeout=15) as client:
            client.sendall(head.encode() + body[:10])
            # The daemon holds the connection (a new socket among its descriptors).
            wait_until(lambda: socket_inodes(daemon.pid) - before, timeout=10, what="the accept")
            daemon.send_signal(signal.SIGTERM)
            daemon.log.wait_for("daemon.stopping")
            client.sendall(body[10:])
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
        assert daemon.wait(20) == 0
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 503 Service Unavailable", reply
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"retry-after: 5" in headers.lower()
    assert json.loads(payload) == {"error": "chronosd is shutting down"}
    assert setup.state.occurrences() == []
    assert setup.state.runs() == []


def test_auth_none_on_a_public_address_is_refused_at_start_up(setup: Setup) -> None:
    setup.write_jobs([])
    setup.write_config(hmac=False)
    daemon = setup.daemon(extra_args=("--listen", "0.0.0.0:0"))
    with daemon:
        assert daemon.wait(20) == 1
    errors = [line for line in daemon.log.lines() if not line.startswith("{")]
    assert len(errors) == 1, daemon.log.tail()
    assert errors[0].startswith("chronosd: auth.mode none is only allowed on loopback")
    assert daemon.log.count("daemon.started") == 0


# ---------------------------------------------------------------------- 5. job environment
FD_PROBE = textwrap.dedent(
    """
    import json, os
    names = os.listdir("/proc/self/fd")  # its own descriptor is closed again by now
    targets = {}
    for name in names:
        try:
            targets[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            targets[name] = None
    print(json.dumps({"fds": targets, "env": dict(os.environ)}))
    """
)


def test_a_job_of_a_socket_activated_daemon_inherits_no_socket_and_no_systemd_variables(
    setup: Setup,
) -> None:
    at = soon(40)
    setup.write_jobs(
        [
            {
                "id": "probe",
                "schedule": f"at {to_wire(at)}",
                "command": [sys.executable, "-c", FD_PROBE],
            }
        ]
    )
    setup.write_config(hmac=False)
    argv = [*(sys.executable, "-m", "chronosd"), "run", "--config", str(setup.config)]
    activator = SocketActivator(
        argv, env=child_env(setup.root), stdout_path=setup.log_path, notify=True
    )
    with activator:
        answer = fire(activator.address, None, "probe", at)
        assert answer.status == 202, answer.body
        (run,) = wait_until(
            lambda: setup.state.finished_runs("probe"), timeout=20, what="the probe's run"
        )
        assert activator.activations == 1
        assert any(n.startswith("READY=1") for n in activator.notifications)
    assert run["status"] == "ok"
    report = json.loads(setup.state.output(run))
    fds: dict[str, str | None] = report["fds"]
    assert not [t for t in fds.values() if t and t.startswith("socket:")], fds
    # 0, 1 and 2, plus the directory listing's own descriptor (closed by the time it is read).
    assert {"0", "1", "2"} <= set(fds)
    assert [target for name, target in fds.items() if name not in ("0", "1", "2")] in ([], [None])
    leaked = {k for k in report["env"] if k.startswith("LISTEN_") or k == "NOTIFY_SOCKET"}
    assert not leaked
    assert report["env"]["CHRONOS_JOB_ID"] == "probe"


# ---------------------------------------------------------------------- 6. the command line
def test_cli_commands_work_with_the_daemon_running_and_after_it_stopped(setup: Setup) -> None:
    setup.write_jobs(
        [
            {
                "id": "hello",
                "schedule": "every 1h",
                "command": ["sh", "-c", 'echo "hello from $CHRONOS_TRIGGER"; exit 3'],
            }
        ]
    )
    setup.write_config()
    with setup.daemon() as daemon:
        daemon.wait_started()
        daemon.log.wait_for("arm.confirmed", job_id="hello")

        fired = setup.cli("fire", "hello")
        assert fired.returncode == 3, fired.stderr
        assert fired.stdout == "hello from manual\n"

        status = setup.cli("status")
        assert status.returncode == 0, status.stdout
        assert f"running, pid {daemon.pid}" in status.stdout

        runs = json.loads(setup.cli("runs", "--json").stdout)
        assert [(r["job"], r["trigger"], r["status"], r["exit_code"]) for r in runs] == [
            ("hello", "manual", "failed", 3)
        ]
        first_run = runs[0]["run_id"]
        logs = setup.cli("logs", "hello")
        assert (logs.returncode, logs.stdout) == (0, "hello from manual\n")
        assert daemon.stop() == 0

    fired = setup.cli("fire", "hello")
    assert fired.returncode == 3
    status = setup.cli("status")
    # With local timers and no daemon nothing is armed: degraded, and said so.
    assert status.returncode == 1
    assert "not running" in status.stdout
    runs = json.loads(setup.cli("runs", "--json").stdout)
    assert len(runs) == 2
    assert runs[1]["run_id"] == first_run
    assert setup.cli("logs", "hello", first_run).stdout == "hello from manual\n"
    assert setup.cli("logs", "hello").stdout == "hello from manual\n"
    table = setup.cli("runs", "hello")
    assert table.returncode == 0
    assert table.stdout.count("hello") == 2


# ---------------------------------------------------------------------- 6. timing of starts
def test_local_timer_jobs_are_claimed_ahead_but_never_start_before_their_instant(
    setup: Setup,
) -> None:
    stamps = setup.root / "stamps"
    code = (
        "import os, time\n"
        f"open({str(stamps)!r}, 'a').write("
        "os.environ['CHRONOS_SCHEDULED_AT'] + ' ' + repr(time.time()) + '\\n')"
    )
    setup.write_jobs(
        [{"id": "onsec", "schedule": "every 1s", "command": [sys.executable, "-c", code]}]
    )
    setup.write_config()
    with setup.daemon() as daemon:
        daemon.wait_started()
        wait_until(
            lambda: stamps.exists() and len(stamps.read_text().splitlines()) >= 4,
            timeout=30,
            what="4 starts of onsec",
        )
        assert daemon.stop() == 0
    for line in stamps.read_text().splitlines():
        scheduled, started = line.split()
        assert float(started) >= parse_instant(scheduled).timestamp(), line
