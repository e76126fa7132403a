"""chronosd's one HTTP/1.1 client: small requests to one origin over kept-alive anyio streams.

It serves the NAS provider (provision, cancel, list) and the reference NAS's fire calls
(`chronosd.nas.delivery`). One `HTTPClient` talks to one origin (``http://host[:port]`` or
``https://...``) over a pool of kept-alive connections. It does only what those calls need,
which is why it costs a fraction of httpx's CPU per request (and less than h11: the bytes are
written and read by `chronosd.http.wire`): ``Content-Length`` request bodies, responses framed
by ``Content-Length``, chunked coding or the close of the connection, no redirects, no
cookies, no compression, no proxies.

- A connection goes back to the pool only after a complete response, and only when neither
  side asked to close it; any error, a cancellation or ``Connection: close`` drops it.
- ``timeout`` bounds the connect (TLS handshake included), sending the request, and each wait
  for response bytes (as httpx's per-operation timeouts do).
- An idle connection the server has closed meanwhile (its keep-alive timeout) is noticed before
  reuse and dropped, and with ``keepalive_expiry`` one idle longer than that is not reused at
  all: the server may be closing it at that very moment. If the server closes a reused
  connection before any byte of the response, the request is sent once more on a new
  connection: chronosd's calls are idempotent (a provision carries its dedup key, a cancel of
  an unknown job is a no-op, a list reads, a fire delivered twice is answered ``duplicate``).

Failures raise `RequestTimedOut` or `RequestFailed` with a one-line reason; HTTP error
statuses are not failures here, the caller classifies them.
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import anyio
import anyio.abc
import anyio.streams.tls

from chronosd.errors import ChronosError
from chronosd.http.wire import (
    ResponseCutShort,
    ResponseError,
    ResponseParser,
    finish_request,
    format_fields,
    format_head,
)

_RECEIVE_SIZE = 65536
_MAX_HEADS = 64  # request heads kept for reuse (one per method and path)
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
    """A complete response from the server."""

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
    __slots__ = ("idle_since", "poller", "reused", "stream")

    def __init__(self, stream: anyio.abc.ByteStream, fileno: int) -> None:
        self.stream = stream
        self.reused = False
        self.idle_since = 0.0
        self.poller: select.poll | None = None
        if fileno >= 0:
            self.poller = select.poll()
            self.poller.register(fileno, select.POLLIN)

    def looks_closed(self) -> bool:
        """Whether the idle connection is readable: the server closed it (or sent junk).

        On TLS a readable socket may also hold a harmless record; dropping the connection
        then costs a handshake, nothing more.
        """
        if self.poller is None:
            return False
        try:
            return bool(self.poller.poll(0))
        except OSError:
            return True


class HTTPClient:
    """Requests to one origin over at most ``max_idle`` kept-alive connections at rest.

    Any number of requests may run at once (the caller bounds that); each uses a connection of
    its own, taken from the pool or opened, and returns it afterwards when it can be reused.
    ``keepalive_expiry``: seconds a connection may rest and still be reused (None: no limit).
    ``max_body``: the largest response body accepted.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        headers: Sequence[tuple[str, str]] = (),
        max_idle: int = 16,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float | None = None,
        max_body: int = MAX_RESPONSE_BODY,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HTTPClient: {base_url!r} is not an http(s) URL")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = quote(parts.path.rstrip("/"), safe=_SAFE)
        host = self._host
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise ValueError(
                    f"HTTPClient: the host of {base_url!r} cannot be encoded: {exc}"
                ) from None
        host = f"[{host}]" if ":" in host else host
        default_port = 443 if self._tls else 80
        authority = host if self._port == default_port else f"{host}:{self._port}"
        self._headers = [("host", authority), *headers]
        self.timeout = timeout
        self._max_idle = max_idle
        self._ssl_context = ssl_context
        self._expiry = keepalive_expiry
        self._max_body = max_body
        self._idle: list[_Connection] = []
        self._closed = False
        self._heads: dict[tuple[str, str], bytes] = {}

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> ClientResponse:
        """Send one request and read its whole response."""
        data = self._request_bytes(method, path, headers, body)
        head_request = method == "HEAD"
        conn = await self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, data, head_request)
            except _StaleConnection:
                pass  # closed by the server as we sent: once more, on a new connection
        # A new connection never counts as stale: its failures are reported as they are.
        return await self._exchange(await self._connect(), data, head_request)

    async def aclose(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await anyio.aclose_forcefully(conn.stream)

    def _request_bytes(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> bytes:
        # The request line and the client's own headers repeat from call to call: each is
        # checked and encoded once. The per-call headers (a fresh token) are checked each time.
        key = (method, path)
        head = self._heads.get(key)
        try:
            if head is None:
                target = self._prefix + quote(path, safe=_SAFE)
                head = format_head(method, target, self._headers)
                if len(self._heads) >= _MAX_HEADS:
                    self._heads.clear()
                self._heads[key] = head
            if headers:
                head += format_fields(headers)
        except (ValueError, UnicodeEncodeError) as exc:
            raise RequestFailed(f"cannot send the request: {_reason(exc)}") from None
        return finish_request(head, body)

    # -- connections -----------------------------------------------------------------------

    async def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be closing
            if (
                self._expiry is None or time.monotonic() - conn.idle_since <= self._expiry
            ) and not conn.looks_closed():
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
                        # Every response is framed by its head, so a missing close_notify
                        # cannot truncate one unnoticed; waiting for it on close only costs
                        # time.
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
        """Put *conn* back in the pool if there is room (it can carry another request)."""
        if self._closed or len(self._idle) >= self._max_idle:
            return False
        conn.reused = True
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        return True

    # -- one exchange ----------------------------------------------------------------------

    async def _exchange(self, conn: _Connection, data: bytes, head_request: bool) -> ClientResponse:
        kept = False
        try:
            parser = await self._send_and_receive(conn, data, head_request)
            kept = parser.keep_alive and self._keep(conn)
            return ClientResponse(
                parser.status,
                parser.reason,
                tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in parser.headers),
                parser.body(),
            )
        finally:
            if not kept:
                # Forcefully: this also runs under a cancellation, and must not wait.
                await anyio.aclose_forcefully(conn.stream)

    async def _send_and_receive(
        self, conn: _Connection, data: bytes, head_request: bool
    ) -> ResponseParser:
        parser = ResponseParser(max_body=self._max_body, head_request=head_request)
        try:
            if anyio.current_effective_deadline() <= anyio.current_time() + self.timeout:
                # The caller's own deadline comes first (the dispatcher bounds each fire
                # call so): a scope of ours could never expire, and would only cost CPU.
                await self._converse(conn, data, parser, None)
            else:
                with anyio.fail_after(self.timeout) as scope:
                    await self._converse(conn, data, parser, scope)
        except TimeoutError:
            raise RequestTimedOut(f"no answer within {self.timeout:g} s") from None
        except ResponseCutShort:
            raise RequestFailed("the server closed the connection mid-response") from None
        except ResponseError as exc:
            raise RequestFailed(f"invalid HTTP response: {exc}") from None
        except _NETWORK_ERRORS as exc:
            if conn.reused and not parser.received:
                raise _StaleConnection from None
            raise RequestFailed(f"connection failed: {_reason(exc)}") from None
        return parser

    async def _converse(
        self,
        conn: _Connection,
        data: bytes,
        parser: ResponseParser,
        scope: anyio.CancelScope | None,
    ) -> None:
        stream = conn.stream
        await stream.send(data)
        while True:
            try:
                received = await stream.receive(_RECEIVE_SIZE)
            except anyio.EndOfStream:
                received = b""
            if not received and conn.reused and not parser.received:
                raise _StaleConnection
            if parser.feed(received):
                return
            if scope is not None:
                # The timeout is per wait for bytes, not for the whole response.
                scope.deadline = anyio.current_time() + self.timeout


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
