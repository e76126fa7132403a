"""A bounded keep-alive load generator (used by listener.py when wrk is not installed).

``python bench/load_client.py PORT CONNECTIONS SECONDS BODY``: CONNECTIONS connections to
127.0.0.1:PORT each send ``POST /api/cron/fire`` with BODY, one request at a time, until SECONDS
have passed. Prints ``{"rate": requests per second, "non_2xx": count}`` as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def worker(port: int, request: bytes, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.monotonic() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            counts[0] += 1
            if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                counts[1] += 1
    finally:
        writer.close()


async def main(port: int, connections: int, seconds: float, body: bytes) -> None:
    request = (
        b"POST /api/cron/fire HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    counts = [0, 0]
    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(worker(port, request, deadline, counts) for _ in range(connections)))
    elapsed = time.monotonic() - started
    print(json.dumps({"rate": counts[0] / elapsed, "non_2xx": counts[1]}))


if __name__ == "__main__":
    port, connections, seconds, body = sys.argv[1:5]
    asyncio.run(main(int(port), int(connections), float(seconds), body.encode()))
