"""A small HTTP/1.1 server on asyncio transports and h11, for the daemon and the reference NAS.

This module owns the sockets, the limits and the life cycle:

- keep-alive and pipelining (requests on one connection are answered in order), HTTP/1.0,
  ``Content-Length`` and chunked request bodies, ``Expect: 100-continue``;
- a request head over ``Limits.max_head`` gets 431, a body over ``Limits.max_body`` gets 413
  (a declared ``Content-Length`` is checked before any of the body is read), a request not
  complete within ``Limits.request_timeout`` gets 408; each of these closes the connection;
- a connection idle in keep-alive is closed after ``Limits.keepalive_timeout``;
- at most ``Limits.max_connections`` connections are open at once; one more is accepted, answered
  ``503`` with ``Connection: close`` and closed at once, so the caller learns to retry instead of
  waiting in a backlog it cannot see;
- malformed requests get 400 (501 for a transfer coding other than chunked) and a close; a
  handler that raises gets 500 (event ``http.handler_failed``); neither, nor a client vanishing
  mid-response, stops the server.

Two parsers, one behaviour. The common request — HTTP/1.1, ``Content-Length`` or no body, plain
header lines — is parsed here by a strict subset of h11's own grammar and answered with
pre-encoded headers: per request that is a few regular-expression matches and one write, where
h11's state machine costs several times the whole of it. Anything outside the subset
(HTTP/1.0, chunked bodies, ``Expect``, an absolute-form target, obs-fold,
anything malformed, a client that closes mid-request) goes to h11 exactly as it arrived, so
every odd or hostile request meets the full parser and its refusals.

The connection is an asyncio protocol read by the connection's task (one per connection, owned
by `serve`'s task group): anyio streams cost a checkpoint and a cancel scope per call, a third
of the time of a small request. Timeouts are one deadline per connection, moved as the
connection goes from idle to reading to writing, and checked by a timer re-armed only when it
fires early. So this server runs on anyio's asyncio backend only (as the daemon and the NAS do).

Every response carries ``Content-Length``. ``stop_accepting()`` leaves the listening sockets open:
under socket activation systemd owns them, and connections that arrive after we stop wait in
the kernel backlog for the next instance.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from chronosd.errors import ConfigError

if TYPE_CHECKING:
    # Imported where used: a plain request never needs it, and it costs 10-15 ms of every
    # cold start.
    import h11


@dataclass(frozen=True)
class Request:
    """One complete request: head and body, as the handler sees it.

    ``path`` and ``query`` are the two halves of ``target`` around the first ``?`` (for an
    absolute-form target, of its path part); neither is percent-decoded.
    """

    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # names lower-case, values latin-1 decoded
    body: bytes
    client: tuple[str, int] | None

    def header(self, name: str) -> str | None:
        """The first value of header *name* (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


@dataclass(frozen=True)
class Response:
    """What a handler returns.

    ``on_sent`` is called once the server is done with the response: after its bytes were
    written, and also when the client went away (or stopped reading for
    ``Limits.request_timeout``) before they could be; not when the server itself is cancelled.
    The fire flow starts the job there; its claim is already committed, so the job must start
    even if the 202 was lost (the caller's retry is then answered ``duplicate``). An exception
    it raises is logged (``http.on_sent_failed``) and goes no further. Framing headers
    (``Content-Length``, ``Transfer-Encoding``) set by the handler are replaced.
    """

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    on_sent: Callable[[], None] | None = None

    @classmethod
    def json(
        cls,
        status: int,
        payload: object,
        *,
        headers: Sequence[tuple[str, str]] = (),
        on_sent: Callable[[], None] | None = None,
    ) -> Response:
        """A compact JSON response with ``Content-Type: application/json``."""
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(status, body, (("content-type", "application/json"), *headers), on_sent)


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client may cost the server (sizes in bytes, times in seconds)."""

    max_head: int = 16384
    max_body: int = 65536
    request_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    max_connections: int = 256


DEFAULT_LIMITS = Limits()

_RECEIVE_SIZE = 65536
# Bytes a client may have sent ahead (pipelined requests, a body still to be read) before the
# server stops reading from it until the task has caught up.
_READ_AHEAD = 262144
# Pipelined requests answered one after the other without a pause; then the connection yields,
# so one client filling its buffer with requests cannot hold the event loop.
_FAIR_SHARE = 16
# After an error response, reading what the client still sends (for this long, up to this
# much) before closing keeps the kernel from answering the close with a reset that would
# destroy the response before the client has read it.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 262144
# accept() failing for lack of descriptors leaves the socket readable; pause instead of spinning.
_ACCEPT_BACKOFF = 0.1
# At the connection limit, a connection that has waited this long for a complete request head
# is slow (or idle) and makes room for a newcomer; a younger one does not.
_SLOW_HEAD = 1.0
# Distinct (status, headers) pairs whose encoded head is kept; handlers use a handful.
_HEAD_CACHE_SIZE = 256
_NETWORK_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_BODYLESS_STATUSES = frozenset({204, 304})
_REJECTION_MESSAGES = {
    400: "bad request",
    408: "request timeout",
    413: "body too large",
    431: "request head too large",
    501: "transfer coding not supported",
}


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()


@dataclass(frozen=True)
class _Rejection:
    """A request refused before the handler: the status and why."""

    status: int
    reason: str  # for the log only


class HTTPServer:
    """Serves *handler* on the listeners given to `serve`.

    *on_connections*, when given, is called with the number of open connections each time it
    changes (the daemon's idle tracker holds the process up while any is open).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits = DEFAULT_LIMITS,
        server_header: str = "chronosd",
        on_connections: Callable[[int], None] | None = None,
    ) -> None:
        self._handler = handler
        self._on_connections = on_connections
        self._limits = limits
        self._server_header = server_header
        self._open = 0
        self._in_flight = 0
        self._stopping = False
        self._paused = False
        self._stop_requested: anyio.Event | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._sockets: list[socket.socket] = []
        self._looping: set[socket.socket] = set()
        self._accept_scopes: set[anyio.CancelScope] = set()
        self._wires: set[_Wire] = set()
        self._heads: dict[tuple[int, tuple[tuple[str, str], ...]], _EncodedHead] = {}
        self._overflow_reply = _raw_response(
            503,
            _json_error("too many connections"),
            (
                ("content-type", "application/json"),
                ("retry-after", "1"),
                ("server", server_header),
            ),
        )
        self.last_activity: float = time.monotonic()
        """`time.monotonic()` at the last accept, request or close (anyio's clock on asyncio)."""

    @property
    def open_connections(self) -> int:
        """Connections currently open, including those idle in keep-alive."""
        return self._open

    @property
    def busy(self) -> bool:
        """True while any request is being received, handled or answered.

        Receiving starts when a new connection opens or the next request's first byte arrives.
        """
        return self._in_flight > 0

    async def serve(
        self,
        listeners: Sequence[anyio.abc.SocketListener],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on every listener until `stop_accepting`; return when all connections are done.

        Connections live in a task group owned by this call. The listeners are never closed
        here: their owner (the caller, or systemd) decides, and closes one only after `serve`
        has returned (a socket closed under a pending wait is not noticed reliably).
        """
        if self._stopping:
            task_status.started()
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "HTTPServer.serve() runs on asyncio transports; "
                "run it under anyio's asyncio backend (the default of anyio.run)"
            ) from None
        self._stop_requested = anyio.Event()
        self._sockets = [listener.extra(SocketAttribute.raw_socket) for listener in listeners]
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                self._start_accept_loops()
                task_status.started()
                # Kept open while merely paused, so that resume_accepting() has a group to
                # start the accept loops in again.
                await self._stop_requested.wait()
        finally:
            self._group = None

    def stop_accepting(self) -> None:
        """Stop calling accept() for good and close connections idle in keep-alive.

        Requests already being received or handled are answered (with ``Connection: close``);
        then `serve` returns. Pending connections stay in the kernel backlog for whoever
        accepts next (under socket activation, the next instance).
        """
        self._stopping = True
        if self._stop_requested is not None:
            self._stop_requested.set()
        self._halt_accepting()

    def pause_accepting(self) -> None:
        """As `stop_accepting`, but `serve` keeps running until `resume_accepting` or a stop.

        For the idle exit's last look around: pause, re-check, then stop or resume.
        """
        self._paused = True
        self._halt_accepting()

    def resume_accepting(self) -> None:
        """Undo `pause_accepting`.

        Raises RuntimeError after `stop_accepting` or when `serve` is not running: a stopped
        server returns from `serve` as soon as it is drained, so there is nothing to resume.
        """
        if self._stopping or self._group is None:
            raise RuntimeError(
                "HTTPServer.resume_accepting(): the server was stopped or is not serving; "
                "use pause_accepting() to stop accepting for a while"
            )
        self._paused = False
        self._start_accept_loops()

    @property
    def _accepting(self) -> bool:
        return not (self._stopping or self._paused)

    def _halt_accepting(self) -> None:
        for scope in self._accept_scopes:
            scope.cancel()
        for wire in self._wires:
            if wire.idle:
                wire.interrupt()

    def _start_accept_loops(self) -> None:
        assert self._group is not None
        for listening in self._sockets:
            # A loop paused and resumed before it noticed carries on by itself.
            if listening not in self._looping:
                self._looping.add(listening)
                self._group.start_soon(self._accept_loop, listening, self._group)

    # -- accepting -------------------------------------------------------------------------

    async def _accept_loop(self, listening: socket.socket, group: anyio.abc.TaskGroup) -> None:
        try:
            await self._accept_until_halted(listening, group)
        finally:
            self._looping.discard(listening)

    async def _accept_until_halted(
        self, listening: socket.socket, group: anyio.abc.TaskGroup
    ) -> None:
        while self._accepting:
            client: socket.socket | None = None
            with anyio.CancelScope() as scope:
                self._accept_scopes.add(scope)
                try:
                    client = await self._accept_one(listening)
                except (anyio.ClosedResourceError, OSError, ValueError) as exc:
                    # The listening socket was closed under us; the other listeners go on.
                    _log().error("http.listener_failed", error=str(exc))
                    return
                finally:
                    self._accept_scopes.discard(scope)
            if client is None:
                continue
            self.last_activity = time.monotonic()
            if self._open >= self._limits.max_connections and not self._evict_slowest():
                self._refuse(client)
                continue
            self._count_connection(+1)
            group.start_soon(self._connection, client)

    def _evict_slowest(self) -> bool:
        waiting = [wire for wire in self._wires if wire.waiting_since is not None]
        if not waiting:
            return False  # every open connection is being answered: refuse the newcomer
        slowest = min(waiting, key=_waiting_since)
        if time.monotonic() - _waiting_since(slowest) < _SLOW_HEAD:
            return False  # a burst of new connections, not slow ones: refuse the newcomer
        slowest.waiting_since = None
        slowest.interrupt()
        _log().info("http.connection_evicted", reason="connection limit, slowest request head")
        return True

    def _count_connection(self, change: int) -> None:
        self._open += change
        self.last_activity = time.monotonic()
        if self._on_connections is None:
            return
        try:
            self._on_connections(self._open)
        except Exception:
            _log().exception("http.on_connections_failed", open_connections=self._open)

    async def _accept_one(self, listening: socket.socket) -> socket.socket | None:
        # Waiting for readiness and then accepting without an await in between means that
        # stop_accepting() (which cancels only the wait) can never drop a connection that the
        # kernel already handed over: it is either served here or left in the backlog.
        await anyio.wait_readable(listening)
        if not self._accepting:
            return None
        try:
            client, _ = listening.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None
        except OSError as exc:
            if exc.errno == errno.EPROTO:
                return None
            _log().error("http.accept_failed", error=str(exc))
            await anyio.sleep(_ACCEPT_BACKOFF)
            return None
        return client

    def _refuse(self, client: socket.socket) -> None:
        _log().warning("http.connection_refused", reason="too many connections")
        try:
            client.setblocking(False)
            client.send(self._overflow_reply)
            client.shutdown(socket.SHUT_WR)
            # Reading what already arrived avoids a reset that would discard the 503.
            for _ in range(16):
                if not client.recv(_RECEIVE_SIZE):
                    break
        except OSError:
            pass
        finally:
            client.close()

    # -- one connection --------------------------------------------------------------------

    async def _connection(self, client: socket.socket) -> None:
        try:
            loop = asyncio.get_running_loop()
            wire = _Wire(loop)
            try:
                peer = _peer(client)
                await loop.connect_accepted_socket(lambda: wire, client)
            except BaseException:
                client.close()
                raise
            self._wires.add(wire)
            try:
                await self._converse(wire, peer)
            finally:
                self._wires.discard(wire)
                wire.close()
        except (_Interrupted, *_NETWORK_ERRORS):
            pass
        except Exception:
            _log().exception("http.connection_failed")
        finally:
            self._count_connection(-1)

    async def _converse(self, wire: _Wire, client: tuple[str, int] | None) -> None:
        limits = self._limits
        loop = wire.loop
        fresh = True
        unbroken = 0  # requests answered from the buffer without waiting for the client
        while True:
            # A fresh connection was opened to send a request, so it is not idle: it gets the
            # request timeout (and a 408), even while stopping. Until its head is complete, it
            # is among those the connection limit may evict.
            now = loop.time()
            wire.waiting_since = now
            if fresh:
                fresh = False
            elif wire.buffer:  # pipelined: the next request has already (partly) arrived
                unbroken += 1
                if unbroken >= _FAIR_SHARE:
                    unbroken = 0
                    await asyncio.sleep(0)
            else:
                unbroken = 0
                if wire.eof or not self._accepting:
                    return
                wire.deadline = now + limits.keepalive_timeout
                wire.idle = True
                try:
                    await wire.more()
                except _Timeout:
                    return
                finally:
                    wire.idle = False
                if not wire.buffer:
                    return  # the client closed its end
                now = loop.time()
            wire.deadline = now + limits.request_timeout
            self._in_flight += 1
            try:
                keep_alive = await self._exchange(wire, client)
            finally:
                self._in_flight -= 1
                self.last_activity = time.monotonic()
            if not keep_alive:
                return

    async def _exchange(self, wire: _Wire, client: tuple[str, int] | None) -> bool:
        """Receive one request and answer it; True when the connection may serve another."""
        try:
            head = await self._read_head(wire)
        except _Timeout:
            await self._reject(wire, _Rejection(408, "request not complete in time"), client)
            return False
        if head is None:
            return await self._exchange_h11(wire, client)
        buffer = wire.buffer
        end = head.body_start + head.body_length
        try:
            while len(buffer) < end:
                if wire.eof:
                    return await self._exchange_h11(wire, client)
                await wire.more()
        except _Timeout:
            await self._reject(wire, _Rejection(408, "request not complete in time"), client)
            return False
        body = bytes(buffer[head.body_start : end])
        del buffer[:end]
        request = Request(
            method=head.method,
            target=head.target,
            path=head.path,
            query=head.query,
            headers=head.headers,
            body=body,
            client=client,
        )
        response = await self._call_handler(request)
        closing = head.close or not self._accepting
        try:
            data, closes = self._encode(response, head_only=head.method == "HEAD", close=closing)
        except InvalidResponse as exc:
            _log().error("http.response_invalid", status=response.status, error=str(exc))
            fallback = Response.json(500, {"error": "internal error"})
            data, closes = self._encode(fallback, head_only=head.method == "HEAD", close=closing)
        sent = await wire.send(data, self._limits.request_timeout)
        _run_on_sent(response)
        return sent and not closes

    async def _read_head(self, wire: _Wire) -> _Head | None:
        """The next request's head, once complete; None when h11 must read this request."""
        buffer = wire.buffer
        limits = self._limits
        scan_from = 0
        while True:
            head = _parse_head(buffer, scan_from, limits.max_head, limits.max_body)
            if head is not _INCOMPLETE:
                break
            if wire.eof:
                return None
            scan_from = max(0, len(buffer) - 2)
            await wire.more()
        if head is not None:
            wire.waiting_since = None
        return cast("_Head | None", head)

    def _encode(self, response: Response, *, head_only: bool, close: bool) -> tuple[bytes, bool]:
        """The response's bytes, and whether the connection must close after them.

        What h11 would write for it after a keep-alive HTTP/1.1 request. Raises
        InvalidResponse for a response h11 would refuse to send.
        """
        key = (response.status, response.headers)
        try:
            encoded = self._heads.get(key)
        except TypeError:  # headers in a list after all: encoded each time, as h11 would
            encoded = _encode_head(response.status, tuple(response.headers), self._server_header)
        if encoded is None:
            encoded = _encode_head(response.status, response.headers, self._server_header)
            if len(self._heads) >= _HEAD_CACHE_SIZE:
                self._heads.clear()
            self._heads[key] = encoded
        body = response.body
        if encoded.bodyless:
            framing = b"connection: close\r\n\r\n" if close else b"\r\n"
            return encoded.head + framing, close or encoded.closes
        framing = b"content-length: %d\r\n%s\r\n" % (
            len(body),
            b"connection: close\r\n" if close else b"",
        )
        if head_only:
            return encoded.head + framing, close or encoded.closes
        return encoded.head + framing + body, close or encoded.closes

    # -- the full parser, for everything the fast path leaves to it ---------------------------

    async def _exchange_h11(self, wire: _Wire, client: tuple[str, int] | None) -> bool:
        import h11

        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_head)
        try:
            outcome = await self._read_request(wire, conn, client)
        except _Timeout:
            outcome = _Rejection(408, "request not complete in time")
        if outcome is None:
            return False
        if isinstance(outcome, _Rejection):
            answerable = conn.our_state in (h11.IDLE, h11.SEND_RESPONSE)
            await self._reject(wire, outcome, client, answer=answerable)
            return False

        response = await self._call_handler(outcome)
        closing = not self._accepting
        sent = await self._send_response(
            wire, conn, response, head_only=outcome.method == "HEAD", close=closing
        )
        _run_on_sent(response)
        if not sent or closing:
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            # What h11 read beyond this request is the start of the next one.
            wire.buffer[:0] = conn.trailing_data[0]
            return True
        return False  # h11 decided the connection must close (HTTP/1.0, Connection: close)

    async def _read_request(
        self, wire: _Wire, conn: h11.Connection, client: tuple[str, int] | None
    ) -> Request | _Rejection | None:
        import h11

        # h11 unfolds obs-fold lines and merges repeated Content-Length headers; both are
        # request-smuggling material, so the raw head is kept to refuse them.
        head = bytearray(wire.buffer)
        initial = wire.take()
        if initial or wire.eof:
            conn.receive_data(initial)  # b"": the client has closed, and h11 must know
        started: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                return _Rejection(exc.error_status_hint, str(exc))
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    continue_event = h11.InformationalResponse(status_code=100, headers=[])
                    if not await wire.send(conn.send(continue_event) or b"", None):
                        return None
                if not wire.buffer and not wire.eof:
                    await wire.more()
                chunk = wire.take()  # b"" once the client has closed: h11 learns of it
                if started is None:
                    head += chunk
                conn.receive_data(chunk)
            elif isinstance(event, h11.Request):
                # h11 bounds only a head that arrives in pieces; one that came in a single
                # read is measured here.
                head_size = _head_size(head)
                if head_size > self._limits.max_head:
                    return _Rejection(431, f"request head of {head_size} bytes")
                problem = _framing_problem(bytes(head[:head_size]), event)
                if problem is not None:
                    return _Rejection(400, problem)
                declared = _content_length(event)
                if declared is not None and declared > self._limits.max_body:
                    return _Rejection(413, f"declared body of {declared} bytes")
                started = event
                wire.waiting_since = None
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._limits.max_body:
                    return _Rejection(413, "chunked body over the limit")
            elif isinstance(event, h11.EndOfMessage):
                if started is None:  # h11 never ends a message it has not started
                    return _Rejection(400, "body without a request")
                return _build_request(started, bytes(body), client)
            else:  # ConnectionClosed before a request began
                return None

    async def _send_response(
        self,
        wire: _Wire,
        conn: h11.Connection,
        response: Response,
        *,
        head_only: bool,
        close: bool,
    ) -> bool:
        import h11

        try:
            head, body = self._h11_response(response, close=close, head_only=head_only)
        except h11.LocalProtocolError as exc:
            _log().error("http.response_invalid", status=response.status, error=str(exc))
            fallback = Response.json(500, {"error": "internal error"})
            head, body = self._h11_response(fallback, close=close, head_only=head_only)
        try:
            data = conn.send(head) or b""
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            _log().error("http.response_invalid", status=response.status, error=str(exc))
            return False
        return await wire.send(data, self._limits.request_timeout)

    def _h11_response(
        self, response: Response, *, close: bool, head_only: bool
    ) -> tuple[h11.Response, bytes]:
        headers = [
            (name, value)
            for name, value in response.headers
            if name.lower() not in _FRAMING_HEADERS
        ]
        headers.append(("server", self._server_header))
        bodyless = response.status in _BODYLESS_STATUSES
        if not bodyless:
            headers.append(("content-length", str(len(response.body))))
        if close:
            headers.append(("connection", "close"))
        import h11

        head = h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )
        return head, b"" if bodyless or head_only else response.body

    # -- either parser ---------------------------------------------------------------------

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:
            _log().exception("http.handler_failed", method=request.method, path=request.path)
            return Response.json(500, {"error": "internal error"})

    async def _reject(
        self,
        wire: _Wire,
        rejection: _Rejection,
        client: tuple[str, int] | None,
        *,
        answer: bool = True,
    ) -> None:
        _log().info(
            "http.request_rejected",
            status=rejection.status,
            reason=rejection.reason,
            client=client[0] if client else None,
        )
        if not answer:
            return
        message = _REJECTION_MESSAGES.get(rejection.status, "bad request")
        response = Response.json(rejection.status, {"error": message})
        data, _ = self._encode(response, head_only=False, close=True)
        if await wire.send(data, self._limits.request_timeout):
            await self._linger(wire)

    async def _linger(self, wire: _Wire) -> None:
        if not wire.send_eof():
            return
        wire.deadline = wire.loop.time() + min(_LINGER_SECONDS, self._limits.request_timeout)
        drained = 0
        try:
            while drained < _LINGER_BYTES and not wire.eof:
                drained += len(wire.take())
                await wire.more()
        except (_Timeout, _Interrupted):
            return


