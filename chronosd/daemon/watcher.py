"""Watch jobs.json and call back once per settled change.

The *directory* is watched, not the file: editors, ``sed -i`` and chronosd's
own CLI replace jobs.json by renaming a temporary file over it, which a
watch on the file's inode would lose. Events for other names in the
directory are dropped; the directory is not watched recursively.

watchfiles' Rust backend (`RustNotify`, documented as its low-level API) is
used directly rather than `awatch`, because `awatch` only yields on the first
change: it gives no moment at which the watch is known to be installed.
`RustNotify` adds its inotify watches in its constructor, so once it returns
every later change is seen and ``task_status.started()`` carries no race.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskStatus

if TYPE_CHECKING:
    from watchfiles._rust_notify import RustNotify

# How often the watching thread looks for changes and at the stop flag. It
# reports a change only after one further step without a new one, so a change
# is seen 1-2 steps after it happens; the step also bounds how long a
# cancellation or stop_event takes to end the watch. Waiting for a first
# change polls a little less often (idle CPU) than waiting for one to settle.
_STEP_MS = 20
_SETTLE_STEP_MS = 10
# Upper bound on one batch while changes keep coming; our own quiet-period
# logic does the debouncing proper.
_MAX_BATCH_MS = 1_000


async def watch_jobs_file(
    path: Path,
    on_change: Callable[[], Awaitable[None]],
    *,
    stop_event: anyio.Event | None = None,
    debounce_ms: int = 100,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Call *on_change* after each change to *path* once it has settled.

    A change settles when no further event for *path* arrives for
    *debounce_ms* milliseconds, so a rename, a truncate-and-write or a
    ``sed -i`` each give one call. Changes that happen while *on_change* runs
    are collected and give one more call after it returns. *on_change* runs in
    this task; its exceptions end the watch and propagate.

    Returns when *stop_event* is set; cancellation also ends it within about
    50 ms. Raises FileNotFoundError if the directory of *path* does not exist.
    """
    from watchfiles._rust_notify import RustNotify

    target = Path(os.path.abspath(path))
    # Any object with is_set() will do for the Rust side; a threading.Event is
    # safe to read from the worker thread, an anyio.Event is not promised to be.
    stop_flag = threading.Event()
    with RustNotify(
        [str(target.parent)],
        False,  # debug
        "WATCHFILES_FORCE_POLLING" in os.environ,  # as watchfiles' own API honours it
        300,  # poll_delay_ms, only used when polling
        False,  # recursive
        False,  # ignore_permission_denied
    ) as notifier:
        _log_debug("watcher.started", path=str(target), debounce_ms=debounce_ms)
        task_status.started()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_relay_stop, stop_event, stop_flag)
            await _watch_loop(notifier, target.name, on_change, stop_flag, debounce_ms)
            tg.cancel_scope.cancel()
    _log_debug("watcher.stopped", path=str(target))


async def _relay_stop(stop_event: anyio.Event | None, stop_flag: threading.Event) -> None:
    # The watching thread cannot be cancelled; it only notices stop_flag. Set
    # it when asked to stop and also when this task group is being cancelled,
    # so the thread returns within one step and the cancellation can land.
    try:
        if stop_event is None:
            await anyio.sleep_forever()
        else:
            await stop_event.wait()
    finally:
        stop_flag.set()


async def _watch_loop(
    notifier: RustNotify,
    name: str,
    on_change: Callable[[], Awaitable[None]],
    stop_flag: threading.Event,
    debounce_ms: int,
) -> None:
    idle_step_ms = max(1, min(_STEP_MS, debounce_ms))
    settle_step_ms = max(1, min(_SETTLE_STEP_MS, debounce_ms))
    settle_at: float | None = None  # anyio clock instant at which to call back
    while True:
        timeout_ms = 0  # 0 = wait for changes indefinitely
        step_ms = idle_step_ms if settle_at is None else settle_step_ms
        if settle_at is not None:
            remaining = settle_at - anyio.current_time()
            if remaining <= 0:
                settle_at = None
                await on_change()
                continue
            timeout_ms = max(1, int(remaining * 1000))
        result = await anyio.to_thread.run_sync(
            notifier.watch, max(_MAX_BATCH_MS, step_ms), step_ms, timeout_ms, stop_flag
        )
        if isinstance(result, str):
            if result == "stop":
                return
            continue  # "timeout" (our settle deadline) or "signal" (main thread only)
        changes = sorted({changed for _, changed in result if os.path.basename(changed) == name})
        if not changes:
            continue
        _log_debug("jobs_file.changed", paths=changes)
        if debounce_ms <= 0:
            await on_change()
        else:
            settle_at = anyio.current_time() + debounce_ms / 1000


def _log_debug(event: str, **context: object) -> None:
    from chronosd.log import get_logger

    get_logger().debug(event, **context)
