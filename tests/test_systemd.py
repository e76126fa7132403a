from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from chronosd.daemon import systemd
from chronosd.daemon.systemd import InheritedSocket

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs in a child: moves the passed descriptors to 3, 4, ... (where systemd
# puts them), calls listen_fds and reports what it saw.
CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys
    from chronosd.daemon import systemd

    passed = [int(fd) for fd in sys.argv[1:]]
    # Park them high first so that moving one to 3 cannot clobber another.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in passed]
    for fd in passed:
        os.close(fd)
    for index, fd in enumerate(parked):
        os.dup2(fd, systemd.SD_LISTEN_FDS_START + index)
        os.close(fd)
    before = [os.get_inheritable(3 + i) for i in range(len(passed))]
    activated = systemd.socket_activated()
    sockets = systemd.listen_fds()
    print(json.dumps({
        "pid": os.getpid(),
        "activated": activated,
        "sockets": [[s.fd, s.name] for s in sockets],
        "inheritable_before": before,
        "inheritable_after": [os.get_inheritable(3 + i) for i in range(len(passed))],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }))
    """
)


def run_child(
    fds: list[int], env: dict[str, str], *, listen_pid_is_child: bool = True
) -> dict[str, object]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    child_env["PYTHONPATH"] = str(REPO_ROOT)
    child_env.update(env)
    argv = [sys.executable, "-c", CHILD, *map(str, fds)]
    if listen_pid_is_child:
        # Like systemd: LISTEN_PID is the pid of the process that gets exec'd.
        argv = ["sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *argv]
    completed = subprocess.run(
        argv, env=child_env, pass_fds=fds, capture_output=True, text=True, timeout=30, check=True
    )
    result: dict[str, object] = json.loads(completed.stdout)
    return result


@pytest.fixture
def listening_sockets() -> Iterator[list[socket.socket]]:
    socks = []
    for _ in range(2):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        socks.append(sock)
    yield socks
    for sock in socks:
        sock.close()


def test_listen_fds_adopts_fd3_and_unsets_environment(
    listening_sockets: list[socket.socket],
) -> None:
    result = run_child([listening_sockets[0].fileno()], {"LISTEN_FDS": "1"})
    assert result["activated"] is True
    assert result["sockets"] == [[3, None]]
    assert result["inheritable_before"] == [True]
    assert result["inheritable_after"] == [False]
    assert result["env_left"] == []


def test_listen_fds_reads_names_for_each_descriptor(
    listening_sockets: list[socket.socket],
) -> None:
    fds = [sock.fileno() for sock in listening_sockets]
    result = run_child(fds, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "chronosd.socket:extra"})
    assert result["sockets"] == [[3, "chronosd.socket"], [4, "extra"]]
    assert result["inheritable_after"] == [False, False]
    assert result["env_left"] == []


def test_listen_fds_ignores_names_whose_count_does_not_match(
    listening_sockets: list[socket.socket],
) -> None:
    fds = [sock.fileno() for sock in listening_sockets]
    result = run_child(fds, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"})
    assert result["sockets"] == [[3, None], [4, None]]


def test_listen_fds_for_another_pid_returns_nothing_and_still_unsets(
    listening_sockets: list[socket.socket],
) -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}  # ours, not the child's
    result = run_child([listening_sockets[0].fileno()], env, listen_pid_is_child=False)
    assert result["activated"] is False
    assert result["sockets"] == []
    assert result["inheritable_after"] == [True]
    assert result["env_left"] == []


@pytest.mark.parametrize(
    ("listen_pid", "listen_fds"),
    [
        ("self", "abc"),
        ("self", ""),
        ("self", "0"),
        ("self", "-1"),
        ("self", " 1"),
        ("self", "1.0"),
        ("self", "100000"),  # far past the open descriptors
        ("garbage", "1"),
        ("", "1"),
        ("-5", "1"),
        (None, "1"),
        ("self", None),
    ],
)
def test_listen_fds_with_garbage_returns_nothing(
    listen_pid: str | None, listen_fds: str | None
) -> None:
    environ: dict[str, str] = {"OTHER": "kept"}
    if listen_pid is not None:
        environ["LISTEN_PID"] = str(os.getpid()) if listen_pid == "self" else listen_pid
    if listen_fds is not None:
        environ["LISTEN_FDS"] = listen_fds
    environ["LISTEN_FDNAMES"] = "a:b"
    assert systemd.listen_fds(environ=environ) == []
    assert environ == {"OTHER": "kept"}


def test_listen_fds_keeps_environment_when_asked() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_fds(unset_environment=False, environ=environ) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


def test_socket_activated_reflects_variables_for_this_process() -> None:
    me = str(os.getpid())
    assert systemd.socket_activated({"LISTEN_PID": me, "LISTEN_FDS": "2"})
    assert not systemd.socket_activated({"LISTEN_PID": me})
    assert not systemd.socket_activated({"LISTEN_PID": me, "LISTEN_FDS": "0"})
    assert not systemd.socket_activated({"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"})
    assert not systemd.socket_activated({})


def test_inherited_socket_is_a_frozen_value() -> None:
    inherited = InheritedSocket(fd=3, name="x")
    with pytest.raises(AttributeError):
        inherited.fd = 4  # type: ignore[misc]
    assert inherited == InheritedSocket(fd=3, name="x")


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    address = str(tmp_path / "notify.sock")
    if len(address) >= 100:  # sun_path is 108 bytes; fall back to a short directory
        pytest.skip("tmp_path too long for an AF_UNIX address")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    yield sock, address
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    name = f"chronosd-test-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_notify_ready_reaches_a_socket_path(path_receiver: tuple[socket.socket, str]) -> None:
    sock, address = path_receiver
    assert systemd.notify_ready("serving 3 jobs", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 3 jobs"


def test_notify_ready_reaches_an_abstract_address(
    abstract_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = abstract_receiver
    assert systemd.notify_ready("up", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_helpers_use_process_environment(
    abstract_receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = abstract_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify_ready("ready")
    assert systemd.notify_status("reconciling")
    assert systemd.notify_stopping("idle for 30s")
    assert systemd.notify("WATCHDOG=1")
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [
        b"READY=1\nSTATUS=ready",
        b"STATUS=reconciling",
        b"STOPPING=1\nSTATUS=idle for 30s",
        b"WATCHDOG=1",
    ]


def test_notify_status_cannot_inject_assignments(
    abstract_receiver: tuple[socket.socket, str],
) -> None:
    sock, address = abstract_receiver
    assert systemd.notify_status("bad\nREADY=1", environ={"NOTIFY_SOCKET": address})
    assert sock.recv(4096) == b"STATUS=bad READY=1"


def test_notify_without_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready("x") is False
    assert systemd.notify("READY=1", environ={}) is False
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize(
    "address",
    ["relative/notify.sock", "/nonexistent/dir/notify.sock", "@chronosd-test-nobody-listens"],
)
def test_notify_failure_is_swallowed(address: str) -> None:
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": address}) is False
