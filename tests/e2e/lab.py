"""The parts of the end-to-end tests: the reference NAS, chronosd under socket activation, and
a proxy that can make the NAS fail.

Everything is a real process on 127.0.0.1: ``chronosd nas serve`` (restartable on the same
port, killable with SIGKILL), and ``chronosd run`` started by the socket-activation harness
(tests/harness.py) whenever the NAS calls back or a test triggers it as a path unit would.
Jobs append ``<job id> <scheduled at> <trigger>`` to one file, which is what the tests count.
Every wait is bounded; none is asserted on.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar
from zoneinfo import ZoneInfo

from chronosd.timefmt import parse_instant, to_wire
from tests.daemon_support import (
    CHRONOSD,
    EventLog,
    StateReader,
    child_env,
    free_port,
    jobs_text,
    replace_atomically,
    toml_config,
    wait_until,
    write_private,
)
from tests.harness import SocketActivator

T = TypeVar("T")


# ---------------------------------------------------------------------- the reference NAS
@dataclass
class NasServer:
    """``chronosd nas serve`` on a fixed loopback port, so it can be killed and come back."""

    state_dir: Path
    home: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _log_file: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> EventLog:
        return EventLog(self.log_path)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*CHRONOSD, "nas", *args, "--state-dir", str(self.state_dir)],
            capture_output=True,
            text=True,
            env=child_env(self.home),
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, f"chronosd nas {' '.join(args)}: {result.stderr}"
        return result

    def add_agent(self, name: str, callback_url: str) -> str:
        out = json.loads(
            self.cli("agent", "add", name, "--callback-url", callback_url, "--json").stdout
        )
        return str(out["token"])

    def armed(self, agent: str | None = None) -> dict[str, dict[str, Any]]:
        """job id -> arm, as ``chronosd nas armed --json`` shows them."""
        rows = json.loads(self.cli("armed", "--json").stdout)
        return {row["job_id"]: row for row in rows if agent is None or row["agent"] == agent}

    def dead(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("dead", "--json").stdout))

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery attempt the NAS recorded (read-only; the NAS may be writing)."""
        path = self.state_dir / "nas.db"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM deliveries ORDER BY id")]
        finally:
            conn.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> NasServer:
        assert not self.running(), "the NAS is already running"
        self.starts += 1
        ready = self.state_dir.parent / f"nas-ready-{self.starts}"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        self.process = subprocess.Popen(
            [
                *CHRONOSD,
                "nas",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--public-url",
                self.base_url,
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

        def is_ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"the reference NAS exited:\n{self.log.tail()}")
            return ready.exists()

        wait_until(is_ready, timeout=20, what="the reference NAS to listen")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last writes."""
        if self.running():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            self.process.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


# ---------------------------------------------------------------------- a faulty NAS
class FaultyProxy:
    """A real HTTP server in front of the NAS that answers 500 to every provision while
    `failing` is set, and forwards everything else (and everything when not failing).

    chronosd's HTTP server and an httpx client, on an event loop in a thread of its own.
    """

    PROVISION = "/api/agent-cron/provision"

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.failing = threading.Event()
        self.refused = 0  # provisions answered 500
        self.forwarded: list[tuple[str, int]] = []  # (path, status) of forwarded requests
        self.port = 0
        self._stack = ExitStack()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultyProxy:
        import anyio.from_thread
        import httpx

        from chronosd.http.server import HTTPServer, bind_listener

        portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        listener = portal.call(bind_listener, "127.0.0.1", 0)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        client = httpx.AsyncClient(trust_env=False, timeout=10)
        server = HTTPServer(self._handle, server_header="faulty-proxy")
        self._client = client
        future, _ = portal.start_task(server.serve, [listener])

        def shut_down() -> None:
            portal.call(server.stop_accepting)
            future.result(timeout=10)
            portal.call(client.aclose)
            portal.call(listener.aclose)

        self._stack.callback(shut_down)
        return self

    def stop(self) -> None:
        self._stack.close()

    async def _handle(self, request: Any) -> Any:
        import httpx

        from chronosd.http.server import Response

        if self.failing.is_set() and request.path == self.PROVISION:
            self.refused += 1
            return Response.json(500, {"error": "injected failure"})
        keep = ("authorization", "content-type", "accept")
        try:
            answer = await self._client.request(
                request.method,
                self.target + request.target,
                content=request.body,
                headers={k: v for k, v in request.headers if k in keep},
            )
        except httpx.HTTPError as exc:
            return Response.json(502, {"error": f"NAS unreachable: {type(exc).__name__}"})
        self.forwarded.append((request.path, answer.status_code))
        headers = tuple(
            (k, v)
            for k, v in answer.headers.items()
            if k.lower() in ("content-type", "retry-after")
        )
        return Response(answer.status_code, answer.content, headers)


# ---------------------------------------------------------------------- one agent
@dataclass(frozen=True)
class Fired:
    """One line a job appended: which occurrence ran, and why."""

    job_id: str
    scheduled_at: datetime
    trigger: str


@dataclass
class Agent:
    """chronosd (config, jobs.json, state) under the socket-activation harness."""

    name: str
    root: Path
    nas: NasServer
    activator: SocketActivator
    config: Path
    jobs: Path
    state_dir: Path
    fired_path: Path
    log_path: Path

    @property
    def log(self) -> EventLog:
        return EventLog(self.log_path)

    @property
    def state(self) -> StateReader:
        return StateReader(self.state_dir)

    def job(
        self, job_id: str, schedule: str, *, sleep: float = 0.0, **fields: Any
    ) -> dict[str, Any]:
        """A jobs.json record whose command appends its occurrence to the fired file."""
        command = (
            f'echo "$CHRONOS_JOB_ID $CHRONOS_SCHEDULED_AT $CHRONOS_TRIGGER" >> "{self.fired_path}"'
        )
        if sleep:
            command += f"; sleep {sleep:g}"
        return {"id": job_id, "schedule": schedule, "command": command, **fields}

    def write_jobs(self, records: Sequence[Mapping[str, Any]]) -> None:
        replace_atomically(self.jobs, jobs_text(records))

    def fired(self) -> list[Fired]:
        try:
            text = self.fired_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 3:  # a line still being written has fewer
                found.append(Fired(parts[0], parse_instant(parts[1]), parts[2]))
        return found

    def cli(self, *args: str) -> Any:
        """``chronosd ARGS --json`` against this agent's state; the decoded output."""
        result = subprocess.run(
            [*CHRONOSD, *args, "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            env=child_env(self.root),
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, f"chronosd {' '.join(args)}: {result.stderr}"
        return json.loads(result.stdout)

    def runs(self) -> list[dict[str, Any]]:
        return list(self.cli("runs", "-n", "10000"))

    def armed(self) -> dict[str, dict[str, Any]]:
        """This agent's arms at the NAS."""
        return self.nas.armed(self.name)

    def start_as_path_unit(self) -> int:
        """Start chronosd without a connection, as chronosd.path would; the activation number."""
        assert self.activator.trigger(), "chronosd is already running"
        number = self.activator.activations + 1
        self.wait_for(lambda: self.activator.activations >= number, timeout=20, what="the start")
        return number

    def wait_exited(self, count: int | None = None, *, timeout: float = 30) -> None:
        """Until *count* processes have exited (default: every one started so far)."""
        activator = self.activator

        def done() -> bool:
            wanted = activator.activations if count is None else count
            return len(activator.exit_codes) >= wanted and (
                count is not None or not activator.running()
            )

        self.wait_for(done, timeout=timeout, what="chronosd to exit")

    def stop_between_fires(self, *, timeout: float = 30) -> None:
        """Stop the activator (no more starts) at a moment chronosd is not running, if any."""
        activator = self.activator
        activator.wait_for(lambda: not activator.running(), timeout)
        activator.stop()

    def wait_for(self, predicate: Callable[[], T | None], *, timeout: float, what: str) -> T:
        try:
            return wait_until(predicate, timeout=timeout, what=what)
        except AssertionError as exc:
            logs = f"--- chronosd ---\n{self.log.tail(60)}\n--- NAS ---\n{self.nas.log.tail(20)}"
            raise AssertionError(f"{exc}\n{logs}") from None

    def wait_fired(
        self, predicate: Callable[[list[Fired]], bool], *, timeout: float, what: str
    ) -> list[Fired]:
        def check() -> list[Fired] | None:
            fired = self.fired()
            return fired if predicate(fired) else None

        return self.wait_for(check, timeout=timeout, what=what)

    def sessions(self) -> list[list[dict[str, Any]]]:
        """The daemon's log events, one list per process that exited normally (and the rest)."""
        sessions: list[list[dict[str, Any]]] = [[]]
        for event in self.log.events():
            sessions[-1].append(event)
            if event.get("event") == "daemon.stopped":
                sessions.append([])
        return [s for s in sessions if s]

    def errors(self) -> list[dict[str, Any]]:
        """Events that mean chronosd failed inside: none may appear in a healthy cycle."""
        bad = {"http.handler_failed", "fire.state_failed", "http.on_sent_failed", "watcher.failed"}
        return [e for e in self.log.events() if e.get("event") in bad]


@dataclass
class Lab:
    """The NAS and the agents of one test; `close` tears all of it down."""

    root: Path
    nas: NasServer
    agents: list[Agent] = field(default_factory=list)
    proxies: list[FaultyProxy] = field(default_factory=list)

    def agent(
        self,
        *,
        nas_url: str | None = None,
        fallback_after: str = "3s",
        list_every: str = "1h",
        idle_exit: str = "1s",
    ) -> Agent:
        """A configured agent with an empty jobs.json, its activator listening; not started.

        *nas_url* is where chronosd sends provision/cancel/list (default: the NAS itself);
        the JWKS and the issuer are always the NAS's own.
        """
        number = len(self.agents)
        root = self.root / f"agent{number}"
        root.mkdir()
        config = root / "chronosd.toml"
        log_path = root / "chronosd.log"
        argv = [sys.executable, "-m", "chronosd", "run", "--config", str(config)]
        activator = SocketActivator(argv, env=child_env(root), stdout_path=log_path)
        activator.start()
        callback = f"http://127.0.0.1:{activator.port}"
        name = f"e2e-agent-{number}"
        token_file = write_private(root / "nas-token", self.nas.add_agent(name, callback) + "\n")
        agent = Agent(
            name=name,
            root=root,
            nas=self.nas,
            activator=activator,
            config=config,
            jobs=root / "jobs.json",
            state_dir=root / "state",
            fired_path=root / "fired.txt",
            log_path=log_path,
        )
        self.agents.append(agent)
        write_private(
            config,
            toml_config(
                jobs=agent.jobs,
                state_dir=agent.state_dir,
                listen=f"127.0.0.1:{activator.port}",
                extra=f'idle_exit = "{idle_exit}"\nshutdown_grace = "5s"',
                provider={"kind": "nas", "fallback_after": fallback_after},
                nas={
                    "url": nas_url or self.nas.base_url,
                    "callback_url": callback,
                    "token_file": str(token_file),
                    "list_every": list_every,
                    "timeout": "2s",
                },
                auth={
                    "mode": "jwt",
                    "jwks_url": f"{self.nas.base_url}/.well-known/jwks.json",
                    "audience": f"agent:{name}",
                    "issuer": self.nas.base_url,
                },
            ),
        )
        agent.write_jobs([])
        return agent

    def delivery_statuses(self) -> dict[int | None, int]:
        """How the agents answered the NAS's fire calls: status (None: no answer) -> count."""
        counts: dict[int | None, int] = {}
        for delivery in self.nas.deliveries():
            status = delivery["status_code"]
            counts[status] = counts.get(status, 0) + 1
        return counts

    def assert_no_5xx(self) -> None:
        statuses = self.delivery_statuses()
        assert not [s for s in statuses if s is not None and s >= 500], statuses

    def proxy(self) -> FaultyProxy:
        proxy = FaultyProxy(self.nas.base_url).start()
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for agent in self.agents:
            agent.activator.stop()
        for proxy in self.proxies:
            proxy.stop()
        self.nas.stop()


# ---------------------------------------------------------------------- time and schedules
def now_utc() -> datetime:
    return datetime.now(UTC)


def occurrences(
    schedule: str, start: datetime, end: datetime, *, timezone: str = "UTC"
) -> list[datetime]:
    """Instants of cron *schedule* (5 or 6 fields) strictly after *start*, up to *end*, in UTC."""
    from cronsim import CronSim

    local = start.astimezone(ZoneInfo(timezone)).replace(microsecond=0)
    found: list[datetime] = []
    for instant in CronSim(schedule, local):
        aware = instant.astimezone(UTC)
        if aware > end:
            return found
        if aware > start:
            found.append(aware)
    return found


def next_occurrence(schedule: str, after: datetime, *, timezone: str = "UTC") -> datetime:
    """The first instant of cron *schedule* strictly after *after*, in UTC."""
    from cronsim import CronSim

    local = after.astimezone(ZoneInfo(timezone)).replace(microsecond=0)
    for instant in CronSim(schedule, local):
        aware = instant.astimezone(UTC)
        if aware > after:
            return aware
    raise AssertionError(f"{schedule!r} has no occurrence after {after}")


def sleep_until(instant: datetime) -> None:
    delay = (instant - now_utc()).total_seconds()
    if delay > 0:
        time.sleep(delay)


def wire(instant: datetime) -> str:
    return to_wire(instant.astimezone(UTC).replace(microsecond=0))


def twice(fired: Sequence[Fired]) -> dict[str, int]:
    """Occurrences that ran more than once, as ``job@instant`` -> count."""
    counts: dict[tuple[str, datetime], int] = {}
    for f in fired:
        counts[(f.job_id, f.scheduled_at)] = counts.get((f.job_id, f.scheduled_at), 0) + 1
    return {f"{job}@{wire(at)}": n for (job, at), n in counts.items() if n > 1}


def summary(name: str, **facts: object) -> None:
    """The one line each test prints about what it saw."""
    print(f"\n[e2e] {name}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
