"""The framework baseline: a Starlette hello-world for uvicorn (``uvicorn --fd 3``)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def fire(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"}, status_code=202)


app = Starlette(routes=[Route("/api/cron/fire", fire, methods=["POST"]), Route("/", fire)])
