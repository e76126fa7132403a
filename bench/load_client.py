"""A bounded keep-alive load generator (used by listener.py when wrk is not installed).

``python bench/load_client.py PORT CONNECTIONS SECONDS REQUESTS MODE``: CONNECTIONS connections
to 127.0.0.1:PORT each send ``POST /api/cron/fire``, one request at a time, until SECONDS have
passed. REQUESTS is a file of pre-signed fires, one a line: the ``Chronos-Signature`` value, a
tab, the body. MODE ``once`` sends each line at most once and stops when they run out (a used
signature would only be refused as a replay); ``cycle`` starts again from the first line (for
servers that check nothing). Prints as JSON ``{"seconds", "responses", "ok" (2xx),
"duplicate" (200 with "duplicate" in the body), "exhausted" (true when ``once`` ran out)}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from itertools import cycle
from pathlib import Path


def load_requests(path: Path) -> list[bytes]:
    out = []
    for line in path.read_bytes().splitlines():
        signature, _, body = line.partition(b"\t")
        out.append(
            b"POST /api/cron/fire HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nChronos-Signature: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (signature, len(body), body)
        )
    return out


class Counts:
    def __init__(self) -> None:
        self.responses = 0
        self.ok = 0
        self.duplicate = 0
        self.exhausted = False


async def worker(port: int, requests: Iterator[bytes], deadline: float, counts: Counts) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < deadline:
            # One event loop, so taking the next request needs no lock: no two connections
            # ever send the same pre-signed request.
            request = next(requests, None)
            if request is None:
                counts.exhausted = True
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
            counts.responses += 1
            if head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                counts.ok += 1
                if head[9:12] == b"200" and b'"duplicate"' in body:
                    counts.duplicate += 1
    finally:
        writer.close()


async def main(port: int, connections: int, seconds: float, path: Path, mode: str) -> None:
    loaded = load_requests(path)
    requests = cycle(loaded) if mode == "cycle" else iter(loaded)
    counts = Counts()
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(worker(port, requests, deadline, counts) for _ in range(connections)))
    elapsed = time.monotonic() - started
    print(
        json.dumps(
            {
                "seconds": elapsed,
                "responses": counts.responses,
                "ok": counts.ok,
                "duplicate": counts.duplicate,
                "exhausted": counts.exhausted,
            }
        )
    )


if __name__ == "__main__":
    port, connections, seconds, path, mode = sys.argv[1:6]
    if mode not in ("once", "cycle"):
        sys.exit(f"load_client.py: MODE must be once or cycle, not {mode!r}")
    asyncio.run(main(int(port), int(connections), float(seconds), Path(path), mode))