def _waiting_since(wire: _Wire) -> float:
    return wire.waiting_since if wire.waiting_since is not None else math.inf


# -- the connection ----------------------------------------------------------------------------


class _Timeout(Exception):
    """The connection's deadline passed while it waited for its client."""


class _Interrupted(Exception):
    """The server closed the connection (stop, or eviction at the limit) while it waited."""


class _Wire(asyncio.Protocol):
    """One connection: what the client sent, buffered for the task that serves it.

    Only that task waits here (`more`, `send`), with one deadline at a time: ``deadline`` is
    moved as the connection goes from idle to reading to writing, and the timer that enforces
    it is armed when a wait starts and re-armed only when it went off before the deadline.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buffer = bytearray()
        self.eof = False  # the client sent FIN, or the connection is gone
        self.lost = False
        self.idle = False  # waiting in keep-alive: closed when the server stops accepting
        self.waiting_since: float | None = None  # when it began waiting for a request head
        self.deadline = math.inf
        self._transport: asyncio.Transport | None = None
        self._interrupted = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._read_paused = False

    # protocol callbacks (the event loop's side)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)
        # Paused while anything is left unsent, resumed when all of it is in the kernel: a
        # response counts as written (and on_sent runs) only then.
        self._transport.set_write_buffer_limits(high=0, low=0)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= _READ_AHEAD and self._transport is not None:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake(None)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(None)
        return True  # keep our side open: a client that half-closed still reads the answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self._wake(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake(None)

    # the connection task's side

    def take(self) -> bytes:
        """Everything buffered (b"" when nothing is), removed from the buffer."""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def more(self) -> None:
        """Wait until more bytes arrive or the client closes.

        Raises _Timeout when ``deadline`` passes first, _Interrupted after `interrupt`.
        """
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        size = len(self.buffer)
        while len(self.buffer) == size and not self.eof:
            await self._wait()

    async def send(self, data: bytes, timeout: float | None) -> bool:
        """Write *data*; True once all of it is in the kernel, False if the client went away.

        A client that does not take it within *timeout* seconds (None: by ``deadline``) counts
        as gone.
        """
        transport = self._transport
        if transport is None or self.lost or transport.is_closing():
            return False
        transport.write(data)
        if self._write_paused:
            if timeout is not None:
                self.deadline = self.loop.time() + timeout
            try:
                while self._write_paused and not self.lost:
                    await self._wait()
            except _Timeout:
                return False
        return not (self.lost or transport.is_closing())

    def send_eof(self) -> bool:
        """Half-close our side; False when the connection is already gone."""
        if self._transport is None or self.lost or self._transport.is_closing():
            return False
        try:
            self._transport.write_eof()
        except OSError:
            return False
        return True

    def interrupt(self) -> None:
        """End the connection's current (or next) wait with _Interrupted."""
        self._interrupted = True
        self._wake(_Interrupted())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()  # a client that stopped reading: nothing more will reach it
        else:
            transport.close()

    async def _wait(self) -> None:
        if self._interrupted:
            raise _Interrupted
        if self.deadline != math.inf:
            if self.loop.time() >= self.deadline:
                raise _Timeout
            timer = self._timer
            if timer is None or timer.when() > self.deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self.loop.call_at(self.deadline, self._timer_went_off)
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _timer_went_off(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # the next wait arms it again
        if self.loop.time() >= self.deadline:
            self._wake(_Timeout())
        elif self.deadline != math.inf:
            self._timer = self.loop.call_at(self.deadline, self._timer_went_off)

    def _wake(self, error: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


# -- the fast path's parser and encoder ---------------------------------------------------------

# h11's grammar (h11/_abnf.py), for text decoded as latin-1. A header line is token ":" OWS
# field-value OWS, where the value is runs of [^\x00\s] (bytes-pattern \s: six ASCII characters)
# separated by spaces and tabs: whatever follows the colon is such a line exactly when it holds
# none of NUL, CR, LF, VT, FF, and the value is what remains after stripping spaces and tabs.
_TOKEN = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/1\.1")
_HEADER_LINES = re.compile(rf"(?:{_TOKEN}:[^\x00\n\r\x0b\x0c]*\r\n)*")
_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head
# Headers whose request h11 handles in ways the fast path does not: chunked bodies (and 501s),
# interim responses, protocol switches.
_LEFT_TO_H11 = frozenset({"transfer-encoding", "expect", "upgrade"})
_CONTENT_LENGTH_DIGITS = 20  # h11's bound


class _Head(NamedTuple):
    method: str
    target: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body_start: int
    body_length: int
    close: bool  # the client sent Connection: close


class _Incomplete:
    pass


_INCOMPLETE = _Incomplete()


def _parse_head(
    data: bytearray | bytes, scan_from: int, max_head: int, max_body: int
) -> _Head | _Incomplete | None:
    """The head of the request at the start of *data*, read as h11 would read it.

    None when h11 must read this request instead: anything it refuses or treats in its own way
    (HTTP/1.0, chunked, ``Expect``, ``Upgrade``, CONNECT, a repeated or
    over-limit ``Content-Length``, a head over *max_head*, obs-fold, bare LF line ends).
    *scan_from* is where to resume looking for the end of the head.
    """
    found = _HEAD_END.search(data, scan_from, max_head)  # a head ending later is not ours
    if found is None:
        if len(data) > max_head or (data and data[0] < 0x21):
            return None  # h11 answers at once: 431, or 400 for what cannot start a request
        return _INCOMPLETE
    end = found.end()
    if end > max_head or data[end - 4 : end] != b"\r\n\r\n":
        return None
    text = data[: end - 2].decode("latin-1")
    line_end = text.index("\r\n")
    request_line = _REQUEST_LINE.fullmatch(text, 0, line_end)
    block = text[line_end + 2 :]  # every header line with its CRLF
    if request_line is None or _HEADER_LINES.fullmatch(block) is None:
        return None
    method, target = request_line.group(1, 2)
    if method == "CONNECT":
        return None
    headers = []
    hosts = 0
    body_length = -1
    close = False
    for line in block[:-2].split("\r\n") if block else ():
        name, _, value = line.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        if name == "host":
            hosts += 1
        elif name == "content-length":
            # isascii: latin-1 has digits of its own ("²") that isdigit accepts and h11 does not
            digits = value.isascii() and value.isdigit()
            if body_length >= 0 or not digits or len(value) > _CONTENT_LENGTH_DIGITS:
                return None
            body_length = int(value)
            if body_length > max_body:
                return None
        elif name == "connection":
            # As h11 reads it: a comma list of tokens, compared without case.
            close = close or "close" in (token.strip(" \t") for token in value.lower().split(","))
        elif name in _LEFT_TO_H11:
            return None
        headers.append((name, value))
    if hosts != 1:
        return None
    if target[0] == "/" or target == "*":
        path, _, query = target.partition("?")
    else:
        return None  # absolute form: rare, and h11's path splits it
    return _Head(method, target, path, query, tuple(headers), end, max(body_length, 0), close)


class InvalidResponse(Exception):
    """A handler's response that h11 would refuse to send (its LocalProtocolError)."""


# h11/_abnf.py: field-name is a token; a field value is runs of any byte but NUL and
# whitespace, separated by spaces or tabs, with nothing around them.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def _bytes(value: object) -> bytes:
    # h11's bytesify: a str must be ASCII (UnicodeEncodeError otherwise, as from h11).
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, int):
        raise TypeError("expected bytes-like object, not int")
    return bytes(cast("bytes", value))


def _checked_fields(status: object, headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """The header fields as h11.Response would hold them (framing headers already left out),
    refusing what it refuses, without importing h11 on the way to every cold start's 202."""
    items = []
    for name, value in headers:  # first, as h11 checks them before the status
        raw_name, raw_value = _bytes(name), _bytes(value)
        if not _FIELD_NAME.fullmatch(raw_name):
            raise InvalidResponse(f"Illegal header name {raw_name!r}")
        if not _FIELD_VALUE.fullmatch(raw_value):
            raise InvalidResponse(f"Illegal header value {raw_value!r}")
        items.append((raw_name, raw_value))
    if not isinstance(status, int):
        raise InvalidResponse("status code must be integer")
    if not 200 <= status < 1000:
        raise InvalidResponse(f"Response status_code should be in range [200, 1000), not {status}")
    return items


class _EncodedHead(NamedTuple):
    head: bytes  # status line and headers, up to the framing headers
    bodyless: bool
    closes: bool  # the handler asked for Connection: close


def _encode_head(
    status: int, headers: tuple[tuple[str, str], ...], server_header: str
) -> _EncodedHead:
    """What h11 writes for this response head, up to the framing headers h11 would add."""
    kept = [(name, value) for name, value in headers if name.lower() not in _FRAMING_HEADERS]
    kept.append(("server", server_header))
    items = _checked_fields(status, kept)
    ordered = [item for item in items if item[0].lower() == b"host"]  # h11 writes Host first
    ordered += [item for item in items if item[0].lower() != b"host"]
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status).encode("ascii"))]
    lines += [b"%s: %s\r\n" % (name, value) for name, value in ordered]
    tokens = {
        token.strip()
        for name, value in items
        if name.lower() == b"connection"
        for token in value.lower().split(b",")
    }
    return _EncodedHead(b"".join(lines), status in _BODYLESS_STATUSES, b"close" in tokens)


