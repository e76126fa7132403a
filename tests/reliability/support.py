"""Shared pieces of the reliability tests: sizes, a daemon's files, probes of its state.

Sizes scale with ``CHRONOSD_RELIABILITY_SCALE`` (default 1, the size `.ci/run` uses); every
trial count below is "at scale 1" and is multiplied by it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon_support import (
    Answer,
    DaemonProcess,
    StateReader,
    fire_body,
    jobs_text,
    toml_config,
    wait_until,
    write_private,
)

SCALE = float(os.environ.get("CHRONOSD_RELIABILITY_SCALE", "1") or "1")


def scaled(count: int, *, minimum: int = 1) -> int:
    return max(minimum, round(count * SCALE))


# A job that records that it started, then optionally stays a while. One short O_APPEND
# write per start, so concurrent starts never interleave within a line.
_RECORD = 'echo "$CHRONOS_JOB_ID $CHRONOS_SCHEDULED_AT $CHRONOS_ATTEMPT $CHRONOS_TRIGGER" >> "$1"'


def recording(starts: Path, *, sleep: float = 0.0) -> list[str]:
    script = _RECORD + ('; sleep "$2"' if sleep else "")
    return ["sh", "-c", script, "sh", str(starts), f"{sleep:g}"]


@dataclass(frozen=True)
class Start:
    job_id: str
    scheduled_at: str
    attempt: int
    trigger: str


def read_starts(path: Path) -> list[Start]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    starts = []
    for line in lines:
        job_id, scheduled_at, attempt, trigger = line.split()
        starts.append(Start(job_id, scheduled_at, int(attempt), trigger))
    return starts


def doubled(starts: list[Start], *, per_attempt: bool) -> int:
    """Starts beyond the first of one occurrence (of one attempt, with *per_attempt*)."""
    keys = Counter(
        (s.job_id, s.scheduled_at, s.attempt) if per_attempt else (s.job_id, s.scheduled_at)
        for s in starts
    )
    return sum(count - 1 for count in keys.values() if count > 1)


class World:
    """The files of one chronosd installation in *root*: jobs.json, config, state, logs."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.jobs = root / "jobs.json"
        self.config = root / "chronosd.toml"
        self.state_dir = root / "state"
        self.starts = root / "starts"
        self.lives = 0

    @property
    def state(self) -> StateReader:
        return StateReader(self.state_dir)

    def write_jobs(self, jobs: list[dict[str, Any]]) -> bytes:
        write_private(self.jobs, jobs_text(jobs))
        return self.jobs.read_bytes()

    def write_config(self, **kwargs: Any) -> None:
        kwargs.setdefault("auth", {"mode": "none"})
        write_private(self.config, toml_config(jobs=self.jobs, state_dir=self.state_dir, **kwargs))

    def daemon(self, env: Mapping[str, str] | None = None, **kwargs: Any) -> DaemonProcess:
        """A new life of the daemon, started, with a log file of its own.

        Not a context manager: DaemonProcess.__enter__ would start it a second time. Use
        `running` for a block, or kill() it in a finally.
        """
        self.lives += 1
        log_path = self.root / f"life-{self.lives:04d}.log"
        return DaemonProcess(
            config=self.config, home=self.root, log_path=log_path, env=dict(env or {}), **kwargs
        ).start()

    @contextlib.contextmanager
    def running(
        self, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Iterator[DaemonProcess]:
        daemon = self.daemon(env, **kwargs)
        try:
            yield daemon
        finally:
            daemon.kill()


def started_or_exited(daemon: DaemonProcess, timeout: float = 20) -> bool:
    """Wait until the daemon logged daemon.started (True) or exited (False)."""

    def settled() -> str | None:
        assert daemon.process is not None
        if daemon.log.events("daemon.started"):
            return "started"
        if daemon.process.poll() is not None:
            return "exited"
        return None

    return wait_until(settled, timeout=timeout, what=f"start-up of {daemon.log_path}") == "started"


def sigkill(daemon: DaemonProcess) -> None:
    assert daemon.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon.process.pid, signal.SIGKILL)


