from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketAttribute
from structlog.testing import capture_logs

from chronosd.errors import ConfigError
from chronosd.http.server import (
    HTTPServer,
    Limits,
    Request,
    Response,
    bind_listener,
    format_listener_address,
    is_loopback_address,
    is_loopback_listener,
    listener_from_fd,
)

pytestmark = pytest.mark.anyio

QUICK = Limits(request_timeout=2.0, keepalive_timeout=2.0)
WAIT = 5.0  # bound on every wait, so a broken server fails a test instead of hanging it


# -- a raw HTTP client that reads exactly what the server wrote ----------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RawClient:
    stream: anyio.abc.SocketStream
    buffer: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await anyio.connect_tcp("127.0.0.1", port))

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stream.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def _fill(self) -> bool:
        try:
            chunk = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            return False
        self.buffer += chunk
        return True

    async def response(self, *, head_request: bool = False) -> Reply:
        with anyio.fail_after(WAIT):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    raise AssertionError(f"connection closed mid-response: {bytes(self.buffer)!r}")
            end = self.buffer.index(b"\r\n\r\n")
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            del self.buffer[: end + 4]
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if head_request or status < 200 or status in (204, 304):
                length = 0
            while len(self.buffer) < length:
                if not await self._fill():
                    raise AssertionError("connection closed mid-body")
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            return Reply(status, headers, body)

    async def raw_response(self, *, head_request: bool = False) -> bytes:
        """The next response exactly as written (one with a Content-Length, or bodyless)."""
        with anyio.fail_after(WAIT):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._fill():
                    raise AssertionError(f"connection closed mid-response: {bytes(self.buffer)!r}")
            end = self.buffer.index(b"\r\n\r\n") + 4
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:") and not head_request:
                    length = int(line.partition(b":")[2])
            while len(self.buffer) < end + length:
                if not await self._fill():
                    raise AssertionError("connection closed mid-body")
            raw = bytes(self.buffer[: end + length])
            del self.buffer[: end + length]
            return raw

    async def closed(self) -> bool:
        """True once the server has closed the connection (waits for it, bounded)."""
        if self.buffer:
            return False
        with anyio.fail_after(WAIT):
            return not await self._fill()