# -- helpers -----------------------------------------------------------------------------------


def _peer(client: socket.socket) -> tuple[str, int] | None:
    try:
        address = client.getpeername()
    except OSError:
        return None
    if isinstance(address, tuple):
        return str(address[0]), int(address[1])
    return None  # a Unix socket peer has no address worth reporting


def _framing_problem(head: bytes, request: h11.Request) -> str | None:
    """Why a head (its raw bytes, through the blank line) h11 accepted must still be refused."""
    names = {name for name, _ in request.headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        return "both Content-Length and Transfer-Encoding"
    content_lengths = 0
    header_lines = head.split(b"\n")[1:]
    for line in header_lines:
        if line[:1] in (b" ", b"\t"):
            return "obs-fold header line"
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            content_lengths += 1
            if b"," in value:
                return "list-valued Content-Length"
    if content_lengths > 1:
        return "repeated Content-Length"
    return None


def _head_size(received: bytearray) -> int:
    """Bytes up to the end of the first head in *received* (all of it if the end is missing)."""
    ends = [
        index + len(marker)
        for marker in (b"\n\r\n", b"\n\n")
        if (index := received.find(marker)) >= 0
    ]
    return min(ends) if ends else len(received)


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def _build_request(
    event: h11.Request, body: bytes, client: tuple[str, int] | None
) -> Request | _Rejection:
    try:
        target = event.target.decode("ascii")
    except UnicodeDecodeError:
        return _Rejection(400, "non-ASCII request target")
    if target.startswith("/") or target == "*":
        path, _, query = target.partition("?")
    else:
        from urllib.parse import urlsplit

        parts = urlsplit(target)
        path, query = parts.path or "/", parts.query
    headers = tuple(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in event.headers
    )
    return Request(
        method=event.method.decode("ascii"),
        target=target,
        path=path,
        query=query,
        headers=headers,
        body=body,
        client=client,
    )


# The phrases of what chronosd and the reference NAS answer: importing http.HTTPStatus for
# them costs a millisecond of every cold start.
_REASONS = {
    200: "OK",
    202: "Accepted",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


def _reason(status: int) -> str:
    if status in _REASONS:
        return _REASONS[status]
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _json_error(message: str) -> bytes:
    return json.dumps({"error": message}, separators=(",", ":")).encode()


def _raw_response(status: int, body: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """A complete ``Connection: close`` response, for use without an h11 connection."""
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _run_on_sent(response: Response) -> None:
    if response.on_sent is None:
        return
    try:
        response.on_sent()
    except Exception:
        _log().exception("http.on_sent_failed", status=response.status)


# -- listeners ---------------------------------------------------------------------------------


async def listener_from_fd(fd: int) -> anyio.abc.SocketListener:
    """Adopt an inherited listening socket (systemd socket activation).

    The descriptor is made non-inheritable, so jobs started later never receive it.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(
            f"inherited file descriptor {fd} is not a socket ({exc.strerror}); "
            "check the socket unit that started chronosd"
        ) from exc
    listening = sock.type == socket.SOCK_STREAM and bool(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    )
    if not listening:
        sock.detach()  # not ours to close: whoever passed it may still use it
        raise ConfigError(
            f"inherited file descriptor {fd} is not a listening stream socket; "
            "use ListenStream= in the socket unit"
        )
    sock.set_inheritable(False)
    sock.setblocking(False)
    return await anyio.abc.SocketListener.from_socket(sock)


async def bind_listener(host: str, port: int) -> anyio.abc.SocketListener:
    """Bind and listen on *host*:*port* (SO_REUSEADDR); *host* may be a name or an address."""
    bare_host = host.strip("[]") or None
    try:
        infos = await anyio.getaddrinfo(
            bare_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, proto, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
            "choose another listen address or stop the process that holds it"
        ) from exc
    return await anyio.abc.SocketListener.from_socket(sock)


def is_loopback_address(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and anything else."""
    import ipaddress  # only needed at start-up, for auth.mode none

    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_listener(listener: anyio.abc.SocketListener) -> bool:
    """True when only this machine can connect: a loopback address or a Unix socket."""
    if listener.extra(SocketAttribute.family) == socket.AF_UNIX:
        return True
    address = listener.extra(SocketAttribute.local_address)
    return isinstance(address, tuple) and is_loopback_address(str(address[0]))


def format_listener_address(listener: anyio.abc.SocketListener) -> str:
    """``127.0.0.1:8787``, ``[::1]:8787`` or a Unix socket path, for messages and logs."""
    address = listener.extra(SocketAttribute.local_address)
    if not isinstance(address, tuple):
        return str(address)
    host, port = str(address[0]), int(address[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
