"""The client side of HTTP/1.1 without I/O: a request's bytes, and a parser for the response.

chronosd's calls (a provision to the NAS, a fire from the NAS) are small requests of a few
known shapes whose answers are a status line, a few headers and a short JSON body. h11 does
both sides of any exchange with full generality, and in these calls that cost more CPU than
everything else together (validating every header of every event, then one event per part of
the response); this module does only what a client needs. What it reads is what RFC 9112
allows a server to send: status lines of HTTP/1.0 and 1.1, interim 1xx responses, bodies
framed by ``Content-Length``, by chunked transfer coding or by the end of the connection,
header and chunk lines ending in CRLF or a bare LF. Anything else is a `ResponseError`, and
the connection is not used again. tests/test_http_wire.py checks it against h11.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_HEAD = 65536
_MAX_LINE = 8192  # a chunk-size line or a trailer line

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# What may stand in a request head, as RFC 9110 allows it (h11's rules): a method is a token;
# a target is visible ASCII; a field value is visible characters (obs-text included) with
# single spaces or tabs inside, nothing that could end a line or a field.
_TOKEN_TEXT = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TARGET = re.compile(r"[!-~]+")
_FIELD_VALUE = re.compile(r"[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*")  # or empty


class ResponseError(ValueError):
    """The bytes received are not a valid HTTP/1.1 response."""


class ResponseCutShort(ResponseError):
    """The connection closed before the response was complete."""


def format_head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """The request line and header lines (CRLF each, no blank line); ValueError if unsafe."""
    if not _TOKEN_TEXT.fullmatch(method):
        raise ValueError(f"method {method!r} is not a token")
    if not _TARGET.fullmatch(target):
        raise ValueError(f"target {target!r} is not safe in a request line")
    return f"{method} {target} HTTP/1.1\r\n".encode("ascii") + format_fields(headers)


def format_fields(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header lines, CRLF each; ValueError for a name or value that would break the head."""
    lines = []
    for name, value in headers:
        if not _TOKEN_TEXT.fullmatch(name):
            raise ValueError(f"header name {name!r} is not a token")
        if value and not _FIELD_VALUE.fullmatch(value):
            raise ValueError(f"the value of header {name!r} is not safe in a request head")
        lines.append(f"{name}: {value}\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header value is not latin-1") from None


def finish_request(head: bytes, body: bytes | None) -> bytes:
    """The whole request: *head* (from `format_head`), its framing, the blank line, *body*."""
    if body is None:
        return head + b"\r\n"
    return b"%scontent-length: %d\r\n\r\n%s" % (head, len(body), body)


