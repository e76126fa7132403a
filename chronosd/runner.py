"""Run one occurrence of a job as a subprocess (DESIGN.md 3.1 and 3.2).

The child starts in a session and process group of its own, with exactly the
environment it is given, the job's JSON record on stdin and nothing open but
descriptors 0, 1 and 2. Its stdout and stderr share one pipe, so the run log
keeps their order; the log is capped while the child writes, tail kept.

A run ends when the child (the group leader) has exited *and* nothing it
left in its process group is still alive: leftovers are terminated like a
timed-out job. That is what systemd does to the rest of a unit's cgroup, and
it keeps an orphan from holding the output pipe (or the machine) forever.

`run_job` is an ordinary coroutine: the caller owns the task group it runs
in, and cancelling the caller's scope terminates the process group before
the cancellation propagates. Call everything here from the event loop
(asyncio: the daemon runs on anyio's asyncio backend).

The child is started with `subprocess.Popen` (so ``close_fds`` and the rest of
its guarantees hold) on pipes of our own, and watched with plain event-loop
callbacks: its exit through a pidfd (`chronosd.daemon.children.watch_exit`),
its output and stdin as readable and writable descriptors. asyncio's
subprocess transport with anyio's streams on top cost four times as much CPU
per run (tasks, cancel scopes and protocol objects for three pipes), and a
burst of fires starts hundreds of runs on the same loop that answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio

from chronosd.daemon.children import watch_exit
from chronosd.durations import format_duration
from chronosd.timefmt import to_wire

RunStatus = Literal["ok", "failed", "timeout", "killed", "spawn-error"]

SHELL = "/bin/sh"
JOB_ID_PLACEHOLDER = "{job_id}"

# Passed from chronosd's own environment to every job (INTERFACE.md).
PASSED_ENV = ("PATH", "HOME", "LANG", "TZ")
# systemd's protocol variables describe chronosd's descriptors and notify
# socket; a job that saw them could answer for the daemon or misuse fd 3.
NEVER_PASSED_ENV = frozenset({"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"})

_READ_CHUNK = 65536
# While the child writes, the log may grow this far past the cap before it is
# compacted; a slack of at least 64 KiB keeps compactions rare for tiny caps.
_MIN_SLACK = 65536
# Polling is only used while a process group is being terminated.
_GROUP_POLL = 0.05
# After the group is gone the pipe reaches EOF at once; only a process that
# escaped the group (setsid) can hold it open, and we do not wait on that.
_DRAIN_GRACE = 2.0


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything needed to start one run; built by the fire flow."""

    argv: tuple[str, ...]  # already resolved (see resolve_argv)
    env: Mapping[str, str]  # the complete environment of the child
    stdin: bytes  # the job's JSON record
    cwd: str | None
    timeout: float  # seconds; then SIGTERM to the process group
    kill_after: float = 10.0  # seconds after SIGTERM; then SIGKILL to the process group
    output_path: Path  # the run log, appended to (created 0600, in 0700 directories, if missing)
    output_max_bytes: int = 1048576  # the tail of the whole log file that is kept

    def __post_init__(self) -> None:
        if self.timeout < 0 or self.kill_after < 0:
            raise ValueError("timeout and kill_after must not be negative")
        if self.output_max_bytes < 0:
            raise ValueError("output_max_bytes must not be negative")


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended.

    ``exit_code`` is the leader's exit status, negative for the signal that
    ended it; ``output_bytes`` counts every byte the job wrote, including
    what the cap dropped from the log. ``error`` is one line: why the job
    could not start, or why its output could not be written in full.
    """

    status: RunStatus
    exit_code: int | None
    pid: int | None
    output_bytes: int
    error: str | None = None


class RunControl:
    """Handle the caller keeps to stop a run (overlap=replace, shutdown).

    One handle per run. ``pid`` is the child's pid (also its process group)
    once it has started; it stays set after the run ended, for the record.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self._stop_requested = False
        self._finished = False
        self._stop_event: anyio.Event | None = None

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def running(self) -> bool:
        return self.pid is not None and not self._finished

    def stop(self) -> None:
        """SIGTERM the process group now, SIGKILL it after kill_after; status 'killed'.

        Before the start it prevents the start; after the end it does nothing.
        """
        if self._finished or self._stop_requested:
            return
        self._stop_requested = True
        if self.pid is not None:
            _signal_group(self.pid, signal.SIGTERM)
        if self._stop_event is not None:
            self._stop_event.set()

    def _attach(self, pid: int) -> anyio.Event:
        self.pid = pid
        self._stop_event = anyio.Event()
        if self._stop_requested:  # stop() came while the process was being spawned
            _signal_group(pid, signal.SIGTERM)
            self._stop_event.set()
        return self._stop_event

    def _finish(self) -> None:
        self._finished = True


