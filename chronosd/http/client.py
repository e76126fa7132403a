"""A lean HTTP/1.1 client on anyio streams and h11, for the calls chronosd makes to the NAS.

One `HTTPClient` talks to one origin (``http://host[:port]`` or ``https://...``) over a small
pool of kept-alive connections. It does only what the NAS contract needs, which is why it costs
a fraction of httpx's CPU per request: ``Content-Length`` request bodies, responses framed by
``Content-Length``, chunked coding or the close of the connection, no redirects, no cookies,
no compression, no proxies.

- A connection goes back to the pool only after a complete response, and only when neither
  side asked to close it; any error, a cancellation or ``Connection: close`` drops it.
- ``timeout`` bounds the connect (TLS handshake included), sending the request, and each wait
  for response bytes (as httpx's per-operation timeouts do).
- An idle connection the server has closed meanwhile (its keep-alive timeout) is noticed before
  reuse and dropped. If the server closes it in the instant the request is sent, the request
  is sent once more on a new connection: the calls to the NAS are idempotent (a provision
  carries its dedup key, a cancel of an unknown job is a no-op, a list reads).

Failures raise `RequestTimedOut` or `RequestFailed` with a one-line reason; HTTP error
statuses are not failures here, the caller classifies them.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
import anyio.streams.tls
import h11

from chronosd.errors import ChronosError

_RECEIVE_SIZE = 65536
_MAX_HEADS = 64  # request heads kept for reuse (one per call, token and body length)
# Characters left as they are in a request target: those RFC 3986 allows, and "%" so that a
# target already percent-encoded stays as it is.
_SAFE = "/?@!$&'()*+,;=:%~-._"
# Far above any NAS answer (a list of 10,000 arms is ~1 MB); a server sending more is broken.
MAX_RESPONSE_BODY = 64 * 1024 * 1024
_NETWORK_ERRORS = (
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    ssl.SSLError,
)


class RequestFailed(ChronosError):
    """The request could not be sent or its response not read (connection or protocol)."""


class RequestTimedOut(RequestFailed):
    """The connect, the send or a wait for response bytes took longer than the timeout."""


@dataclass(frozen=True)
class ClientResponse:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lower-case, values latin-1 decoded
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header *name* (any case), or None."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


class _StaleConnection(Exception):
    """A reused connection was closed by the server before any byte of the response."""


class _Connection:
    __slots__ = ("fileno", "h11", "reused", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, fileno: int) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.fileno = fileno
        self.reused = False

    def looks_closed(self) -> bool:
        """Whether the idle connection is readable: the server closed it (or sent junk).

        On TLS a readable socket may also hold a harmless record; dropping the connection
        then costs a handshake, nothing more.
        """
        if self.fileno < 0:
            return False
        poller = select.poll()
        poller.register(self.fileno, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True


class HTTPClient:
    """Requests to one origin over at most ``max_idle`` kept-alive connections at rest.

    Any number of requests may run at once (the caller bounds that); each uses a connection of
    its own, taken from the pool or opened, and returns it afterwards when it can be reused.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        headers: Sequence[tuple[str, str]] = (),
        max_idle: int = 16,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HTTPClient: {base_url!r} is not an http(s) URL")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = quote(parts.path.rstrip("/"), safe=_SAFE)
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = 443 if self._tls else 80
        authority = host if self._port == default_port else f"{host}:{self._port}"
        self._headers: list[tuple[bytes, bytes]] = [(b"host", authority.encode("idna"))]
        self._headers += [(k.encode("ascii"), v.encode("latin-1")) for k, v in headers]
        self.timeout = timeout
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: list[_Connection] = []
        self._closed = False
        self._heads: dict[tuple[str, str, tuple[tuple[str, str], ...], int | None], h11.Request]
        self._heads = {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> ClientResponse:
        """Send one request and read its whole response."""
        request = self._request_head(method, path, headers, None if body is None else len(body))
        conn = await self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, request, body)
            except _StaleConnection:
                pass  # closed by the server as we sent: once more, on a new connection
        # A new connection never counts as stale: its failures are reported as they are.
        return await self._exchange(await self._connect(), request, body)

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await anyio.aclose_forcefully(conn.stream)

    def _request_head(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], length: int | None
    ) -> h11.Request:
        # h11 validates every header of every event it is given, a fifth of the client's CPU
        # per request; the NAS calls repeat the same few heads, so each is built once.
        key = (method, path, tuple(headers), length)
        request = self._heads.get(key)
        if request is not None:
            return request
        head = list(self._headers)
        head += [(k.encode("ascii"), v.encode("latin-1")) for k, v in headers]
        if length is not None:
            head.append((b"content-length", str(length).encode("ascii")))
        try:
            request = h11.Request(
                method=method.encode("ascii"),
                target=(self._prefix + quote(path, safe=_SAFE)).encode("ascii"),
                headers=head,
            )
        except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
            raise RequestFailed(f"cannot send the request: {_reason(exc)}") from None
        if len(self._heads) >= _MAX_HEADS:
            self._heads.clear()
        self._heads[key] = request
        return request

    # -- connections -----------------------------------------------------------------------

    async def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.looks_closed():
                return conn
            await anyio.aclose_forcefully(conn.stream)
        return None

    async def _connect(self) -> _Connection:
        try:
            with anyio.fail_after(self.timeout):
                if self._tls:
                    if self._ssl_context is None:
                        self._ssl_context = ssl.create_default_context()
                    stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                        self._host,
                        self._port,
                        tls=True,
                        ssl_context=self._ssl_context,
                        tls_hostname=self._host,
                        # Every response is framed by h11, so a missing close_notify cannot
                        # truncate one unnoticed; waiting for it on close only costs time.
                        tls_standard_compatible=False,
                    )
                else:
                    stream = await anyio.connect_tcp(self._host, self._port)
        except TimeoutError:
            raise RequestTimedOut(f"no connection within {self.timeout:g} s") from None
        except _NETWORK_ERRORS as exc:
            raise RequestFailed(f"cannot connect: {_reason(exc)}") from None
        try:
            fileno = stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
        except anyio.TypedAttributeLookupError:
            fileno = -1
        return _Connection(stream, fileno)

    def _keep(self, conn: _Connection) -> bool:
        """Put *conn* back in the pool if it can carry another request."""
        state = conn.h11
        if (
            self._closed
            or len(self._idle) >= self._max_idle
            or state.our_state is not h11.DONE
            or state.their_state is not h11.DONE
            or state.trailing_data[0]  # bytes after the response: nothing we asked for
        ):
            return False
        state.start_next_cycle()
        conn.reused = True
        self._idle.append(conn)
        return True

    # -- one exchange ----------------------------------------------------------------------

    async def _exchange(
        self, conn: _Connection, request: h11.Request, body: bytes | None
    ) -> ClientResponse:
        kept = False
        try:
            response = await self._send_and_receive(conn, request, body)
            kept = self._keep(conn)
            return response
        finally:
            if not kept:
                # Forcefully: this also runs under a cancellation, and must not wait.
                await anyio.aclose_forcefully(conn.stream)

    async def _send_and_receive(
        self, conn: _Connection, request: h11.Request, body: bytes | None
    ) -> ClientResponse:
        state = conn.h11
        stream = conn.stream
        got_bytes = False
        try:
            data = state.send(request) or b""
            if body:
                data += state.send(h11.Data(data=body)) or b""
            data += state.send(h11.EndOfMessage()) or b""
            with anyio.fail_after(self.timeout) as scope:
                await stream.send(data)
                head: h11.Response | None = None
                chunks: list[bytes] = []
                size = 0
                while True:
                    event = state.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            received = await stream.receive(_RECEIVE_SIZE)
                        except anyio.EndOfStream:
                            received = b""
                        if received:
                            got_bytes = True
                            # The timeout is per wait for bytes, not for the whole response.
                            scope.deadline = anyio.current_time() + self.timeout
                        elif conn.reused and not got_bytes:
                            raise _StaleConnection
                        state.receive_data(received)
                    elif isinstance(event, h11.Response):
                        head = event
                    elif isinstance(event, h11.Data):
                        size += len(event.data)
                        if size > MAX_RESPONSE_BODY:
                            raise RequestFailed(
                                f"response body larger than {MAX_RESPONSE_BODY} bytes"
                            )
                        chunks.append(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise RequestFailed("the server closed the connection mid-response")
                    # InformationalResponse (1xx) and PAUSED cannot end the exchange: go on.
        except TimeoutError:
            raise RequestTimedOut(f"no answer within {self.timeout:g} s") from None
        except h11.RemoteProtocolError as exc:
            if conn.reused and not got_bytes:
                raise _StaleConnection from None
            raise RequestFailed(f"invalid HTTP response: {exc}") from None
        except h11.LocalProtocolError as exc:
            raise RequestFailed(f"cannot send the request: {exc}") from None
        except _NETWORK_ERRORS as exc:
            if conn.reused and not got_bytes:
                raise _StaleConnection from None
            raise RequestFailed(f"connection failed: {_reason(exc)}") from None
        assert head is not None  # h11 yields the Response before any Data or EndOfMessage
        return ClientResponse(
            head.status_code,
            head.reason.decode("ascii", errors="ignore"),
            tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers),
            b"".join(chunks),
        )


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