def get(path: str = "/", *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: test", *extra, "", ""]
    return "\r\n".join(lines).encode()


def post(path: str, body: bytes, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(lines).encode() + body


# -- a server under test -------------------------------------------------------------------


@dataclass
class Recorder:
    """The echo handler: remembers requests and answers with what it saw."""

    requests: list[Request] = field(default_factory=list)

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        return Response.json(
            200,
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "body": request.body.decode("latin-1"),
            },
        )


@asynccontextmanager
async def serving(
    handler: Callable[[Request], Awaitable[Response]] | None = None,
    *,
    limits: Limits = QUICK,
    listener: anyio.abc.SocketListener | None = None,
) -> AsyncIterator[tuple[HTTPServer, int]]:
    own_listener = listener is None
    if listener is None:
        listener = await bind_listener("127.0.0.1", 0)
    server = HTTPServer(handler or Recorder(), limits=limits)
    done = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        await server.serve([listener], task_status=task_status)
        done.set()

    try:
        async with anyio.create_task_group() as group:
            await group.start(run)
            try:
                yield server, listener.extra(SocketAttribute.local_port, 0)
            finally:
                server.stop_accepting()
                with anyio.fail_after(WAIT):
                    await done.wait()
    finally:
        if own_listener:
            await listener.aclose()


async def eventually(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(WAIT):
        while not condition():
            await anyio.sleep(0.01)


# -- keep-alive, framing, versions ----------------------------------------------------------


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    recorder = Recorder()
    async with serving(recorder) as (_, port), await RawClient.connect(port) as client:
        for n in range(3):
            await client.send(get(f"/n{n}?x={n}"))
            reply = await client.response()
            assert reply.status == 200
            assert reply.json() == {
                "method": "GET",
                "path": f"/n{n}",
                "query": f"x={n}",
                "body": "",
            }
            assert reply.headers["content-length"] == str(len(reply.body))
    assert [r.client for r in recorder.requests].count(recorder.requests[0].client) == 3


async def test_connection_close_is_honoured() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(get("/", "Connection: close"))
        reply = await client.response()
        assert reply.status == 200
        assert reply.headers["connection"] == "close"
        assert await client.closed()


async def test_http10_request_is_answered_and_closed() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"GET /old HTTP/1.0\r\n\r\n")
        reply = await client.response()
        assert reply.status == 200
        assert reply.json() == {"method": "GET", "path": "/old", "query": "", "body": ""}
        assert await client.closed()


async def test_content_length_body_reaches_the_handler() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(post("/p", b'{"job_id": "a"}'))
        assert (await client.response()).json() == {
            "method": "POST",
            "path": "/p",
            "query": "",
            "body": '{"job_id": "a"}',
        }


async def test_chunked_body_reaches_the_handler() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        reply = await client.response()
        assert reply.status == 200
        assert reply.json() == {"method": "POST", "path": "/c", "query": "", "body": "hello world"}


async def test_body_of_exactly_the_limit_is_accepted() -> None:
    body = b"x" * QUICK.max_body
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(post("/big", body))
        reply = await client.response()
        assert reply.status == 200
        assert reply.json() == {
            "method": "POST",
            "path": "/big",
            "query": "",
            "body": body.decode(),
        }


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(get("/1") + post("/2", b"two") + get("/3"))
        paths = [(await client.response()).json() for _ in range(3)]
        assert [(p["path"], p["body"]) for p in paths] == [("/1", ""), ("/2", "two"), ("/3", "")]


async def test_expect_100_continue_gets_interim_response_before_body() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        head = b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        await client.send(head)
        assert (await client.response()).status == 100
        await client.send(b"hello")
        reply = await client.response()
        assert reply.status == 200
        assert reply.json() == {"method": "POST", "path": "/e", "query": "", "body": "hello"}


async def test_head_request_gets_length_without_body() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = await client.response(head_request=True)
        assert reply.status == 200
        assert int(reply.headers["content-length"]) > 0
        # A stray body would be read as the next response's status line.
        await client.send(get("/after"))
        assert (await client.response()).json() == {
            "method": "GET",
            "path": "/after",
            "query": "",
            "body": "",
        }


async def test_request_carries_lowercase_headers_and_client_address() -> None:
    recorder = Recorder()
    async with serving(recorder) as (_, port), await RawClient.connect(port) as client:
        await client.send(b"GET /x?a=1&b=2 HTTP/1.1\r\nHost: test\r\nX-Thing: caf\xe9\r\n\r\n")
        await client.response()
    (request,) = recorder.requests
    assert request.target == "/x?a=1&b=2"
    assert (request.path, request.query) == ("/x", "a=1&b=2")
    assert ("x-thing", "café") in request.headers
    assert request.header("X-THING") == "café"
    assert request.header("missing") is None
    assert request.client is not None and request.client[0] == "127.0.0.1"


async def test_absolute_form_target_is_split_into_path_and_query() -> None:
    recorder = Recorder()
    async with serving(recorder) as (_, port), await RawClient.connect(port) as client:
        await client.send(b"GET http://test/abs?q=1 HTTP/1.1\r\nHost: test\r\n\r\n")
        await client.response()
    assert (recorder.requests[0].path, recorder.requests[0].query) == ("/abs", "q=1")


async def test_handler_framing_headers_are_replaced_and_server_header_added() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, b"abc", (("Content-Length", "999"), ("X-Custom", "yes")))

    async with serving(handler) as (_, port), await RawClient.connect(port) as client:
        await client.send(get())
        reply = await client.response()
        assert (reply.body, reply.headers["content-length"]) == (b"abc", "3")
        assert reply.headers["x-custom"] == "yes"
        assert reply.headers["server"] == "chronosd"
        await client.send(get())
        assert (await client.response()).body == b"abc"


