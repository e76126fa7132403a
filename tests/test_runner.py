"""chronosd.runner against real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from chronosd.runner import (
    RunControl,
    RunOutcome,
    RunSpec,
    job_environment,
    resolve_argv,
    run_job,
)

PY = sys.executable
# Every wait in this file is bounded; no single run needs more than this.
RUN_LIMIT = 20.0


def make_spec(tmp_path: Path, argv: tuple[str, ...], **overrides: Any) -> RunSpec:
    log = tmp_path / "run.log"
    if not log.exists():
        log.touch(mode=0o600)
    fields: dict[str, Any] = {
        "argv": argv,
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "stdin": b"{}",
        "cwd": None,
        "timeout": 15.0,
        "kill_after": 0.5,
        "output_path": log,
    }
    fields.update(overrides)
    return RunSpec(**fields)


async def run(spec: RunSpec, control: RunControl | None = None, **kwargs: Any) -> RunOutcome:
    with anyio.fail_after(RUN_LIMIT):
        return await run_job(spec, control, **kwargs)


def process_gone(pid: int) -> bool:
    """Dead: no /proc entry, or a zombie left to an init that does not reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


async def wait_gone(pid: int) -> bool:
    # SIGKILL is delivered asynchronously; give the kernel a moment.
    with anyio.move_on_after(5):
        while not process_gone(pid):
            await anyio.sleep(0.02)
    return process_gone(pid)


async def wait_for_log(path: Path, needle: bytes) -> None:
    with anyio.fail_after(10):
        while needle not in path.read_bytes():
            await anyio.sleep(0.02)


# --- resolve_argv and job_environment (pure) ---


def test_argv_tuple_is_used_as_is() -> None:
    argv = ("/usr/bin/backup", "--full", "a b")
    assert resolve_argv(argv, job_id="j", default_command=["x"]) == argv


def test_shell_string_runs_under_bin_sh() -> None:
    assert resolve_argv("echo hi | wc -c", job_id="j", default_command=["x"]) == (
        "/bin/sh",
        "-c",
        "echo hi | wc -c",
    )


def test_default_command_replaces_job_id_in_each_element() -> None:
    argv = resolve_argv(
        None,
        job_id="nightly-backup",
        default_command=["hermes", "cron", "run", "{job_id}", "--tag={job_id}.{job_id}"],
    )
    assert argv == (
        "hermes",
        "cron",
        "run",
        "nightly-backup",
        "--tag=nightly-backup.nightly-backup",
    )


def test_environment_holds_chronos_facts_and_only_allowed_parent_names() -> None:
    parent = {
        "PATH": "/bin",
        "HOME": "/home/c",
        "LANG": "C.UTF-8",
        "TZ": "Europe/London",
        "SECRET": "s",
        "EXTRA": "e",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "http",
        "NOTIFY_SOCKET": "/run/systemd/notify",
    }
    env = job_environment(
        job_id="backup",
        run_id="r-1",
        scheduled_at=datetime(2025, 3, 30, 3, 30, 15, 999, tzinfo=timezone(timedelta(hours=2))),
        trigger="catch-up",
        attempt=2,
        job_env={"TARGET": "s3://bucket", "PATH": "/opt/bin"},
        pass_env=("EXTRA", "LISTEN_FDS", "NOTIFY_SOCKET", "ABSENT"),
        parent_env=parent,
    )
    assert env == {
        "PATH": "/opt/bin",
        "HOME": "/home/c",
        "LANG": "C.UTF-8",
        "TZ": "Europe/London",
        "EXTRA": "e",
        "TARGET": "s3://bucket",
        "CHRONOS_JOB_ID": "backup",
        "CHRONOS_RUN_ID": "r-1",
        "CHRONOS_SCHEDULED_AT": "2025-03-30T01:30:15+00:00",
        "CHRONOS_TRIGGER": "catch-up",
        "CHRONOS_ATTEMPT": "2",
    }


