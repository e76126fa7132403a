"""Abuse of the daemon's listener: malformed requests, slowloris, connection floods.

One daemon serves the whole module. Its provider is a NAS that does not exist (and local
fallback is a day away), so nothing ever fires by itself: every run would have come through the
listener. Its one job, ``victim``, is a one-shot whose fire call, correctly framed, *is*
accepted (the module ends by proving it); the malformed requests carry that very body inside
broken framing (request smuggling material), so a parser that let one through would run it.

Malformed requests must get a 4xx (501 for a transfer coding other than chunked, as RFC 9112
asks) or a closed connection; the daemon must not crash, run a job or grow without bound.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronosd.timefmt import to_wire
from tests.daemon_support import DaemonProcess, fire_body, http_request, write_private
from tests.reliability.conftest import Report
from tests.reliability.support import (
    World,
    exchange,
    read_starts,
    recording,
    rows,
    try_fire,
    vm_rss_kib,
)

pytestmark = pytest.mark.slow

MAX_HEAD = 16384
MAX_BODY = 65536
MAX_CONNECTIONS = 256


@dataclass
class Target:
    world: World
    daemon: DaemonProcess
    address: tuple[str, int]
    fire_at: str

    @property
    def victim_body(self) -> bytes:
        return fire_body("victim", self.fire_at)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    world = World(tmp_path_factory.mktemp("abuse"))
    at = to_wire(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=55))
    world.write_jobs(
        [
            {"id": job_id, "schedule": f"at {at}", "command": recording(world.starts)}
            for job_id in ("victim", "prompt-250", "prompt-300")
        ]
    )
    token = write_private(world.root / "nas-token", "not-a-real-token\n")
    world.write_config(
        provider={"kind": "nas", "fallback_after": "1d"},
        nas={
            "url": "http://127.0.0.1:9",
            "callback_url": "http://127.0.0.1:9",
            "token_file": str(token),
        },
    )
    with world.running() as daemon:
        yield Target(world, daemon, daemon.address(), at)


def alive(target: Target) -> bool:
    assert target.daemon.process is not None
    if target.daemon.process.poll() is not None:
        return False
    return http_request(target.address, "GET", "/healthz", timeout=10).status == 200


def nothing_ran(target: Target) -> bool:
    """The victim never started nor was claimed."""
    started = [s for s in read_starts(target.world.starts) if s.job_id == "victim"]
    return not started and not rows(
        target.world.state_dir, "SELECT 1 FROM occurrences WHERE job_id = 'victim'"
    )


# ---------------------------------------------------------------------- malformed requests
CRLF = b"\r\n"
FIRE_LINE = b"POST /api/cron/fire HTTP/1.1"
HOST = b"Host: 127.0.0.1"


@dataclass(frozen=True)
class Abuse:
    kind: str
    data: bytes
    first: tuple[int, ...] = ()  # answers a valid prefix gets before the garbage
    allow_501: bool = False


def head(*lines: bytes) -> bytes:
    return CRLF.join(lines) + CRLF + CRLF


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b""
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += f"{len(piece):x}".encode() + CRLF + piece + CRLF
    return out + b"0" + CRLF + CRLF


def _body() -> bytes:
    # The same occurrence as the module's victim: filled in by the test (see `framed`).
    return b"@BODY@"


line_bytes = st.binary(min_size=1, max_size=120).filter(lambda b: b"\n" not in b)


@st.composite
def bad_request_lines(draw: st.DrawFn) -> Abuse:
    line = draw(
        st.one_of(
            line_bytes,
            st.sampled_from(
                [
                    b"POST /api/cron/fire",
                    b"/api/cron/fire HTTP/1.1",
                    b"POST  /api/cron/fire  HTTP/1.1",
                    b"POST /api/cron/fire HTTP/1.1 trailing",
                    b"P\x00ST /api/cron/fire HTTP/1.1",
                    b"POST /api/\xff\xfe/fire HTTP/1.1",
                    b"POST /api/cron/fire HTTP/2.0",
                    b"POST /api/cron/fire HTTP/1",
                    b"POST api/cron/fire HTTP/1.1",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
                    b"PRI * HTTP/2.0",
                    b"POST /api/cron/fire HTTP/1.1\x00",
                    b" POST /api/cron/fire HTTP/1.1",
                ]
            ),
        )
    )
    return Abuse("request-line", head(line, HOST))


@st.composite
def conflicting_lengths(draw: st.DrawFn) -> Abuse:
    body = _body()
    n = len(fire_body("victim", "2026-01-01T00:00:00+00:00"))
    values = draw(
        st.sampled_from(
            [
                [f"{n}", f"{n + 1}"],
                [f"{n}", f"{n}"],
                [f"{n}, {n}"],
                [f"{n},{n + 3}"],
                [f"-{n}"],
                [f"+{n}"],
                [f"0x{n:x}"],
                [f"{n} {n}"],
                ["99999999999999999999999999"],
                [""],
                ["abc"],
            ]
        )
    )
    lines = [FIRE_LINE, HOST, *(b"Content-Length: " + v.encode() for v in values)]
    return Abuse("content-length", head(*lines) + body)


@st.composite
def length_with_encoding(draw: st.DrawFn) -> Abuse:
    te = draw(st.sampled_from([b"chunked", b"Chunked", b" chunked", b"chunked, chunked"]))
    cl_first = draw(st.booleans())
    cl = b"Content-Length: 4"
    lines = [FIRE_LINE, HOST, *((cl, b"Transfer-Encoding: " + te) if cl_first else ())]
    if not cl_first:
        lines += [b"Transfer-Encoding: " + te, cl]
    return Abuse("cl-and-te", head(*lines) + b"@CHUNKED@", allow_501=True)


@st.composite
def bad_chunks(draw: st.DrawFn) -> Abuse:
    size = draw(
        st.one_of(
            st.sampled_from(
                [
                    b"zz",
                    b"-1",
                    b"ffffffffffffffffffffff",
                    b"",
                    b" 5",
                    b"5 ",
                    b"0x5",
                    b"5;" + b"x" * 9000,
                ]
            ),
            st.binary(min_size=1, max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b),
        )
    )
    after = draw(st.sampled_from([CRLF + b"hello" + CRLF + b"0" + CRLF + CRLF, b"hello", CRLF]))
    lines = [FIRE_LINE, HOST, b"Transfer-Encoding: chunked"]
    return Abuse("chunk-size", head(*lines) + size + after)


@st.composite
def obs_folds(draw: st.DrawFn) -> Abuse:
    fold = draw(st.sampled_from([b" ", b"\t", b"  \t"]))
    where = draw(st.sampled_from(["content-length", "other", "first"]))
    if where == "content-length":
        lines = [FIRE_LINE, HOST, b"Content-Length:", fold + b"@LEN@"]
    elif where == "first":
        lines = [FIRE_LINE, fold + b"X-Folded: yes", HOST, b"Content-Length: @LEN@"]
    else:
        lines = [FIRE_LINE, HOST, b"X-Note: a", fold + b"b", b"Content-Length: @LEN@"]
    return Abuse("obs-fold", head(*lines) + _body())


@st.composite
def over_limits(draw: st.DrawFn) -> Abuse:
    kind = draw(st.sampled_from(["one-header", "many-headers", "declared-body", "chunked-body"]))
    extra = draw(st.integers(min_value=1, max_value=4096))
    if kind == "one-header":
        lines = [FIRE_LINE, HOST, b"X-Big: " + b"a" * (MAX_HEAD + extra), b"Content-Length: @LEN@"]
        return Abuse("head-limit", head(*lines) + _body())
    if kind == "many-headers":
        many = [b"X-H%d: %s" % (n, b"b" * 100) for n in range(MAX_HEAD // 100 + extra // 100 + 1)]
        return Abuse("head-limit", head(FIRE_LINE, HOST, *many, b"Content-Length: @LEN@") + _body())
    if kind == "declared-body":
        size = MAX_BODY + extra
        lines = [FIRE_LINE, HOST, b"Content-Length: %d" % size]
        return Abuse("body-limit", head(*lines) + b"{" + b" " * (size - 2) + b"}")
    body = b'{"job_id": "victim", "pad": "' + b"p" * (MAX_BODY + extra) + b'"}'
    lines = [FIRE_LINE, HOST, b"Transfer-Encoding: chunked"]
    return Abuse("body-limit", head(*lines) + chunked(body, 8192))


@st.composite
def non_utf8(draw: st.DrawFn) -> Abuse:
    junk = draw(st.binary(min_size=1, max_size=40).map(lambda b: bytes(x | 0x80 for x in b)))
    where = draw(st.sampled_from(["target", "header-name", "header-value", "body", "job-id"]))
    if where == "target":
        return Abuse("non-utf8", head(b"POST /api/cron/" + junk + b" HTTP/1.1", HOST))
    if where == "header-name":
        return Abuse("non-utf8", head(FIRE_LINE, HOST, junk + b": x", b"Content-Length: 0"))
    if where == "header-value":
        lines = [FIRE_LINE, HOST, b"X-Junk: " + junk, b"Content-Length: 2"]
        return Abuse("non-utf8", head(*lines) + b"{}")
    body = junk if where == "body" else b'{"job_id": "vict' + junk + b'", "fire_at": "x"}'
    lines = [FIRE_LINE, HOST, b"Content-Length: %d" % len(body)]
    return Abuse("non-utf8", head(*lines) + body)


@st.composite
def pipelined_garbage(draw: st.DrawFn) -> Abuse:
    garbage = draw(
        st.one_of(
            st.binary(min_size=1, max_size=300),
            st.builds(
                lambda a, b: a + CRLF + b,
                line_bytes,
                st.binary(min_size=0, max_size=100),
            ),
        )
    )
    healthz = head(b"GET /healthz HTTP/1.1", HOST)
    return Abuse("pipelined", healthz + garbage, first=(200,))


@st.composite
def unknown_codings(draw: st.DrawFn) -> Abuse:
    te = draw(st.sampled_from([b"gzip", b"gzip, chunked", b"identity", b"chunked, gzip", b"x"]))
    lines = [FIRE_LINE, HOST, b"Transfer-Encoding: " + te]
    return Abuse("transfer-coding", head(*lines) + b"@CHUNKED@", allow_501=True)


abuses = st.one_of(
    bad_request_lines(),
    conflicting_lengths(),
    length_with_encoding(),
    bad_chunks(),
    obs_folds(),
    over_limits(),
    non_utf8(),
    pipelined_garbage(),
    unknown_codings(),
)


def framed(abuse: Abuse, body: bytes) -> bytes:
    """Put the victim's real fire body where the strategy left a placeholder."""
    data = abuse.data.replace(b"@CHUNKED@", chunked(body)).replace(b"@BODY@", body)
    return data.replace(b"@LEN@", str(len(body)).encode())