# Requests the server parses itself, and the same requests in a form only h11 reads (a chunked
# body of no bytes), must be answered with the same bytes.
SAME_ANSWERS = {
    "json": Response.json(202, {"status": "accepted"}),
    "custom headers": Response(200, b"abc", (("Content-Length", "9"), ("X-Custom", "yes"))),
    "host header first": Response(200, b"x", (("X-A", "1"), ("Host", "h"), ("X-B", "2"))),
    "no content": Response(204, b"ignored", (("x-a", "b"),)),
    "not modified": Response(304),
    "unknown status": Response(599, b"?"),
    "informational status": Response(150, b"?"),
    "invalid header": Response(200, b"x", (("x-bad", "line\r\nbreak"),)),
    "handler closes": Response(200, b"bye", (("Connection", "close"),)),
}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("answer", SAME_ANSWERS.values(), ids=SAME_ANSWERS.keys())
async def test_fast_path_and_h11_answer_with_the_same_bytes(method: str, answer: Response) -> None:
    async def handler(request: Request) -> Response:
        return answer

    plain = f"{method} /x HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    chunked = b"%s /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (
        method.encode()
    )
    closes = answer.headers == (("Connection", "close"),)
    answers = []
    async with serving(handler) as (_, port):
        for request in (plain, chunked):
            async with await RawClient.connect(port) as client:
                await client.send(request)
                answers.append(await client.raw_response(head_request=method == "HEAD"))
                if closes:
                    assert await client.closed()
                    continue
                # Still serving, and no stray body is read as the next response's head.
                await client.send(request)
                assert await client.raw_response(head_request=method == "HEAD") == answers[-1]
    fast, full = answers
    assert fast == full


async def test_head_arriving_byte_by_byte_is_read_whole() -> None:
    recorder = Recorder()
    data = post("/slowly?x=1", b"body!", "X-Thing: a  b")
    async with serving(recorder) as (_, port), await RawClient.connect(port) as client:
        raw = client.stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for offset in range(len(data)):
            await client.send(data[offset : offset + 1])
            await anyio.sleep(0.001)
        assert (await client.response()).json() == {
            "method": "POST",
            "path": "/slowly",
            "query": "x=1",
            "body": "body!",
        }
    assert recorder.requests[0].header("x-thing") == "a  b"


async def test_many_pipelined_requests_sent_while_answers_are_read_all_arrive_in_order() -> None:
    # More than the server reads ahead, so it stops reading and resumes as it catches up.
    count = 6000
    data = b"".join(get(f"/{n}", "X-Pad: " + "p" * 40) for n in range(count))
    assert len(data) > 262144
    paths: list[str] = []
    async with serving() as (_, port), await RawClient.connect(port) as client:

        async def read_all() -> None:
            for _ in range(count):
                paths.append((await client.response()).json()["path"])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(read_all)
                await client.send(data)
    assert paths == [f"/{n}" for n in range(count)]


async def test_requests_h11_reads_and_fast_ones_interleave_on_one_connection() -> None:
    recorder = Recorder()
    bare_lf = b"GET /bare-lf HTTP/1.1\nHost: t\n\n"
    chunked = (
        b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n\r\n"
    )
    async with serving(recorder) as (_, port), await RawClient.connect(port) as client:
        await client.send(get("/1") + bare_lf + post("/2", b"two") + chunked + get("/3"))
        replies = [(await client.response()).json() for _ in range(5)]
    assert [(r["path"], r["body"]) for r in replies] == [
        ("/1", ""),
        ("/bare-lf", ""),
        ("/2", "two"),
        ("/chunked", "hi"),
        ("/3", ""),
    ]


async def test_keep_alive_header_keeps_the_connection_and_close_in_a_list_closes_it() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(get("/a", "Connection: keep-alive"))
        assert "connection" not in (await client.response()).headers
        await client.send(get("/b", "Connection: keep-alive, Close"))
        assert (await client.response()).headers["connection"] == "close"
        assert await client.closed()


async def test_client_that_half_closes_after_its_requests_still_gets_the_answers() -> None:
    async with serving() as (server, port), await RawClient.connect(port) as client:
        await client.send(get("/1") + get("/2"))
        await client.stream.send_eof()
        assert (await client.response()).json()["path"] == "/1"
        assert (await client.response()).json()["path"] == "/2"
        assert await client.closed()
        await eventually(lambda: server.open_connections == 0)


async def test_body_arriving_after_the_head_is_waited_for() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"POST /late HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf")
        await anyio.sleep(0.05)
        await client.send(b"-whole")
        assert (await client.response()).json()["body"] == "half-whole"


