"""Delivers due arms: POST ``{callback}/api/cron/fire`` with a fresh fire token.

The dispatcher sleeps until the earliest next attempt among the arms, or until `wake` says the
arms changed; it never polls. Due arms are delivered concurrently in a task group the
dispatcher owns: at most ``max_in_flight`` at a time, and at most ``max_in_flight_per_agent``
to any one agent. The second bound spares an agent a burst of simultaneous fires (each one may
start a job) and keeps the connection pool small: httpx's pool costs grow with the connections
it holds, and past a dozen or so to one host, more concurrency delivers a burst slower, not
faster.

Each agent with deliveries under way has its own HTTP client: connections are reused through
a burst, and closed as soon as nothing is in flight to that agent. A socket-activated agent
counts an open connection as activity, so a connection left idle in a pool would keep it
awake until the agent's own keep-alive timeout (httpx expires idle connections only when the
pool is next used, which for a quiet agent is its next fire).

A 2xx is a delivery; anything else is retried with exponential backoff (doubling from
``backoff_base`` up to ``backoff_cap``, or what ``Retry-After`` asks for) until
``max_delivery_age`` after the fire instant, when the arm becomes a dead letter.
Outcomes are written only if the arm still has the generation the delivery started with (see
`chronosd.nas.store`).
"""

from __future__ import annotations

import email.utils
import math
import sqlite3
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from chronosd.nas.app import fire_url
from chronosd.nas.keys import KeyRing
from chronosd.nas.store import Arm, NASStore

if TYPE_CHECKING:
    import httpx

DEFAULT_MAX_DELIVERY_AGE = 24 * 3600.0
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 300.0
DEFAULT_DELIVERY_TIMEOUT = 10.0
DEFAULT_MAX_IN_FLIGHT = 64
DEFAULT_MAX_IN_FLIGHT_PER_AGENT = 8

# Arms are timed by the wall clock, sleeps by the monotonic one. After a suspend or a clock
# step the two disagree, so a long sleep is cut into pieces of at most this many seconds and
# the wall clock is consulted again.
_MAX_SLEEP = 300.0
_MAX_ERROR_LENGTH = 500


