"""The HTTP client's bytes (chronosd.http.wire), checked against h11 as the reference."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.http.wire import (
    ResponseCutShort,
    ResponseError,
    ResponseParser,
    finish_request,
    format_fields,
    format_head,
)

MAX_BODY = 1 << 20

BODY = b'{"job_id":"j1","fire_at":"2030-01-01T00:00:00+00:00"}'


def format_request(target: str, authority: str, authorization: str, body: bytes | None) -> bytes:
    head = format_head("POST", target, [("host", authority), ("content-type", "application/json")])
    return finish_request(head + format_fields([("authorization", authorization)]), body)


def test_request_is_a_complete_post_h11_reads_back() -> None:
    raw = format_request("/prefix/api/cron/fire", "agent.example:8443", "Bearer a.b.c", BODY)
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/prefix/api/cron/fire")
    assert list(request.headers) == [
        (b"host", b"agent.example:8443"),
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer a.b.c"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    data = server.next_event()
    assert isinstance(data, h11.Data) and data.data == BODY
    assert isinstance(server.next_event(), h11.EndOfMessage)


def test_request_without_a_body_has_no_framing_and_h11_reads_it_whole() -> None:
    raw = finish_request(format_head("GET", "/list?x=1", [("host", "nas")]), None)
    assert raw == b"GET /list?x=1 HTTP/1.1\r\nhost: nas\r\n\r\n"
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)


@pytest.mark.parametrize(
    ("target", "authority", "authorization"),
    [
        ("/a b", "agent.example", "Bearer x"),
        ("/a\r\nx: y", "agent.example", "Bearer x"),
        ("/", "agent.example\r\nx: y", "Bearer x"),
        ("/", "agent.example", "Bearer x\r\nx: y"),
        ("/", "agent.example", "Bearer x\x00"),
        ("", "agent.example", "Bearer x"),
    ],
)
def test_request_refuses_values_that_would_break_the_head(
    target: str, authority: str, authorization: str
) -> None:
    with pytest.raises(ValueError, match="not safe"):
        format_request(target, authority, authorization, BODY)


@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET PUT", []), ("POST", [("bad name", "x")]), ("POST", [("x", "\u20ac")])],
)
def test_request_refuses_bad_methods_names_and_non_latin1_values(
    method: str, headers: list[tuple[str, str]]
) -> None:
    with pytest.raises(ValueError):
        format_head(method, "/", headers)


# -- responses: generated, cut at random places, read by both parsers -------------------------

_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"
_VALUE_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, str]:
    """Bytes of one valid response (maybe after interim ones), and how its body is framed."""
    version = draw(st.sampled_from(["1.1", "1.0"]))
    eol = draw(st.sampled_from(["\r\n", "\n"])) if version == "1.1" else "\r\n"
    parts: list[str] = []
    if version == "1.1":
        for interim in draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2)):
            parts.append(f"HTTP/1.1 {interim} Interim{eol}x-interim: 1{eol}{eol}")
    status = draw(st.sampled_from([200, 202, 204, 304, 400, 401, 409, 429, 500, 503]))
    framing = draw(
        st.sampled_from(["length", "chunked", "close"] if version == "1.1" else ["length", "close"])
    )
    if status in (204, 304):
        framing = "none"
    body = draw(st.binary(max_size=300)) if framing != "none" else b""
    headers = [
        (
            draw(st.text(_TOKEN_CHARS, min_size=1, max_size=12)).join("x-"),
            draw(st.text(_VALUE_CHARS, max_size=20)),
        )
        for _ in range(draw(st.integers(0, 4)))
    ]
    if draw(st.booleans()):
        headers.append(("Retry-After", str(draw(st.integers(0, 3600)))))
    connection = draw(st.sampled_from([None, "close", "keep-alive", "Keep-Alive, Upgrade"]))
    if connection is not None:
        headers.append(("Connection", connection))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    head = f"HTTP/{version} {status} Whatever{eol}"
    head += "".join(f"{name}: {value}{eol}" for name, value in headers) + eol
    raw = "".join(parts).encode() + head.encode()
    if framing == "chunked":
        eol = "\r\n"  # h11 takes a bare LF in heads, not in chunk lines
        pieces = draw(st.lists(st.integers(1, 50), max_size=5))
        position = 0
        for size in pieces:
            chunk = body[position : position + size]
            position += size
            if chunk:
                extension = draw(st.sampled_from(["", ";ext=1"]))
                raw += f"{len(chunk):x}{extension}{eol}".encode() + chunk + eol.encode()
        rest = body[position:]
        if rest:
            raw += f"{len(rest):X}{eol}".encode() + rest + eol.encode()
        trailer = draw(st.sampled_from(["", f"x-trailer: 1{eol}"]))
        raw += f"0{eol}{trailer}{eol}".encode()
    else:
        raw += body
    return raw, framing


Reading = tuple[int, str, list[tuple[bytes, bytes]], bytes, bool]


def h11_reading(raw: bytes, framing: str) -> Reading:
    """(status, reason, headers, body, keep-alive) of the final response, as h11 reads it."""
    client = h11.Connection(h11.CLIENT)
    client.send(
        h11.Request(
            method="POST",
            target="/api/cron/fire",
            headers=[("host", "a"), ("content-length", str(len(BODY)))],
        )
    )
    client.send(h11.Data(data=BODY))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    if framing == "close":
        client.receive_data(b"")
    status, reason, headers, body = 0, "", [], b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason.decode()
            headers = list(event.headers)
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        assert event is not h11.NEED_DATA, "h11 wanted more: the generated response is short"
    keep_alive = client.their_state is h11.DONE and client.our_state is h11.DONE
    if framing == "close":
        keep_alive = False  # h11 says DONE at the end of the body; the close came with it
    return status, reason, headers, body, keep_alive


def parsed(parser: ResponseParser) -> Reading:
    return parser.status, parser.reason, parser.headers, parser.body(), parser.keep_alive


@settings(max_examples=300, deadline=None)
@given(case=responses(), data=st.data())
def test_response_cut_anywhere_reads_as_h11_reads_it(
    case: tuple[bytes, str], data: st.DataObject
) -> None:
    raw, framing = case
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    parser = ResponseParser(max_body=MAX_BODY)
    fed = [parser.feed(piece) for piece in pieces if piece]
    if framing == "close":
        assert not any(fed)
        assert parser.feed(b"")
    else:
        # Complete with the last byte, not before.
        assert fed[-1] and not any(fed[:-1])
    assert parsed(parser) == h11_reading(raw, framing)


def read(raw: bytes) -> ResponseParser:
    parser = ResponseParser(max_body=MAX_BODY)
    if not parser.feed(raw):
        raise AssertionError("response not complete")
    return parser


def test_bytes_beyond_the_response_make_the_connection_unusable() -> None:
    parser = read(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n")
    assert parser.status == 202
    assert not parser.keep_alive


def test_chunk_lines_may_end_in_a_bare_line_feed() -> None:
    parser = read(b"HTTP/1.1 202 Accepted\ntransfer-encoding: chunked\n\n2\n{}\n0\n\n")
    assert (parser.status, parser.keep_alive) == (202, True)


def test_close_delimited_body_completes_at_the_close() -> None:
    parser = ResponseParser(max_body=MAX_BODY)
    assert not parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome body")
    assert not parser.feed(b" and more")
    assert parser.feed(b"")
    assert (parser.status, parser.body(), parser.keep_alive) == (200, b"some body and more", False)


def test_close_delimited_body_over_the_cap_is_refused() -> None:
    parser = ResponseParser(max_body=10)
    assert not parser.feed(b"HTTP/1.0 200 OK\r\n\r\n0123456789")
    with pytest.raises(ResponseError, match="over 10 bytes"):
        parser.feed(b"!")


def test_the_answer_to_head_has_no_body_whatever_its_length() -> None:
    parser = ResponseParser(max_body=MAX_BODY, head_request=True)
    assert parser.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")
    assert (parser.status, parser.body(), parser.keep_alive) == (200, b"", True)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: continuation\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxy",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1),
    ],
)
def test_invalid_response_is_refused(raw: bytes) -> None:
    with pytest.raises(ResponseError):
        ResponseParser(max_body=MAX_BODY).feed(raw)


def test_response_cut_short_by_the_close_is_refused() -> None:
    parser = ResponseParser(max_body=MAX_BODY)
    assert not parser.feed(b"HTTP/1.1 202 Accepted\r\ncontent-length: 10\r\n\r\nabc")
    with pytest.raises(ResponseCutShort, match="closed"):
        parser.feed(b"")