async def test_client_closing_mid_body_gets_400_and_the_server_goes_on() -> None:
    async with serving() as (_, port):
        async with await RawClient.connect(port) as client:
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf")
            await client.stream.send_eof()
            assert (await client.response()).status == 400
            assert await client.closed()
        await assert_still_serving(port)


async def test_at_the_limit_the_connection_slowest_with_its_head_makes_room() -> None:
    limits = Limits(request_timeout=WAIT, keepalive_timeout=WAIT, max_connections=2)
    async with serving(limits=limits) as (server, port):
        slow = await RawClient.connect(port)
        await slow.send(b"GET / HTTP/1.1\r\nHo")
        busy = await RawClient.connect(port)
        await busy.send(get("/busy"))
        assert (await busy.response()).status == 200
        await anyio.sleep(1.2)  # the slow head is now older than a burst of newcomers
        async with await RawClient.connect(port) as newcomer:
            await newcomer.send(get("/new"))
            assert (await newcomer.response()).json()["path"] == "/new"
        assert await slow.closed()
        await slow.stream.aclose()
        await busy.stream.aclose()
        await eventually(lambda: server.open_connections == 0)


def test_response_json_is_compact_with_content_type() -> None:
    response = Response.json(202, {"status": "accepted", "n": [1, 2]}, headers=(("x-a", "b"),))
    assert response.body == b'{"status":"accepted","n":[1,2]}'
    assert response.headers == (("content-type", "application/json"), ("x-a", "b"))


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("finished", [True, False], ids=["whole head", "head without end"])
async def test_oversized_head_gets_431_and_close(finished: bool) -> None:
    head = get("/", "X-Big: " + "a" * (QUICK.max_head + 10))
    async with serving() as (_, port):
        async with await RawClient.connect(port) as client:
            await client.send(head if finished else head[:-4])
            reply = await client.response()
            assert reply.status == 431
            assert await client.closed()
        await assert_still_serving(port)


async def test_declared_oversized_body_gets_413_before_it_is_sent() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
        reply = await client.response()
        assert (reply.status, reply.json()) == (413, {"error": "body too large"})
        assert await client.closed()


async def test_chunked_body_over_the_limit_gets_413() -> None:
    chunk = b"%x\r\n%s\r\n" % (10000, b"y" * 10000)
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        await client.send(chunk * 7)
        reply = await client.response()
        assert (reply.status, reply.json()) == (413, {"error": "body too large"})
        assert await client.closed()


async def test_incomplete_request_gets_408_after_request_timeout() -> None:
    limits = Limits(request_timeout=0.3, keepalive_timeout=2.0)
    async with serving(limits=limits) as (_, port):
        async with await RawClient.connect(port) as client:
            await client.send(b"GET / HTTP/1.1\r\nHost")
            assert (await client.response()).status == 408
            assert await client.closed()
        async with await RawClient.connect(port) as client:
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nhalf")
            assert (await client.response()).status == 408
            assert await client.closed()


async def test_silent_new_connection_gets_408() -> None:
    limits = Limits(request_timeout=0.3, keepalive_timeout=2.0)
    async with serving(limits=limits) as (_, port), await RawClient.connect(port) as client:
        assert (await client.response()).status == 408
        assert await client.closed()


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout() -> None:
    limits = Limits(request_timeout=2.0, keepalive_timeout=0.2)
    async with serving(limits=limits) as (server, port), await RawClient.connect(port) as client:
        await client.send(get())
        assert (await client.response()).status == 200
        assert await client.closed()
        await eventually(lambda: server.open_connections == 0)


async def test_connections_beyond_the_limit_get_503_and_serving_resumes() -> None:
    limits = Limits(request_timeout=2.0, keepalive_timeout=WAIT, max_connections=2)
    async with serving(limits=limits) as (server, port):
        first, second = await RawClient.connect(port), await RawClient.connect(port)
        for client in (first, second):
            await client.send(get())
            assert (await client.response()).status == 200
        assert server.open_connections == 2
        async with await RawClient.connect(port) as third:
            reply = await third.response()
            assert reply.status == 503
            assert reply.json() == {"error": "too many connections"}
            assert await third.closed()
        await first.stream.aclose()
        await eventually(lambda: server.open_connections == 1)
        async with await RawClient.connect(port) as fourth:
            await fourth.send(get())
            assert (await fourth.response()).status == 200
        await second.stream.aclose()


