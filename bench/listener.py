"""Listener throughput: duplicate fires (an occurrence already claimed) over keep-alive.

chronosd runs awake (``--idle-exit never``) on a loopback port with **auth hmac**, the mode of
setups without a NAS. One fire is sent and claimed first (202); then the load generator delivers
the same occurrence (same ``job_id`` and ``fire_at``) again and again, each time with a fresh,
valid signature, as a NAS's retries are: every answer must be ``200 {"status": "duplicate"}``,
after the signature was checked and recorded in the replay cache. A signature is accepted once
(replays are refused), so the requests are signed before the run, distinct, and each is sent at
most once. HMAC signs only ``t`` (whole seconds) and the body, and a NAS retries seconds apart
while a load generator sends thousands a second, so each body also carries a delivery counter
(``"delivery": n``) that chronosd ignores; ``t`` is the time of signing, a few seconds before the
run, well within the 5-minute tolerance. The same chronosd with **auth none** gives an extra row
that isolates the listener, the routing and the duplicate check.

Load: ``wrk`` (Debian) with a Lua script whose ``request()`` returns the next pre-signed request
from a file loaded in ``init()``, one thread and 8 connections, when it is installed; else a
bounded asyncio client (bench/load_client.py) with the same file. Only 200 duplicates are
counted for chronosd; when the pre-signed requests run out, the load generator stops (wrk's
thread sends a ``GET /healthz`` instead, never a used signature) and the run is reported as
exhausted. Baselines under the same load in the same run, cycling through the same requests:
the minimal stdlib asyncio responder and uvicorn + Starlette hello-world.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    PYTHON,
    Nas,
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
    start_chronosd,
    stop_popen,
    verdict,
    wait_port,
)

CONNECTIONS = 8
# Pre-signed requests per second of run: an upper bound on chronosd's rate on this kind of
# machine (it does a few thousand); capped so the file stays near 40 MB at most.
RATE_BOUND = 20_000
MAX_SIGNED = 250_000
JOB_ID = "tick"

# Each thread loads its share of the lines (line i goes to thread i mod THREADS), so no two
# threads, and no two requests, ever share a signature.
WRK_SCRIPT = r"""
local prepared, count, index, once = {}, 0, 0, true
total, ok, dup, exhausted = 0, 0, 0, 0  -- globals, for done() through thread:get
local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, mode, nthreads = args[1], args[2], tonumber(args[3])
  once = mode == "once"
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == thread_index then
      local tab = line:find("\t", 1, true)
      count = count + 1
      prepared[count] = wrk.format("POST", nil, {
        ["Content-Type"] = "application/json",
        ["Chronos-Signature"] = line:sub(1, tab - 1),
      }, line:sub(tab + 1))
    end
    i = i + 1
  end
end

function request()
  if index >= count then
    if once then
      -- Out of fresh signatures: stop rather than send one again (a refused replay).
      exhausted = exhausted + 1
      wrk.thread:stop()
      return wrk.format("GET", "/healthz", {}, nil)
    end
    index = 0
  end
  index = index + 1
  return prepared[index]
end

function response(status, headers, body)
  total = total + 1
  if status >= 200 and status < 300 then
    ok = ok + 1
    if status == 200 and body:find('"duplicate"', 1, true) then
      dup = dup + 1
    end
  end
end

function done(summary, latency, rates)
  local t, o, d, x = 0, 0, 0, 0
  for _, thread in ipairs(threads) do
    t = t + thread:get("total")
    o = o + thread:get("ok")
    d = d + thread:get("dup")
    x = x + thread:get("exhausted")
  end
  io.write(string.format("BENCH_COUNTS %d %d %d %d %d\n", summary.duration, t, o, d, x))
