"""The fire-precision peer: APScheduler 3 (AsyncIOScheduler), an interval job every second.

``python bench/aps_peer.py OUT SECONDS OFFSET MODE``: the job fires at whole seconds plus
OFFSET (so that peers measured alongside each other never fire at the same moment). MODE
``inproc``: the job's first line records ``time.time()``; MODE ``spawn``: the job starts
``/bin/date +%s.%N`` (what chronosd's benchmark job runs) and keeps the stamp it prints. The
stamps are written to OUT, one a line.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

stamps: list[float] = []


async def tick() -> None:
    stamps.append(time.time())


async def tick_spawn() -> None:
    proc = await asyncio.create_subprocess_exec(
        "/bin/date", "+%s.%N", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    stamps.append(float(out))


async def main(out: str, seconds: float, offset: float, mode: str) -> None:
    scheduler = AsyncIOScheduler()
    start = datetime.fromtimestamp(int(time.time()) + 2 + offset, UTC)
    job = tick_spawn if mode == "spawn" else tick
    scheduler.add_job(job, "interval", seconds=1, start_date=start, misfire_grace_time=30)
    scheduler.start()
    await asyncio.sleep(seconds)
    scheduler.shutdown(wait=False)
    with open(out, "w") as handle:
        handle.writelines(f"{stamp:.6f}\n" for stamp in stamps)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
