"""Routes of the daemon's listener: POST /api/cron/fire and GET /healthz (CONTRACT.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable

from chronosd import __version__
from chronosd.errors import StateError
from chronosd.fire import FireResult
from chronosd.http.auth import FireAuthenticator
from chronosd.http.server import Request, Response
from chronosd.log import get_logger
from chronosd.timefmt import parse_instant

log = get_logger("chronosd.http")

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FIRE_PATH = "/api/cron/fire"


class DaemonRoutes:
    def __init__(
        self,
        *,
        authenticator: FireAuthenticator,
        fire: Callable[[str, object], Awaitable[FireResult]],
        health: Callable[[], dict[str, object]],
    ) -> None:
        self.authenticator = authenticator
        self.fire = fire
        self.health = health

    async def __call__(self, request: Request) -> Response:
        if request.path == FIRE_PATH:
            if request.method != "POST":
                return Response.json(405, {"error": "use POST"}, headers=(("allow", "POST"),))
            return await self._fire(request)
        if request.path == "/healthz":
            if request.method not in ("GET", "HEAD"):
                return Response.json(405, {"error": "use GET"}, headers=(("allow", "GET"),))
            return Response.json(200, {"status": "ok", "version": __version__, **self.health()})
        return Response.json(404, {"error": "not found"})

    async def _fire(self, request: Request) -> Response:
        try:
            verdict = await self.authenticator.verify(request)
        except StateError as exc:  # the replay cache could not be written
            log.error("fire.state_failed", error=str(exc))
            return Response.json(503, {"error": str(exc)}, headers=(("retry-after", "5"),))
        if not verdict.ok:
            log.warning("fire.refused", reason=verdict.reason, client=_client(request))
            return Response.json(401, {"error": "invalid fire token"})
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            return Response.json(400, {"error": "body is not JSON"})
        if not isinstance(body, dict):
            return Response.json(400, {"error": "body must be a JSON object"})
        job_id = body.get("job_id")
        # The id only ever selects a job we already know; it must never build a path.
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            return Response.json(400, {"error": "job_id is missing or not a valid job id"})
        try:
            fire_at = parse_instant(body.get("fire_at"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return Response.json(400, {"error": "fire_at is missing or not an ISO-8601 instant"})
        result = await self.fire(job_id, fire_at)
        headers: tuple[tuple[str, str], ...] = ()
        if result.http_status == 503:
            headers = (("retry-after", "5"),)
        return Response.json(
            result.http_status, result.payload(), headers=headers, on_sent=result.start
        )


def _client(request: Request) -> str:
    return f"{request.client[0]}:{request.client[1]}" if request.client else "?"
