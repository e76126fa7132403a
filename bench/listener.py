"""Listener throughput: duplicate fires (an occurrence already claimed) over keep-alive.

chronosd runs awake (``--idle-exit never``) on a port with **auth none** (loopback only): an
HMAC signature is accepted once and its replays are refused, and a fire token's ``jti`` likewise,
so the same authenticated request cannot be sent thousands of times; auth none measures the
listener, the routing and the duplicate check in SQLite. One fire is sent and claimed first, then
the load generator repeats it: every answer is ``200 {"status": "duplicate"}``.

Load: ``wrk`` (Debian) with a Lua script for the POST, one thread and 8 connections, when it is
installed; else a bounded asyncio client (bench/load_client.py). Baselines under the same load in
the same run: the minimal stdlib asyncio responder and uvicorn + Starlette hello-world.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    PYTHON,
    Row,
    Section,
    Settings,
    base_env,
    free_port,
    http_request,
    make_chronosd,
    nas_available,
    ratio,
    read_response,
    running_nas,
    stop_popen,
    verdict,
    wait_port,
)

CONNECTIONS = 8


def _load(port: int, body: bytes, seconds: float, work: Path) -> tuple[float, int, str]:
    """(requests per second, non-2xx responses, tool) for POST /api/cron/fire."""
    wrk = shutil.which("wrk")
    if wrk is not None:
        script = work / "post.lua"
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds:.0f}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/api/cron/fire",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        ).stdout
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors:.*", out)
        detail = f"wrk -t1 -c{CONNECTIONS} -d{seconds:.0f}s" + (
            f" ({errors.group(0)})" if errors else ""
        )
        return (
            (float(rate.group(1)) if rate else float("nan")),
            int(bad.group(1) if bad else 0),
            detail,
        )
    out = subprocess.run(
        [
            PYTHON,
            str(BENCH_DIR / "load_client.py"),
            str(port),
            str(CONNECTIONS),
            str(seconds),
            body.decode(),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        env=base_env(),
    ).stdout
    data = json.loads(out)
    return (
        float(data["rate"]),
        int(data["non_2xx"]),
        f"bench/load_client.py, {CONNECTIONS} keep-alive connections, {seconds:.0f} s",
    )


def _post(port: int, body: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(http_request("POST", "/api/cron/fire", body))
        return read_response(sock, 10)


def run(settings: Settings) -> Section:
    section = Section("listener", "Duplicate fires per second over keep-alive")
    seconds = 3.0 if settings.quick else 10.0
    work = settings.workdir
    have_nas, _why = nas_available()
    results: dict[str, tuple[float, int, str]] = {}
    port = free_port()
    body = b'{"job_id":"tick","fire_at":"2026-01-01T00:00:00+00:00"}'
    # Provider nas when it is there, so no local timer fires during the load; the NAS's
    # callback goes to a closed port, so nothing is delivered back to us.
    nas_cm = running_nas(work / "nas") if have_nas else None
    nas = nas_cm.__enter__() if nas_cm is not None else None
    try:
        setup = make_chronosd(
            work / "chronosd",
            jobs=[{"id": "tick", "schedule": "* * * * * *", "command": ["/bin/true"]}],
            nas=nas,
            auth="none",
            idle_exit="never",
            listen=f"127.0.0.1:{port}",
        )
        with open(setup.log_path, "ab") as log:
            proc = subprocess.Popen(
                setup.argv(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=base_env(),
                start_new_session=True,
            )
        try:
            wait_port("127.0.0.1", port, 30)
            # An occurrence 2 s ahead: past the one planned at start-up, not "too early".
            fire_at = datetime.fromtimestamp(int(time.time()) + 2, UTC)
            wire = fire_at.strftime("%Y-%m-%dT%H:%M:%S+00:00")
            body = json.dumps({"job_id": "tick", "fire_at": wire}).encode()
            status, answer = _post(port, body)
            first = f"{status} {answer.decode(errors='replace')}"
            status, answer = _post(port, body)
            if b"duplicate" not in answer:
                section.notes.append(
                    f"The repeated fire was not a duplicate ({status} {answer!r}); "
                    f"the first answer was {first}."
                )
            results["chronosd"] = _load(port, body, seconds, work)
        finally:
            stop_popen(proc)
    finally:
        if nas_cm is not None:
            nas_cm.__exit__(None, None, None)

    mini_port = free_port()
    mini = subprocess.Popen(
        [PYTHON, str(BENCH_DIR / "minimal_server.py"), "--port", str(mini_port)], env=base_env()
    )
    try:
        wait_port("127.0.0.1", mini_port)
        results["minimal"] = _load(mini_port, body, seconds, work)
    finally:
        stop_popen(mini)
    uv_port = free_port()
    with open(work / "uvicorn.log", "wb") as uv_log:
        uv = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "--port",
                str(uv_port),
                "--app-dir",
                str(BENCH_DIR),
                "uvicorn_app:app",
            ],
            env=base_env(),
            stdout=uv_log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port("127.0.0.1", uv_port)
        results["uvicorn"] = _load(uv_port, body, seconds, work)
    finally:
        stop_popen(uv)

    rate, bad, tool = results["chronosd"]
    mini_rate, uv_rate = results["minimal"][0], results["uvicorn"][0]
    section.rows += [
        Row(
            f"chronosd, duplicate fires, auth none ({bad} non-2xx)",
            f"{rate:,.0f}/s",
            f"uvicorn hello {uv_rate:,.0f}/s",
            ratio(rate, uv_rate),
            "≥ 3,000/s",
            verdict(rate >= 3000) if rate == rate else "n/a",
        ),
        Row("stdlib asyncio responder", f"{mini_rate:,.0f}/s", "", ratio(mini_rate, uv_rate)),
        Row("uvicorn + starlette hello-world", f"{uv_rate:,.0f}/s"),
    ]
    section.notes += [
        f"Load: {tool}. chronosd logs each duplicate at info level to a file, as it would to "
        "journald; uvicorn logs each request (its access log) likewise.",
        "Auth none, on purpose: HMAC signatures and fire-token ids are single-use (replays are "
        "refused), so a repeated authenticated request would measure the refusal path.",
    ]
    return section