# -- malformed input ------------------------------------------------------------------------


async def assert_still_serving(port: int) -> None:
    async with await RawClient.connect(port) as client:
        await client.send(get("/alive"))
        assert (await client.response()).status == 200


MALFORMED = {
    "bad request line": b"GARBAGE\r\n\r\n",
    "bad header": b"GET / HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n",
    "missing host": b"GET / HTTP/1.1\r\n\r\n",
    "conflicting content-length": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
    ),
    "duplicate content-length": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    ),
    "list content-length": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello",
    "negative content-length": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
    "content-length with transfer-encoding": (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
    "non-utf8 garbage": b"\xff\xfe\xfd\x80\x81 \xc3\x28\r\n\r\n",
    "non-ascii target": b"GET /caf\xe9 HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_gets_400_and_close_while_others_are_served(raw: bytes) -> None:
    async with serving() as (_, port):
        async with await RawClient.connect(port) as client:
            await client.send(raw)
            reply = await client.response()
            assert (reply.status, reply.json()) == (400, {"error": "bad request"})
            assert await client.closed()
        await assert_still_serving(port)


async def test_unsupported_transfer_coding_gets_501() -> None:
    async with serving() as (_, port), await RawClient.connect(port) as client:
        await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        assert (await client.response()).status == 501
        assert await client.closed()


async def test_pipelined_garbage_after_a_good_request_gets_400_after_the_good_answer() -> None:
    async with serving() as (_, port):
        async with await RawClient.connect(port) as client:
            await client.send(get("/good") + b"\x00\x01 nonsense\r\n\r\n")
            assert (await client.response()).status == 200
            assert (await client.response()).status == 400
            assert await client.closed()
        await assert_still_serving(port)


# -- failures in the handler and on the wire --------------------------------------------------


async def test_handler_exception_gives_500_is_logged_and_connection_keeps_serving() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("kaput")
        return Response(200, b"fine")

    with capture_logs() as logs:
        async with serving(handler) as (_, port), await RawClient.connect(port) as client:
            await client.send(get("/boom"))
            reply = await client.response()
            assert (reply.status, reply.json()) == (500, {"error": "internal error"})
            await client.send(get("/ok"))
            assert (await client.response()).body == b"fine"
    failures = [entry for entry in logs if entry["event"] == "http.handler_failed"]
    assert len(failures) == 1
    assert failures[0]["path"] == "/boom"


async def test_invalid_response_header_gives_500() -> None:
    async def handler(request: Request) -> Response:
        return Response(200, b"x", (("x-bad", "line\r\nbreak"),))

    with capture_logs() as logs:
        async with serving(handler) as (_, port), await RawClient.connect(port) as client:
            await client.send(get())
            assert (await client.response()).status == 500
    assert any(entry["event"] == "http.response_invalid" for entry in logs)


async def test_on_sent_runs_after_the_response_and_its_failure_is_contained() -> None:
    calls: list[str] = []

    def explode() -> None:
        calls.append("explode")
        raise RuntimeError("on_sent bug")

    async def handler(request: Request) -> Response:
        if request.path == "/explode":
            return Response(202, b"a", on_sent=explode)
        return Response(202, b"b", on_sent=lambda: calls.append(request.path))

    with capture_logs() as logs:
        async with serving(handler) as (_, port), await RawClient.connect(port) as client:
            await client.send(get("/first"))
            assert (await client.response()).status == 202
            await eventually(lambda: calls == ["/first"])
            await client.send(get("/explode"))
            assert (await client.response()).body == b"a"
            await client.send(get("/last"))
            assert (await client.response()).body == b"b"
            await eventually(lambda: calls == ["/first", "explode", "/last"])
    assert any(entry["event"] == "http.on_sent_failed" for entry in logs)


async def test_client_resetting_mid_response_does_not_stop_the_server() -> None:
    sent = anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/huge":
            return Response(200, b"z" * (16 * 1024 * 1024), on_sent=sent.set)
        return Response(200, b"ok")

    async with serving(handler) as (server, port):
        client = await RawClient.connect(port)
        await client.send(get("/huge"))
        await client.stream.receive()  # the response has started
        raw = client.stream.extra(SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.stream.aclose()  # an abortive close: the peer sees a reset
        with anyio.fail_after(WAIT):
            await sent.wait()  # the claim-then-run flow must still start its job
        await eventually(lambda: server.open_connections == 0)
        await assert_still_serving(port)


async def test_client_that_stops_reading_is_dropped_after_request_timeout() -> None:
    sent = anyio.Event()

    async def handler(request: Request) -> Response:
        return Response(200, b"z" * (16 * 1024 * 1024), on_sent=sent.set)

    limits = Limits(request_timeout=0.3, keepalive_timeout=2.0)
    async with (
        serving(handler, limits=limits) as (server, port),
        await RawClient.connect(port) as client,
    ):
        await client.send(get("/huge"))
        with anyio.fail_after(WAIT):
            await sent.wait()
        await eventually(lambda: server.open_connections == 0)


# -- life cycle ------------------------------------------------------------------------------


async def test_open_connections_and_busy_follow_the_traffic() -> None:
    release = anyio.Event()
    entered = anyio.Event()

    async def handler(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(200, b"done")

    async with serving(handler) as (server, port):
        assert (server.open_connections, server.busy) == (0, False)
        before = server.last_activity
        async with await RawClient.connect(port) as client:
            await client.send(get())
            with anyio.fail_after(WAIT):
                await entered.wait()
            assert (server.open_connections, server.busy) == (1, True)
            release.set()
            assert (await client.response()).body == b"done"
            await eventually(lambda: not server.busy)
            assert server.open_connections == 1  # idle in keep-alive
        await eventually(lambda: server.open_connections == 0)
        assert server.last_activity > before


async def test_on_connections_reports_each_change_of_the_open_count() -> None:
    counts: list[int] = []
    listener = await bind_listener("127.0.0.1", 0)
    server = HTTPServer(Recorder(), limits=QUICK, on_connections=counts.append)
    port = listener.extra(SocketAttribute.local_port)
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                await group.start(server.serve, [listener])
                async with await RawClient.connect(port) as first:
                    await first.send(get())
                    await first.response()
                    async with await RawClient.connect(port) as second:
                        await second.send(get())
                        await second.response()
                        assert counts == [1, 2]
                    await eventually(lambda: counts == [1, 2, 1])
                await eventually(lambda: counts == [1, 2, 1, 0])
                server.stop_accepting()
    finally:
        await listener.aclose()


async def test_stop_accepting_closes_idle_connections_and_finishes_running_requests() -> None:
    release, entered = anyio.Event(), anyio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return Response(200, request.path.encode())

    limits = Limits(request_timeout=2.0, keepalive_timeout=WAIT)
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(SocketAttribute.local_port)
    server = HTTPServer(handler, limits=limits)
    try:
        with anyio.fail_after(WAIT):  # bounds serve(), which must return by itself
            async with anyio.create_task_group() as group:
                await group.start(server.serve, [listener])
                idle, working = await RawClient.connect(port), await RawClient.connect(port)
                await idle.send(get("/fast"))
                assert (await idle.response()).body == b"/fast"
                await working.send(get("/slow"))
                await entered.wait()
                assert server.busy
                server.stop_accepting()
                assert await idle.closed()
                release.set()
                reply = await working.response()
                assert (reply.body, reply.headers["connection"]) == (b"/slow", "close")
                assert await working.closed()
                await idle.stream.aclose()
                await working.stream.aclose()
        # serve() returned on its own: the task group could exit.
        assert listener.extra(SocketAttribute.raw_socket).fileno() >= 0  # not closed
    finally:
        await listener.aclose()


async def test_connection_arriving_after_stop_waits_in_backlog_for_the_next_server() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    try:
        async with serving(listener=listener) as (_, port):
            await assert_still_serving(port)
        # The first server has stopped; the listening socket stays open, so the kernel
        # completes this handshake and keeps the connection for whoever accepts next.
        async with await RawClient.connect(port) as client:
            await client.send(get("/queued"))
            async with serving(listener=listener):
                reply = await client.response()
                assert reply.json() == {"method": "GET", "path": "/queued", "query": "", "body": ""}
    finally:
        await listener.aclose()


async def test_paused_server_keeps_serving_after_resume() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    port = listener.extra(SocketAttribute.local_port)
    server = HTTPServer(Recorder(), limits=QUICK)
    done = anyio.Event()

    async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        await server.serve([listener], task_status=task_status)
        done.set()

    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as group:
                await group.start(run)
                async with await RawClient.connect(port) as idle:
                    await idle.send(get("/before"))
                    assert (await idle.response()).status == 200
                    server.pause_accepting()
                    assert await idle.closed()
                async with await RawClient.connect(port) as queued:
                    await queued.send(get("/queued"))
                    await anyio.wait_all_tasks_blocked()
                    assert server.open_connections == 0  # left in the backlog
                    assert not done.is_set()  # a paused server has not returned
                    server.resume_accepting()
                    reply = await queued.response()
                    assert reply.json()["path"] == "/queued"
                    assert "connection" not in reply.headers
                server.stop_accepting()
                with pytest.raises(RuntimeError, match="pause_accepting"):
                    server.resume_accepting()
        assert done.is_set()
    finally:
        await listener.aclose()


async def test_stop_before_serve_returns_at_once() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    try:
        server = HTTPServer(Recorder())
        server.stop_accepting()
        with anyio.fail_after(WAIT):
            await server.serve([listener])
    finally:
        await listener.aclose()


# -- listeners -------------------------------------------------------------------------------


async def test_listener_from_fd_adopts_an_inherited_socket_non_inheritably() -> None:
    original = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    original.bind(("127.0.0.1", 0))
    original.listen()
    fd = os.dup(original.fileno())
    os.set_inheritable(fd, True)  # as systemd passes it
    original.close()
    listener = await listener_from_fd(fd)
    try:
        assert not os.get_inheritable(fd)
        async with serving(listener=listener) as (_, port):
            await assert_still_serving(port)
    finally:
        await listener.aclose()


async def test_listener_from_fd_refuses_a_socket_that_is_not_listening() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ConfigError, match="not a listening stream socket"):
            await listener_from_fd(sock.fileno())
        assert sock.fileno() >= 0  # left open for its owner


async def test_listener_from_fd_refuses_a_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ConfigError, match="is not a socket"):
            await listener_from_fd(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_bind_listener_reports_a_busy_port_as_config_error() -> None:
    listener = await bind_listener("127.0.0.1", 0)
    try:
        port = listener.extra(SocketAttribute.local_port)
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            await bind_listener("127.0.0.1", port)
    finally:
        await listener.aclose()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.2", False),
        ("::ffff:10.0.0.1", False),
        ("localhost", False),
        ("", False),
    ],
)
def test_is_loopback_address(host: str, loopback: bool) -> None:
    assert is_loopback_address(host) is loopback


async def test_loopback_and_unix_listeners_count_as_loopback(tmp_path: Path) -> None:
    tcp = await bind_listener("127.0.0.1", 0)
    unix = await anyio.create_unix_listener(tmp_path / "s.sock")
    try:
        assert is_loopback_listener(tcp)
        assert is_loopback_listener(unix)
        assert format_listener_address(tcp) == f"127.0.0.1:{tcp.extra(SocketAttribute.local_port)}"
    finally:
        await tcp.aclose()
        await unix.aclose()


async def test_wildcard_bound_socket_is_not_loopback() -> None:
    # Bound but never listening, so nothing outside can reach it during the test.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 0))
    listener = await anyio.abc.SocketListener.from_socket(sock)
    try:
        assert not is_loopback_listener(listener)
    finally:
        await listener.aclose()


async def test_server_serves_a_unix_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    unix = await anyio.create_unix_listener(path)
    try:
        async with serving(listener=unix):
            stream = await anyio.connect_unix(path)
            client = RawClient(stream)
            async with client:
                await client.send(get("/u"))
                reply = await client.response()
                assert reply.json() == {"method": "GET", "path": "/u", "query": "", "body": ""}
    finally:
        await unix.aclose()
