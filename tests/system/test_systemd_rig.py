"""chronosd under a real systemd (PID 1 in a systemd-nspawn container): tests/system/rig.py.

Skipped, with the reason, when not root, when CHRONOSD_SKIP_SYSTEM=1, or when the systemd rig
cannot boot a container on this machine. The first run builds a Debian rootfs (about two
minutes); later runs take about four minutes, most of it the scenarios' own waiting (a job
watched for 60 s, one-shots that must come due).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RIG_DRIVER = Path(__file__).resolve().parent / "rig.py"
TIMEOUT = 900  # seconds: the rootfs build, the boot and the scenarios' 480 s, with room

pytestmark = [pytest.mark.system, pytest.mark.slow]


def test_scenarios_pass_under_a_real_systemd() -> None:
    if os.environ.get("CHRONOSD_SKIP_SYSTEM") == "1":
        pytest.skip("CHRONOSD_SKIP_SYSTEM=1")
    if os.geteuid() != 0:
        pytest.skip("the systemd rig needs root (systemd-nspawn, overlayfs, debootstrap)")
    try:
        done = subprocess.run(
            [sys.executable, str(RIG_DRIVER)],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        pytest.fail(f"the system tests did not finish in {TIMEOUT}s:\n{out[-6000:]}")
    lines = done.stdout.splitlines()
    skip = [line for line in lines if line.startswith("SKIP: ")]
    if done.returncode == 3 and skip:
        pytest.skip(skip[-1].removeprefix("SKIP: "))
    summary = [
        m for line in lines if (m := re.fullmatch(r"sdrig: (\d+) passed, (\d+) failed", line))
    ]
    failures = [line for line in lines if line.startswith("FAIL")]
    report = "\n".join(failures) + "\n---- last lines:\n" + "\n".join(lines[-60:]) + done.stderr
    assert summary, f"the rig printed no summary (exit {done.returncode}):\n{report}"
    passed, failed = (int(n) for n in summary[-1].groups())
    assert failed == 0 and done.returncode == 0, f"{failed} failed, {passed} passed:\n{report}"
    assert passed >= 40, f"only {passed} checks ran:\n{report}"
