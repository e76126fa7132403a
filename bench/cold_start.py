"""Cold fire: from the connection to the response, for the first request of a socket-activated
process.

Per run: bind a listening socket, connect to it (the connection waits in the backlog, as under
systemd), send the fire, start the program with the socket as fd 3 (``LISTEN_FDS=1``,
``LISTEN_PID``), and stop the clock when the whole response has arrived. chronosd answers a
valid fire for a real occurrence of a job ``* * * * * *`` (every second): it claims the
occurrence in SQLite, answers 202, starts the job (``/bin/date``) and re-arms on the reference
NAS, then idles out. Baselines started the same way, in the same rounds: a minimal stdlib
asyncio responder (``bench/minimal_server.py``) and uvicorn + Starlette hello-world
(``uvicorn --fd 3``). Variants run round-robin so that drift of the machine hits all alike.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    PYTHON,
    REPO,
    Chronosd,
    Nas,
    Row,
    Section,
    Settings,
    base_env,
    http_request,
    kill_group,
    listening_socket,
    make_chronosd,
    median,
    mint_fire_token,
    ms,
    nas_available,
    percentile,
    ratio,
    read_response,
    running_nas,
    spawn_activated,
    verdict,
    wait_pid,
)

JOB_ID = "tick"
JOB = {"id": JOB_ID, "schedule": "* * * * * *", "command": ["/bin/date", "+%s.%N"]}
FIRE_PATH = "/api/cron/fire"


@dataclass
class Variant:
    name: str
    label: str
    argv: list[str]
    setup: Chronosd | None = None  # chronosd variants only
    auth: str = "none"
    latencies: list[float] = field(default_factory=list)
    lifetimes: list[float] = field(default_factory=list)  # activation to exit (chronosd)
    statuses: list[int] = field(default_factory=list)
    last_second: int = 0


def _wire(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _next_fire_second(last: int) -> int:
    """A whole second after *last*, waiting until we are 0.25-0.6 s into it.

    The NAS fires its re-arms on whole seconds; measuring mid-second keeps them apart.
    """
    while True:
        now = time.time()
        second = int(now)
        if second > last and 0.25 <= now - second <= 0.6:
            return second
        time.sleep(0.01)


def _fire_request(variant: Variant, nas: Nas | None, second: int) -> bytes:
    body = json.dumps({"job_id": JOB_ID, "fire_at": _wire(second)}).encode()
    headers: dict[str, str] = {}
    if variant.auth == "hmac":
        sys.path.insert(0, str(REPO))
        from chronosd.http.auth import sign_hmac

        secret = (variant.setup.root / "hmac-secret").read_bytes().strip()  # type: ignore[union-attr]
        headers["Chronos-Signature"] = sign_hmac(secret, body, int(time.time()))
    elif variant.auth == "jwt":
        assert nas is not None
        headers["Authorization"] = f"Bearer {mint_fire_token(nas, JOB_ID)}"
    return http_request("POST", FIRE_PATH, body, headers)


def activate_once(
    argv: list[str], request: bytes, log_path: Path, *, timeout: float = 15.0
) -> tuple[float, int, bytes, int]:
    """(seconds from connect to the whole response, status, body, pid)."""
    listener = listening_socket()
    port = listener.getsockname()[1]
    client = socket.socket()
    try:
        started = time.perf_counter()
        client.connect(("127.0.0.1", port))
        client.sendall(request)
        pid = spawn_activated(argv, listener, env=base_env(), log_path=log_path)
        try:
            status, body = read_response(client, timeout)
        except (OSError, ValueError):
            status, body = 0, b""
        elapsed = time.perf_counter() - started
    finally:
        client.close()
        listener.close()
    return elapsed, status, body, pid


def _measure(variant: Variant, nas: Nas | None, log_path: Path, *, keep: bool) -> None:
    if variant.setup is not None:
        variant.last_second = _next_fire_second(variant.last_second)
        request = _fire_request(variant, nas, variant.last_second)
    else:
        request = http_request("POST", FIRE_PATH, b'{"job_id":"tick"}')
    t0 = time.perf_counter()
    elapsed, status, _body, pid = activate_once(variant.argv, request, log_path)
    if variant.setup is not None:
        # Let it claim, run, re-arm and idle out by itself: the next run depends on that state.
        code = wait_pid(pid, 20.0)
        if code is None:
            kill_group(pid)
        lifetime = time.perf_counter() - t0
    else:
        kill_group(pid)
        lifetime = float("nan")
    if keep:
        variant.latencies.append(elapsed)
        variant.statuses.append(status)
        if variant.setup is not None:
            variant.lifetimes.append(lifetime)


def _import_profile(setup: Chronosd, variant: Variant, nas: Nas | None, work: Path) -> list[str]:
    """Top imports by cumulative time on the way to the response (python -X importtime).

    The process is killed the moment the response is in, so what it imported afterwards (httpx
    for the re-arm, say) is not listed.
    """
    log_path = work / "importtime.log"
    argv = [PYTHON, "-X", "importtime", "-m", "chronosd", "--config", str(setup.config), "run"]
    variant.last_second = _next_fire_second(variant.last_second)
    request = _fire_request(variant, nas, variant.last_second)
    _elapsed, status, _body, pid = activate_once(argv, request, log_path)
    kill_group(pid, grace=0.0)
    entries: list[tuple[int, int, str]] = []
    pattern = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")
    for line in log_path.read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match:
            entries.append((int(match.group(2)), int(match.group(1)), match.group(4)))
    if not entries:
        return ["(no -X importtime output captured)"]
    total_self = sum(self_us for _cum, self_us, _name in entries)
    top = sorted(entries, reverse=True)[:15]
    lines = [
        f"Imports completed before the response ({variant.label}, answered {status}): "
        f"{len(entries)} modules, {total_self / 1000:.0f} ms of import time in all "
        "(under -X importtime, which itself slows imports). Top 15 by cumulative time:",
        "",
        "| module | cumulative | self |",
        "|---|---:|---:|",
    ]
    lines += [f"| `{name}` | {cum / 1000:.1f} ms | {own / 1000:.1f} ms |" for cum, own, name in top]
    heavy = sorted(
        {
            name.split(".")[0]
            for _c, _s, name in entries
            if name.split(".")[0] in {"httpx", "jwt", "cryptography", "watchfiles", "structlog"}
        }
    )
    lines += ["", f"Optional-heavy packages on the path: {', '.join(heavy) or 'none'}."]
    return lines


def run(settings: Settings) -> Section:
    section = Section("cold_start", "Cold fire under socket activation")
    rounds = 5 if settings.quick else 15
    work = settings.workdir
    have_nas, why = nas_available()
    with contextlib.ExitStack() as stack:
        nas = stack.enter_context(running_nas(work)) if have_nas else None
        if nas is None:
            section.notes.append(f"Reference NAS unavailable ({why}): jwt not measured.")
        variants: list[Variant] = []
        for auth in ("none", "hmac", "jwt"):
            if auth == "jwt" and nas is None:
                continue
            setup = make_chronosd(
                work / f"chronosd-{auth}",
                jobs=[JOB],
                nas=nas,
                auth=auth,
                idle_exit="0.1s",
            )
            variants.append(
                Variant(f"chronosd-{auth}", f"chronosd, auth {auth}", setup.argv(), setup, auth)
            )
        variants.append(
            Variant(
                "minimal",
                "stdlib asyncio responder",
                [PYTHON, str(BENCH_DIR / "minimal_server.py")],
            )
        )
        uvicorn = Path(PYTHON).parent / "uvicorn"
        uvicorn_argv = [str(uvicorn)] if uvicorn.exists() else [PYTHON, "-m", "uvicorn"]
        variants.append(
            Variant(
                "uvicorn",
                "uvicorn + starlette hello-world",
                [*uvicorn_argv, "--fd", "3", "--app-dir", str(BENCH_DIR), "uvicorn_app:app"],
            )
        )
        # Warm-up: creates each state.db, arms the job, fills the JWKS cache, warms page cache.
        for variant in variants:
            _measure(variant, nas, work / f"{variant.name}.log", keep=False)
        for _ in range(rounds):
            for variant in variants:
                _measure(variant, nas, work / f"{variant.name}.log", keep=True)
        by_name = {v.name: v for v in variants}
        uv = median(by_name["uvicorn"].latencies)
        mini = median(by_name["minimal"].latencies)
        for variant in variants:
            if variant.setup is None:
                continue
            value = median(variant.latencies)
            accepted = sum(1 for s in variant.statuses if s == 202)
            section.rows.append(
                Row(
                    f"{variant.label}: connect → 202, median of {len(variant.latencies)}",
                    ms(value),
                    f"uvicorn hello {ms(uv)}",
                    ratio(value, uv),
                    "≤ 1.00× uvicorn",
                    verdict(value <= uv),
                )
            )
            if accepted != len(variant.statuses):
                section.notes.append(
                    f"{variant.label}: only {accepted} of {len(variant.statuses)} fires answered "
                    f"202 (statuses {sorted(set(variant.statuses))})."
                )
        section.rows.append(
            Row(
                "stdlib asyncio responder: connect → response, median",
                ms(mini),
                f"uvicorn hello {ms(uv)}",
                ratio(mini, uv),
            )
        )
        section.rows.append(
            Row("uvicorn + starlette hello-world: connect → response, median", ms(uv))
        )
        lines = [
            "| variant | min | median | p90 | max | vs asyncio | vs uvicorn | activation → exit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in variants:
            lat = variant.latencies
            life = median(variant.lifetimes) if variant.lifetimes else float("nan")
            lines.append(
                f"| {variant.label} | {ms(min(lat))} | {ms(median(lat))} | "
                f"{ms(percentile(lat, 90))} | {ms(max(lat))} | {ratio(median(lat), mini)} | "
                f"{ratio(median(lat), uv)} | {ms(life) if life == life else '—'} |"
            )
        section.notes += [
            f"{rounds} rounds, variants interleaved; one warm-up activation each (not counted). "
            "chronosd runs with provider nas (the reference NAS on loopback) and idle_exit 0.1 s; "
            "'activation → exit' includes the job, the re-arm on the NAS and the idle wait.",
            "",
            *lines,
            "",
        ]
        profiled = next((v for v in reversed(variants) if v.setup is not None), None)
        if profiled is not None and profiled.setup is not None:
            section.notes += _import_profile(profiled.setup, profiled, nas, work)
    return section
