"""In-process timers: the built-in provider, which keeps the daemon resident.

One sleeping task waits for the earliest armed instant (a heap, no polling);
arming an earlier instant wakes it to sleep again for the new minimum.

An arm is handed to ``on_due`` LEAD seconds before its instant, so that the claim
and its fsync are done when the instant comes; the engine starts the run at the
instant itself, never before. Arms due together are handed over concurrently,
so their claims share fsyncs.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final

import anyio

from chronosd.providers.base import Arm, DueCallback
from chronosd.timefmt import utc_now

LEAD: Final = 0.1  # seconds before an armed instant that on_due is called

_LEAD: Final = timedelta(seconds=LEAD)


class LocalProvider:
    name = "local"
    persistent = False

    def __init__(self, clock: Callable[[], datetime] = utc_now) -> None:
        self._clock = clock
        self._armed: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, str]] = []
        self._changed = anyio.Event()

    @property
    def resident(self) -> bool:
        return bool(self._armed)

    async def arm(self, job_id: str, fire_at: datetime, *, dedup_key: str = "") -> str:
        self._armed[job_id] = fire_at
        heapq.heappush(self._heap, (fire_at, job_id))
        self._changed.set()
        return f"local:{job_id}"

    async def cancel(self, job_id: str) -> None:
        # The heap entry stays and is discarded lazily when it surfaces.
        if self._armed.pop(job_id, None) is not None:
            self._changed.set()

    async def list_armed(self) -> list[Arm]:
        return [Arm(job_id, at, f"local:{job_id}") for job_id, at in self._armed.items()]

    def armed(self) -> dict[str, datetime]:
        return dict(self._armed)

    async def aclose(self) -> None:
        self._armed.clear()

    def _pop_due(self, now: datetime) -> list[tuple[str, datetime]]:
        """Arms whose instant is at most LEAD after ``now``."""
        due: list[tuple[str, datetime]] = []
        horizon = now + _LEAD
        while self._heap and self._heap[0][0] <= horizon:
            fire_at, job_id = heapq.heappop(self._heap)
            if self._armed.get(job_id) == fire_at:
                del self._armed[job_id]
                due.append((job_id, fire_at))
        return due

    def _next_delay(self, now: datetime) -> float:
        while self._heap and self._armed.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry of a cancelled or replaced arm
        if not self._heap:
            return float("inf")
        return max(0.0, (self._heap[0][0] - now).total_seconds() - LEAD)

    async def run(self, on_due: DueCallback) -> None:
        """Fire due arms forever, LEAD before their instants; the callbacks of arms due
        together run concurrently, and all of them to completion before the next sleep."""
        while True:
            now = self._clock()
            due = self._pop_due(now)
            if len(due) == 1:
                await on_due(*due[0])
            elif due:
                async with anyio.create_task_group() as tg:
                    for job_id, fire_at in due:
                        tg.start_soon(on_due, job_id, fire_at)
            delay = self._next_delay(self._clock())
            if delay == 0.0:
                continue
            self._changed = anyio.Event()
            with anyio.move_on_after(delay):
                await self._changed.wait()
