from __future__ import annotations

import anyio
import pytest

from chronosd.daemon.idle import IdleTracker


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_fresh_tracker_is_idle_from_creation() -> None:
    clock = FakeClock()
    tracker = IdleTracker(30, clock=clock)
    assert tracker.is_idle
    assert tracker.idle_deadline() == 1030.0


def test_never_exit_has_no_deadline() -> None:
    tracker = IdleTracker(None, clock=FakeClock())
    assert tracker.is_idle
    assert tracker.idle_deadline() is None


def test_hold_blocks_idle_and_release_restarts_the_count() -> None:
    clock = FakeClock()
    tracker = IdleTracker(30, clock=clock)
    clock.now = 1010.0
    with tracker.hold("connection"):
        assert tracker.idle_deadline() is None
        assert tracker.busy_reasons == {"connection": 1}
        clock.now = 1050.0
    assert tracker.busy_reasons == {}
    assert tracker.idle_deadline() == 1080.0


def test_nested_and_overlapping_holds_count_per_reason() -> None:
    clock = FakeClock()
    tracker = IdleTracker(5, clock=clock)
    tracker.acquire("run")
    tracker.acquire("run")
    tracker.acquire("reconcile")
    assert tracker.busy_reasons == {"run": 2, "reconcile": 1}
    tracker.release("run")
    tracker.release("reconcile")
    assert tracker.busy_reasons == {"run": 1}
    assert tracker.idle_deadline() is None
    clock.now = 2000.0
    tracker.release("run")
    assert tracker.idle_deadline() == 2005.0


def test_hold_is_released_when_the_block_raises() -> None:
    tracker = IdleTracker(5, clock=FakeClock())
    with pytest.raises(KeyError), tracker.hold("run"):
        raise KeyError("boom")
    assert tracker.busy_reasons == {}
    assert tracker.is_idle


def test_unpaired_release_is_refused() -> None:
    tracker = IdleTracker(5, clock=FakeClock())
    tracker.acquire("run")
    with pytest.raises(RuntimeError, match="'connection' without a matching acquire"):
        tracker.release("connection")
    assert tracker.busy_reasons == {"run": 1}


def test_resident_provider_keeps_the_process_busy() -> None:
    clock = FakeClock()
    tracker = IdleTracker(30, clock=clock)
    tracker.set_resident(True)
    assert tracker.resident
    assert tracker.idle_deadline() is None
    clock.now = 1100.0
    tracker.set_resident(False)
    assert tracker.idle_deadline() == 1130.0


def test_repeating_non_resident_does_not_postpone_exit() -> None:
    clock = FakeClock()
    tracker = IdleTracker(30, clock=clock)
    clock.now = 1020.0
    tracker.set_resident(False)
    assert tracker.idle_deadline() == 1030.0


def test_resident_and_holds_both_must_clear() -> None:
    clock = FakeClock()
    tracker = IdleTracker(30, clock=clock)
    tracker.set_resident(True)
    tracker.acquire("retry")
    tracker.set_resident(False)
    assert tracker.idle_deadline() is None
    clock.now = 1200.0
    tracker.release("retry")
    assert tracker.idle_deadline() == 1230.0


def test_negative_idle_exit_is_rejected() -> None:
    with pytest.raises(ValueError, match="idle_exit"):
        IdleTracker(-1)


@pytest.mark.anyio
async def test_wait_idle_returns_after_idle_period() -> None:
    tracker = IdleTracker(0.05)
    with anyio.fail_after(5):
        await tracker.wait_idle()
    assert tracker.is_idle


@pytest.mark.anyio
async def test_wait_idle_waits_for_hold_to_end() -> None:
    tracker = IdleTracker(0.05)
    tracker.acquire("run")
    returned = anyio.Event()

    async def waiter() -> None:
        await tracker.wait_idle()
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        # Far longer than idle_exit: a busy tracker must not let the waiter go.
        await anyio.sleep(0.3)
        assert not returned.is_set()
        tracker.release("run")
        with anyio.fail_after(5):
            await returned.wait()
    assert tracker.busy_reasons == {}


@pytest.mark.anyio
async def test_activity_during_the_idle_period_restarts_it() -> None:
    tracker = IdleTracker(0.5)
    returned = anyio.Event()
    blips = 0

    async def waiter() -> None:
        await tracker.wait_idle()
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        # Brief holds five times more often than idle_exit, for longer than
        # idle_exit in total: the waiter must stay blocked throughout.
        for _ in range(8):
            await anyio.sleep(0.1)
            assert not returned.is_set()
            with tracker.hold("connection"):
                blips += 1
        with anyio.fail_after(5):
            await returned.wait()
    assert blips == 8
    deadline = tracker.idle_deadline()
    assert deadline is not None and deadline <= anyio.current_time()


@pytest.mark.anyio
async def test_wait_idle_never_returns_without_idle_exit() -> None:
    tracker = IdleTracker(None)
    with anyio.move_on_after(0.2) as scope:
        await tracker.wait_idle()
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_resident_toggle_wakes_the_waiter() -> None:
    tracker = IdleTracker(0.05)
    tracker.set_resident(True)
    returned = anyio.Event()

    async def waiter() -> None:
        await tracker.wait_idle()
        returned.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.2)
        assert not returned.is_set()
        tracker.set_resident(False)
        with anyio.fail_after(5):
            await returned.wait()
