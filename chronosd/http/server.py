"""A small HTTP/1.1 server on anyio sockets and h11, shared by the daemon and the reference NAS.

h11 parses and frames; this module owns the sockets, the limits and the life cycle:

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

Every response carries ``Content-Length``. ``stop_accepting()`` leaves the listening sockets open:
under socket activation systemd owns them, and connections that arrive after we stop wait in
the kernel backlog for the next instance.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11
from anyio.abc import SocketAttribute

from chronosd.errors import ConfigError


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
        self._idle_scopes: set[anyio.CancelScope] = set()
        # Connections that have not delivered a complete request head (fresh, or idle in
        # keep-alive), with the moment they started waiting: at the connection limit the one
        # waiting longest makes room for a newcomer, so slow clients cannot hold every slot.
        self._head_waiters: dict[anyio.CancelScope, float] = {}
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
        for scope in (*self._accept_scopes, *self._idle_scopes):
            scope.cancel()

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
        if not self._head_waiters:
            return False  # every open connection is being answered: refuse the newcomer
        scope = min(self._head_waiters, key=self._head_waiters.__getitem__)
        if time.monotonic() - self._head_waiters[scope] < _SLOW_HEAD:
            return False  # a burst of new connections, not slow ones: refuse the newcomer
        del self._head_waiters[scope]
        scope.cancel()
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
            try:
                stream = await _wrap_stream(client)
            except BaseException:
                client.close()
                raise
            async with stream:
                with anyio.CancelScope() as scope:
                    try:
                        await self._converse(stream, scope)
                    finally:
                        self._head_waiters.pop(scope, None)
        except _NETWORK_ERRORS:
            pass
        except Exception:
            _log().exception("http.connection_failed")
        finally:
            self._count_connection(-1)

    async def _converse(self, stream: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_head)
        client = _peer(stream)
        fresh = True
        while True:
            # A fresh connection was opened to send a request, so it is not idle: it gets the
            # request timeout (and a 408), even while stopping.
            self._head_waiters[scope] = time.monotonic()
            if not fresh and not await self._await_next_request(stream, conn):
                return
            fresh = False
            self._in_flight += 1
            try:
                keep_alive = await self._exchange(stream, conn, client, scope)
            finally:
                self._in_flight -= 1
                self.last_activity = time.monotonic()
            if not keep_alive:
                return

    async def _await_next_request(
        self, stream: anyio.abc.SocketStream, conn: h11.Connection
    ) -> bool:
        buffered, closed = conn.trailing_data
        if buffered:
            return True  # pipelined: the next request has already (partly) arrived
        if closed or not self._accepting:
            return False
        chunk = b""
        with anyio.move_on_after(self._limits.keepalive_timeout) as scope:
            self._idle_scopes.add(scope)
            try:
                chunk = await _receive(stream)
            finally:
                self._idle_scopes.discard(scope)
        if scope.cancelled_caught or not chunk:
            return False
        conn.receive_data(chunk)
        return True

    async def _exchange(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        client: tuple[str, int] | None,
        conn_scope: anyio.CancelScope,
    ) -> bool:
        """Receive one request and answer it; True when the connection may serve another."""
        outcome: Request | _Rejection | None = None
        with anyio.move_on_after(self._limits.request_timeout) as scope:
            outcome = await self._read_request(stream, conn, client, conn_scope)
        if scope.cancelled_caught:
            outcome = _Rejection(408, "request not complete in time")
        if outcome is None:
            return False
        if isinstance(outcome, _Rejection):
            await self._reject(stream, conn, outcome, client)
            return False

        response = await self._call_handler(outcome)
        closing = not self._accepting
        sent = await self._send_response(
            stream, conn, response, head_only=outcome.method == "HEAD", close=closing
        )
        _run_on_sent(response)
        if not sent or closing:
            return False
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False  # h11 decided the connection must close (HTTP/1.0, Connection: close)

    async def _read_request(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        client: tuple[str, int] | None,
        conn_scope: anyio.CancelScope,
    ) -> Request | _Rejection | None:
        # h11 unfolds obs-fold lines and merges repeated Content-Length headers; both are
        # request-smuggling material, so the raw head is kept to refuse them.
        head = bytearray(conn.trailing_data[0])
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
                    if not await self._send(stream, conn.send(continue_event) or b""):
                        return None
                chunk = await _receive(stream)
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
                self._head_waiters.pop(conn_scope, None)
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

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:
            _log().exception("http.handler_failed", method=request.method, path=request.path)
            return Response.json(500, {"error": "internal error"})

    async def _reject(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        rejection: _Rejection,
        client: tuple[str, int] | None,
    ) -> None:
        _log().info(
            "http.request_rejected",
            status=rejection.status,
            reason=rejection.reason,
            client=client[0] if client else None,
        )
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        message = _REJECTION_MESSAGES.get(rejection.status, "bad request")
        response = Response.json(rejection.status, {"error": message})
        if await self._send_response(stream, conn, response, head_only=False, close=True):
            await self._linger(stream)

    async def _send_response(
        self,
        stream: anyio.abc.SocketStream,
        conn: h11.Connection,
        response: Response,
        *,
        head_only: bool,
        close: bool,
    ) -> bool:
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
        return await self._send(stream, data)

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
        head = h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )
        return head, b"" if bodyless or head_only else response.body

    async def _send(self, stream: anyio.abc.SocketStream, data: bytes) -> bool:
        # A client that stops reading must not hold the connection (and stop) forever.
        with anyio.move_on_after(self._limits.request_timeout):
            try:
                await stream.send(data)
            except _NETWORK_ERRORS:
                return False
            return True
        return False

    async def _linger(self, stream: anyio.abc.SocketStream) -> None:
        try:
            await stream.send_eof()
        except _NETWORK_ERRORS:
            return
        drained = 0
        with anyio.move_on_after(min(_LINGER_SECONDS, self._limits.request_timeout)):
            while drained < _LINGER_BYTES:
                chunk = await _receive(stream)
                if not chunk:
                    return
                drained += len(chunk)


# -- helpers -----------------------------------------------------------------------------------


async def _wrap_stream(client: socket.socket) -> anyio.abc.SocketStream:
    client.setblocking(False)
    if client.family != socket.AF_UNIX:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The transport-based stream for Unix sockets too: anyio's UNIXSocketStream on asyncio
    # leaves its reader registered after a cancelled receive (as stop_accepting does to idle
    # connections), and a late wake-up then fails inside the event loop.
    return await anyio.abc.SocketStream.from_socket(client)


async def _receive(stream: anyio.abc.SocketStream) -> bytes:
    """The next bytes from the peer; b"" once it has closed or vanished."""
    try:
        return await stream.receive(_RECEIVE_SIZE)
    except (anyio.EndOfStream, *_NETWORK_ERRORS):
        return b""


def _peer(stream: anyio.abc.SocketStream) -> tuple[str, int] | None:
    try:
        address = stream.extra(SocketAttribute.remote_address)
    except anyio.TypedAttributeLookupError:
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


def _reason(status: int) -> str:
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
