"""Duplicate storm: a thousand concurrent deliveries of one occurrence run it exactly once.

The deliveries come over a few hundred keep-alive connections opened before the first request
goes out (the listener allows 256 at once), so many of them race for the claim together. The
second test splits the storm between two daemons that share one state database: the claim is
one INSERT in SQLite, so at most one of all deliveries wins, whichever process it reaches.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from chronosd.timefmt import to_wire
from tests.daemon_support import DaemonProcess, fire_body, wait_until
from tests.reliability.conftest import Report
from tests.reliability.support import (
    World,
    deliver_concurrently,
    free_port,
    read_starts,
    recording,
    rows,
    scaled,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DELIVERIES = 1000
CONNECTIONS = 200  # below the listener's 256, so none is refused at the door


def storm_world(root: Path, *, listen: str) -> tuple[World, str]:
    world = World(root)
    at = to_wire(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=50))
    world.write_jobs([{"id": "storm", "schedule": f"at {at}", "command": recording(world.starts)}])
    world.write_config(listen=listen)
    return world, at


def summarise(answers: list[tuple[int, dict[str, object]]]) -> Counter[str]:
    return Counter(
        f"{status}:{body.get('status') or body.get('error')}" for status, body in answers
    )


async def test_a_thousand_concurrent_deliveries_of_one_occurrence_run_it_once(
    tmp_path: Path, report: Report
) -> None:
    world, at = storm_world(tmp_path, listen="127.0.0.1:0")
    deliveries = scaled(DELIVERIES, minimum=DELIVERIES)
    with world.running() as daemon:
        address = daemon.address()
        bodies = [fire_body("storm", at) for _ in range(deliveries)]
        answers = await deliver_concurrently(address, bodies, connections=CONNECTIONS)
        await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: world.state.finished_runs("storm"), timeout=20, what="the storm's run"
            )
        )
        assert daemon.stop() == 0
    outcome = summarise(answers)
    starts = read_starts(world.starts)
    report(
        deliveries=len(answers),
        connections=CONNECTIONS,
        accepted=outcome["202:accepted"],
        duplicate=outcome["200:duplicate"],
        other=len(answers) - outcome["202:accepted"] - outcome["200:duplicate"],
        runs=len(world.state.runs("storm")),
        starts=len(starts),
    )
    assert len(answers) == deliveries
    assert outcome == Counter({"202:accepted": 1, "200:duplicate": deliveries - 1})
    assert len(starts) == 1
    assert len(world.state.runs("storm")) == 1


async def test_a_storm_split_between_two_daemons_on_one_state_database_runs_once(
    tmp_path: Path, report: Report
) -> None:
    world, at = storm_world(tmp_path, listen="127.0.0.1:0")
    first_port, second_port = free_port(), free_port()
    deliveries = scaled(DELIVERIES, minimum=DELIVERIES)
    first = DaemonProcess(
        config=world.config,
        home=world.root,
        log_path=world.root / "first.log",
        extra_args=("--listen", f"127.0.0.1:{first_port}"),
    )
    second = DaemonProcess(
        config=world.config,
        home=world.root,
        log_path=world.root / "second.log",
        extra_args=("--listen", f"127.0.0.1:{second_port}"),
    )
    with first, second:
        first.wait_started()
        second.wait_started()
        half = deliveries // 2
        results: dict[int, list[tuple[int, dict[str, object]]]] = {}

        async def storm(port: int, count: int) -> None:
            bodies = [fire_body("storm", at) for _ in range(count)]
            results[port] = await deliver_concurrently(
                ("127.0.0.1", port), bodies, connections=CONNECTIONS // 2
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(storm, first_port, half)
            tg.start_soon(storm, second_port, deliveries - half)
        await anyio.to_thread.run_sync(
            lambda: wait_until(
                lambda: world.state.finished_runs("storm"), timeout=20, what="the storm's run"
            )
        )
        assert first.stop() == 0
        assert second.stop() == 0
    answers = results[first_port] + results[second_port]
    outcome = summarise(answers)
    starts = read_starts(world.starts)
    winners = [port for port, got in results.items() if any(s == 202 for s, _ in got)]
    report(
        deliveries=len(answers),
        daemons=2,
        accepted=outcome["202:accepted"],
        duplicate=outcome["200:duplicate"],
        other=len(answers) - outcome["202:accepted"] - outcome["200:duplicate"],
        starts=len(starts),
    )
    assert outcome == Counter({"202:accepted": 1, "200:duplicate": deliveries - 1})
    assert len(winners) == 1
    assert len(starts) == 1
    assert len(rows(world.state_dir, "SELECT 1 FROM occurrences WHERE job_id = 'storm'")) == 1
