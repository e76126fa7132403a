"""A stand-in for systemd's socket and path activation, for tests.

`SocketActivator` owns a listening TCP socket as a ``.socket`` unit with
``Accept=no`` does: while no service process runs, it waits until the
socket is readable (a connection is queued), then starts the program with
the socket as fd 3 and ``LISTEN_FDS=1``/``LISTEN_PID=<its pid>``, waits for
it to exit and starts over. Connections that arrive while the program is
exiting stay in the kernel backlog and start the next one, as under
systemd. `trigger()` starts the program without a connection, as a
``.path`` unit would.

Differences from systemd worth knowing:

- Stopping sends SIGTERM to the main process only, then SIGKILL to its
  process group after the timeout (``KillMode=mixed``). When the main
  process exits, what is left of its process group is SIGKILLed; processes
  that started their own session escape (systemd's cgroup would catch them).
- The trigger limit (default 20 starts in 2 s, systemd's ``TriggerLimit*``
  defaults for ``Accept=no``) stops activation and sets `failure`, so a
  crash loop fails the test instead of spinning.

This is test code: it uses a background thread, which the package does not.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

# The socket arrives as stdin (subprocess can place any descriptor there) and
# the shell moves it to 3; LISTEN_PID can only be the pid after the fork, and
# `exec` keeps it for the program.
_WRAPPER = 'exec 3<&0 0</dev/null; export LISTEN_PID=$$; exec "$@"'


class SocketActivator:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        stdout_path: Path | None = None,
        fd_name: str | None = "chronosd.socket",
        notify: bool = False,
        trigger_limit_burst: int = 20,
        trigger_limit_interval: float = 2.0,
    ) -> None:
        """*argv* is started per activation; its stdout and stderr are appended
        to *stdout_path* when given (inherited otherwise). With *notify*, a
        ``NOTIFY_SOCKET`` is provided and what the program sends is collected
        in `notifications`.
        """
        if not argv:
            raise ValueError("argv must name a program")
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.activations = 0
        self.exit_codes: list[int] = []
        self.pids: list[int] = []
        self.notifications: list[str] = []
        self.failure: str | None = None
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self._stdout_path = stdout_path
        self._fd_name = fd_name
        self._want_notify = notify
        self._burst = trigger_limit_burst
        self._interval = trigger_limit_interval
        self._starts: collections.deque[float] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._trigger_pending = False
        self._child: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._notify_sock: socket.socket | None = None
        self._wake_r = -1
        self._wake_w = -1
        self._threads: list[threading.Thread] = []

    # -- public -------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> None:
        if self._sock is not None:
            raise RuntimeError("SocketActivator already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.create_server((self.host, self.port), family=family, backlog=128)
        self.port = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            self._env.pop(variable, None)
        self._env["LISTEN_FDS"] = "1"
        if self._fd_name is not None:
            self._env["LISTEN_FDNAMES"] = self._fd_name
        if self._want_notify:
            name = f"chronosd-harness-{secrets.token_hex(8)}"
            self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._notify_sock.bind("\0" + name)
            self._notify_sock.settimeout(0.1)
            self._env["NOTIFY_SOCKET"] = "@" + name
            self._spawn_thread(self._collect_notifications, "notify")
        self._spawn_thread(self._loop, "activator")

    def trigger(self) -> bool:
        """Start the program now unless it is running; True if a start was queued."""
        with self._cond:
            if self._sock is None or self._stopping:
                raise RuntimeError("SocketActivator is not running")
            if self._child is not None:
                return False
            self._trigger_pending = True
        self._wake()
        return True

    def running(self) -> bool:
        with self._cond:
            return self._child is not None

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> bool:
        """Block until *predicate* (evaluated under the lock) holds; False on timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_exited(self, count: int, timeout: float = 10) -> bool:
        """Block until *count* children have exited in total."""
        return self.wait_for(lambda: len(self.exit_codes) >= count, timeout)

    def stop(self, timeout: float = 10) -> None:
        """Stop activating, SIGTERM a running program (SIGKILL after *timeout*), close."""
        with self._cond:
            self._stopping = True
            if self._child is not None:
                _signal_pid(self._child.pid, signal.SIGTERM)
        if self._sock is None or self._wake_r < 0:
            return  # never started, or already stopped
        self._wake()
        if not self.wait_for(lambda: self._child is None, timeout):
            with self._cond:
                if self._child is not None:
                    _signal_group(self._child.pid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self._sock.close()
        if self._notify_sock is not None:
            self._notify_sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> SocketActivator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- background ---------------------------------------------------------

    def _spawn_thread(self, target: Callable[[], None], role: str) -> None:
        thread = threading.Thread(target=target, name=f"SocketActivator-{role}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _wake(self) -> None:
        # BlockingIOError: the pipe is already full of wake-ups.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _loop(self) -> None:
        assert self._sock is not None
        listen_fd = self._sock.fileno()
        while True:
            with self._cond:
                if self._stopping:
                    return
                triggered = self._trigger_pending
            if not triggered:
                readable, _, _ = select.select([listen_fd, self._wake_r], [], [])
                if self._wake_r in readable:
                    while True:
                        try:
                            if not os.read(self._wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                with self._cond:
                    triggered = self._trigger_pending
                if listen_fd not in readable and not triggered:
                    continue
            if not self._within_trigger_limit():
                return
            self._run_once()

    def _within_trigger_limit(self) -> bool:
        now = time.monotonic()
        while self._starts and now - self._starts[0] > self._interval:
            self._starts.popleft()
        if len(self._starts) < self._burst:
            self._starts.append(now)
            return True
        with self._cond:
            self.failure = (
                f"trigger limit hit: {self._burst} starts within {self._interval} s; "
                f"exit codes so far {self.exit_codes}"
            )
            self._cond.notify_all()
        return False

    def _run_once(self) -> None:
        assert self._sock is not None
        output = open(self._stdout_path, "ab") if self._stdout_path is not None else None  # noqa: SIM115
        try:
            with self._cond:
                if self._stopping:
                    return
                child = subprocess.Popen(
                    ["sh", "-c", _WRAPPER, "sh", *self.argv],
                    stdin=self._sock.fileno(),
                    stdout=output,
                    stderr=subprocess.STDOUT if output is not None else None,
                    env=self._env,
                    cwd=self._cwd,
                    start_new_session=True,
                )
                self._child = child
                self._trigger_pending = False
                self.activations += 1
                self.pids.append(child.pid)
                self._cond.notify_all()
        finally:
            if output is not None:
                output.close()
        # Wait without reaping, so the pid (and its process group id) cannot
        # be reused while leftovers are killed and stop() may signal it.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        with self._cond:
            _signal_group(child.pid, signal.SIGKILL)
            code = child.wait()
            self._child = None
            self.exit_codes.append(code)
            self._cond.notify_all()

    def _collect_notifications(self) -> None:
        assert self._notify_sock is not None
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                data = self._notify_sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.notifications.append(data.decode("utf-8", "replace"))
                self._cond.notify_all()


def _signal_pid(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
