"""Reaping job processes on the event loop (a small module: it is entered at every start)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any


def watch_exit(pid: int, on_exit: Callable[[int], object]) -> Callable[[], None]:
    """Reap child *pid* when it exits and call ``on_exit(returncode)`` on the running loop.

    The return code is as asyncio gives it: the exit status, or minus the signal that ended
    the child. Linux: a pidfd read by the event loop itself, no thread and no task. Without
    pidfds (a kernel before 5.3, a seccomp filter), a thread per child waits for it, as
    asyncio's ThreadedChildWatcher does. Returns a function that stops watching (with a
    pidfd; a waiting thread cannot be recalled and reaps the child anyway). Only this pid is
    ever waited for: other children (and whoever waits for them) are left alone.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return _watch_in_thread(loop, pid, on_exit)

    def ready() -> None:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            returncode = 255  # reaped by someone else: its status is lost (asyncio says 255)
        else:
            if reaped == 0:
                return  # not a zombie yet (a pidfd is readable only once it is)
            returncode = os.waitstatus_to_exitcode(status)
        stop()
        on_exit(returncode)

    closed = False

    def stop() -> None:
        nonlocal closed
        if not closed:
            closed = True
            loop.remove_reader(pidfd)
            os.close(pidfd)

    try:
        loop.add_reader(pidfd, ready)
    except BaseException:
        os.close(pidfd)
        raise
    return stop


def _watch_in_thread(loop: Any, pid: int, on_exit: Callable[[int], object]) -> Callable[[], None]:
    import threading

    def wait() -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            returncode = 255
        else:
            returncode = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(on_exit, returncode)

    threading.Thread(target=wait, name=f"waitpid-{pid}", daemon=True).start()
    return lambda: None


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
