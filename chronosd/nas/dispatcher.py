"""Delivers due arms: POST ``{callback}/api/cron/fire`` with a fresh fire token.

The dispatcher sleeps until the earliest next attempt among the arms, or until the app says the
arms changed (`arm_changed`); it never polls. Due arms are read from the database a
batch at a time into per-agent queues, and delivered concurrently in a task group the
dispatcher owns: at most ``max_in_flight`` at a time, and at most ``max_in_flight_per_agent``
to any one agent (each fire may start a job; a socket-activated agent may accept only so many
connections before it runs). A provision or cancel that touches a queued arm takes it out of
the queue, so an arm is never delivered in a version older than the one read at its start.

Each agent with deliveries under way has its own `AgentConnections` (the shared HTTP client,
`chronosd.http.client`, per origin): kept-alive connections reused through a burst, closed as
soon as nothing is in flight or queued for that agent. A socket-activated agent counts an open
connection as activity, so a connection left idle would keep it awake.

A 2xx is a delivery; anything else is retried with exponential backoff (doubling from
``backoff_base`` up to ``backoff_cap``, or what ``Retry-After`` asks for) until
``max_delivery_age`` after the fire instant, when the arm becomes a dead letter.
Outcomes are deferred to the store's next transaction (`NASStore.defer`: one commit for those
that finished together, and always before any later change to the arms), and apply only if the
arm still has the generation the delivery started with. An arm stays in flight, out of every
read, until its outcome is written, so it is not delivered twice.
"""

from __future__ import annotations

import email.utils
import json
import math
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from chronosd.nas.delivery import AgentConnections, DeliveryError, DeliveryTimedOut, fire_target
from chronosd.nas.keys import KeyRing
from chronosd.nas.store import Arm, NASStore, Outcome

DEFAULT_MAX_DELIVERY_AGE = 24 * 3600.0
DEFAULT_BACKOFF_BASE = 1.0
DEFAULT_BACKOFF_CAP = 300.0
DEFAULT_DELIVERY_TIMEOUT = 10.0
DEFAULT_MAX_IN_FLIGHT = 64
# An agent commits the claims of concurrent fires together (one fsync for the lot), so a burst
# goes faster with more in flight (measured into chronosd, 300 fires: 1.0–1.7 s at 32,
# 1.7–3.2 s at 16, 2.2 s at 8), up to where the agent's connection limit (chronosd: 256)
# would answer 503.
DEFAULT_MAX_IN_FLIGHT_PER_AGENT = 32
DEFAULT_KEEPALIVE_EXPIRY = 2.0
"""A connection idle this long is not reused: the agent may be closing it (chronosd: 5 s)."""

# Arms are timed by the wall clock, sleeps by the monotonic one. After a suspend or a clock
# step the two disagree, so a long sleep is cut into pieces of at most this many seconds and
# the wall clock is consulted again.
_MAX_SLEEP = 300.0
_MAX_ERROR_LENGTH = 500
# Due arms read per query, and at most queued per agent: enough to keep the deliveries going
# between reads, few enough that one agent's burst leaves room for the others.
_BATCH = 256


@dataclass(frozen=True)
class RetryPolicy:
    """How failed deliveries are retried."""

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


def _default_tls_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


