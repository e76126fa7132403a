"""Support for the tests that drive the real daemon (and the reference NAS) as subprocesses.

Everything here is synchronous: the daemon runs in its own process, the socket activation
harness (tests/harness.py) in threads, and a test only waits for what those processes write
(log events, state rows, HTTP answers). Every wait has a deadline; none measures time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

from chronosd.http.auth import sign_hmac
from chronosd.timefmt import to_wire

CHRONOSD = (sys.executable, "-m", "chronosd")
T = TypeVar("T")

# Variables of the test runner's own environment that would change what a child does.
_FOREIGN = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET", "STATE_DIRECTORY")


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a chronosd child: ours minus CHRONOSD_* and systemd's, HOME=home."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("CHRONOSD_") and key not in _FOREIGN
    }
    env["HOME"] = str(home)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_private(path: Path, text: str) -> Path:
    """Write *text* to *path* readable by its owner only (what chronosd demands of its files)."""
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path


def jobs_text(jobs: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"jobs": list(jobs)}, indent=2) + "\n"


def replace_atomically(path: Path, text: str) -> None:
    """Write a temporary sibling and rename it over *path*, as editors and the CLI do."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_private(tmp, text)
    os.replace(tmp, path)


def toml_config(
    *,
    jobs: Path,
    state_dir: Path,
    listen: str = "127.0.0.1:0",
    extra: str = "",
    auth: Mapping[str, str] | None = None,
    provider: Mapping[str, str] | None = None,
    nas: Mapping[str, str] | None = None,
    runner: Mapping[str, Any] | None = None,
) -> str:
    lines = [f"jobs = {json.dumps(str(jobs))}", f"state_dir = {json.dumps(str(state_dir))}"]
    lines.append(f"listen = {json.dumps(listen)}")
    if extra:
        lines.append(extra)
    for name, section in (
        ("provider", provider),
        ("provider.nas", nas),
        ("auth", auth),
        ("runner", runner),
    ):
        if section:
            lines.append(f"[{name}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in section.items())
    return "\n".join(lines) + "\n"


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
    """Poll *predicate* until it returns something truthy; fail the test after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------- log events
class EventLog:
    """The JSON-line events a process wrote to *path* (other lines are skipped)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, name: str | None = None, **match: object) -> list[dict[str, Any]]:
        found = []
        for line in self.lines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if name is not None and event.get("event") != name:
                continue
            if all(event.get(key) == value for key, value in match.items()):
                found.append(event)
        return found

    def count(self, name: str, **match: object) -> int:
        return len(self.events(name, **match))

    def wait_for(
        self, name: str, *, count: int = 1, timeout: float = 15, **match: object
    ) -> list[dict[str, Any]]:
        """Wait until at least *count* events *name* (matching *match*) were logged."""

        def enough() -> list[dict[str, Any]] | None:
            events = self.events(name, **match)
            return events if len(events) >= count else None

        try:
            return wait_until(enough, timeout=timeout, what=f"{count} x {name} {match or ''}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.path} ---\n{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines()[-lines:])


# ---------------------------------------------------------------------- the daemon
@dataclass
class DaemonProcess:
    """``chronosd run`` as a child process; its stderr (the log) goes to *log_path*."""

    config: Path
    home: Path
    log_path: Path
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    python_options: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = None

    @property
    def log(self) -> EventLog:
        return EventLog(self.log_path)

    def start(self) -> DaemonProcess:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [
                sys.executable,
                *self.python_options,
                "-m",
                "chronosd",
                "run",
                "--config",
                str(self.config),
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=child_env(self.home, **self.env),
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_started(self, timeout: float = 20) -> dict[str, Any]:
        def started() -> list[dict[str, Any]] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"chronosd exited with {self.process.returncode} during start-up:\n"
                    + self.log.tail()
                )
            return self.log.events("daemon.started")

        return wait_until(started, timeout=timeout, what="daemon.started\n" + str(self.log_path))[0]

    def address(self) -> tuple[str, int]:
        host, _, port = self.wait_started()["listen"][0].rpartition(":")
        return host, int(port)

    def send_signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 20) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"chronosd did not exit within {timeout} s:\n{self.log.tail()}"
            ) from None
        finally:
            if self.process.returncode is not None and self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """Last resort at the end of a test: nothing of ours outlives it."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


def run_cli(
    *args: str, config: Path, home: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """One ``chronosd`` command line with ``--config``; output captured."""
    return subprocess.run(
        [*CHRONOSD, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=child_env(home),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


# ---------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def http_request(
    address: tuple[str, int],
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = 15,
) -> Answer:
    """One request on a fresh connection; connection errors propagate (a test must see them)."""
    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        all_headers = {"content-type": "application/json", **(headers or {})}
        conn.request(
            method, path, body=body if body or method == "POST" else None, headers=all_headers
        )
        response = conn.getresponse()
        raw = response.read()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            payload = {"raw": raw.decode("latin-1")}
        return Answer(response.status, payload, {k.lower(): v for k, v in response.getheaders()})
    finally:
        conn.close()


def fire_body(job_id: str, fire_at: datetime | str, **extra: object) -> bytes:
    instant = fire_at if isinstance(fire_at, str) else to_wire(fire_at)
    return json.dumps({"job_id": job_id, "fire_at": instant, **extra}).encode()


def hmac_headers(secret: bytes, body: bytes, t: int | None = None) -> dict[str, str]:
    return {"chronos-signature": sign_hmac(secret, body, int(time.time()) if t is None else t)}


def fire(
    address: tuple[str, int], secret: bytes | None, job_id: str, fire_at: datetime | str
) -> Answer:
    """A fire call; signed when *secret* is given. A nonce keeps every signature unique."""
    body = fire_body(job_id, fire_at, nonce=os.urandom(8).hex())
    headers = hmac_headers(secret, body) if secret is not None else {}
    return http_request(address, "POST", "/api/cron/fire", body, headers)


# ---------------------------------------------------------------------- state.db
class StateReader:
    """Read-only look at a daemon's state.db (it keeps writing while we read)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / "state.db"

    def output(self, run: Mapping[str, Any]) -> str:
        """The captured output of *run* (its path is stored relative to the state dir)."""
        return (self.state_dir / str(run["output_path"])).read_text(encoding="utf-8")

    def _rows(self, query: str, params: Sequence[object] = ()) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(query, params)]
        finally:
            conn.close()

    def runs(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            return self._rows("SELECT * FROM runs ORDER BY seq")
        return self._rows("SELECT * FROM runs WHERE job_id = ? ORDER BY seq", (job_id,))

    def finished_runs(self, job_id: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.runs(job_id) if r["ended_at"] is not None]

    def occurrences(self, job_id: str | None = None) -> list[dict[str, Any]]:
        if job_id is None:
            return self._rows("SELECT * FROM occurrences ORDER BY job_id, scheduled_at")
        return self._rows(
            "SELECT * FROM occurrences WHERE job_id = ? ORDER BY scheduled_at", (job_id,)
        )

    def job_state(self, job_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM job_state WHERE job_id = ?", (job_id,))
        return rows[0] if rows else None


# ---------------------------------------------------------------------- the reference NAS
@dataclass
class ReferenceNas:
    """``chronosd nas serve`` on a free loopback port, state in *state_dir*."""

    state_dir: Path
    home: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    _log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    @property
    def log(self) -> EventLog:
        return EventLog(self.log_path)

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CHRONOSD, "nas", *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            env=child_env(self.home),
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result

    def add_agent(self, name: str, callback_url: str) -> str:
        """Register an agent; its bearer token."""
        out = json.loads(
            self._cli("agent", "add", name, "--callback-url", callback_url, "--json").stdout
        )
        return str(out["token"])

    def armed(self) -> list[dict[str, Any]]:
        return list(json.loads(self._cli("armed", "--json").stdout))

    def start(self) -> ReferenceNas:
        ready = self.state_dir.parent / f"{self.state_dir.name}.ready"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                *CHRONOSD,
                "nas",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(self.state_dir),
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=child_env(self.home),
            start_new_session=True,
        )

        def is_ready() -> str | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the reference NAS exited:\n{self.log.tail()}")
            return ready.read_text().strip() if ready.exists() else None

        self.address = wait_until(is_ready, timeout=20, what="the reference NAS")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> ReferenceNas:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
