"""chronosd.daemon.children.watch_exit against real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from chronosd.daemon.children import watch_exit

pytestmark = pytest.mark.anyio
LIMIT = 20.0


async def exit_of(popen: subprocess.Popen[bytes]) -> int:
    done = anyio.Event()
    codes: list[int] = []

    def exited(code: int) -> None:
        codes.append(code)
        done.set()

    watch_exit(popen.pid, exited)
    with anyio.fail_after(LIMIT):
        await done.wait()
    popen.returncode = codes[0]  # reaped by the watcher: Popen must not wait for it
    return codes[0]


async def test_exit_status_is_reported_and_the_child_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    assert await exit_of(child) == 7
    assert not Path(f"/proc/{child.pid}").exists()  # no zombie left behind


async def test_a_signal_is_reported_as_its_negative_number() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(child.pid, signal.SIGKILL)
    assert await exit_of(child) == -signal.SIGKILL


async def test_stopping_the_watch_leaves_the_child_to_others() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    called: list[int] = []
    stop = watch_exit(child.pid, called.append)
    stop()
    stop()  # a second call changes nothing
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(timeout=LIMIT) == 0  # still ours to reap: the watcher let go
    await anyio.sleep(0.05)
    assert called == []