end
"""


@dataclass(frozen=True)
class Load:
    """What one load run measured."""

    seconds: float
    responses: int
    ok: int  # 2xx
    duplicate: int  # 200 {"status": "duplicate"}
    exhausted: bool  # the pre-signed requests ran out before the end
    tool: str

    @property
    def non_2xx(self) -> int:
        return self.responses - self.ok

    def rate(self, *, duplicates_only: bool) -> float:
        counted = self.duplicate if duplicates_only else self.ok
        return counted / self.seconds if self.seconds > 0 else float("nan")


def _load(port: int, requests: Path, mode: str, seconds: float, work: Path) -> Load:
    """Send the pre-signed fires in *requests* to 127.0.0.1:*port* for *seconds*."""
    wrk = shutil.which("wrk")
    if wrk is not None:
        script = work / "presigned.lua"
        script.write_text(WRK_SCRIPT)
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds:.0f}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/api/cron/fire",
                "--",
                str(requests),
                mode,
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
        ).stdout
        counts = re.search(r"BENCH_COUNTS (\d+) (\d+) (\d+) (\d+) (\d+)", out)
        if counts is None:
            raise RuntimeError(f"wrk printed no counts: {out[-500:]!r}")
        duration_us, responses, ok, dup, exhausted = (int(v) for v in counts.groups())
        errors = re.search(r"Socket errors:.*", out)
        detail = f"wrk -t1 -c{CONNECTIONS} -d{seconds:.0f}s" + (
            f" ({errors.group(0)})" if errors else ""
        )
        return Load(duration_us / 1e6, responses, ok, dup, exhausted > 0, detail)
    out = subprocess.run(
        [
            PYTHON,
            str(BENCH_DIR / "load_client.py"),
            str(port),
            str(CONNECTIONS),
            str(seconds),
            str(requests),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        env=base_env(),
    ).stdout
    data = json.loads(out)
    return Load(
        float(data["seconds"]),
        int(data["responses"]),
        int(data["ok"]),
        int(data["duplicate"]),
        bool(data["exhausted"]),
        f"bench/load_client.py, {CONNECTIONS} keep-alive connections, {seconds:.0f} s",
    )


def _body(wire: str, delivery: int | None = None) -> bytes:
    fields: dict[str, object] = {"job_id": JOB_ID, "fire_at": wire}
    if delivery is not None:
        fields["delivery"] = delivery
    return json.dumps(fields, separators=(",", ":")).encode()


def _write_signed(path: Path, secret: bytes, wire: str, count: int) -> int:
    """*count* distinct signed deliveries of the occurrence at *wire*; the ``t`` they carry."""
    from chronosd.http.auth import sign_hmac

    t = int(time.time())
    with open(path, "wb") as out:
        for delivery in range(1, count + 1):
            body = _body(wire, delivery)
            out.write(sign_hmac(secret, body, t).encode("ascii") + b"\t" + body + b"\n")
    return t


def _post(port: int, body: bytes, secret: bytes) -> tuple[int, bytes]:
    """POST *body* to the fire route with a fresh signature."""
    from chronosd.http.auth import sign_hmac

    return _post_raw(port, body, {"Chronos-Signature": sign_hmac(secret, body, int(time.time()))})


def _post_raw(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(http_request("POST", "/api/cron/fire", body, headers))
        return read_response(sock, 10)


@dataclass(frozen=True)
class ChronosdRun:
    load: Load
    requests: Path  # the pre-signed file, reused for the baselines
    signed: int  # how many
    signed_at: int  # their t
    ended_at: float  # unix time the load ended
    notes: list[str]


def _chronosd(auth: str, root: Path, nas: Nas | None, seconds: float) -> ChronosdRun:
    from chronosd.http.auth import sign_hmac

    port = free_port()
    notes: list[str] = []
    setup = make_chronosd(
        root,
        jobs=[{"id": JOB_ID, "schedule": "* * * * * *", "command": ["/bin/true"]}],
        nas=nas,
        auth=auth,
        idle_exit="never",
        listen=f"127.0.0.1:{port}",
    )
    # make_chronosd writes the secret for auth hmac; with auth none the signatures are
    # ignored, but the same kind of request is sent, so the two rows differ only in the check.
    secret_file = root / "hmac-secret"
    secret = secret_file.read_bytes().rstrip(b"\r\n") if auth == "hmac" else b"unused"
    proc = start_chronosd(setup)
    try:
        wait_port("127.0.0.1", port, 30)
        # An occurrence 2 s ahead: past the one planned at start-up, not "too early".
        fire_at = datetime.fromtimestamp(int(time.time()) + 2, UTC)
        wire = fire_at.strftime("%Y-%m-%dT%H:%M:%S+00:00")
        claim = _body(wire)
        claim_headers = {"Chronos-Signature": sign_hmac(secret, claim, int(time.time()))}
        status, answer = _post_raw(port, claim, claim_headers)
        first = f"{status} {answer.decode(errors='replace')}"
        if status != 202:
            notes.append(f"auth {auth}: the claiming fire was not accepted: {first}.")
        status, answer = _post(port, _body(wire, 0), secret)
        if b"duplicate" not in answer:
            notes.append(
                f"auth {auth}: a fresh delivery of the claimed occurrence was not a duplicate "
                f"({status} {answer!r}); the first answer was {first}."
            )
        if auth == "hmac":
            # The claim's own signature again: must be refused, else the replay cache (the
            # work this row measures) is not in play.
            status, answer = _post_raw(port, claim, claim_headers)
            if status != 401:
                notes.append(f"auth hmac: a replayed signature got {status} {answer!r}, not 401.")
        requests = root / "presigned.txt"
        signed = min(MAX_SIGNED, math.ceil(RATE_BOUND * (seconds + 1)))
        signed_at = _write_signed(requests, secret, wire, signed)
        load = _load(port, requests, "once", seconds, root)
        ended_at = time.time()
    finally:
        stop_popen(proc)
    return ChronosdRun(load, requests, signed, signed_at, ended_at, notes)


def _baseline(
    argv: list[str], port: int, log_path: Path, requests: Path, seconds: float, work: Path
) -> Load:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=base_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        return _load(port, requests, "cycle", seconds, work)
    finally:
        stop_popen(proc)


def run(settings: Settings) -> Section:
    from chronosd.http.auth import DEFAULT_TOLERANCE

    section = Section("listener", "Duplicate fires per second over keep-alive")
    seconds = 3.0 if settings.quick else 10.0
    work = settings.workdir
    have_nas, _why = nas_available()
    # Provider nas when it is there, so no local timer fires during the load; the NAS's
    # callback goes to a closed port, so nothing is delivered back to us.
    nas_cm = running_nas(work / "nas") if have_nas else None
    nas = nas_cm.__enter__() if nas_cm is not None else None
    try:
        hmac_run = _chronosd("hmac", work / "chronosd-hmac", nas, seconds)
        none_run = _chronosd("none", work / "chronosd-none", nas, seconds)
    finally:
        if nas_cm is not None:
            nas_cm.__exit__(None, None, None)

    requests = none_run.requests
    mini_port = free_port()
    minimal = _baseline(
        [PYTHON, str(BENCH_DIR / "minimal_server.py"), "--port", str(mini_port)],
        mini_port,
        work / "minimal.log",
        requests,
        seconds,
        work,
    )
    uv_port = free_port()
    uvicorn = _baseline(
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
        uv_port,
        work / "uvicorn.log",
        requests,
        seconds,
        work,
    )

    hmac_load, none_load = hmac_run.load, none_run.load
    rate = hmac_load.rate(duplicates_only=True)
    none_rate = none_load.rate(duplicates_only=True)
    mini_rate = minimal.rate(duplicates_only=False)
    uv_rate = uvicorn.rate(duplicates_only=False)

    def label(name: str, load: Load) -> str:
        extra = ""
        if load.exhausted:
            # wrk's clock runs to the end of -d even after its thread stopped.
            bound = ": a lower bound" if load.tool.startswith("wrk") else ""
            extra = f", ran out of pre-signed requests{bound}"
        return f"{name} ({load.non_2xx} non-2xx{extra})"

    section.rows += [
        Row(
            label("chronosd, duplicate fires, auth hmac", hmac_load),
            f"{rate:,.0f}/s",
            f"uvicorn hello {uv_rate:,.0f}/s",
            ratio(rate, uv_rate),
            "≥ 3,000/s",
            verdict(rate >= 3000) if rate == rate else "n/a",
        ),
        Row(
            label("chronosd, duplicate fires, auth none", none_load),
            f"{none_rate:,.0f}/s",
            f"uvicorn hello {uv_rate:,.0f}/s",
            ratio(none_rate, uv_rate),
        ),
        Row("stdlib asyncio responder", f"{mini_rate:,.0f}/s", "", ratio(mini_rate, uv_rate)),
        Row("uvicorn + starlette hello-world", f"{uv_rate:,.0f}/s"),
    ]
    section.notes += hmac_run.notes + none_run.notes
    for name, load in (("auth hmac", hmac_load), ("auth none", none_load)):
        stray = load.ok - load.duplicate
        if stray:
            section.notes.append(
                f"chronosd {name}: {stray} 2xx answers were not duplicates (not counted)."
            )
    age = hmac_run.ended_at - hmac_run.signed_at
    section.notes += [
        f"Load: {hmac_load.tool}. chronosd logs each duplicate at debug level (not written at "
        "the bench's info level); uvicorn logs each request (its access log) to a file.",
        f"Auth hmac: {hmac_run.signed:,} distinct signatures of the same occurrence, as a NAS's "
        "retries are, each sent at most once and checked against the replay cache "
        "(HMAC signs a whole-second t and the body, so each body also carries a "
        '"delivery" counter that chronosd ignores; the replay cache is in SQLite); '
        f"{hmac_load.duplicate:,} were answered 200 duplicate. Signed with t = "
        f"the time of signing; the run ended {age:.0f} s later, "
        + (
            f"within the {DEFAULT_TOLERANCE:.0f} s tolerance."
            if age + 1 < DEFAULT_TOLERANCE
            else f"OUTSIDE the {DEFAULT_TOLERANCE:.0f} s tolerance: the figure is not valid."
        ),
        "Auth none: the same requests to the same chronosd set-up, signatures ignored: the "
        "listener, the routing and the duplicate check without the signature check and the "
        "replay-cache write. Baselines answer every request and cycle through the same file.",
    ]
    return section
