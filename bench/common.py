"""Shared pieces of the benchmarks: result rows, statistics, processes, the NAS, chronosd set-ups.

Everything talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- results


@dataclass
class Row:
    """One line of the results table."""

    metric: str
    value: str
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    verdict: str = "—"  # "met", "missed" or "—" (no target)


@dataclass
class Section:
    """What one benchmark hands back."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class Settings:
    quick: bool
    workdir: Path  # a fresh directory for this benchmark, removed afterwards


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def ms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "n/a"
    return f"{seconds * 1000:.1f} ms"


def ratio(value: float, baseline: float) -> str:
    if not baseline or value != value or baseline != baseline:
        return "n/a"
    return f"{value / baseline:.2f}×"


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "met" if ok else "missed"


# ---------------------------------------------------------------------- machine


def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count() or "?"),
        "cpu": model,
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


# ---------------------------------------------------------------------- /proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and friends from /proc/<pid>/status, in kB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key.startswith("Vm") and rest.strip().endswith("kB"):
                out[key] = int(rest.split()[0])
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of *pid* itself (not its children), in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------- processes


def chronosd_argv() -> list[str]:
    script = Path(PYTHON).parent / "chronosd"
    return [str(script)] if script.exists() else [PYTHON, "-m", "chronosd"]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHRONOSD_", "LISTEN_"))}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(REPO)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def listening_socket(backlog: int = 1024) -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
    return sock


def spawn_activated(
    argv: Sequence[str],
    sock: socket.socket,
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> int:
    """fork + exec *argv* with *sock* as fd 3, LISTEN_FDS=1 and LISTEN_PID=<child pid>.

    What systemd does for a ``.socket`` unit with ``Accept=no``; the child gets its own
    session so that what it leaves behind can be killed as a group.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    argv = list(argv)
    env = dict(env)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setsid()
            if cwd is not None:
                os.chdir(cwd)
            os.dup2(null_fd, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            if sock.fileno() == 3:
                os.set_inheritable(3, True)
            else:
                os.dup2(sock.fileno(), 3)  # dup2 makes fd 3 inheritable
            env["LISTEN_FDS"] = "1"
            env["LISTEN_PID"] = str(os.getpid())
            env["LISTEN_FDNAMES"] = "bench.socket"
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    os.close(log_fd)
    os.close(null_fd)
    return pid


def wait_pid(pid: int, timeout: float) -> int | None:
    """The exit status of child *pid*, or None when it is still running after *timeout*.

    Waits on a pidfd, so the moment of exit is seen at once rather than at the next poll.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        pidfd = -1
    try:
        if pidfd >= 0:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(max(0.0, timeout) * 1000):
                return None
        else:
            deadline = time.monotonic() + timeout
            while not os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.002)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        return None
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def kill_group(pid: int, *, grace: float = 5.0) -> int | None:
    """SIGTERM the process group of child *pid*, SIGKILL after *grace*; reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    code = wait_pid(pid, grace)
    if code is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        code = wait_pid(pid, 5.0)
    return code


def stop_popen(proc: subprocess.Popen[Any], *, grace: float = 10.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait(5)
    return proc.returncode


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 15.0) -> bool:
    def up() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False

    return wait_until(up, timeout, 0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- raw HTTP


def http_request(
    method: str,
    path: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    close: bool = True,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method == "POST":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_response(sock: socket.socket, timeout: float) -> tuple[int, bytes]:
    """Read one complete response (Content-Length framed, or until EOF)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match:
        length = int(match.group(1))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        while chunk := sock.recv(65536):
            body += chunk
    return status, body


