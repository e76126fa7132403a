"""Crash points for fault-injection tests.

``CHRONOSD_CRASH_AT=<point>`` makes the process kill itself with SIGKILL when
it reaches that point, exactly as a power cut or the OOM killer would; the
reliability tests use it to prove that no occurrence is lost or run twice.
Unset (always, in production) it costs one dictionary look-up per point.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset(
    {
        "before-claim",  # the claim transaction has not committed
        "after-claim",  # claimed and next fire planned, no reply sent yet
        "after-reply",  # the 202 is out, the job not yet started
        "after-run",  # the job finished, its run not yet recorded
        "mid-reconcile",  # the provider holds the arm, state.db does not know yet
    }
)

_ARMED = os.environ.get("CHRONOSD_CRASH_AT", "")


def crash_point(name: str) -> None:
    if _ARMED and name == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