def resolve_argv(
    command: tuple[str, ...] | str | None,
    *,
    job_id: str,
    default_command: Sequence[str],
) -> tuple[str, ...]:
    """The argv a job runs: its own argv, its shell string under /bin/sh -c, or the default.

    In the default command ``{job_id}`` is replaced inside each element; no
    shell ever sees the result, so a job id cannot inject anything.
    """
    if command is None:
        return tuple(part.replace(JOB_ID_PLACEHOLDER, job_id) for part in default_command)
    if isinstance(command, str):
        return (SHELL, "-c", command)
    return tuple(command)


def job_environment(
    *,
    job_id: str,
    run_id: str,
    scheduled_at: datetime,
    trigger: str,
    attempt: int,
    job_env: Mapping[str, str],
    pass_env: Sequence[str] = (),
    parent_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of a run (INTERFACE.md, "Environment given to a job").

    From *parent_env* (default: chronosd's own environment) only PATH, HOME,
    LANG, TZ and the names in *pass_env* are taken, never systemd's
    LISTEN_*/NOTIFY_SOCKET. The job's ``env`` overrides those; the CHRONOS_*
    facts are set last so a job cannot mislabel its own run.
    """
    parent = os.environ if parent_env is None else parent_env
    env: dict[str, str] = {}
    for name in (*PASSED_ENV, *pass_env):
        if name in NEVER_PASSED_ENV:
            continue
        value = parent.get(name)
        if value is not None:
            env[name] = value
    env.update(job_env)
    env.update(
        {
            "CHRONOS_JOB_ID": job_id,
            "CHRONOS_RUN_ID": run_id,
            "CHRONOS_SCHEDULED_AT": to_wire(scheduled_at),
            "CHRONOS_TRIGGER": trigger,
            "CHRONOS_ATTEMPT": str(attempt),
        }
    )
    return env


async def run_job(
    spec: RunSpec,
    control: RunControl | None = None,
    *,
    on_started: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Run *spec* to its end and say how it ended.

    *on_started* is called with the pid as soon as the process exists (the
    fire flow records it). Spawn failures are reported as ``spawn-error``,
    never raised; cancellation terminates the process group, then re-raises.
    """
    control = control if control is not None else RunControl()
    try:
        run_log = _RunLog(spec.output_path, spec.output_max_bytes)
    except OSError as exc:
        control._finish()
        error = f"cannot open the run log {str(spec.output_path)!r}: {exc.strerror or exc}"
        _log().warning("run.spawn_failed", argv0=_argv0(spec.argv), error=error)
        return RunOutcome("spawn-error", None, None, 0, error)
    try:
        return await _run(spec, control, run_log, on_started)
    finally:
        run_log.close()


async def _run(
    spec: RunSpec,
    control: RunControl,
    run_log: _RunLog,
    on_started: Callable[[int], None] | None,
) -> RunOutcome:
    if control.stop_requested:
        control._finish()
        return RunOutcome("killed", None, None, 0, "stopped before the process started")
    try:
        child = _Child.start(spec, run_log)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        control._finish()
        error = _spawn_error_message(spec, exc)
        run_log.note(f"chronosd: {error}")
        run_log.finish()
        _log().warning("run.spawn_failed", argv0=_argv0(spec.argv), error=error)
        return RunOutcome("spawn-error", None, None, 0, error)

    pid = child.pid
    stop_event = control._attach(pid)
    # The leader's exit wakes the same wait as a stop does.
    child.on_exit = stop_event.set
    ending: Literal["exited", "timeout", "killed"] = "exited"
    interrupted = False
    try:
        try:
            child.feed(spec.stdin)
            if on_started is not None:
                on_started(pid)
            ending = await _wait_for_end(child, spec.timeout, stop_event, control)
            if ending == "timeout":
                _log().warning("run.timed_out", pid=pid, timeout=spec.timeout)
            # A stop already sent SIGTERM; it gets the same kill_after grace.
            await _end_group(child, pid, spec.kill_after, term_sent=control.stop_requested)
            if not child.drained.is_set():
                with anyio.move_on_after(_DRAIN_GRACE):
                    await child.drained.wait()
        except BaseException:
            # Shutdown (cancellation) or a failing on_started: the child must not outlive us.
            interrupted = True
            with anyio.CancelScope(shield=True):
                await _end_group(child, pid, spec.kill_after, term_sent=False)
            raise
        finally:
            control._finish()
            child.close()
    finally:
        # Reached on cancellation too, so a shut-down run's log is capped as well.
        if ending == "timeout":
            run_log.note(f"chronosd: timed out after {_seconds(spec.timeout)}")
        elif ending == "killed":
            run_log.note("chronosd: stopped on request")
        elif interrupted:
            run_log.note("chronosd: stopped at shutdown")
        run_log.finish()

    exit_code = child.returncode
    status: RunStatus
    if ending == "timeout" or ending == "killed":
        status = ending
    else:
        status = "ok" if exit_code == 0 else "failed"
    return RunOutcome(status, exit_code, pid, run_log.job_bytes, run_log.error)


class _Child:
    """A started job process, watched with event-loop callbacks (no task of its own).

    ``exited`` is set once the leader has been reaped (``returncode`` is then its status,
    negative for a signal); ``drained`` once its output pipe reached EOF. Everything the
    child writes goes to the run log as it arrives; its stdin is fed without blocking.
    """

    def __init__(self, popen: subprocess.Popen[bytes], stdin_fd: int, stdout_fd: int) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.returncode: int | None = None
        self.exited = anyio.Event()
        self.drained = anyio.Event()
        self.on_exit: Callable[[], object] | None = None
        self._loop = asyncio.get_running_loop()
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._pending = memoryview(b"")
        self._writing = False
        self._unwatch: Callable[[], None] | None = None
        self._run_log: _RunLog | None = None

    @classmethod
    def start(cls, spec: RunSpec, run_log: _RunLog) -> _Child:
        if not spec.argv:
            raise ValueError("the command is empty")
        # Pipes of our own (non-inheritable, so only the child's copies on 0-2 survive its
        # exec): Popen then builds no file objects. Popen's defaults already close every
        # descriptor but 0-2 (close_fds=True) and restore SIGPIPE; a new session gives the
        # child a group we can kill. stdout and stderr share one pipe, so the log keeps order.
        stdin_r, stdin_w = os.pipe()
        try:
            stdout_r, stdout_w = os.pipe()
        except BaseException:
            os.close(stdin_r)
            os.close(stdin_w)
            raise
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                stdin=stdin_r,
                stdout=stdout_w,
                stderr=stdout_w,
                cwd=spec.cwd,
                env=dict(spec.env),
                start_new_session=True,
            )
        except BaseException:
            os.close(stdin_w)
            os.close(stdout_r)
            raise
        finally:
            os.close(stdin_r)
            os.close(stdout_w)
        child = cls(popen, stdin_w, stdout_r)
        try:
            os.set_blocking(stdin_w, False)
            os.set_blocking(stdout_r, False)
            child._run_log = run_log
            child._loop.add_reader(stdout_r, child._read)
            child._unwatch = watch_exit(child.pid, child._exited)
        except BaseException:
            # Unwatched, the child must not run on: Popen's own clean-up reaps it.
            _signal_group(child.pid, signal.SIGKILL)
            child.close()
            raise
        return child

    def feed(self, data: bytes) -> None:
        """Write *data* to the child's stdin, then close it; what the pipe cannot take at once
        is written as the child reads. A child that never reads stdin, or exits early, breaks
        the pipe: that is its right."""
        self._pending = memoryview(data)
        self._write()
        if self._stdin_fd >= 0 and not self._writing:
            self._loop.add_writer(self._stdin_fd, self._write)
            self._writing = True

    def _write(self) -> None:
        if self._stdin_fd < 0:
            return
        try:
            while self._pending:
                written = os.write(self._stdin_fd, self._pending)
                self._pending = self._pending[written:]
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close_stdin()

    def _close_stdin(self) -> None:
        fd, self._stdin_fd = self._stdin_fd, -1
        if fd < 0:
            return
        if self._writing:
            self._loop.remove_writer(fd)
            self._writing = False
        self._pending = memoryview(b"")
        os.close(fd)

    def _read(self) -> None:
        try:
            chunk = os.read(self._stdout_fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            if self._run_log is not None:
                self._run_log.append(chunk)
            return
        self._close_stdout()

    def _close_stdout(self) -> None:
        fd, self._stdout_fd = self._stdout_fd, -1
        if fd >= 0:
            self._loop.remove_reader(fd)
            os.close(fd)
        self.drained.set()

    def _exited(self, returncode: int) -> None:
        self._unwatch = None
        self.returncode = returncode
        # Reaped here: Popen must never wait for this pid itself (its own clean-up of
        # unreaped children would steal another process's status).
        self._popen.returncode = returncode
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit()

    def close(self) -> None:
        """Stop watching the pipes and close them (the leader is reaped by then)."""
        self._close_stdin()
        if self._stdout_fd >= 0:
            self._close_stdout()
        self._run_log = None
        if self._unwatch is not None and self.returncode is None:
            # Only reached if the leader outlived SIGKILL's wait (cannot happen); leave
            # it to Popen's own clean-up rather than to a watcher nobody reads.
            self._unwatch()
            self._unwatch = None


async def _wait_for_end(
    child: _Child,
    timeout: float,
    stop_event: anyio.Event,
    control: RunControl,
) -> Literal["exited", "timeout", "killed"]:
    """Wait until the leader exits, the timeout expires or a stop is requested."""
    with anyio.move_on_after(timeout):
        await stop_event.wait()  # set by a stop and by the leader's exit
    # A stop wins even when its SIGTERM made the leader exit before we noticed.
    if control.stop_requested:
        return "killed"
    if child.returncode is None:
        return "timeout"
    return "exited"


async def _end_group(child: _Child, pgid: int, kill_after: float, *, term_sent: bool) -> None:
    """Make sure nothing of the group is alive and the leader is reaped.

    SIGTERM (unless already sent), up to *kill_after* for the leader and
    every other member to exit, then SIGKILL to whatever is left.
    """
    if child.returncode is not None and not _group_has_live_members(pgid):
        return
    if not term_sent:
        _signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(kill_after):
        await child.exited.wait()
        while _group_has_live_members(pgid):
            await anyio.sleep(_GROUP_POLL)
    if child.returncode is None or _group_has_live_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        _log().warning("process_group.killed", pgid=pgid, kill_after=kill_after)
    await child.exited.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group may already be empty
        os.killpg(pgid, signum)


def _group_has_live_members(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member changed its uid; it is still alive
    # killpg also reaches zombies, and an init that does not reap (a bare
    # container) keeps them forever; /proc tells a zombie from a live member.
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat_file:
                stat = stat_file.read()
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


class _RunLog:
    """The run log: appended to as output arrives, its tail capped at *max_bytes*.

    Compaction rewrites the file in place as a marker line plus the newest
    *max_bytes*; it happens whenever the file outgrows the cap by the slack,
    and once more at the end, so disk use stays bounded during the run and
    the cap is exact afterwards. File writes are small and local, so they
    are done directly from the event loop.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.job_bytes = 0
        self.error: str | None = None
        self._slack = max(max_bytes, _MIN_SLACK)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            self._fd = os.open(path, flags, 0o600)
        except FileNotFoundError:
            # The claim records the log's path only; the first run of a job makes its
            # directory, private like the rest of the state directory.
            from chronosd.state import make_private_dir

            make_private_dir(path.parent)
            self._fd = os.open(path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._marker_len = 0
        self._truncated = 0

    def append(self, data: bytes) -> None:
        """Output of the job."""
        self.job_bytes += len(data)
        self._write(data)
        if self._size - self._marker_len > self.max_bytes + self._slack:
            self._compact()

    def note(self, line: str) -> None:
        """A line from chronosd itself (spawn error, timeout); not counted as job output."""
        self._write(line.encode("utf-8", "replace") + b"\n")

    def finish(self) -> None:
        self._compact()

    def close(self) -> None:
        os.close(self._fd)

    def _write(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            _pwrite_all(self._fd, data, self._size)
        except OSError as exc:
            # Keep draining the pipe so the child never blocks on a full log disk.
            self.error = f"cannot write the run log {str(self.path)!r}: {exc.strerror or exc}"
            _log().warning("run_log.write_failed", path=str(self.path), error=self.error)
            return
        self._size += len(data)

    def _compact(self) -> None:
        if self.error is not None:
            return
        drop = self._size - self._marker_len - self.max_bytes
        if drop <= 0:
            return
        try:
            tail = _pread_all(self._fd, self.max_bytes, self._marker_len + drop)
            marker = f"[... {self._truncated + drop} bytes truncated ...]\n".encode()
            _pwrite_all(self._fd, marker + tail, 0)
            os.ftruncate(self._fd, len(marker) + len(tail))
        except OSError as exc:
            self.error = f"cannot cap the run log {str(self.path)!r}: {exc.strerror or exc}"
            _log().warning("run_log.write_failed", path=str(self.path), error=self.error)
            return
        self._truncated += drop
        self._marker_len = len(marker)
        self._size = len(marker) + len(tail)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        part = os.pread(fd, size, offset)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


def _spawn_error_message(spec: RunSpec, exc: BaseException) -> str:
    if not spec.argv:
        return "cannot start the job: the command is empty; give the job a command"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        if spec.cwd is not None and exc.filename == spec.cwd:
            return (
                f"cannot start the job: working directory {spec.cwd!r}: {reason}; "
                "create it or fix the job's cwd"
            )
        return (
            f"cannot start the job: {spec.argv[0]!r}: {reason}; "
            "check the job's command and the PATH it runs with"
        )
    return f"cannot start the job: {' '.join(str(exc).split())}"


def _seconds(value: float) -> str:
    return format_duration(value) if value >= 1 else f"{value:g}s"


def _argv0(argv: tuple[str, ...]) -> str | None:
    return argv[0] if argv else None


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()
