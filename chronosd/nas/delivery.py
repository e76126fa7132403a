"""What is particular to the dispatcher's fire calls, on top of `chronosd.http.client`.

A fire call is one POST of a small JSON body to ``{callback}/api/cron/fire``. The HTTP is the
shared client's (kept-alive connections, the single retry on a connection the agent closed
meanwhile, timeouts, TLS); this module adds the grouping per agent. `AgentConnections` holds
one `HTTPClient` per origin the agent's callbacks use, so that the dispatcher can close them
all as soon as nothing is in flight to the agent: a socket-activated agent counts an open
connection as activity, so an idle one would keep it awake. A connection idle for more than
*keepalive_expiry* seconds is not reused: the agent may be closing it at that very moment
(chronosd closes idle ones after 5 s).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from chronosd.http.client import HTTPClient, RequestFailed, RequestTimedOut

# Characters left as they are in the request target: RFC 3986 pchar, "/" and existing escapes.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# An agent answers a few dozen bytes; more is a broken or hostile peer.
MAX_REPLY_BODY = 1 << 20
_FIRE_HEADERS = (
    ("user-agent", "chronosd-nas"),
    ("content-type", "application/json"),
    ("accept", "application/json"),
)


class DeliveryError(Exception):
    """The fire call got no HTTP response; the message says why, for the deliveries table."""


class DeliveryTimedOut(DeliveryError):
    """The connect, the send or a wait for the response took longer than the timeout."""


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
    """An agent's answer to a fire call."""

    status: int
    retry_after: str | None


class AgentConnections:
    """The connections to one agent, reused through a burst of deliveries.

    Connections are opened on demand, so there are never more than the deliveries in flight
    at once; up to *max_idle* per origin are kept between them. *timeout* bounds the connect,
    the send and each wait for response bytes (`HTTPClient`).
    """

    def __init__(
        self,
        *,
        tls_context: Callable[[], ssl.SSLContext],
        timeout: float,
        keepalive_expiry: float = 2.0,
        max_idle: int = 32,
    ) -> None:
        self._tls_context = tls_context
        self._timeout = timeout
        self._expiry = keepalive_expiry
        self._max_idle = max_idle
        self._clients: dict[tuple[bool, str, int], HTTPClient] = {}

    async def post_json(self, target: FireTarget, body: bytes, authorization: str) -> Reply:
        """POST *body* to *target*; the status and Retry-After, or DeliveryError."""
        client = self._clients.get(target.origin)
        if client is None:
            client = self._clients[target.origin] = HTTPClient(
                f"{'https' if target.tls else 'http'}://{target.authority}",
                timeout=self._timeout,
                headers=_FIRE_HEADERS,
                max_idle=self._max_idle,
                # Made on first use, and only for https: building one costs ~50 ms.
                ssl_context=self._tls_context() if target.tls else None,
                keepalive_expiry=self._expiry,
                max_body=MAX_REPLY_BODY,
            )
        try:
            response = await client.request(
                "POST", target.target, body=body, headers=(("authorization", authorization),)
            )
        except RequestTimedOut as exc:
            raise DeliveryTimedOut(f"{target.authority}: {exc}") from None
        except RequestFailed as exc:
            raise DeliveryError(f"{target.authority}: {exc}") from None
        return Reply(response.status, response.header("retry-after"))

    async def aclose(self) -> None:
        """Close every idle connection; one still in use is closed when its delivery ends."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