def test_job_env_cannot_override_the_chronos_facts() -> None:
    env = job_environment(
        job_id="a",
        run_id="r",
        scheduled_at=datetime(2025, 1, 1, tzinfo=UTC),
        trigger="manual",
        attempt=1,
        job_env={"CHRONOS_JOB_ID": "spoofed"},
        parent_env={},
    )
    assert env["CHRONOS_JOB_ID"] == "a"


def test_environment_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOME", "/home/from-os")
    monkeypatch.setenv("CHRONOS_TEST_UNLISTED", "x")
    env = job_environment(
        job_id="a",
        run_id="r",
        scheduled_at=datetime(2025, 1, 1, tzinfo=UTC),
        trigger="schedule",
        attempt=1,
        job_env={},
    )
    assert env["HOME"] == "/home/from-os"
    assert "CHRONOS_TEST_UNLISTED" not in env


# --- running processes ---


@pytest.mark.anyio
async def test_argv_reaches_the_child_without_a_shell(tmp_path: Path) -> None:
    script = "import sys; print(sys.argv[1:])"
    spec = make_spec(tmp_path, (PY, "-c", script, "a b", "$HOME", "*"))
    outcome = await run(spec)
    assert outcome.status == "ok"
    assert outcome.exit_code == 0
    assert outcome.pid is not None
    assert spec.output_path.read_text() == "['a b', '$HOME', '*']\n"


@pytest.mark.anyio
async def test_shell_string_merges_stdout_and_stderr_in_order(tmp_path: Path) -> None:
    argv = resolve_argv(
        "echo one; echo two >&2; echo three; echo four >&2; exit 3",
        job_id="j",
        default_command=(),
    )
    outcome = await run(make_spec(tmp_path, argv))
    assert outcome.status == "failed"
    assert outcome.exit_code == 3
    assert (tmp_path / "run.log").read_text() == "one\ntwo\nthree\nfour\n"
    assert outcome.output_bytes == len("one\ntwo\nthree\nfour\n")


@pytest.mark.anyio
async def test_default_command_runs_with_the_job_id(tmp_path: Path) -> None:
    argv = resolve_argv(
        None,
        job_id="my.job",
        default_command=[PY, "-c", "import sys; print(sys.argv[1])", "{job_id}"],
    )
    outcome = await run(make_spec(tmp_path, argv))
    assert outcome.status == "ok"
    assert (tmp_path / "run.log").read_text() == "my.job\n"


@pytest.mark.anyio
async def test_child_runs_in_the_given_cwd(tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    spec = make_spec(tmp_path, (PY, "-c", "import os; print(os.getcwd())"), cwd=str(workdir))
    assert (await run(spec)).status == "ok"
    assert spec.output_path.read_text() == f"{workdir}\n"


@pytest.mark.anyio
async def test_child_sees_exactly_the_given_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("CHRONOSD_SECRET_TOKEN", "do-not-leak")
    monkeypatch.setenv("PASSED_ON", "yes")
    env = job_environment(
        job_id="envjob",
        run_id="run-7",
        scheduled_at=datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
        trigger="schedule",
        attempt=1,
        job_env={"TARGET": "s3://bucket"},
        pass_env=("PASSED_ON",),
    )
    spec = make_spec(tmp_path, ("/usr/bin/env", "-0"), env=env)
    assert (await run(spec)).status == "ok"
    pairs = [item.split("=", 1) for item in spec.output_path.read_text().split("\0") if item]
    seen = dict(pairs)
    assert len(pairs) == len(seen)
    allowed_from_os = {name for name in ("PATH", "HOME", "LANG", "TZ") if name in os.environ}
    assert set(seen) == allowed_from_os | {
        "PASSED_ON",
        "TARGET",
        "CHRONOS_JOB_ID",
        "CHRONOS_RUN_ID",
        "CHRONOS_SCHEDULED_AT",
        "CHRONOS_TRIGGER",
        "CHRONOS_ATTEMPT",
    }
    assert seen["CHRONOS_SCHEDULED_AT"] == "2025-06-01T12:00:00+00:00"
    assert seen["CHRONOS_RUN_ID"] == "run-7"
    assert seen["PASSED_ON"] == "yes"


@pytest.mark.anyio
async def test_job_record_arrives_on_stdin_followed_by_eof(tmp_path: Path) -> None:
    record = {"id": "nightly", "command": ["x"], "env": {"A": "ü"}}
    payload = json.dumps(record).encode()
    script = (
        "import json, sys; data = json.load(sys.stdin); print(data['id'], len(sys.stdin.read()))"
    )
    spec = make_spec(tmp_path, (PY, "-c", script), stdin=payload)
    assert (await run(spec)).status == "ok"
    assert spec.output_path.read_text() == "nightly 0\n"


@pytest.mark.anyio
async def test_child_that_never_reads_a_large_stdin_does_not_block_the_run(
    tmp_path: Path,
) -> None:
    spec = make_spec(tmp_path, ("/bin/sh", "-c", "echo done"), stdin=b"x" * (4 * 1024 * 1024))
    outcome = await run(spec)
    assert outcome.status == "ok"
    assert spec.output_path.read_text() == "done\n"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("script", "status", "exit_code"),
    [
        ("raise SystemExit(0)", "ok", 0),
        ("raise SystemExit(1)", "failed", 1),
        ("raise SystemExit(77)", "failed", 77),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "failed", -signal.SIGKILL),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "failed", -signal.SIGTERM),
    ],
)
async def test_exit_status_decides_the_outcome(
    tmp_path: Path, script: str, status: str, exit_code: int
) -> None:
    outcome = await run(make_spec(tmp_path, (PY, "-c", script)))
    assert (outcome.status, outcome.exit_code) == (status, exit_code)
    assert outcome.error is None


