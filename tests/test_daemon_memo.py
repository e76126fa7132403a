"""The daemon's side of the validation memo and of a quick start-up.

In-process Daemon objects (local provider, real state.db in tmp_path) for the memo and the
last good text; a socket-activated subprocess for the keep-alive of an idle connection.
"""

from __future__ import annotations

import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from chronosd.config import load_config
from chronosd.daemon.supervisor import (
    META_JOBS_MEMO,
    META_LAST_GOOD,
    META_LAST_GOOD_LAYOUT,
    SOCKET_ACTIVATED_KEEPALIVE,
    Daemon,
    RunOptions,
)
from chronosd.jobs import validate
from chronosd.jobs.layout import RecordLayout, text_digest
from chronosd.jobs.model import Job
from tests.daemon_support import (
    EventLog,
    child_env,
    http_request,
    jobs_text,
    replace_atomically,
    toml_config,
    write_private,
)
from tests.harness import SocketActivator


def rec(job_id: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"id": job_id, "schedule": f"{len(job_id)} 4 * * *"}
    record["command"] = ["true"]
    record.update(fields)
    return record


class Setup:
    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.jobs = root / "jobs.json"
        self.config = root / "chronosd.toml"
        self.state_dir = root / "state"
        write_private(
            self.config,
            toml_config(jobs=self.jobs, state_dir=self.state_dir, auth={"mode": "none"}),
        )
        self.checked: list[object] = []
        original = validate._Checker.run

        def run(checker: Any, *args: Any) -> Job | None:
            self.checked.append(checker.record.get("id"))
            return original(checker, *args)

        monkeypatch.setattr(validate._Checker, "run", run)
        monkeypatch.delenv("LISTEN_FDS", raising=False)
        monkeypatch.delenv("LISTEN_PID", raising=False)

    def write(self, records: list[Any]) -> None:
        replace_atomically(self.jobs, jobs_text(records))

    def start(self) -> Daemon:
        """A fresh Daemon that loads jobs.json as a start would, then closes its state."""
        self.checked.clear()
        daemon = Daemon(load_config(config_path=self.config), RunOptions(self.config))
        daemon.load_jobs(startup=True)
        daemon._save_memo()  # what the daemon does a moment later, or on its way out
        daemon._save_layout()
        daemon.db.close()
        return daemon

    def meta(self, key: str) -> str | None:
        with sqlite3.connect(self.state_dir / "state.db") as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with sqlite3.connect(self.state_dir / "state.db") as db:
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    return Setup(tmp_path, monkeypatch)


def test_a_start_with_an_unchanged_file_checks_no_job_again(setup: Setup) -> None:
    records = [rec(f"job-{i}", env={"N": str(i)}) for i in range(30)]
    setup.write(records)
    first = setup.start()
    assert len(setup.checked) == 30
    assert setup.meta(META_JOBS_MEMO)
    second = setup.start()
    assert setup.checked == []
    assert second.engine.jobs == first.engine.jobs
    assert [j.spec_hash for j in second.engine.jobs.values()] == [
        j.spec_hash for j in first.engine.jobs.values()
    ]


def test_a_start_after_one_edit_checks_only_the_edited_job(setup: Setup) -> None:
    records = [rec(f"job-{i}") for i in range(30)]
    setup.write(records)
    setup.start()
    records[12] = rec("job-12", schedule="45 6 * * *")
    setup.write(records)
    daemon = setup.start()
    assert setup.checked == ["job-12"]
    assert daemon.engine.jobs["job-12"].schedule.text == "0 45 6 * * *"


def test_a_damaged_memo_costs_a_full_validation_and_nothing_else(setup: Setup) -> None:
    records = [rec(f"job-{i}") for i in range(10)]
    setup.write(records)
    first = setup.start()
    stored = setup.meta(META_JOBS_MEMO)
    assert stored is not None
    setup.set_meta(META_JOBS_MEMO, stored[:-40] + "x" * 40)
    second = setup.start()
    assert len(setup.checked) == 10
    assert second.engine.jobs == first.engine.jobs
    assert second.jobs_error is None


def test_a_file_made_invalid_is_rejected_and_the_last_good_set_kept(setup: Setup) -> None:
    records = [rec(f"job-{i}") for i in range(5)]
    setup.write(records)
    first = setup.start()
    good_text = setup.meta(META_LAST_GOOD)
    records[3] = rec("job-3", schedule="0 0 31 2 *")
    setup.write(records)
    second = setup.start()
    assert second.jobs_error is not None
    assert 'job job-3: schedule: "0 0 31 2 *" never fires' in second.jobs_error
    assert second.engine.jobs == first.engine.jobs
    assert setup.meta(META_LAST_GOOD) == good_text


def test_the_last_good_text_follows_the_applied_file(setup: Setup) -> None:
    setup.write([rec("a")])
    setup.start()
    first = setup.meta(META_LAST_GOOD)
    assert first == setup.jobs.read_text()
    setup.write([rec("a"), rec("b")])
    setup.start()
    assert setup.meta(META_LAST_GOOD) == setup.jobs.read_text()
    setup.write([rec("a")])
    setup.start()
    assert setup.meta(META_LAST_GOOD) == first
    # With its layout, for the next edit to be found by its changed part.
    stored = setup.meta(META_LAST_GOOD_LAYOUT)
    layout = None if stored is None else RecordLayout.loads(stored)
    assert layout is not None and layout.digest == text_digest(first) and layout.ids == ("a",)


def test_a_waiting_connection_is_seen_before_it_is_accepted(setup: Setup) -> None:
    daemon = Daemon(load_config(config_path=setup.config), RunOptions(setup.config))
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            daemon._listener_fds = [server.fileno()]
            assert not daemon._connection_waiting()
            with socket.create_connection(server.getsockname(), timeout=5):
                deadline = time.monotonic() + 5
                while not daemon._connection_waiting() and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert daemon._connection_waiting()
    finally:
        daemon.db.close()


def test_an_idle_keep_alive_connection_does_not_hold_a_socket_activated_daemon(
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs.json"
    write_private(jobs, jobs_text([]))
    config = write_private(
        tmp_path / "chronosd.toml",
        toml_config(
            jobs=jobs,
            state_dir=tmp_path / "state",
            auth={"mode": "none"},
            extra='idle_exit = "500ms"',
        ),
    )
    log = EventLog(tmp_path / "daemon.log")
    argv = [sys.executable, "-m", "chronosd", "run", "--config", str(config)]
    request = b"GET /healthz HTTP/1.1\r\nhost: chronosd\r\n\r\n"
    # A client that comes back on its kept-alive connection somewhat later than the daemon
    # keeps an idle one open (a NAS's pool): the daemon has closed it and exited by then.
    pause = SOCKET_ACTIVATED_KEEPALIVE + 1.5
    with SocketActivator(argv, env=child_env(tmp_path), stdout_path=log.path) as activator:
        first = http_request(activator.address, "GET", "/healthz")
        assert first.status == 200, first
        with socket.create_connection(activator.address, timeout=10) as conn:
            conn.sendall(request)
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            closed = False
            for _ in range(3):
                time.sleep(pause)
                try:
                    conn.sendall(request)
                    answer = conn.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    answer = b""
                if not answer:
                    closed = True
                    break
            assert closed, "the daemon kept an idle connection open"
        assert activator.wait_exited(1, timeout=20), log.tail()
    stopping = log.events("daemon.stopping")
    assert stopping and stopping[0]["reason"] == "idle"
    assert first.body["status"] == "ok"