def get_json(url: str, timeout: float = 10.0, token: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------- the reference NAS


@dataclass
class Nas:
    """The reference NAS (with the bench's request counter) in a subprocess."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    address: str
    token: str
    agent: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stats(self, job: str | None = None) -> dict[str, Any]:
        query = f"?job={job}" if job else ""
        data: dict[str, Any] = get_json(f"{self.url}/bench/stats{query}")
        return data

    def reset(self) -> None:
        get_json(f"{self.url}/bench/reset")

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.state_dir / 'nas.db'}?mode=ro", uri=True, timeout=10)
        return conn

    def stop(self) -> None:
        stop_popen(self.proc)

    def add_agent(self, name: str, callback_url: str = "http://127.0.0.1:9") -> str:
        """Register another agent; its bearer token."""
        return _add_agent(self.state_dir, name, callback_url)


def _add_agent(state_dir: Path, name: str, callback_url: str) -> str:
    added = subprocess.run(
        [
            PYTHON,
            "-m",
            "chronosd",
            "nas",
            "agent",
            "add",
            name,
            "--callback-url",
            callback_url,
            "--state-dir",
            str(state_dir),
            "--json",
        ],
        capture_output=True,
        timeout=60,
        env=base_env(),
        check=True,
    )
    return str(json.loads(added.stdout)["token"])


def nas_available() -> tuple[bool, str]:
    try:
        result = subprocess.run(
            [PYTHON, "-m", "chronosd", "nas", "serve", "--help"],
            capture_output=True,
            timeout=60,
            env=base_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if result.returncode != 0:
        return False, result.stderr.decode(errors="replace").strip()[-300:]
    return True, ""


@contextlib.contextmanager
def running_nas(
    workdir: Path,
    *,
    agent: str = "bench",
    callback_url: str = "http://127.0.0.1:9",
    log_level: str = "warning",
) -> Iterator[Nas]:
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = workdir / "nas-state"
    ready = workdir / "nas.ready"
    log_path = workdir / "nas.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                PYTHON,
                str(BENCH_DIR / "counting_nas.py"),
                "--log-level",
                log_level,
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(state_dir),
                "--ready-file",
                str(ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=base_env(),
            start_new_session=True,
        )
    try:
        if not wait_until(lambda: ready.exists() or proc.poll() is not None, 30):
            raise RuntimeError("the reference NAS did not become ready within 30 s")
        if proc.poll() is not None:
            raise RuntimeError(f"the reference NAS exited: {log_path.read_text()[-500:]}")
        address = ready.read_text().strip()
        token = _add_agent(state_dir, agent, callback_url)
        yield Nas(proc, state_dir, address, token, agent, log_path)
    finally:
        stop_popen(proc)


def mint_fire_token(nas: Nas, job_id: str) -> str:
    """A fire token signed with the NAS's own key (what its dispatcher sends)."""
    sys.path.insert(0, str(REPO))
    from chronosd.nas.keys import KeyRing

    ring = KeyRing.load_or_create(nas.state_dir)
    return ring.mint_fire_token(
        issuer=nas.url, audience=f"agent:{nas.agent}", job_id=job_id, now=time.time()
    )


# ---------------------------------------------------------------------- chronosd set-ups


@dataclass
class Chronosd:
    """One chronosd installation: config, jobs.json, state directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "chronosd.toml"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs.json"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log_path(self) -> Path:
        return self.root / "chronosd.log"

    def argv(self, *extra: str) -> list[str]:
        return [*chronosd_argv(), "--config", str(self.config), "run", *extra]

    def write_jobs(self, jobs: Sequence[Mapping[str, Any]]) -> None:
        tmp = self.jobs.with_name(".jobs.json.tmp")
        tmp.write_text(json.dumps({"jobs": list(jobs)}, indent=2) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, self.jobs)

    def state(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.state_dir / 'state.db'}?mode=ro", uri=True, timeout=10)

    def run_stamps(self) -> list[tuple[str, str, float]]:
        """(job id, scheduled instant, first stamp its output holds) of every finished run."""
        stamp = re.compile(rb"^(\d{9,11}\.\d+)\s*$", re.M)
        out: list[tuple[str, str, float]] = []
        with contextlib.closing(self.state()) as db:
            rows = db.execute("SELECT job_id, scheduled_at, output_path FROM runs").fetchall()
        for job_id, scheduled, output in rows:
            path = Path(output)
            if not path.is_absolute():
                path = self.state_dir / path
            with contextlib.suppress(OSError):
                match = stamp.search(path.read_bytes())
                if match:
                    out.append((job_id, scheduled, float(match.group(1))))
        return out


def make_chronosd(
    root: Path,
    *,
    jobs: Sequence[Mapping[str, Any]] = (),
    nas: Nas | None = None,
    callback_url: str = "http://127.0.0.1:9",
    auth: str = "none",
    idle_exit: str | None = None,
    listen: str | None = None,
    extra: str = "",
    prewake: int = 0,
) -> Chronosd:
    root.mkdir(parents=True, exist_ok=True)
    setup = Chronosd(root)
    lines = [
        f'jobs = "{setup.jobs}"',
        f'state_dir = "{setup.state_dir}"',
        'log_level = "info"',
    ]
    if idle_exit is not None:
        lines.append(f'idle_exit = "{idle_exit}"')
    if listen is not None:
        lines.append(f'listen = "{listen}"')
    lines += ["[runner]", "keep_runs = 100000", "max_concurrent = 4"]
    if nas is not None:
        token = root / "nas-token"
        token.write_text(nas.token + "\n")
        token.chmod(0o600)
        lines += [
            "[provider]",
            'kind = "nas"',
            "[provider.nas]",
            f'url = "{nas.url}"',
            f'callback_url = "{callback_url}"',
            f'token_file = "{token}"',
        ]
        if prewake:
            lines.append(f'prewake = "{prewake}s"')
    lines += ["[auth]", f'mode = "{auth}"']
    if auth == "hmac":
        secret = root / "hmac-secret"
        secret.write_text("bench-secret-0123456789abcdef\n")
        secret.chmod(0o600)
        lines.append(f'hmac_secret_file = "{secret}"')
    if auth == "jwt":
        assert nas is not None
        lines += [
            f'jwks_url = "{nas.url}/.well-known/jwks.json"',
            f'audience = "agent:{nas.agent}"',
            f'issuer = "{nas.url}"',
        ]
    if extra:
        lines.append(extra)
    setup.config.write_text("\n".join(lines) + "\n")
    setup.write_jobs(jobs)
    return setup


def start_chronosd(setup: Chronosd, *extra: str) -> subprocess.Popen[bytes]:
    """Start ``chronosd run`` in its own session, its output appended to its log."""
    with open(setup.log_path, "ab") as log:
        return subprocess.Popen(
            setup.argv(*extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=base_env(),
            start_new_session=True,
        )


def run_chronosd(
    setup: Chronosd, *extra: str, timeout: float = 120.0
) -> tuple[int | None, float, subprocess.Popen[bytes]]:
    """Run ``chronosd run`` to completion (it must idle-exit); (exit code, wall seconds, proc)."""
    started = time.monotonic()
    proc = start_chronosd(setup, *extra)
    code = wait_popen(proc, timeout)
    wall = time.monotonic() - started
    if code is None:
        stop_popen(proc)
    return code, wall, proc


def wait_popen(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """Like ``proc.wait(timeout)``, but sees the exit at once (no 50 ms polling steps)."""
    code = wait_pid(proc.pid, timeout)
    if code is not None:
        proc.returncode = code
    return code


def tool(name: str) -> str | None:
    return shutil.which(name)


def profile_chronosd(args: Sequence[str], out: Path, *, limit: int = 45) -> list[str]:
    """pyinstrument's call tree of one ``chronosd ARGS`` run, as markdown lines (when installed)."""
    target = chronosd_argv()
    script = target if len(target) == 1 else ["-m", "chronosd"]
    try:
        subprocess.run(
            [
                PYTHON,
                *("-m", "pyinstrument", "--no-color", "-r", "text", "-o", str(out)),
                *script,
                *args,
            ],
            env=base_env(),
            capture_output=True,
            timeout=300,
        )
        text = out.read_text(errors="replace")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"(pyinstrument could not profile: {exc})"]
    lines = [line for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip()[:1].isdigit()), 0)
    return ["```", *lines[start : start + limit], "```"]
