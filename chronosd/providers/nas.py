"""The NAS provider: arms one-shot wake-ups on a NAS over the HTTP contract (CONTRACT.md).

Three calls, each authenticated with the agent's bearer token:
``POST /api/agent-cron/provision``, ``POST /api/agent-cron/cancel`` and
``GET /api/agent-cron/list``. Arms live on the NAS, so the daemon need not stay resident.

The token is read from ``provider.nas.token_file`` at every call, so a token refreshed on disk
by another tool is picked up without a restart; it never appears in a message or a log line.

Failures are sorted for the caller, which owns retrying:

- 401/403 and any other non-2xx below 500 except 429 -> `ProviderRejected` (retrying the same
  request will not help);
- 429, 5xx, timeouts, connection errors, and a 2xx whose body breaks the contract ->
  `ProviderUnavailable`, with ``retry_after`` from the response's ``Retry-After`` when given.

The HTTP client (`chronosd.http.client`, a lean HTTP/1.1 over a few kept-alive anyio streams,
shared with the reference NAS's fire calls) is imported on first use: the fire path answers its
202 before anything is armed. httpx is not used here: it cost 2-4 ms of CPU per request,
several times what the NAS spends on a provision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronosd import __version__
from chronosd.config import NasConfig
from chronosd.errors import ConfigError
from chronosd.providers.base import Arm, ProviderRejected, ProviderUnavailable
from chronosd.timefmt import parse_instant, to_wire, utc_now

if TYPE_CHECKING:
    from chronosd.http.client import ClientResponse, HTTPClient

PROVISION_PATH = "/api/agent-cron/provision"
CANCEL_PATH = "/api/agent-cron/cancel"
LIST_PATH = "/api/agent-cron/list"

_DETAIL_CHARS = 200


def _one_line(text: str, limit: int = _DETAIL_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delay-seconds or HTTP-date), or None.

    A date in the past means "now" (0); anything unparseable is ignored (None).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    from email.utils import parsedate_to_datetime  # 40 ms of imports, rarely needed

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; "-0000" parses naive
        when = when.replace(tzinfo=now.tzinfo)
    return max(0.0, (when - now).total_seconds())


def _is_http_url(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError when out of range
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class NasProvider:
    """Arms, cancels and lists one-shots on the NAS at ``config.url``."""

    name = "nas"
    persistent = True

    def __init__(
        self,
        config: NasConfig,
        *,
        callback_url: str | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        base = config.url.strip().rstrip("/")
        if not _is_http_url(base):
            raise ConfigError(
                f"provider.nas.url {config.url!r} is not an http(s) URL; "
                "set it to the NAS's base URL, e.g. https://nas.example.net"
            )
        callback = config.callback_url if callback_url is None else callback_url
        if not _is_http_url(callback):
            raise ConfigError(
                f"provider.nas.callback_url {callback!r} is not an http(s) URL; set it to "
                "chronosd's public base URL (the NAS appends /api/cron/fire)"
            )
        self._token_cache: tuple[tuple[int, int, int], str] | None = None
        if not config.timeout > 0:
            raise ConfigError(f"provider.nas.timeout must be positive, got {config.timeout}")
        self._config = config
        self._base = base
        self._callback_url = callback
        self._clock = clock
        self._client: HTTPClient | None = None

    @property
    def resident(self) -> bool:
        return False  # the NAS holds the arms and wakes us; nothing here needs to stay up

    # -- the three calls ------------------------------------------------------------------

    async def arm(self, job_id: str, fire_at: datetime, *, dedup_key: str) -> str:
        action = f'provision job "{job_id}"'
        body = await self._call(
            "POST",
            PROVISION_PATH,
            action,
            {
                "job_id": job_id,
                "fire_at": to_wire(fire_at),
                "agent_callback_url": self._callback_url,
                "dedup_key": dedup_key,
            },
        )
        schedule_id = body.get("schedule_id")
        if not isinstance(schedule_id, str):
            raise self._malformed(action, "no schedule_id string")
        return schedule_id

    async def cancel(self, job_id: str) -> None:
        action = f'cancel job "{job_id}"'
        body = await self._call("POST", CANCEL_PATH, action, {"job_id": job_id})
        if body.get("ok") is not True:
            raise self._malformed(action, '"ok" is not true')

    async def list_armed(self) -> list[Arm]:
        action = "list arms"
        body = await self._call("GET", LIST_PATH, action, None)
        entries = body.get("armed")
        if not isinstance(entries, list):
            raise self._malformed(action, "no armed list")
        arms: list[Arm] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise self._malformed(action, "an entry is not an object")
            job_id, fire_at = entry.get("job_id"), entry.get("fire_at")
            schedule_id = entry.get("schedule_id", "")
            if not (
                isinstance(job_id, str)
                and isinstance(fire_at, str)
                and isinstance(schedule_id, str)
            ):
                raise self._malformed(action, "an entry lacks job_id, fire_at or schedule_id")
            try:
                instant = parse_instant(fire_at)
            except ValueError:
                raise self._malformed(action, f"fire_at {fire_at!r} is not an instant") from None
            arms.append(Arm(job_id, instant, schedule_id))
        return arms

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- plumbing --------------------------------------------------------------------------

    def _read_token(self) -> str:
        path: Path | None = self._config.token_file
        if path is None:
            raise ProviderRejected(
                "NAS token: provider.nas.token_file is not set; point it at the file holding "
                "the token from `chronosd nas agent add`",
                status=0,
            )
        try:
            # Read at each use so a token refreshed on disk is picked up at once; the stat
            # spares re-reading a file that has not changed since the last call.
            st = path.stat()
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._token_cache is not None and self._token_cache[0] == key:
                return self._token_cache[1]
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ProviderRejected(
                f"NAS token file {path}: cannot read it ({reason}); check the path and its "
                "permissions",
                status=0,
            ) from None
        if not token:
            raise ProviderRejected(
                f"NAS token file {path} is empty; put the agent's bearer token in it", status=0
            )
        if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
            raise ProviderRejected(
                f"NAS token file {path} holds more than one printable word; "
                "put only the agent's bearer token in it",
                status=0,
            )
        self._token_cache = (key, token)
        return token

    def _http(self) -> HTTPClient:
        if self._client is None:
            from chronosd.http.client import HTTPClient

            self._client = HTTPClient(
                self._base,
                timeout=self._config.timeout,
                headers=(
                    ("user-agent", f"chronosd/{__version__}"),
                    ("accept", "application/json"),
                ),
            )
        return self._client

    async def _call(
        self, method: str, path: str, action: str, payload: dict[str, str] | None
    ) -> dict[str, Any]:
        """Send one request; the decoded JSON object of its 2xx answer, or the right error."""
        from chronosd.http.client import RequestFailed, RequestTimedOut

        token = self._read_token()
        where = f"NAS {self._base}: {action}"
        headers = [("authorization", f"Bearer {token}")]
        content: bytes | None = None
        if payload is not None:
            content = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            headers.append(("content-type", "application/json"))
        try:
            response = await self._http().request(method, path, body=content, headers=headers)
        except RequestTimedOut:
            raise ProviderUnavailable(
                f"{where}: no answer within {self._config.timeout:g} s"
            ) from None
        except RequestFailed as exc:
            reason = _one_line(str(exc)) or type(exc).__name__
            raise ProviderUnavailable(f"{where}: {reason}") from None

        status = response.status
        if 200 <= status < 300:
            try:
                body = json.loads(response.body)
            except (ValueError, UnicodeDecodeError):
                raise self._malformed(action, "body is not JSON") from None
            if not isinstance(body, dict):
                raise self._malformed(action, "body is not a JSON object")
            return body

        message = f"{where}: HTTP {status} {_phrase(response)}{_detail(response)}"
        if status == 429 or status >= 500:
            retry_after = retry_after_seconds(response.header("retry-after"), self._clock())
            raise ProviderUnavailable(message, retry_after=retry_after)
        raise ProviderRejected(message, status=status)

    def _malformed(self, action: str, why: str) -> ProviderUnavailable:
        return ProviderUnavailable(f"NAS {self._base}: {action}: malformed answer: {why}")


def _phrase(response: ClientResponse) -> str:
    if response.reason:
        return response.reason
    try:
        return HTTPStatus(response.status).phrase
    except ValueError:
        return ""


def _detail(response: ClientResponse) -> str:
    """``: <the NAS's error message>`` when its body carries one, else nothing."""
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return f": {_one_line(error)}" if isinstance(error, str) and error.strip() else ""
