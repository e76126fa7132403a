"""The server's own request-head parser against h11, the parser it stands in for.

`_parse_head` may decline any request (h11 then reads it), but what it accepts it must read
exactly as h11 would and as the server's extra framing checks allow; and when it waits for more
bytes, h11 must be waiting too.
"""

from __future__ import annotations

import h11
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from chronosd.http.server import (
    _INCOMPLETE,
    InvalidResponse,
    _encode_head,
    _framing_problem,
    _Head,
    _head_size,
    _parse_head,
    _reason,
)

MAX_HEAD = 300
MAX_BODY = 40

# Characters that matter to the grammar, plus plain ones so that most heads are well formed.
_TRICKY = "\x00\t\x0b\x0c\r\n ,:;\x7f\x80\xa0\xb2\xe9\xff"
_PLAIN = "abcXYZ019-_./?=*"
methods = st.one_of(
    st.sampled_from(["GET", "POST", "HEAD", "PUT", "CONNECT", "get", "P\x00ST", "GE T", ""]),
    st.text(alphabet=_PLAIN + _TRICKY, max_size=6),
)
targets = st.one_of(
    st.sampled_from(["/", "/a?b=c", "/api/cron/fire", "*", "http://x/y?q", "/caf\xe9", "/a b"]),
    st.text(alphabet=_PLAIN + _TRICKY, min_size=0, max_size=8),
)
versions = st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "http/1.1"])
names = st.one_of(
    st.sampled_from(
        [
            "Host",
            "host",
            "HOST",
            "Content-Length",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Expect",
            "Upgrade",
            "X-A",
            "Bad Name",
            "",
        ]
    ),
    st.text(alphabet=_PLAIN + _TRICKY, min_size=0, max_size=5),
)
values = st.one_of(
    st.sampled_from(
        ["t", "5", "05", "0", "41", "5, 5", "-1", "+5", "\xb2", "close", "keep-alive", "Close"]
    ),
    st.sampled_from(["keep-alive, close", "chunked", "100-continue", " padded\t", "a b", ""]),
    st.text(alphabet=_PLAIN + _TRICKY, max_size=8),
)
separators = st.sampled_from([":", ": ", ":\t", " :", ":  "])
line_ends = st.sampled_from(["\r\n", "\r\n", "\r\n", "\r\n", "\n"])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    request_line = f"{draw(methods)} {draw(targets)} {draw(versions)}"
    lines = [request_line]
    if draw(st.booleans()):
        lines.append("Host: example")
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"{draw(names)}{draw(separators)}{draw(values)}")
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from([" folded", "\tx"])))
    text = "".join(line + draw(line_ends) for line in lines) + draw(line_ends)
    body = draw(st.binary(max_size=50))
    cut = draw(st.one_of(st.none(), st.integers(0, len(text) + len(body))))
    data = text.encode("latin-1") + body
    return data if cut is None else data[:cut]


@st.composite
def near_misses(draw: st.DrawFn) -> bytes:
    """A well-formed request, then a few single-character edits: most stay near the border."""
    method = draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE"]))
    target = draw(st.sampled_from(["/", "/api/cron/fire", "/a?b=c&d", "/x/y?"]))
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:8787"]
    plain = st.text(alphabet=_PLAIN + " \t\xe9", max_size=12)
    extra = st.tuples(st.sampled_from(["X-A", "Content-Type", "Connection", "Accept"]), plain)
    lines += [f"{name}: {value}" for name, value in draw(st.lists(extra, max_size=3))]
    body = draw(st.binary(max_size=MAX_BODY))
    if body or draw(st.booleans()):
        lines.append(f"Content-Length: {len(body)}")
    lines = draw(st.permutations(lines[1:]))
    text = bytearray(f"{method} {target} HTTP/1.1\r\n".encode())
    text += "".join(f"{line}\r\n" for line in lines).encode("latin-1") + b"\r\n" + body
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(text) - 1))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        char = draw(st.sampled_from(_TRICKY + "\x01aZ9:")).encode("latin-1")
        if edit == "delete":
            del text[at]
        else:
            text[at : at + (edit == "replace")] = char
    return bytes(text)


