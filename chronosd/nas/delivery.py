"""The dispatcher's HTTP client: one POST per fire, over kept-alive anyio streams.

A fire call is tiny and always the same shape, so a general client (httpx: ~8 ms of CPU per
call under a profiler, its pool costs growing with the connections it holds; h11: more CPU
than the rest of a delivery) is mostly overhead here; the bytes are written and read by
`chronosd.nas.wire`. `AgentConnections` keeps the connections to one agent: a delivery takes an idle
one (or opens one), sends the request, reads the response and gives the connection back if
both sides can go on with it. The dispatcher closes them all as soon as nothing is in flight
to the agent: a socket-activated agent counts an open connection as activity, so an idle one
would keep it awake.

A kept-alive connection may be closed by the agent at any moment (chronosd closes idle ones
after 5 s). A request that fails on a reused connection before any byte of the response came
back is sent once more on a new connection, as browsers and httpx do; a fire delivered twice
is answered ``duplicate`` by the agent, so the retry is harmless.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc

from chronosd.nas.wire import ResponseError, ResponseParser, format_request

_RECEIVE_SIZE = 65536
# Characters left as they are in the request target: RFC 3986 pchar, "/" and existing escapes.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_NETWORK_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class DeliveryError(Exception):
    """The fire call got no HTTP response; the message says why, for the deliveries table."""


@dataclass(frozen=True)
class FireTarget:
    """Where the fire call of an arm goes, taken apart once per callback URL."""

    tls: bool
    host: str  # for connecting and certificate checks (IDNA-encoded, IPv6 without brackets)
    port: int
    authority: str  # the Host header
    target: str  # the request target: the callback's path plus /api/cron/fire

    @property
    def origin(self) -> tuple[bool, str, int]:
        return self.tls, self.host, self.port


@functools.lru_cache(maxsize=1024)
def fire_target(callback_url: str) -> FireTarget:
    """Parse an arm's callback URL (already checked at provision); DeliveryError if unusable."""
    try:
        parts = urlsplit(callback_url)
        hostname = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise DeliveryError(f"callback URL is not valid: {exc}") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise DeliveryError("callback URL is not an http or https URL with a host")
    try:
        host = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise DeliveryError(f"callback host cannot be encoded: {exc}") from None
    tls = parts.scheme == "https"
    port = port if port is not None else (443 if tls else 80)
    shown = f"[{host}]" if ":" in host else host
    default = port == (443 if tls else 80)
    authority = shown if default else f"{shown}:{port}"
    path = quote(parts.path.rstrip("/"), safe=_PATH_SAFE) + "/api/cron/fire"
    return FireTarget(tls=tls, host=host, port=port, authority=authority, target=path)


@dataclass(frozen=True)
class Reply:
    status: int
    retry_after: str | None


class _Stale(Exception):
    """A reused connection was found closed before the response began."""


class _Connection:
    __slots__ = ("idle_since", "reusable", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.idle_since = 0.0
        self.reusable = False

    async def exchange(self, request: bytes, *, reused: bool) -> Reply:
        self.reusable = False
        try:
            await self.stream.send(request)
        except _NETWORK_ERRORS as exc:
            if reused:
                raise _Stale from exc
            raise DeliveryError(_describe(exc, "sending the request")) from None
        parser = ResponseParser()
        while True:
            try:
                chunk = await self.stream.receive(_RECEIVE_SIZE)
            except anyio.EndOfStream:
                chunk = b""
            except _NETWORK_ERRORS as exc:
                if reused and not parser.received:
                    raise _Stale from exc
                raise DeliveryError(_describe(exc, "reading the response")) from None
            if not chunk and reused and not parser.received:
                raise _Stale
            try:
                complete = parser.feed(chunk)
            except ResponseError as exc:
                raise DeliveryError(f"invalid HTTP response: {exc}") from None
            if complete:
                self.reusable = parser.keep_alive
                return Reply(parser.status, parser.retry_after)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            # Closing a socket that failed already must not stop the NAS.
            with contextlib.suppress(Exception):
                await self.stream.aclose()


class AgentConnections:
    """The connections to one agent, reused through a burst of deliveries.

    Connections are opened on demand, so there are never more than the deliveries in flight
    at once. One idle for more than *keepalive_expiry* seconds is closed rather than reused:
    the agent may be closing it at that very moment.
    """

    def __init__(
        self,
        *,
        tls_context: Callable[[], ssl.SSLContext],
        keepalive_expiry: float = 2.0,
    ) -> None:
        self._tls_context = tls_context
        self._expiry = keepalive_expiry
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._expired: list[_Connection] = []
        self._closed = False

    async def post_json(self, target: FireTarget, body: bytes, authorization: str) -> Reply:
        """POST *body* to *target*; the status and Retry-After, or DeliveryError."""
        try:
            request = format_request(target.target, target.authority, authorization, body)
        except ValueError as exc:
            raise DeliveryError(str(exc)) from None
        connection = self._take_idle(target.origin)
        while self._expired:
            await self._expired.pop().aclose()
        if connection is not None:
            try:
                return await self._exchange(connection, target, request, reused=True)
            except _Stale:
                pass  # the agent had closed it: once more on a new connection
        connection = await self._connect(target)
        return await self._exchange(connection, target, request, reused=False)

    async def aclose(self) -> None:
        """Close every connection, idle or not; a delivery still using one fails."""
        self._closed = True
        connections = [c for idle in self._idle.values() for c in idle]
        connections += [*self._busy, *self._expired]
        self._idle.clear()
        self._expired.clear()
        self._busy.clear()
        for connection in connections:
            await connection.aclose()

    async def _exchange(
        self,
        connection: _Connection,
        target: FireTarget,
        request: bytes,
        *,
        reused: bool,
    ) -> Reply:
        self._busy.add(connection)
        keep = False
        try:
            reply = await connection.exchange(request, reused=reused)
            keep = connection.reusable and not self._closed
            return reply
        finally:
            self._busy.discard(connection)
            if keep:
                connection.idle_since = time.monotonic()
                self._idle.setdefault(target.origin, []).append(connection)
            else:
                await connection.aclose()

    def _take_idle(self, origin: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closing
            if time.monotonic() - connection.idle_since <= self._expiry:
                return connection
            self._expired.append(connection)
        return None

    async def _connect(self, target: FireTarget) -> _Connection:
        try:
            stream: anyio.abc.ByteStream
            if target.tls:
                stream = await anyio.connect_tcp(
                    target.host,
                    target.port,
                    ssl_context=self._tls_context(),
                    tls_hostname=target.host,
                    tls_standard_compatible=False,
                )
            else:
                stream = await anyio.connect_tcp(target.host, target.port)
        except ssl.SSLError as exc:
            raise DeliveryError(f"TLS handshake with {target.authority} failed: {exc}") from None
        except _NETWORK_ERRORS as exc:
            raise DeliveryError(_describe(exc, f"connecting to {target.authority}")) from None
        return _Connection(stream)


def _describe(exc: BaseException, doing: str) -> str:
    detail = str(exc)
    name = type(exc).__name__
    return f"{doing}: {name}: {detail}" if detail else f"{doing}: {name}"
