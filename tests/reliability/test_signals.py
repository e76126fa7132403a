"""SIGTERM at the earliest moment a supervisor could send it still ends chronosd cleanly."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.support import World, recording


def test_sigterm_as_soon_as_the_daemon_reports_started_ends_it_with_status_0(
    tmp_path: Path,
) -> None:
    # systemd may send SIGTERM the moment READY=1 arrives; "daemon.started" is logged right
    # after READY. A default SIGTERM disposition at that point would kill it with -15.
    world = World(tmp_path)
    world.write_jobs(
        [{"id": "tick", "schedule": "*/5 * * * *", "command": recording(world.starts)}]
    )
    world.write_config()
    statuses = []
    for _ in range(5):
        with world.running() as daemon:
            daemon.wait_started()
            statuses.append(daemon.stop())
    assert statuses == [0] * 5
