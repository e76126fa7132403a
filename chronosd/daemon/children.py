"""Reaping job processes on the event loop (a small module: it is entered at every start)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def child_watcher() -> Iterator[None]:
    """Wait for job processes on the event loop itself (Linux pidfds) while this is entered.

    Python 3.11's asyncio waits for each child in a thread of its own (ThreadedChildWatcher):
    starting that thread cost a quarter of a job start when a thousand fires came at once.
    3.12 uses pidfds by itself. Must be entered inside the running loop; the previous watcher
    is put back on exit, so other loops in the same process (tests) are unaffected.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        yield
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:  # a kernel before 5.3, or a seccomp filter that forbids it
        yield
        return
    import asyncio

    previous = asyncio.get_child_watcher()
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    try:
        yield
    finally:
        asyncio.set_child_watcher(previous)
        with warnings.catch_warnings():
            # Children still running at exit are reaped by nobody either way: the daemon
            # is leaving (their process groups were already signalled).
            warnings.simplefilter("ignore", RuntimeWarning)
            watcher.close()
