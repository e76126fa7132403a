"""The cold-start and throughput baseline: a minimal stdlib asyncio HTTP responder.

Started like chronosd under socket activation (the listening socket as fd 3, with
``LISTEN_FDS``/``LISTEN_PID``), or with ``--port N`` on 127.0.0.1. Every request, whatever its
method and path, gets ``202 {"status": "accepted"}``; keep-alive is honoured. With
``--idle-exit N`` it exits N seconds after starting (default: it runs until stopped).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

BODY = b'{"status":"accepted"}'
RESPONSE = (
    b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main() -> None:
    args = sys.argv[1:]
    idle_exit = float(args[args.index("--idle-exit") + 1]) if "--idle-exit" in args else None
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        sock = socket.socket(fileno=3)
    else:
        port = int(args[args.index("--port") + 1])
        sock = socket.create_server(("127.0.0.1", port), backlog=1024)
    server = await asyncio.start_server(handle, sock=sock)
    async with server:
        if idle_exit is None:
            await server.serve_forever()
        await asyncio.sleep(idle_exit)


if __name__ == "__main__":
    asyncio.run(main())
