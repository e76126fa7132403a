"""Activity tracking and the idle deadline (DESIGN.md section 5).

The process is idle when nothing holds it — no open connection, no running
or queued run, no pending reconcile or retry — and the provider does not
need it resident. After ``idle_exit`` seconds of uninterrupted idleness the
supervisor may exit. Every change of state wakes the waiter, which then
sleeps until the new deadline: there is no polling tick.

Not thread-safe: call it from the event loop only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio


class IdleTracker:
    """Counts what keeps the daemon busy and says when it may exit.

    *idle_exit* is the required idle duration in seconds, or None to never
    exit. *clock* must be monotonic; `wait_idle` sleeps on anyio's clock, so
    a fake clock is only meaningful for `idle_deadline`.
    """

    def __init__(
        self,
        idle_exit: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_exit is not None and idle_exit < 0:
            raise ValueError(f"idle_exit must be >= 0 seconds or None, got {idle_exit!r}")
        self._idle_exit = idle_exit
        self._clock = clock
        self._holds: dict[str, int] = {}
        self._resident = False
        # Creation counts as the start of idleness; start-up work holds the
        # tracker itself while it runs.
        self._idle_since: float | None = clock()
        self._wakeup: anyio.Event | None = None

    @property
    def idle_exit(self) -> float | None:
        return self._idle_exit

    @property
    def busy_reasons(self) -> dict[str, int]:
        """Active holds by reason (a copy; reasons with no holds are absent)."""
        return dict(self._holds)

    @property
    def resident(self) -> bool:
        return self._resident

    @property
    def is_idle(self) -> bool:
        return self._idle_since is not None

    @contextmanager
    def hold(self, reason: str) -> Iterator[None]:
        """Keep the process busy for the duration of the ``with`` block."""
        self.acquire(reason)
        try:
            yield
        finally:
            self.release(reason)

    def acquire(self, reason: str) -> None:
        """Count one activity for *reason*; pair with exactly one `release`."""
        self._holds[reason] = self._holds.get(reason, 0) + 1
        self._update()

    def release(self, reason: str) -> None:
        """End one activity for *reason* acquired earlier."""
        count = self._holds.get(reason, 0)
        if count == 0:
            # An unpaired release would let the daemon exit under a live run.
            raise RuntimeError(f"idle tracker: release of {reason!r} without a matching acquire")
        if count == 1:
            del self._holds[reason]
        else:
            self._holds[reason] = count - 1
        self._update()

    def set_resident(self, resident: bool) -> None:
        """Record whether the provider needs the process (local timers) or not."""
        self._resident = resident
        self._update()

    def idle_deadline(self) -> float | None:
        """Clock instant at which idle exit is due; None if busy or never."""
        if self._idle_exit is None or self._idle_since is None:
            return None
        return self._idle_since + self._idle_exit

    async def wait_idle(self) -> None:
        """Return once the process has been idle for ``idle_exit`` seconds in a row.

        Never returns when ``idle_exit`` is None (cancel it instead).
        """
        if self._idle_exit is None:
            await anyio.sleep_forever()
        while True:
            if self._wakeup is None:
                self._wakeup = anyio.Event()
            wakeup = self._wakeup
            deadline = self.idle_deadline()
            if deadline is None:
                await wakeup.wait()
                continue
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            with anyio.move_on_after(remaining):
                await wakeup.wait()

    def _update(self) -> None:
        busy = bool(self._holds) or self._resident
        if busy:
            self._idle_since = None
        elif self._idle_since is None:
            # Only a busy -> idle transition restarts the count; repeating
            # set_resident(False) must not postpone the exit.
            self._idle_since = self._clock()
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
