"""The reference NAS's HTTP routes (CONTRACT.md): provision, cancel, list, JWKS and health.

A handler for `chronosd.http.server.HTTPServer`. Agents authenticate with their bearer token;
every refusal is the same 401 so a caller learns nothing from probing. The body size limit is
the server's.
"""

from __future__ import annotations

import functools
import json
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from chronosd import __version__
from chronosd.http.server import Request, Response
from chronosd.nas.keys import KeyRing
from chronosd.nas.store import Agent, NASStore
from chronosd.timefmt import parse_instant

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
AGENT_NAME = JOB_ID
MAX_URL_LENGTH = 2048
MAX_DEDUP_KEY_LENGTH = 512

_JSON_ONLY = (("cache-control", "no-store"),)


class BadRequest(ValueError):
    """The request body is wrong; the message goes back to the agent."""


def check_callback_url(url: object) -> str:
    """*url* when it is an absolute http(s) URL without query or fragment; BadRequest otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise BadRequest("agent_callback_url must be an http or https URL")
    return _checked_url(url)


# An agent sends the same callback URL with every provision; a refused one raises and is not
# remembered.
@functools.lru_cache(maxsize=256)
def _checked_url(url: str) -> str:
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise BadRequest("agent_callback_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError as exc:
        raise BadRequest(f"agent_callback_url is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise BadRequest("agent_callback_url must be an http or https URL with a host")
    if parts.query or parts.fragment:
        raise BadRequest("agent_callback_url must not have a query or fragment")
    return url


def _check_job_id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID.fullmatch(value):
        raise BadRequest("job_id must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    return value


def _check_fire_at(value: object) -> tuple[str, float]:
    if not isinstance(value, str):
        raise BadRequest("fire_at must be an ISO-8601 instant with an offset")
    try:
        instant = parse_instant(value)
    except (ValueError, OverflowError) as exc:
        raise BadRequest(f"fire_at must be an ISO-8601 instant with an offset ({exc})") from None
    return value.strip(), instant.timestamp()


def _check_dedup_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_DEDUP_KEY_LENGTH:
        raise BadRequest(f"dedup_key must be a string of 1 to {MAX_DEDUP_KEY_LENGTH} characters")
    return value


def _json_object(request: Request) -> dict[str, Any]:
    try:
        document = json.loads(request.body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    if not isinstance(document, dict):
        raise BadRequest("body is not a JSON object")
    return document


def _bearer(request: Request) -> str | None:
    value = request.header("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _log() -> Any:
    from chronosd.log import get_logger

    return get_logger()


class NASApp:
    """Routes requests to the store.

    *on_change* tells the dispatcher an arm changed: ``(agent, job_id, next attempt)``, the
    next attempt None for a cancelled arm.
    """

    def __init__(
        self,
        store: NASStore,
        keyring: KeyRing,
        *,
        on_change: Callable[[str, str, float | None], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._on_change = on_change
        self._clock = clock
        self._routes: dict[tuple[str, str], Callable[[Request], Response]] = {
            ("POST", "/api/agent-cron/provision"): self._provision,
            ("POST", "/api/agent-cron/cancel"): self._cancel,
            ("GET", "/api/agent-cron/list"): self._list,
            ("GET", "/.well-known/jwks.json"): self._jwks,
            ("GET", "/healthz"): self._health,
        }

    async def __call__(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        route = self._routes.get((method, request.path))
        if route is None:
            allowed = sorted(m for m, path in self._routes if path == request.path)
            if not allowed:
                return Response.json(404, {"error": "not found"})
            return Response.json(
                405, {"error": "method not allowed"}, headers=[("allow", ", ".join(allowed))]
            )
        try:
            return route(request)
        except BadRequest as exc:
            return Response.json(400, {"error": str(exc)}, headers=_JSON_ONLY)
        except sqlite3.Error as exc:
            _log().error("nas.store_failed", path=request.path, error=str(exc))
            return Response.json(
                503,
                {"error": "state database unavailable"},
                headers=[("retry-after", "1"), *_JSON_ONLY],
            )

    def _agent(self, request: Request) -> Agent | None:
        token = _bearer(request)
        return self._store.agent_for_token(token) if token else None

    @staticmethod
    def _unauthorized() -> Response:
        return Response.json(
            401,
            {"error": "invalid agent token"},
            headers=[("www-authenticate", 'Bearer realm="chronosd-nas"'), *_JSON_ONLY],
        )

    def _provision(self, request: Request) -> Response:
        agent = self._agent(request)
        if agent is None:
            return self._unauthorized()
        body = _json_object(request)
        job_id = _check_job_id(body.get("job_id"))
        fire_at, fire_epoch = _check_fire_at(body.get("fire_at"))
        callback = body.get("agent_callback_url")
        callback_url = check_callback_url(agent.callback_url if callback is None else callback)
        dedup_key = _check_dedup_key(body.get("dedup_key"))
        result = self._store.provision(
            agent.name,
            job_id,
            fire_at=fire_at,
            fire_epoch=fire_epoch,
            callback_url=callback_url,
            dedup_key=dedup_key,
            now=self._clock(),
        )
        if result.changed:
            self._on_change(agent.name, job_id, result.arm.next_attempt_at)
            _log().info(
                "nas.armed",
                agent=agent.name,
                job_id=job_id,
                fire_at=fire_at,
                schedule_id=result.arm.schedule_id,
                replaced=result.replaced,
            )
        return Response.json(200, {"schedule_id": result.arm.schedule_id}, headers=_JSON_ONLY)

    def _cancel(self, request: Request) -> Response:
        agent = self._agent(request)
        if agent is None:
            return self._unauthorized()
        job_id = _check_job_id(_json_object(request).get("job_id"))
        if self._store.cancel(agent.name, job_id):
            self._on_change(agent.name, job_id, None)
            _log().info("nas.cancelled", agent=agent.name, job_id=job_id)
        return Response.json(200, {"ok": True}, headers=_JSON_ONLY)

    def _list(self, request: Request) -> Response:
        agent = self._agent(request)
        if agent is None:
            return self._unauthorized()
        armed = [
            {"job_id": arm.job_id, "fire_at": arm.fire_at, "schedule_id": arm.schedule_id}
            for arm in self._store.armed(agent.name)
        ]
        return Response.json(200, {"armed": armed}, headers=_JSON_ONLY)

    def _jwks(self, request: Request) -> Response:
        # Short caching: a rotated key must reach verifiers well within a token's lifetime.
        return Response.json(
            200,
            self._keyring.jwks(now=self._clock()),
            headers=[("cache-control", "public, max-age=60")],
        )

    def _health(self, request: Request) -> Response:
        return Response.json(200, {"status": "ok", "version": __version__}, headers=_JSON_ONLY)
