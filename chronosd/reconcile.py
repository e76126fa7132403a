"""Desired arms vs observed arms -> arm/cancel actions on the provider.

A coalescing queue of job ids feeds one worker. Each pass looks at the
current desired arm of every queued job (from the Engine) and what the
provider holds (state.db for a persistent provider, the provider itself for
local timers), and sends only the difference, with bounded concurrency.
Transient failures are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import anyio

from chronosd.daemon.idle import IdleTracker
from chronosd.errors import ProviderError, StateError
from chronosd.fire import Engine
from chronosd.log import get_logger
from chronosd.providers.base import Provider, ProviderRejected, ProviderUnavailable
from chronosd.state import StateDB
from chronosd.timefmt import to_wire, utc_now

log = get_logger("chronosd.reconcile")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
REJECTED_RETRY = 300.0  # a refused token is tried again only this rarely


@dataclass(frozen=True)
class Action:
    kind: str  # "arm" | "cancel" | "forget"
    job_id: str
    fire_at: datetime | None = None


def plan_action(
    job_id: str, *, known: bool, desired: datetime | None, observed: datetime | None
) -> Action | None:
    """Pure: the one action that makes the provider hold ``desired`` for ``job_id``."""
    if not known:
        return Action("cancel", job_id) if observed is not None else Action("forget", job_id)
    if desired is None:
        return Action("cancel", job_id) if observed is not None else None
    if desired != observed:
        return Action("arm", job_id, desired)
    return None


def backoff_delay(failures: int, *, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter, never shorter than the server's Retry-After."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, failures - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after or 0.0)


class Reconciler:
    def __init__(
        self,
        *,
        engine: Engine,
        provider: Provider,
        db: StateDB,
        idle: IdleTracker | None = None,
        clock: Callable[[], datetime] = utc_now,
        concurrency: int = 16,
    ) -> None:
        self.engine = engine
        self.provider = provider
        self.db = db
        self.idle = idle
        self.clock = clock
        self._pending: set[str] = set()
        self._wakeup = anyio.Event()
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._failures = 0
        self._busy = False
        self._held = False
        self.last_error: str | None = None

    # ---------------------------------------------------------------- queue
    def request(self, job_ids: Iterable[str]) -> None:
        self._pending.update(job_ids)
        self._sync_hold()
        self._wakeup.set()

    @property
    def idle_now(self) -> bool:
        return not self._pending and not self._busy

    def _sync_hold(self) -> None:
        """Keep the daemon up while anything is queued, in flight or waiting for a retry."""
        wanted = not self.idle_now
        if wanted != self._held and self.idle is not None:
            (self.idle.acquire if wanted else self.idle.release)("reconcile")
        self._held = wanted

    # ---------------------------------------------------------------- worker
    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            if not self._pending:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
            await self.drain()

    async def drain(self) -> bool:
        """One pass over everything queued; True when all of it was confirmed."""
        if not self._pending:
            return True
        batch, self._pending = self._pending, set()
        self._busy = True
        failed: dict[str, ProviderError] = {}
        try:
            observed = await self._observed(batch)
            actions = [
                a
                for job_id in sorted(batch)
                if (
                    a := plan_action(
                        job_id,
                        known=job_id in self.engine.jobs,
                        desired=self.engine.desired_arm(job_id),
                        observed=observed.get(job_id),
                    )
                )
                is not None
            ]

            async def apply(action: Action) -> None:
                async with self._limiter:
                    try:
                        await self._apply(action)
                    except ProviderError as exc:
                        failed[action.job_id] = exc

            async with anyio.create_task_group() as tg:
                for action in actions:
                    tg.start_soon(apply, action)
        except StateError as exc:
            failed.update({job_id: ProviderError(str(exc)) for job_id in batch})
        finally:
            self._busy = False
        now = self.clock()
        if failed:
            first = next(iter(failed.values()))
            self.last_error = str(first)
            self._record(now, error=str(first))
            self._failures += 1
            if isinstance(first, ProviderRejected):
                delay = REJECTED_RETRY
            else:
                retry_after = first.retry_after if isinstance(first, ProviderUnavailable) else None
                delay = backoff_delay(self._failures, retry_after=retry_after)
            log.warning(
                "reconcile.failed", jobs=len(failed), error=str(first), retry_in=round(delay, 1)
            )
            # The ids wait out the backoff marked busy, so the daemon stays up.
            self._busy = True
            try:
                await anyio.sleep(delay)
            finally:
                self._busy = False
                self._pending.update(failed)
            return False
        self._failures = 0
        self.last_error = None
        self._record(now, error=None)
        self._sync_hold()
        return True

    async def _observed(self, batch: set[str]) -> dict[str, datetime]:
        if not self.provider.persistent:
            armed = await self.provider.list_armed()
            return {a.job_id: a.fire_at for a in armed if a.job_id in batch}
        states = self.db.all_jobs()
        return {
            job_id: js.armed_fire
            for job_id, js in states.items()
            if job_id in batch and js.armed_fire is not None and js.armed_confirmed_at is not None
        }

    async def _apply(self, action: Action) -> None:
        job_id = action.job_id
        if action.kind == "arm":
            assert action.fire_at is not None
            await self.provider.arm(
                job_id, action.fire_at, dedup_key=f"{job_id}:{to_wire(action.fire_at)}"
            )
            self.db.update_job(
                job_id,
                armed_fire=action.fire_at,
                armed_confirmed_at=self.clock().replace(microsecond=0),
            )
            log.info(
                "arm.confirmed",
                job_id=job_id,
                fire_at=to_wire(action.fire_at),
                provider=self.provider.name,
            )
        elif action.kind == "cancel":
            await self.provider.cancel(job_id)
            if job_id in self.engine.jobs:
                self.db.update_job(job_id, armed_fire=None, armed_confirmed_at=None)
            else:
                self.db.delete_job(job_id)
            log.info("arm.cancelled", job_id=job_id, provider=self.provider.name)
        else:
            self.db.delete_job(job_id)

    def _record(self, now: datetime, *, error: str | None) -> None:
        try:
            self.db.set_meta("last_reconcile_at", to_wire(now))
            self.db.set_meta("last_reconcile_error", error)
        except StateError:
            pass