class Dispatcher:
    def __init__(
        self,
        store: NASStore,
        keyring: KeyRing,
        *,
        issuer: str,
        policy: RetryPolicy = RetryPolicy(),
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_in_flight_per_agent: int = DEFAULT_MAX_IN_FLIGHT_PER_AGENT,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        tls_context: Callable[[], ssl.SSLContext] = _default_tls_context,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._issuer = issuer
        self._policy = policy
        self._timeout = delivery_timeout
        self._max_in_flight = max(1, max_in_flight)
        self._max_per_agent = max(1, max_in_flight_per_agent)
        self._keepalive_expiry = keepalive_expiry
        self._tls: ssl.SSLContext | None = None
        self._new_tls_context = tls_context
        self._clock = clock
        self._queues: dict[str, deque[Arm]] = {}  # due arms not started yet, per agent
        self._queued: set[tuple[str, str]] = set()
        self._in_flight: set[tuple[str, str]] = set()  # started, outcome not written yet
        self._active: dict[str, int] = {}  # fire calls under way, per agent
        self._active_total = 0
        self._connections: dict[str, AgentConnections] = {}
        # The table may hold due arms that are neither queued nor in flight.
        self._scan = True
        self._scanned_at = -math.inf  # every arm due by then was known after the last read
        self._next_due: float | None = None  # the earliest arm due after _scanned_at
        self._unread_agents: set[str] = set()  # may have more due arms than were read
        self._data_version: int | None = None
        self._wake = anyio.Event()

    @property
    def in_flight(self) -> int:
        """Deliveries started whose outcome is not written yet."""
        return len(self._in_flight)

    def arm_changed(self, agent: str, job_id: str, next_attempt_at: float | None) -> None:
        """Arm (agent, job_id) was provisioned (due at *next_attempt_at*) or cancelled (None)."""
        key = (agent, job_id)
        if key in self._queued:
            self._queued.discard(key)
            queue = self._queues[agent]
            for index, arm in enumerate(queue):
                if arm.key == key:
                    del queue[index]
                    break
        if next_attempt_at is not None and next_attempt_at <= self._scanned_at:
            self._scan = True
        elif next_attempt_at is not None and (
            self._next_due is None or next_attempt_at < self._next_due
        ):
            self._next_due = next_attempt_at
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
                        delay = self._step(deliveries)
                    except sqlite3.Error as exc:
                        # Another process holding the database past the busy timeout must not
                        # take the NAS down; what was due is still due a moment later.
                        _log().error("nas.dispatch_failed", error=str(exc))
                        delay = self._policy.backoff_base
                    if delay is None or delay > 0:
                        with anyio.move_on_after(math.inf if delay is None else delay):
                            await wake.wait()
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    self._write_outcomes()  # what was delivered must not be delivered again
                except sqlite3.Error as exc:
                    _log().error("nas.dispatch_failed", error=str(exc))
                connections, self._connections = list(self._connections.values()), {}
                for pool in connections:
                    await pool.aclose()

    def _step(self, group: anyio.abc.TaskGroup) -> float | None:
        """Write outcomes, start what is due; how long to wait then (None: until woken)."""
        self._write_outcomes()
        now = self._clock()
        version = self._store.data_version()
        if version != self._data_version:
            # Another process wrote (`chronosd nas agent remove` deletes arms): queued arms
            # may be gone.
            self._data_version = version
            self._drop_queues()
            self._scan = True
        if self._next_due is not None and now >= self._next_due:
            self._scan = True
        if self._scan and self._waiting_for_slots() < self._max_in_flight:
            self._read_due(now)
        self._start(group)
        self._release_idle_connections(group)
        if self._scan:
            # More is due than we hold; every queued arm waits for a slot, so a delivery
            # finishing wakes us to read on.
            return None
        self._next_due = self._store.earliest_attempt_after(self._scanned_at)
        if self._next_due is None:
            return None
        return min(self._next_due - now, _MAX_SLEEP)

    def _waiting_for_slots(self) -> int:
        """Queued arms, not counting agents whose queue is full (the next read skips them)."""
        return sum(len(queue) for queue in self._queues.values() if len(queue) < _BATCH)

    def _read_due(self, now: float) -> None:
        full = {agent for agent, queue in self._queues.items() if len(queue) >= _BATCH}
        # Arms queued or in flight are still due in the table: ask for enough rows to see
        # past those of the agents we read for.
        known = sum(len(q) for agent, q in self._queues.items() if agent not in full)
        known += sum(1 for agent, _ in self._in_flight if agent not in full)
        limit = known + _BATCH
        rows = self._store.due(now, limit=limit, skip_agents=full)
        for arm in rows:
            if arm.key in self._in_flight or arm.key in self._queued or arm.agent in full:
                continue
            queue = self._queues.setdefault(arm.agent, deque())
            queue.append(arm)
            self._queued.add(arm.key)
            if len(queue) >= _BATCH:
                full.add(arm.agent)
        if len(rows) < limit:
            # Everything due by *now* is known, but for the agents whose queue is full: they
            # are read again once their queue has run down (see _start).
            self._scan = False
            self._scanned_at = now
            self._unread_agents |= full
        else:
            self._scan = True

    def _start(self, group: anyio.abc.TaskGroup) -> None:
        for agent in list(self._queues):
            queue = self._queues[agent]
            while (
                queue
                and self._active_total < self._max_in_flight
                and self._active.get(agent, 0) < self._max_per_agent
            ):
                arm = queue.popleft()
                self._queued.discard(arm.key)
                self._in_flight.add(arm.key)
                self._active[agent] = self._active.get(agent, 0) + 1
                self._active_total += 1
                group.start_soon(self._deliver, arm)
            if agent in self._unread_agents and len(queue) < _BATCH // 2:
                self._unread_agents.discard(agent)
                self._scan = True
            if not queue:
                del self._queues[agent]
            if self._active_total >= self._max_in_flight:
                break

    def _drop_queues(self) -> None:
        self._queues.clear()
        self._queued.clear()
        self._unread_agents.clear()

    def _release_idle_connections(self, group: anyio.abc.TaskGroup) -> None:
        for agent in [a for a in self._connections if not self._active.get(a)]:
            if agent not in self._queues:
                # Let go of the agent's connections; the next delivery opens a new one.
                group.start_soon(self._connections.pop(agent).aclose)

    def _connections_for(self, agent: str) -> AgentConnections:
        pool = self._connections.get(agent)
        if pool is None:
            pool = self._connections[agent] = AgentConnections(
                tls_context=self._tls_context,
                timeout=self._timeout,
                keepalive_expiry=self._keepalive_expiry,
                max_idle=self._max_per_agent,
            )
        return pool

    def _tls_context(self) -> ssl.SSLContext:
        # One for all agents, made on first use: building one costs ~50 ms.
        if self._tls is None:
            self._tls = self._new_tls_context()
        return self._tls

    async def _deliver(self, arm: Arm) -> None:
        outcome: Outcome | None = None
        try:
            outcome = await self._attempt(arm)
        except Exception:
            # The key file failed us. The arm is still due, so pause before letting it go, or
            # the loop would try it again at once.
            _log().exception("nas.delivery_aborted", agent=arm.agent, job_id=arm.job_id)
            await anyio.sleep(self._policy.backoff_base)
        finally:
            remaining = self._active[arm.agent] - 1
            if remaining:
                self._active[arm.agent] = remaining
            else:
                del self._active[arm.agent]
            self._active_total -= 1
            if outcome is None:
                self._in_flight.discard(arm.key)
                self._scan = True
            else:
                # Written with the next transaction, together with the outcomes that finish
                # meanwhile; the arm stays in flight until then.
                self._store.defer(outcome)
            self._wake.set()

    async def _attempt(self, arm: Arm) -> Outcome:
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
        body = json.dumps(
            {"job_id": arm.job_id, "fire_at": arm.fire_at},
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        try:
            target = fire_target(arm.callback_url)
            with anyio.fail_after(self._timeout):
                reply = await self._connections_for(arm.agent).post_json(
                    target, body, f"Bearer {token}"
                )
            status = reply.status
            retry_after = parse_retry_after(reply.retry_after, now=self._clock())
        except (TimeoutError, DeliveryTimedOut):
            # The client's own timeouts (connect, send, each read) are this one too.
            error = f"no answer within {self._timeout:g}s"
        except DeliveryError as exc:
            error = str(exc)[:_MAX_ERROR_LENGTH]
        now = self._clock()
        if status is not None and 200 <= status < 300:
            return Outcome(arm, "delivered", attempt, now, status)
        reason = error if error is not None else f"HTTP {status}"
        deadline = arm.fire_epoch + self._policy.max_delivery_age
        if now >= deadline:
            return Outcome(arm, "dead", attempt, now, status, reason)
        # The last attempt falls on the deadline itself rather than being skipped.
        next_attempt = min(now + self._policy.delay(attempt, retry_after), deadline)
        return Outcome(arm, "retry", attempt, now, status, reason, next_attempt)

    def _write_outcomes(self) -> None:
        try:
            self._store.flush()
        finally:
            # Also what an agent's request wrote (each change to the arms writes the deferred
            # outcomes first), and what was written before a failure.
            self._settle(self._store.take_written())

    def _settle(self, written: list[tuple[Outcome, bool]]) -> None:
        log = _log()
        for outcome, done in written:
            arm = outcome.arm
            self._in_flight.discard(arm.key)
            if not done:
                # Replaced or cancelled while in flight: a replacement, due perhaps, was
                # skipped by the reads meanwhile.
                self._scan = True
            elif outcome.kind == "retry" and outcome.next_attempt_at is not None:
                # A retry due at once (no backoff) lies behind the last read.
                self._scan = self._scan or outcome.next_attempt_at <= self._scanned_at
            context = {
                "agent": arm.agent,
                "job_id": arm.job_id,
                "fire_at": arm.fire_at,
                "schedule_id": arm.schedule_id,
                "attempt": outcome.attempt,
                "status": outcome.status_code,
            }
            if outcome.kind == "delivered":
                log.info("nas.delivered", **context)
            elif outcome.kind == "dead":
                if done:
                    log.warning("nas.dead_lettered", error=outcome.error, **context)
            else:
                assert outcome.next_attempt_at is not None
                log.warning(
                    "nas.delivery_failed",
                    error=outcome.error,
                    retry_in=round(outcome.next_attempt_at - outcome.at, 3),
                    **context,
                )