@dataclass(frozen=True)
class RetryPolicy:
    max_delivery_age: float = DEFAULT_MAX_DELIVERY_AGE
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based)."""
        if retry_after is not None:
            # Honoured, but never below the base (a "Retry-After: 0" loop would hammer the
            # agent) nor above the cap.
            return min(max(retry_after, self.backoff_base), self.backoff_cap)
        exponent = min(attempt - 1, 64)  # 2**64 seconds is already far past any cap
        return float(min(self.backoff_base * 2**exponent, self.backoff_cap))


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    seconds = when.timestamp() - now
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()


class Dispatcher:
    def __init__(
        self,
        store: NASStore,
        keyring: KeyRing,
        new_client: Callable[[], httpx.AsyncClient],
        *,
        issuer: str,
        policy: RetryPolicy = RetryPolicy(),
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_in_flight_per_agent: int = DEFAULT_MAX_IN_FLIGHT_PER_AGENT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._new_client = new_client
        self._clients: dict[str, httpx.AsyncClient] = {}  # agents with deliveries in flight
        self._issuer = issuer
        self._policy = policy
        self._timeout = delivery_timeout
        self._max_in_flight = max(1, max_in_flight)
        self._max_per_agent = max(1, max_in_flight_per_agent)
        self._clock = clock
        self._in_flight: set[tuple[str, str]] = set()
        self._per_agent: dict[str, int] = {}
        self._wake = anyio.Event()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def wake(self) -> None:
        """The arms changed: look again at what is due and when."""
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver until cancelled. Deliveries cut short are retried by the next start."""
        try:
            async with anyio.create_task_group() as deliveries:
                task_status.started()
                while True:
                    self._wake = wake = anyio.Event()
                    try:
                        delay = self._dispatch(deliveries)
                    except sqlite3.Error as exc:
                        # Another process holding the database past the busy timeout must not
                        # take the NAS down; what was due is still due a moment later.
                        _log().error("nas.dispatch_failed", error=str(exc))
                        delay = self._policy.backoff_base
                    if delay is None or delay > 0:
                        with anyio.move_on_after(math.inf if delay is None else delay):
                            await wake.wait()
        finally:
            clients, self._clients = list(self._clients.values()), {}
            with anyio.CancelScope(shield=True):
                for client in clients:
                    await _close(client)

    def _dispatch(self, group: anyio.abc.TaskGroup) -> float | None:
        """Start what is due; return how long to wait for the next arm (None: until woken)."""
        self._start_due(group, self._clock())
        if len(self._in_flight) >= self._max_in_flight:
            return None  # a finishing delivery frees a slot and wakes us
        # Arms of agents at their limit wait for one of their deliveries to finish, which
        # wakes us too; they must not count as due, or this loop would spin.
        earliest = self._store.earliest_attempt(
            excluding=self._in_flight, skip_agents=self._saturated()
        )
        if earliest is None:
            return None
        return min(earliest - self._clock(), _MAX_SLEEP)

    def _saturated(self) -> set[str]:
        return {agent for agent, count in self._per_agent.items() if count >= self._max_per_agent}

    def _start_due(self, group: anyio.abc.TaskGroup, now: float) -> None:
        started = True
        while started and len(self._in_flight) < self._max_in_flight:
            started = False
            saturated = self._saturated()
            # Arms in flight are still due in the table: ask for enough rows to see past those
            # of the agents we may still call, plus one agent's worth of new ones.
            visible = sum(n for agent, n in self._per_agent.items() if agent not in saturated)
            wanted = min(self._max_in_flight - len(self._in_flight), self._max_per_agent)
            for arm in self._store.due(now, limit=visible + wanted, skip_agents=saturated):
                if len(self._in_flight) >= self._max_in_flight:
                    break
                if arm.key in self._in_flight or arm.agent in saturated:
                    continue
                self._in_flight.add(arm.key)
                count = self._per_agent[arm.agent] = self._per_agent.get(arm.agent, 0) + 1
                if count >= self._max_per_agent:
                    saturated.add(arm.agent)
                group.start_soon(self._deliver, arm)
                started = True

    async def _deliver(self, arm: Arm) -> None:
        try:
            await self._attempt(arm)
        except Exception:
            # The state database or the key file failed us. The arm is still due, so pause
            # before letting it go, or the loop would try it again at once.
            _log().exception("nas.delivery_aborted", agent=arm.agent, job_id=arm.job_id)
            await anyio.sleep(self._policy.backoff_base)
        finally:
            self._in_flight.discard(arm.key)
            remaining = self._per_agent.pop(arm.agent) - 1
            if remaining:
                self._per_agent[arm.agent] = remaining
            self._wake.set()
            if not remaining:
                # Let go of the agent's connections; the next delivery opens a new one.
                client = self._clients.pop(arm.agent, None)
                if client is not None:
                    with anyio.CancelScope(shield=True):
                        await _close(client)

    def _client_for(self, agent: str) -> httpx.AsyncClient:
        client = self._clients.get(agent)
        if client is None:
            client = self._clients[agent] = self._new_client()
        return client

    async def _attempt(self, arm: Arm) -> None:
        import httpx

        attempt = arm.attempts + 1
        token = self._keyring.mint_fire_token(
            issuer=self._issuer,
            audience=f"agent:{arm.agent}",
            job_id=arm.job_id,
            now=self._clock(),
        )
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            with anyio.fail_after(self._timeout):
                response = await self._client_for(arm.agent).post(
                    fire_url(arm.callback_url),
                    json={"job_id": arm.job_id, "fire_at": arm.fire_at},
                    headers={"authorization": f"Bearer {token}"},
                    timeout=self._timeout,
                )
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("retry-after"), now=self._clock())
        except TimeoutError:
            error = f"no answer within {self._timeout:g}s"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}".rstrip(": ")[:_MAX_ERROR_LENGTH]
        now = self._clock()
        context = {
            "agent": arm.agent,
            "job_id": arm.job_id,
            "fire_at": arm.fire_at,
            "schedule_id": arm.schedule_id,
            "attempt": attempt,
        }
        if status is not None and 200 <= status < 300:
            self._store.mark_delivered(arm, attempt=attempt, status_code=status, now=now)
            _log().info("nas.delivered", status=status, **context)
            return
        reason = error if error is not None else f"HTTP {status}"
        deadline = arm.fire_epoch + self._policy.max_delivery_age
        if now >= deadline:
            if self._store.dead_letter(
                arm, attempt=attempt, status_code=status, error=reason, now=now
            ):
                _log().warning("nas.dead_lettered", status=status, error=reason, **context)
            return
        # The last attempt falls on the deadline itself rather than being skipped.
        next_attempt = min(now + self._policy.delay(attempt, retry_after), deadline)
        self._store.schedule_retry(
            arm,
            attempt=attempt,
            next_attempt_at=next_attempt,
            status_code=status,
            error=reason,
            now=now,
        )
        _log().warning(
            "nas.delivery_failed",
            status=status,
            error=reason,
            retry_in=round(next_attempt - now, 3),
            **context,
        )


async def _close(client: httpx.AsyncClient) -> None:
    with suppress(Exception):  # closing sockets that failed already must not stop the NAS
        await client.aclose()