EXAMPLES = 300


def test_malformed_requests_get_a_4xx_or_a_close_and_never_run_a_job(
    target: Target, report: Report
) -> None:
    assert alive(target)
    # Warm up (first connections, lazy imports), then measure.
    for _ in range(30):
        exchange(target.address, head(b"GET /nowhere HTTP/1.1", HOST))
    rss_before = vm_rss_kib(target.daemon.pid)
    seen: dict[str, int] = {}
    statuses: dict[int, int] = {}
    closed_silently = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )
    @given(abuse=abuses)
    def check(abuse: Abuse) -> None:
        nonlocal closed_silently
        seen[abuse.kind] = seen.get(abuse.kind, 0) + 1
        answered = exchange(target.address, framed(abuse, target.victim_body))
        for status in answered:
            statuses[status] = statuses.get(status, 0) + 1
        assert tuple(answered[: len(abuse.first)]) == abuse.first, (abuse, answered)
        rest = answered[len(abuse.first) :]
        if not rest:
            closed_silently += 1
        for status in rest:
            assert 400 <= status < 500 or (abuse.allow_501 and status == 501), (abuse, answered)
        assert len(rest) <= 1, (abuse, answered)  # the connection closes after a rejection

    check()
    rss_after = vm_rss_kib(target.daemon.pid)
    still_alive = alive(target)
    ran_nothing = nothing_ran(target)
    report(
        examples=sum(seen.values()),
        kinds=len(seen),
        closed_without_answer=closed_silently,
        statuses=",".join(f"{k}x{v}" for k, v in sorted(statuses.items())),
        crashed=int(not still_alive),
        rss_kib_before=rss_before,
        rss_kib_after=rss_after,
    )
    assert still_alive
    assert ran_nothing
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)