@pytest.mark.anyio
async def test_timeout_sends_sigterm_to_the_group(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("/bin/sh", "-c", "echo started; exec sleep 100"), timeout=0.5)
    outcome = await run(spec)
    assert outcome.status == "timeout"
    assert outcome.exit_code == -signal.SIGTERM
    log = spec.output_path.read_text()
    assert log == "started\nchronosd: timed out after 0.5s\n"
    assert outcome.output_bytes == len("started\n")


@pytest.mark.anyio
async def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        ("/bin/sh", "-c", "trap '' TERM; echo ready; sleep 100; sleep 100"),
        timeout=0.5,
        kill_after=0.5,
    )
    outcome = await run(spec)
    assert outcome.status == "timeout"
    assert outcome.exit_code == -signal.SIGKILL
    assert outcome.pid is not None
    assert await wait_gone(outcome.pid)


@pytest.mark.anyio
async def test_timeout_kills_grandchildren_in_the_group(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, ("/bin/sh", "-c", "sleep 100 & echo $!; wait"), timeout=0.5, kill_after=0.5
    )
    outcome = await run(spec)
    assert outcome.status == "timeout"
    grandchild = int(spec.output_path.read_text().splitlines()[0])
    assert await wait_gone(grandchild)


@pytest.mark.anyio
async def test_leftovers_of_a_finished_run_are_terminated(tmp_path: Path) -> None:
    # The background sleep keeps the output pipe open; the run must still end.
    spec = make_spec(tmp_path, ("/bin/sh", "-c", "sleep 100 & echo $!"), kill_after=0.5)
    outcome = await run(spec)
    assert outcome.status == "ok"
    assert outcome.exit_code == 0
    leftover = int(spec.output_path.read_text().splitlines()[0])
    assert await wait_gone(leftover)


@pytest.mark.anyio
async def test_stop_kills_the_run_and_its_group(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, ("/bin/sh", "-c", "sleep 100 & echo $!; wait"))
    control = RunControl()
    outcomes: list[RunOutcome] = []
    async with anyio.create_task_group() as tg:

        async def go() -> None:
            outcomes.append(await run(spec, control))

        tg.start_soon(go)
        await wait_for_log(spec.output_path, b"\n")
        assert control.running
        control.stop()
    (outcome,) = outcomes
    assert outcome.status == "killed"
    assert outcome.pid == control.pid
    assert outcome.exit_code == -signal.SIGTERM
    assert not control.running
    grandchild = int(spec.output_path.read_text().splitlines()[0])
    assert await wait_gone(grandchild)