class ResponseParser:
    """One response, fed in pieces; `feed` says when it is complete.

    After completion: ``status``, ``reason``, ``headers`` (names lower-case, in order),
    `body`, and ``keep_alive`` (the connection may carry the next request: HTTP/1.1, no
    ``Connection: close``, the body not delimited by the close, and nothing received beyond
    the response).
    """

    __slots__ = (
        "_body",
        "_buffer",
        "_chunks",
        "_max_body",
        "_no_body",
        "_remaining",
        "_state",
        "headers",
        "keep_alive",
        "reason",
        "received",
        "status",
    )

    def __init__(self, *, max_body: int, head_request: bool = False) -> None:
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = True
        self.received = 0  # bytes fed so far
        self._max_body = max_body
        self._no_body = head_request  # the answer to HEAD has none, whatever its framing
        # head, length, size, data, data-end, trailers, close, done
        self._state = "head"
        self._buffer: bytearray | None = None
        self._chunks: list[bytes] = []
        self._remaining = 0
        self._body = 0

    def body(self) -> bytes:
        return b"".join(self._chunks)

    def feed(self, data: bytes) -> bool:
        """Add *data* (``b""``: the peer closed); True once the response is complete."""
        if self._state == "done":
            if data:
                self.keep_alive = False  # bytes nobody asked for: do not trust the stream
            return True
        self.received += len(data)
        if not data:
            if self._state == "close":
                self._state = "done"
                return True
            raise ResponseCutShort("connection closed before the response was complete")
        if self._buffer is None:
            self._buffer = bytearray(data)
        else:
            self._buffer += data
        done = self._advance(self._buffer)
        if done and self._buffer:
            self.keep_alive = False
        return done

    def _advance(self, buffer: bytearray) -> bool:
        while True:
            state = self._state
            if state == "head":
                if not self._read_head(buffer):
                    return False
            elif state == "length" or state == "data":
                take = min(self._remaining, len(buffer))
                self._chunks.append(bytes(buffer[:take]))
                del buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return False
                self._state = "done" if state == "length" else "data-end"
            elif state == "size":
                line = _take_line(buffer)
                if line is None:
                    return False
                size_text = line.split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_text):
                    raise ResponseError(f"invalid chunk size line {bytes(line[:40])!r}")
                self._remaining = int(size_text, 16)
                self._count_body(self._remaining)
                self._state = "data" if self._remaining else "trailers"
            elif state == "data-end":
                if buffer.startswith(b"\r\n"):
                    del buffer[:2]
                elif buffer.startswith(b"\n"):
                    del buffer[:1]
                elif not buffer or buffer == b"\r":
                    return False
                else:
                    raise ResponseError("chunk data not followed by a line end")
                self._state = "size"
            elif state == "trailers":
                line = _take_line(buffer)
                if line is None:
                    return False
                if not line:
                    self._state = "done"
            elif state == "close":
                self._count_body(len(buffer))
                self._chunks.append(bytes(buffer))
                buffer.clear()
                return False
            else:
                return True

    def _read_head(self, buffer: bytearray) -> bool:
        end, marker = _head_end(buffer)
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise ResponseError(f"response head over {MAX_HEAD} bytes")
            return False
        if end > MAX_HEAD:
            raise ResponseError(f"response head over {MAX_HEAD} bytes")
        lines = bytes(buffer[:end]).split(b"\n")
        del buffer[: end + marker]
        match = _STATUS_LINE.fullmatch(lines[0].rstrip(b"\r"))
        if match is None:
            raise ResponseError(f"invalid status line {lines[0][:40]!r}")
        status = int(match[2])
        headers = _parse_headers(lines[1:])
        if 100 <= status < 200:
            if status == 101:
                raise ResponseError("the server switched protocols")
            return True  # interim response: the final one follows
        self.status = status
        self.reason = (match[3] or b"").decode("ascii", errors="ignore")
        self.headers = headers
        if match[1] == b"0":
            self.keep_alive = False  # HTTP/1.0: the server closes after answering
        connection = b",".join(value for name, value in headers if name == b"connection")
        if b"close" in (token.strip().lower() for token in connection.split(b",")):
            self.keep_alive = False
        coding = [value for name, value in headers if name == b"transfer-encoding"]
        lengths = {value for name, value in headers if name == b"content-length"}
        if self._no_body or status in (204, 304):
            self._state = "done"
        elif coding:
            codings = [c.strip().lower() for c in b",".join(coding).split(b",")]
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise ResponseError("a transfer coding other than chunked")
            self._state = "size"
        elif lengths:
            # Repeated or list-valued, but all the same number: allowed (RFC 9112 6.3).
            values = {v.strip() for value in lengths for v in value.split(b",")}
            length = values.pop() if len(values) == 1 else b""
            if not _DIGITS.fullmatch(length):
                raise ResponseError("invalid Content-Length")
            self._remaining = int(length)
            self._count_body(self._remaining)
            self._state = "length" if self._remaining else "done"
        else:
            self.keep_alive = False
            self._state = "close"
        return True

    def _count_body(self, size: int) -> None:
        self._body += size
        if self._body > self._max_body:
            raise ResponseError(f"response body over {self._max_body} bytes")


def _head_end(buffer: bytearray) -> tuple[int, int]:
    """Where the blank line ending the head starts (after its first LF), and its length."""
    crlf = buffer.find(b"\n\r\n")
    lf = buffer.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return -1, 0
    if lf < 0 or (0 <= crlf < lf):
        return crlf + 1, 2
    return lf + 1, 1


def _parse_headers(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for raw in lines:
        line = raw.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise ResponseError("a continuation line before any header")
            name, value = headers[-1]
            headers[-1] = (name, value + b" " + line.strip(b" \t"))  # obs-fold, RFC 9112 5.2
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ResponseError(f"invalid header line {line[:40]!r}")
        headers.append((name.lower(), value.strip(b" \t")))
    return headers


def _take_line(buffer: bytearray) -> bytes | None:
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > _MAX_LINE:
            raise ResponseError(f"a line over {_MAX_LINE} bytes")
        return None
    line = bytes(buffer[:end]).rstrip(b"\r")
    del buffer[: end + 1]
    return line