# ---------------------------------------------------------------------- connection floods
def test_a_flood_beyond_the_connection_limit_is_refused_without_harm(
    target: Target, report: Report
) -> None:
    flood = 400
    rss_before = vm_rss_kib(target.daemon.pid)
    sockets: list[socket.socket] = []
    try:
        for _ in range(flood):
            sockets.append(socket.create_connection(target.address, timeout=10))
        refused = 0
        retry_after = 0
        deadline = time.monotonic() + 10
        pending = list(sockets)
        # The refused ones are answered 503 and closed at once; the others wait for a request.
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            still = []
            for sock in pending:
                sock.setblocking(False)
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    still.append(sock)
                    continue
                except OSError:
                    refused += 1
                    continue
                if data.startswith(b"HTTP/1.1 503 "):
                    refused += 1
                    retry_after += b"retry-after: 1" in data.lower()
            pending = still
            if refused >= flood - MAX_CONNECTIONS:
                break
        rss_during = vm_rss_kib(target.daemon.pid)
    finally:
        for sock in sockets:
            sock.close()
    # Once the flood is gone the daemon serves as before.
    answer = http_request(target.address, "GET", "/healthz", timeout=10)
    rss_after = vm_rss_kib(target.daemon.pid)
    report(
        connections=flood,
        limit=MAX_CONNECTIONS,
        refused=refused,
        refused_with_retry_after=retry_after,
        healthz_after=answer.status,
        rss_kib_before=rss_before,
        rss_kib_during=rss_during,
        rss_kib_after=rss_after,
    )
    assert refused == flood - MAX_CONNECTIONS
    assert retry_after == refused
    assert answer.status == 200
    assert alive(target)
    assert nothing_ran(target)
    assert rss_during - rss_before < 32 * 1024


