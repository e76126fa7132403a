"""The reference NAS (`chronosd nas serve`) with a request counter, for the benchmarks.

Run as ``python bench/counting_nas.py [nas serve options]``. It is the reference NAS unchanged
except that its request handler is wrapped: every request an agent makes is counted (by method
and path) and every accepted provision is timed, so a benchmark can tell how many calls chronosd
made and when the NAS held an arm. ``GET /bench/stats[?job=ID]`` reports the figures and
``GET /bench/reset`` clears them; neither is counted.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import chronosd.nas.serve as nas_serve
from chronosd.cli import main
from chronosd.http.server import Request, Response
from chronosd.nas.app import NASApp

PROVISION = "/api/agent-cron/provision"


class CountingNASApp(NASApp):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.provisions = 0
        self.last_provision_at: float | None = None
        self.provisioned: dict[str, tuple[float, str]] = {}

    async def __call__(self, request: Request) -> Response:
        if request.path == "/bench/stats":
            return self._stats(request)
        if request.path == "/bench/reset":
            self._reset()
            return Response.json(200, {"ok": True})
        response = await super().__call__(request)
        now = time.time()
        self.counts[f"{request.method} {request.path}"] += 1
        self.first_at = self.first_at or now
        self.last_at = now
        if request.path == PROVISION and response.status == 200:
            self.provisions += 1
            self.last_provision_at = now
            try:
                body = json.loads(request.body)
                self.provisioned[str(body["job_id"])] = (now, str(body["fire_at"]))
            except (ValueError, KeyError, TypeError):
                pass
        return response

    def _stats(self, request: Request) -> Response:
        job = None
        for part in request.query.split("&"):
            key, _, value = part.partition("=")
            if key == "job":
                job = value
        data: dict[str, Any] = {
            "counts": dict(self.counts),
            "requests": sum(self.counts.values()),
            "first_at": self.first_at,
            "last_at": self.last_at,
            "provisions": self.provisions,
            "last_provision_at": self.last_provision_at,
        }
        if job is not None:
            data["job"] = self.provisioned.get(job)
        return Response.json(200, data)


if __name__ == "__main__":
    nas_serve.NASApp = CountingNASApp  # type: ignore[misc]
    sys.exit(main(["nas", "serve", *sys.argv[1:]]))
