from __future__ import annotations

import os
import signal
import socket
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness import SocketActivator

REPO_ROOT = Path(__file__).resolve().parent.parent

# A minimal socket-activated service: insists on systemd's variables, serves
# one HTTP response per connection from fd 3, exits after CHILD_IDLE seconds
# without a connection.
CHILD = textwrap.dedent(
    """
    import os, select, signal, socket, sys, time
    from chronosd.daemon import systemd

    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit(3)
    if systemd.listen_fds() != [systemd.InheritedSocket(3, "chronosd.socket")]:
        sys.exit(4)
    if os.environ.get("CHILD_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    systemd.notify_ready("serving")
    listener = socket.socket(fileno=3)
    idle = float(os.environ.get("CHILD_IDLE", "0.5"))
    served = 0
    while select.select([listener], [], [], idle)[0]:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\\r\\n\\r\\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            body = str(os.getpid()).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n"
                % len(body) + body
            )
        served += 1
    print(f"served {served}", flush=True)
    # Stopped accepting; a slow shutdown leaves new connections in the backlog.
    marker = os.environ.get("CHILD_EXITING_MARKER")
    if marker:
        open(marker, "w").close()
        time.sleep(float(os.environ.get("CHILD_LINGER", "0")))
    systemd.notify_stopping("idle")
    """
)


@pytest.fixture
def child_script(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return script


def make_activator(
    child_script: Path, tmp_path: Path, notify: bool = False, **child_env: str
) -> SocketActivator:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **child_env}
    return SocketActivator(
        [sys.executable, str(child_script)],
        env=env,
        stdout_path=tmp_path / "child.log",
        notify=notify,
    )


def http_get(port: int) -> tuple[str, str]:
    """One request; returns (status line, body). The backlog holds it until a child accepts."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body.decode()


def wait_for_file(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def test_sequential_connections_are_all_answered(child_script: Path, tmp_path: Path) -> None:
    with make_activator(child_script, tmp_path) as activator:
        assert activator.port > 0
        assert not activator.running()
        responses = [http_get(activator.port) for _ in range(5)]
        assert [status for status, _ in responses] == ["HTTP/1.1 200 OK"] * 5
        assert {int(body) for _, body in responses} <= set(activator.pids)
        assert activator.activations >= 1
        assert activator.wait_for(lambda: len(activator.exit_codes) == activator.activations)
        assert activator.exit_codes == [0] * activator.activations
        assert not activator.running()
    log = (tmp_path / "child.log").read_text()
    assert sum(int(line.split()[1]) for line in log.splitlines()) == 5


def test_concurrent_connections_are_all_answered(child_script: Path, tmp_path: Path) -> None:
    with make_activator(child_script, tmp_path) as activator:
        with ThreadPoolExecutor(max_workers=8) as pool:
            responses = list(pool.map(lambda _: http_get(activator.port), range(16)))
        assert all(status == "HTTP/1.1 200 OK" for status, _ in responses)
        assert activator.activations >= 1
        assert activator.wait_exited(activator.activations)
        assert set(activator.exit_codes) == {0}


def test_connection_while_program_exits_is_served_by_next_one(
    child_script: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "exiting"
    activator = make_activator(
        child_script, tmp_path, CHILD_EXITING_MARKER=str(marker), CHILD_LINGER="0.5"
    )
    with activator:
        _, first_pid = http_get(activator.port)
        wait_for_file(marker)
        assert activator.running()  # still lingering, no longer accepting
        marker.unlink()
        status, second_pid = http_get(activator.port)
        assert status == "HTTP/1.1 200 OK"
        assert second_pid != first_pid
        assert activator.pids == [int(first_pid), int(second_pid)]
        assert activator.wait_exited(2)
        assert activator.exit_codes == [0, 0]


def test_trigger_starts_program_without_connection(child_script: Path, tmp_path: Path) -> None:
    with make_activator(child_script, tmp_path) as activator:
        assert activator.trigger()
        activator.trigger()  # queued before the start, or refused after: never a 2nd start
        assert activator.wait_for(activator.running)
        assert activator.trigger() is False
        assert activator.wait_exited(1)
        time.sleep(0.3)
        assert activator.activations == 1
        assert activator.exit_codes == [0]
        # A connection still activates afterwards.
        assert http_get(activator.port)[0] == "HTTP/1.1 200 OK"
        assert activator.activations == 2


def test_notifications_from_the_program_are_collected(child_script: Path, tmp_path: Path) -> None:
    with make_activator(child_script, tmp_path, notify=True) as activator:
        activator.trigger()
        assert activator.wait_exited(1)
        assert activator.wait_for(lambda: len(activator.notifications) == 2)
        assert activator.notifications == ["READY=1\nSTATUS=serving", "STOPPING=1\nSTATUS=idle"]


def test_stop_terminates_a_running_program(child_script: Path, tmp_path: Path) -> None:
    activator = make_activator(child_script, tmp_path, CHILD_IDLE="60")
    activator.start()
    try:
        assert http_get(activator.port)[0] == "HTTP/1.1 200 OK"
        assert activator.running()
    finally:
        activator.stop(timeout=10)
    assert not activator.running()
    assert activator.exit_codes == [-signal.SIGTERM]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", activator.port), timeout=2).close()


def test_stop_kills_a_program_that_ignores_sigterm(child_script: Path, tmp_path: Path) -> None:
    activator = make_activator(child_script, tmp_path, CHILD_IDLE="60", CHILD_IGNORE_TERM="1")
    activator.start()
    try:
        assert http_get(activator.port)[0] == "HTTP/1.1 200 OK"
    finally:
        activator.stop(timeout=0.5)
    assert activator.exit_codes == [-signal.SIGKILL]


def test_crash_loop_hits_the_trigger_limit(tmp_path: Path) -> None:
    activator = SocketActivator(
        ["sh", "-c", "exit 7"], trigger_limit_burst=5, trigger_limit_interval=60
    )
    with activator, socket.create_connection(("127.0.0.1", activator.port), timeout=5):
        # Nobody accepts the queued connection, so every exit re-triggers.
        assert activator.wait_for(lambda: activator.failure is not None)
        assert activator.wait_exited(5)
        assert activator.exit_codes == [7] * 5
        assert activator.activations == 5
        assert "trigger limit" in (activator.failure or "")


def test_program_environment_names_its_own_pid(tmp_path: Path) -> None:
    report = tmp_path / "env.txt"
    script = 'echo "$$ $LISTEN_PID $LISTEN_FDS $LISTEN_FDNAMES" > "$0"'
    with SocketActivator(["sh", "-c", script, str(report)]) as activator:
        activator.trigger()
        assert activator.wait_exited(1)
    pid, listen_pid, listen_fds, names = report.read_text().split()
    assert pid == listen_pid == str(activator.pids[0])
    assert (listen_fds, names) == ("1", "chronosd.socket")


def test_stop_is_idempotent_and_safe_before_start() -> None:
    never_started = SocketActivator(["true"])
    never_started.stop()
    activator = SocketActivator(["true"])
    activator.start()
    activator.stop()
    activator.stop()
    assert activator.activations == 0