# ---------------------------------------------------------------------- slowloris
# Regression test for a fixed bug: chronosd/http/server.py HTTPServer._accept_until_halted refuses
# every connection beyond max_connections (256) with 503, whatever the open ones are doing: 300
# clients trickling a byte a second hold all 256 slots and the real fire call is refused


@contextlib.contextmanager
def slowloris(address: tuple[str, int], count: int) -> Iterator[list[socket.socket]]:
    """*count* connections, each sending one byte of a request head per second."""
    partial = b"POST /api/cron/fire HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 200
    sockets = [socket.create_connection(address, timeout=10) for _ in range(count)]
    for sock in sockets:
        sock.setblocking(False)
    stop = threading.Event()

    def trickle() -> None:
        offset = 0
        while not stop.wait(1.0):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(partial[offset : offset + 1])
            offset = (offset + 1) % len(partial)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield sockets
    finally:
        stop.set()
        thread.join(5)
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    "connections",
    [
        pytest.param(250, id="within-the-limit"),
        pytest.param(300, id="300"),
    ],
)
def test_slowloris_connections_do_not_stop_a_real_fire_being_answered_within_a_second(
    target: Target, report: Report, connections: int
) -> None:
    job_id = f"prompt-{connections}"
    with slowloris(target.address, connections):
        time.sleep(3.5)  # a few bytes in: every slow connection is open and mid-head
        answers = []
        for _ in range(3):
            # The bound is the client's own timeout: no answer within 1 s counts as none.
            answers.append(try_fire(target.address, job_id, target.fire_at, timeout=1.0))
            time.sleep(0.3)
    statuses = [None if a is None else f"{a.status}:{a.body.get('status')}" for a in answers]
    report(slow_connections=connections, answers=",".join(str(s) for s in statuses))
    assert alive(target)
    # Each answer came within the client's 1 s timeout: accepted once, then duplicates.
    assert statuses == ["202:accepted", "200:duplicate", "200:duplicate"]


# ---------------------------------------------------------------------- the control
def test_the_victims_correctly_framed_fire_is_accepted_once_at_the_end(target: Target) -> None:
    """Proves the smuggled body would have run the job: the control for the tests above."""
    assert nothing_ran(target)
    answer = try_fire(target.address, "victim", target.fire_at)
    assert answer is not None and answer.status == 202, answer
    again = try_fire(target.address, "victim", target.fire_at)
    assert again is not None and again.body.get("status") == "duplicate", again
