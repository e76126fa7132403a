"""Running the reference NAS: the HTTP routes and the dispatcher in one task group.

`run_nas` is what ``chronosd nas serve`` and the tests start::

    async with anyio.create_task_group() as tg:
        nas = await tg.start(run_nas, NASOptions(state_dir=path), [listener])
        ...               # nas.base_url, nas.store, nas.keyring
        nas.stop()        # or cancel tg: nothing is lost, unfinished deliveries are retried

The listeners belong to the caller (or to systemd) and are never closed here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from chronosd.errors import ConfigError
from chronosd.http.server import HTTPServer, Limits, format_listener_address
from chronosd.nas.app import NASApp
from chronosd.nas.dispatcher import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_DELIVERY_TIMEOUT,
    DEFAULT_MAX_DELIVERY_AGE,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_IN_FLIGHT_PER_AGENT,
    Dispatcher,
    RetryPolicy,
)
from chronosd.nas.keys import KeyRing
from chronosd.nas.store import NASStore

DEFAULT_LISTEN = "127.0.0.1:8788"
DELIVERY_HISTORY = 30 * 86400.0
"""Delivery attempts older than this are pruned at start-up."""
_STOP_GRACE = 5.0  # seconds for requests in progress to be answered at shutdown


@dataclass(frozen=True)
class NASOptions:
    """How `chronosd nas serve` runs."""

    state_dir: Path
    public_url: str | None = None  # default: http://<first listener's address>
    max_delivery_age: float = DEFAULT_MAX_DELIVERY_AGE
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_cap: float = DEFAULT_BACKOFF_CAP
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_in_flight_per_agent: int = DEFAULT_MAX_IN_FLIGHT_PER_AGENT
    limits: Limits = field(default_factory=Limits)


@dataclass
class RunningNAS:
    """Handed to the caller of `run_nas` once it accepts connections."""

    base_url: str  # the public URL, also the ``iss`` of every fire token
    address: str  # "host:port" of the first listener
    state_dir: Path
    store: NASStore
    keyring: KeyRing
    dispatcher: Dispatcher
    _stop: anyio.Event = field(default_factory=anyio.Event, repr=False)

    def stop(self) -> None:
        """Stop accepting, answer requests in progress, then return from `run_nas`."""
        self._stop.set()


def resolve_state_dir(flag: Path | str | None) -> Path:
    """``--state-dir``, else ``$STATE_DIRECTORY`` (its first entry), else the user default."""
    if flag:
        return Path(flag).expanduser().absolute()
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if from_systemd:
        return Path(from_systemd)
    return Path.home() / ".local" / "state" / "chronosd-nas"


def ensure_state_dir(path: Path) -> Path:
    """Create *path* (mode 0700) when missing; it holds the signing keys."""
    try:
        if not path.is_dir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.chmod(0o700)  # mkdir's mode is filtered by the umask
    except OSError as exc:
        raise ConfigError(
            f"NAS state directory {path}: cannot create it ({exc.strerror}); "
            "pass --state-dir with a writable directory"
        ) from exc
    return path


def check_public_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise ConfigError(
            f"--public-url {url!r} is not an http(s) base URL; write e.g. https://nas.example.net"
        )
    # The issuer must equal the agent's auth.issuer byte for byte; a trailing slash is the
    # usual difference, so it is never part of it.
    return url.rstrip("/")


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()


async def run_nas(
    options: NASOptions,
    listeners: Sequence[anyio.abc.SocketListener],
    *,
    task_status: anyio.abc.TaskStatus[RunningNAS] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the NAS on *listeners* and dispatch its arms until stopped or cancelled."""
    if not listeners:
        raise ConfigError("the reference NAS needs at least one listening socket")
    state_dir = ensure_state_dir(options.state_dir)
    address = format_listener_address(listeners[0])
    base_url = check_public_url(options.public_url or f"http://{address}")
    store = NASStore.open(state_dir)
    try:
        keyring = KeyRing.load_or_create(state_dir)
        store.prune_deliveries(time.time() - DELIVERY_HISTORY)
        dispatcher = Dispatcher(
            store,
            keyring,
            issuer=base_url,
            policy=RetryPolicy(
                max_delivery_age=options.max_delivery_age,
                backoff_base=options.backoff_base,
                backoff_cap=options.backoff_cap,
            ),
            delivery_timeout=options.delivery_timeout,
            max_in_flight=options.max_in_flight,
            max_in_flight_per_agent=options.max_in_flight_per_agent,
        )
        app = NASApp(store, keyring, on_change=dispatcher.arm_changed)
        server = HTTPServer(app, limits=options.limits, server_header="chronosd-nas")
        running = RunningNAS(
            base_url=base_url,
            address=address,
            state_dir=state_dir,
            store=store,
            keyring=keyring,
            dispatcher=dispatcher,
        )
        served = anyio.Event()

        async def serve(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await server.serve(listeners, task_status=task_status)
            finally:
                served.set()

        async with anyio.create_task_group() as group:
            await group.start(serve)
            await group.start(dispatcher.run)
            _log().info(
                "nas.started",
                listen=[format_listener_address(listener) for listener in listeners],
                public_url=base_url,
                state_dir=str(state_dir),
                kid=keyring.current().kid,
                armed=store.count_armed(),
            )
            task_status.started(running)
            await running._stop.wait()
            server.stop_accepting()
            with anyio.move_on_after(_STOP_GRACE):
                await served.wait()
            group.cancel_scope.cancel()
        _log().info("nas.stopped")
    finally:
        store.close()