def integrity_ok(state_dir: Path) -> bool:
    conn = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def rows(state_dir: Path, query: str, params: tuple[object, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{state_dir / 'state.db'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(query, params)]
    finally:
        conn.close()


def try_fire(
    address: tuple[str, int], job_id: str, fire_at: str, *, timeout: float = 10
) -> Answer | None:
    """A fire call (auth none); None when the connection failed or broke (a crash)."""
    import json

    conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    try:
        conn.request(
            "POST",
            "/api/cron/fire",
            body=fire_body(job_id, fire_at),
            headers={"content-type": "application/json"},
        )
        response = conn.getresponse()
        raw = response.read()
        return Answer(
            response.status,
            json.loads(raw) if raw else {},
            {k.lower(): v for k, v in response.getheaders()},
        )
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at *mount_point* (root only); unmounted afterwards."""
    mount_point.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield mount_point
    finally:
        for _ in range(50):
            done = subprocess.run(
                ["umount", str(mount_point)], capture_output=True, timeout=30, check=False
            )
            if done.returncode == 0:
                break
            time.sleep(0.1)  # a job or the daemon may still hold a file there


def can_mount() -> bool:
    if os.geteuid() != 0:
        return False
    import shutil
    import tempfile

    if shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="chronosd-mount-probe-"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], capture_output=True, timeout=30, check=False)
        return True
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


# ---------------------------------------------------------------------- raw HTTP
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def exchange(address: tuple[str, int], data: bytes, *, timeout: float = 20) -> list[int]:
    """Send *data*, half-close, read until the server closes; the statuses it answered."""
    with socket.create_connection(address, timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        else:
            raise AssertionError(f"the server kept the connection open for {timeout} s")
    return [int(m.group(1)) for m in _STATUS_LINE.finditer(bytes(received))]


async def deliver_concurrently(
    address: tuple[str, int],
    bodies: list[bytes],
    *,
    connections: int,
    timeout: float = 60,
) -> list[tuple[int, dict[str, Any]]]:
    """POST every body to /api/cron/fire over *connections* keep-alive connections at once.

    The connections are all open before the first request goes out, and each sends its share
    of the bodies one after the other on the same connection. Returns (status, JSON body)
    per answer; a connection the server closed early reconnects for the rest of its share.
    """
    import json

    import anyio
    import h11

    shares = [bodies[n::connections] for n in range(connections)]
    answers: list[tuple[int, dict[str, Any]]] = []
    go = anyio.Event()
    opened = 0
    all_open = anyio.Event()

    async def ask(stream: Any, conn: h11.Connection, body: bytes) -> bool:
        request = h11.Request(
            method="POST",
            target="/api/cron/fire",
            headers=[
                ("host", f"{address[0]}:{address[1]}"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
            ],
        )
        await stream.send(
            conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
        )
        status = 0
        data = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    conn.receive_data(await stream.receive())
                except anyio.EndOfStream:
                    conn.receive_data(b"")
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise anyio.EndOfStream
        answers.append((status, json.loads(bytes(data)) if data else {}))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    async def one(share: list[bytes]) -> None:
        nonlocal opened
        stream: Any = await anyio.connect_tcp(*address)
        opened += 1
        if opened == connections:
            all_open.set()
        await go.wait()
        conn = h11.Connection(h11.CLIENT)
        try:
            for body in share:
                if stream is None:  # the server ended the last exchange with a close
                    stream = await anyio.connect_tcp(*address)
                    conn = h11.Connection(h11.CLIENT)
                if not await ask(stream, conn, body):
                    await stream.aclose()
                    stream = None
        finally:
            if stream is not None:
                await stream.aclose()

    with anyio.fail_after(timeout):
        async with anyio.create_task_group() as tg:
            for share in shares:
                tg.start_soon(one, share)
            await all_open.wait()
            go.set()
    return answers