@pytest.mark.anyio
async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path, ("/bin/sh", "-c", "trap '' TERM; echo ready; sleep 100"), kill_after=0.5
    )
    control = RunControl()
    started: list[int] = []
    outcomes: list[RunOutcome] = []
    async with anyio.create_task_group() as tg:

        async def go() -> None:
            outcomes.append(await run(spec, control, on_started=started.append))

        tg.start_soon(go)
        await wait_for_log(spec.output_path, b"ready\n")
        control.stop()
    (outcome,) = outcomes
    assert (outcome.status, outcome.exit_code) == ("killed", -signal.SIGKILL)
    assert started == [outcome.pid]


@pytest.mark.anyio
async def test_stop_before_start_prevents_the_start(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    control = RunControl()
    control.stop()
    outcome = await run(make_spec(tmp_path, ("/bin/sh", "-c", f"touch '{marker}'")), control)
    assert (outcome.status, outcome.pid) == ("killed", None)
    assert not marker.exists()


@pytest.mark.anyio
async def test_stop_after_the_end_changes_nothing(tmp_path: Path) -> None:
    control = RunControl()
    outcome = await run(make_spec(tmp_path, ("/bin/sh", "-c", "exit 0")), control)
    control.stop()
    assert outcome.status == "ok"
    assert not control.stop_requested


@pytest.mark.anyio
async def test_output_cap_keeps_the_tail_after_a_marker(tmp_path: Path) -> None:
    line_count = 50 * 1024  # 50 MiB of 1 KiB lines
    script = (
        "import sys\n"
        "out = sys.stdout.buffer\n"
        f"for i in range({line_count}):\n"
        "    out.write(b'%09d' % i + b'x' * 1014 + b'\\n')\n"
        "out.write(b'THE END\\n')\n"
    )
    cap = 4096
    spec = make_spec(tmp_path, (PY, "-c", script), output_max_bytes=cap)
    outcome = await run(spec)
    total = line_count * 1024 + len(b"THE END\n")
    assert outcome.status == "ok"
    assert outcome.output_bytes == total
    log = spec.output_path.read_bytes()
    marker, _, tail = log.partition(b"\n")
    assert marker == f"[... {total - cap} bytes truncated ...]".encode()
    assert len(tail) == cap
    assert tail.endswith(b"x\nTHE END\n")
    assert tail.endswith(b"%09d" % (line_count - 1) + b"x" * 1014 + b"\nTHE END\n")


@pytest.mark.anyio
async def test_output_under_the_cap_is_kept_whole(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, (PY, "-c", "print('a' * 99)"), output_max_bytes=100)
    outcome = await run(spec)
    assert outcome.output_bytes == 100
    assert spec.output_path.read_text() == "a" * 99 + "\n"


@pytest.mark.anyio
async def test_missing_executable_is_a_spawn_error_written_to_the_log(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, (str(tmp_path / "no-such-program"), "--flag"))
    outcome = await run(spec)
    assert outcome.status == "spawn-error"
    assert (outcome.exit_code, outcome.pid, outcome.output_bytes) == (None, None, 0)
    assert outcome.error is not None
    assert "no-such-program" in outcome.error
    assert "\n" not in outcome.error
    assert spec.output_path.read_text() == f"chronosd: {outcome.error}\n"


@pytest.mark.anyio
async def test_missing_cwd_is_a_spawn_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone")
    outcome = await run(make_spec(tmp_path, ("/bin/sh", "-c", "true"), cwd=missing))
    assert outcome.status == "spawn-error"
    assert outcome.error is not None
    assert missing in outcome.error
    assert "cwd" in outcome.error


@pytest.mark.anyio
async def test_non_executable_file_is_a_spawn_error(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("not a program\n")
    plain.chmod(0o600)
    outcome = await run(make_spec(tmp_path, (str(plain),)))
    assert outcome.status == "spawn-error"
    assert outcome.error is not None


@pytest.mark.anyio
async def test_unwritable_run_log_is_a_spawn_error_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "not-a-dir").write_text("")  # unusable even by root
    spec = RunSpec(
        argv=("/bin/sh", "-c", f"touch '{marker}'"),
        env={},
        stdin=b"{}",
        cwd=None,
        timeout=5,
        output_path=tmp_path / "not-a-dir" / "run.log",
    )
    outcome = await run(spec)
    assert outcome.status == "spawn-error"
    assert outcome.error is not None
    assert "run log" in outcome.error
    assert not marker.exists()


@pytest.mark.anyio
async def test_child_inherits_no_descriptor_beyond_stdio(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        # systemd hands its sockets over inheritable; prove the runner closes them anyway.
        listener.set_inheritable(True)
        socket_inode = os.fstat(listener.fileno()).st_ino
        script = (
            "import json, os\n"
            "fds = {}\n"
            "for name in os.listdir('/proc/self/fd'):\n"
            "    try:\n"
            "        fds[name] = os.readlink('/proc/self/fd/' + name)\n"
            "    except OSError:\n"
            "        fds[name] = None\n"
            "print(json.dumps(fds))\n"
        )
        spec = make_spec(tmp_path, (PY, "-c", script))
        assert (await run(spec)).status == "ok"
    fds: Mapping[str, str | None] = json.loads(spec.output_path.read_text())
    extra = {fd: target for fd, target in fds.items() if fd not in {"0", "1", "2"}}
    # The only extra descriptor is the one listdir used to read /proc/self/fd.
    assert len(extra) <= 1
    assert all(target is None or target.startswith("/proc/") for target in extra.values())
    assert f"socket:[{socket_inode}]" not in fds.values()
    assert {"0", "1", "2"} <= set(fds)


@pytest.mark.anyio
async def test_cancelling_the_caller_kills_the_process_group(tmp_path: Path) -> None:
    spec = make_spec(
        tmp_path,
        ("/bin/sh", "-c", "trap '' TERM; sleep 100 & echo $!; wait; wait"),
        kill_after=0.5,
    )
    started: list[int] = []
    finished = False
    with anyio.fail_after(RUN_LIMIT):
        async with anyio.create_task_group() as tg:

            async def go() -> None:
                nonlocal finished
                await run_job(spec, on_started=started.append)
                finished = True

            tg.start_soon(go)
            await wait_for_log(spec.output_path, b"\n")
            tg.cancel_scope.cancel()
    assert not finished
    (pid,) = started
    grandchild = int(spec.output_path.read_text().splitlines()[0])
    assert await wait_gone(pid)
    assert await wait_gone(grandchild)


@pytest.mark.anyio
async def test_runs_leave_no_zombie_child(tmp_path: Path) -> None:
    outcome = await run(make_spec(tmp_path, ("/bin/sh", "-c", "exit 5")))
    assert outcome.pid is not None
    # The leader is ours to reap: by the time the outcome exists it is gone, not a zombie.
    assert not Path(f"/proc/{outcome.pid}").exists()


@pytest.mark.anyio
async def test_child_watcher_reaps_jobs_on_the_loop_and_puts_the_old_watcher_back(
    tmp_path: Path,
) -> None:
    import asyncio
    import threading

    from chronosd.daemon.children import child_watcher

    before = asyncio.get_child_watcher()
    threads = threading.active_count()
    with child_watcher():
        if sys.version_info < (3, 12) and hasattr(os, "pidfd_open"):
            assert isinstance(asyncio.get_child_watcher(), asyncio.PidfdChildWatcher)
        outcomes = []
        for code in (0, 3, 0):
            spec = make_spec(tmp_path, (PY, "-c", f"import sys; sys.exit({code})"))
            outcomes.append(await run(spec))
        # Waiting happened on the loop: no waiter thread per child was left behind or started.
        assert threading.active_count() <= threads
    assert [o.exit_code for o in outcomes] == [0, 3, 0]
    assert [o.status for o in outcomes] == ["ok", "failed", "ok"]
    assert asyncio.get_child_watcher() is before
    # And the restored watcher still works for this loop.
    assert (await run(make_spec(tmp_path, (PY, "-c", "pass")))).status == "ok"