def h11_reading(data: bytes) -> h11.Request | str:
    """What the server's full path makes of *data*: the request, or why it stops there."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    if data:  # b"" would tell h11 the client closed
        conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "refused"
    if event is h11.NEED_DATA:
        return "incomplete"
    assert isinstance(event, h11.Request)
    return event


@settings(max_examples=1500, deadline=None)
@given(data=st.one_of(heads(), near_misses()))
@example(data=b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
@example(data=b"POST /p?q=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nX-Y:\t a b \r\n\r\nhello")
@example(data=b"GET / HTTP/1.1\r\nHost: t\r\nX: caf\xe9\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: \xb2\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x0bb\r\n\r\n")
@example(data=b"GET / HTTP/1.1\r\nHo")
@example(data=b" GET / HTTP/1.1\r\nHo")
def test_fast_parser_reads_what_it_accepts_exactly_as_h11_does(data: bytes) -> None:
    parsed = _parse_head(bytearray(data), 0, MAX_HEAD, MAX_BODY)
    reading = h11_reading(data)
    event("fast" if isinstance(parsed, _Head) else "incomplete" if parsed is _INCOMPLETE else "h11")
    if parsed is None:
        return  # left to h11: always allowed
    if parsed is _INCOMPLETE:
        assert reading == "incomplete"
        return
    assert isinstance(parsed, _Head)
    assert isinstance(reading, h11.Request), reading
    assert reading.http_version == b"1.1"
    assert parsed.method == reading.method.decode("ascii")
    assert parsed.target == reading.target.decode("ascii")
    assert (parsed.path, parsed.query) == parsed.target.partition("?")[::2]
    assert parsed.headers == tuple(
        (name.decode("latin-1"), value.decode("latin-1")) for name, value in reading.headers
    )
    head_size = _head_size(bytearray(data))
    assert parsed.body_start == head_size <= MAX_HEAD
    assert _framing_problem(data[:head_size], reading) is None
    declared = [int(value) for name, value in reading.headers if name == b"content-length"]
    assert parsed.body_length == (declared[0] if declared else 0) <= MAX_BODY
    names = {name for name, _ in reading.headers}
    assert not names & {b"transfer-encoding", b"expect", b"upgrade"}
    connection = b",".join(value for name, value in reading.headers if name == b"connection")
    assert b"close" not in connection.lower()  # h11 would keep the connection alive


def test_fast_parser_waits_for_the_rest_of_a_head_and_resumes_its_search() -> None:
    data = bytearray(b"GET / HTTP/1.1\r\nHost: t\r\n\r")
    assert _parse_head(data, 0, MAX_HEAD, MAX_BODY) is _INCOMPLETE
    data += b"\n"
    parsed = _parse_head(data, len(data) - 3, MAX_HEAD, MAX_BODY)
    assert isinstance(parsed, _Head)
    assert (parsed.body_start, parsed.body_length) == (len(data), 0)


def test_fast_parser_leaves_oversized_and_unanswerable_heads_to_h11() -> None:
    assert (
        _parse_head(bytearray(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD), 0, MAX_HEAD, 9) is None
    )
    full = b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert _parse_head(bytearray(full), 0, MAX_HEAD, MAX_BODY) is None
    too_long = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 41\r\n\r\n"
    assert _parse_head(bytearray(too_long), 0, MAX_HEAD, MAX_BODY) is None
    assert _parse_head(bytearray(b"\x16\x03\x01"), 0, MAX_HEAD, MAX_BODY) is None


header_values = st.one_of(
    st.sampled_from(["close", "Close", "keep-alive, close", "keep-alive", "a\r\nb"]),
    st.text(alphabet=_PLAIN + "\t ,\x80\xe9", max_size=10),
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([100, 200, 202, 204, 304, 400, 404, 503, 599, 1000]),
    headers=st.lists(
        st.tuples(
            st.sampled_from(["X-A", "host", "Connection", "content-type", "b d"]), header_values
        ),
        max_size=4,
    ),
)
def test_encoded_head_is_what_h11_writes(status: int, headers: list[tuple[str, str]]) -> None:
    """After a keep-alive request, with the framing header the server adds to both."""
    bodyless = status in (204, 304)
    framing = [] if bodyless else [("content-length", "0")]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    try:
        event = h11.Response(
            status_code=status,
            headers=[*headers, ("server", "chronosd"), *framing],
            reason=_reason(status),
        )
    except (h11.LocalProtocolError, UnicodeEncodeError) as exc:
        refused: type[Exception] | None = type(exc)
    else:
        refused = None
    try:
        encoded = _encode_head(status, tuple(headers), "chronosd")
    except (InvalidResponse, UnicodeEncodeError) as exc:
        # Refused for the same reason h11 refuses it, without h11 (see _checked_fields).
        assert refused is (h11.LocalProtocolError if type(exc) is InvalidResponse else type(exc))
        return
    assert refused is None
    written = conn.send(event)
    assert written == encoded.head + (b"" if bodyless else b"content-length: 0\r\n") + b"\r\n"
    assert encoded.bodyless == bodyless
    conn.send(h11.EndOfMessage())
    assert encoded.closes == (conn.our_state is h11.MUST_CLOSE)


def test_connection_close_is_read_by_the_fast_path_as_h11_reads_it() -> None:
    for value, close in (
        ("close", True),
        ("Keep-Alive, Close", True),
        (" close ", True),
        ("keep-alive", False),
        ("closed", False),
        ("upgrade-close", False),
    ):
        data = f"POST /f HTTP/1.1\r\nHost: t\r\nConnection: {value}\r\nContent-Length: 0\r\n\r\n"
        head = _parse_head(bytearray(data.encode()), 0, MAX_HEAD, MAX_BODY)
        assert isinstance(head, tuple), value
        assert head.close is close, value
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(data.encode())
        assert isinstance(conn.next_event(), h11.Request)
        assert conn.next_event() == h11.EndOfMessage()
        conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
        conn.send(h11.EndOfMessage())
        assert (conn.our_state is h11.MUST_CLOSE) is close, value
