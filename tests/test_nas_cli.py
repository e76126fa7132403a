"""``chronosd nas ...`` as a user runs it: real subprocesses, a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt

from chronosd.timefmt import to_wire

WAIT = 20.0


def chronosd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("STATE_DIRECTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "chronosd", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=env,
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@contextmanager
def nas_serving(tmp_path: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``chronosd nas serve`` on a free port; yields its base URL once it accepts."""
    ready = tmp_path / "nas-ready"
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronosd",
            "nas",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            str(tmp_path / "nas"),
            "--ready-file",
            str(ready),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not ready.exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "nas serve did not become ready"
            time.sleep(0.05)
        yield f"http://{ready.read_text().strip()}", process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=WAIT)
        if process.stderr is not None:
            process.stderr.close()


def test_agent_add_prints_the_token_once_and_refuses_a_second_add(tmp_path: Path) -> None:
    state = str(tmp_path / "nas")
    added = as_json(
        chronosd(
            tmp_path,
            "nas",
            "agent",
            "add",
            "alpha",
            "--callback-url",
            "http://127.0.0.1:9",
            "--state-dir",
            state,
            "--json",
        )
    )
    assert added["agent"] == "alpha"
    assert added["callback_url"] == "http://127.0.0.1:9"
    assert len(added["token"]) >= 32

    again = chronosd(
        tmp_path, "nas", "agent", "add", "alpha", "--callback-url", "http://x", "--state-dir", state
    )
    assert again.returncode == 1
    assert again.stderr.startswith("chronosd: ")
    assert "--rotate-token" in again.stderr
    assert "Traceback" not in again.stderr

    rotated = as_json(
        chronosd(
            tmp_path,
            "--json",
            "nas",
            "agent",
            "add",
            "alpha",
            "--callback-url",
            "http://127.0.0.1:10",
            "--rotate-token",
            "--state-dir",
            state,
        )
    )
    assert rotated["token"] != added["token"]
    listed = as_json(chronosd(tmp_path, "nas", "agent", "list", "--state-dir", state, "--json"))
    assert [(a["agent"], a["callback_url"], a["armed"]) for a in listed] == [
        ("alpha", "http://127.0.0.1:10", 0)
    ]
    assert added["token"] not in (tmp_path / "nas" / "nas.db").read_bytes().decode("latin-1")


def test_agent_add_refuses_a_bad_callback_url(tmp_path: Path) -> None:
    result = chronosd(
        tmp_path,
        "nas",
        "agent",
        "add",
        "alpha",
        "--callback-url",
        "ftp://x",
        "--state-dir",
        str(tmp_path / "nas"),
    )
    assert result.returncode == 2
    assert result.stderr.startswith("chronosd: nas agent add: --callback-url")


def test_armed_and_dead_are_empty_lists_before_anything_happened(tmp_path: Path) -> None:
    state = str(tmp_path / "never-created")
    assert as_json(chronosd(tmp_path, "nas", "armed", "--state-dir", state, "--json")) == []
    assert as_json(chronosd(tmp_path, "nas", "dead", "--state-dir", state, "--json")) == []
    assert not Path(state).exists()


def test_served_nas_arms_fires_and_dead_letters_then_exits_cleanly(tmp_path: Path) -> None:
    state = str(tmp_path / "nas")
    closed_port = _closed_port()
    token = as_json(
        chronosd(
            tmp_path,
            "nas",
            "agent",
            "add",
            "alpha",
            "--callback-url",
            f"http://127.0.0.1:{closed_port}",
            "--state-dir",
            state,
            "--json",
        )
    )["token"]
    later = to_wire(datetime.now(UTC) + timedelta(hours=1))
    past = to_wire(datetime.now(UTC) - timedelta(seconds=5))
    with nas_serving(tmp_path, "--max-delivery-age", "0s") as (url, process):
        with httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {token}"}, trust_env=False
        ) as api:
            assert api.get("/healthz").json()["status"] == "ok"
            (key,) = api.get("/.well-known/jwks.json").json()["keys"]
            assert key["crv"] == "Ed25519"
            later_id = api.post(
                "/api/agent-cron/provision",
                json={"job_id": "later", "fire_at": later, "dedup_key": "later:1"},
            ).json()["schedule_id"]
            api.post(
                "/api/agent-cron/provision",
                json={
                    "job_id": "doomed",
                    "fire_at": past,
                    "agent_callback_url": f"http://127.0.0.1:{closed_port}",
                    "dedup_key": "doomed:1",
                },
            ).raise_for_status()

        deadline = time.monotonic() + WAIT
        while True:
            dead = as_json(chronosd(tmp_path, "nas", "dead", "--state-dir", state, "--json"))
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [(d["agent"], d["job_id"], d["fire_at"]) for d in dead] == [
            ("alpha", "doomed", past)
        ]
        assert dead[0]["last_error"]
        armed = as_json(chronosd(tmp_path, "nas", "armed", "--state-dir", state, "--json"))
        assert [(a["job_id"], a["fire_at"], a["schedule_id"]) for a in armed] == [
            ("later", later, later_id)
        ]
        table = chronosd(tmp_path, "nas", "armed", "--state-dir", state)
        assert table.returncode == 0
        assert "later" in table.stdout

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0
        assert process.stderr is not None
        events = [json.loads(line)["event"] for line in process.stderr.read().splitlines()]
        assert "nas.started" in events
        assert "nas.armed" in events
        assert "nas.dead_lettered" in events


def test_keys_rotate_publishes_both_keys_through_the_running_server(tmp_path: Path) -> None:
    state = str(tmp_path / "nas")
    with nas_serving(tmp_path, "--public-url", "https://nas.example/") as (url, process):
        first = httpx.get(f"{url}/.well-known/jwks.json", trust_env=False).json()["keys"]
        rotated = as_json(
            chronosd(tmp_path, "nas", "keys", "rotate", "--state-dir", state, "--json")
        )
        keys = httpx.get(f"{url}/.well-known/jwks.json", trust_env=False).json()["keys"]
        assert {k["kid"] for k in keys} == {first[0]["kid"], rotated["kid"]}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT) == 0
    assert jwt.PyJWKSet.from_dict({"keys": keys})[rotated["kid"]].key is not None


def test_serve_refuses_a_bad_max_delivery_age(tmp_path: Path) -> None:
    result = chronosd(
        tmp_path, "nas", "serve", "--state-dir", str(tmp_path / "n"), "--max-delivery-age", "soon"
    )
    assert result.returncode == 2
    assert result.stderr.startswith("chronosd: --max-delivery-age")


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_serve_adopts_a_systemd_socket_and_reports_ready(tmp_path: Path) -> None:
    from tests.harness import SocketActivator

    env = {**os.environ, "HOME": str(tmp_path / "home")}
    argv = [sys.executable, "-m", "chronosd", "nas", "serve", "--state-dir", str(tmp_path / "n")]
    activator = SocketActivator(
        argv, env=env, stdout_path=tmp_path / "nas.log", notify=True, fd_name="chronosd-nas"
    )
    with activator:
        response = httpx.get(
            f"http://127.0.0.1:{activator.port}/healthz", timeout=WAIT, trust_env=False
        )
        assert response.status_code == 200
        assert activator.wait_for(
            lambda: any("READY=1" in note for note in activator.notifications), WAIT
        )
    assert activator.exit_codes == [0]
