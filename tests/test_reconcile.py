"""The reconcile worker against the local provider, and its pure decisions."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from chronosd.config import Config, NasConfig
from chronosd.daemon.idle import IdleTracker
from chronosd.fire import Engine
from chronosd.providers.local import LocalProvider
from chronosd.providers.nas import NasProvider
from chronosd.reconcile import Action, Reconciler, backoff_delay, plan_action
from chronosd.state import StateDB
from tests.jobtools import T0, make_job

S = timedelta(seconds=1)


def test_plan_action_covers_every_case() -> None:
    a, b = T0, T0 + S
    assert plan_action("j", known=True, desired=a, observed=None) == Action("arm", "j", a)
    assert plan_action("j", known=True, desired=b, observed=a) == Action("arm", "j", b)
    assert plan_action("j", known=True, desired=a, observed=a) is None
    assert plan_action("j", known=True, desired=None, observed=a) == Action("cancel", "j")
    assert plan_action("j", known=True, desired=None, observed=None) is None
    assert plan_action("j", known=False, desired=None, observed=a) == Action("cancel", "j")
    assert plan_action("j", known=False, desired=None, observed=None) == Action("forget", "j")


def test_backoff_grows_and_honours_retry_after() -> None:
    for failures in range(1, 12):
        delay = backoff_delay(failures)
        ceiling = min(300.0, 2.0 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay(1, retry_after=42.0) == 42.0


@pytest.mark.anyio
async def test_edits_turn_into_arms_and_cancels_on_local_timers(tmp_path: Path) -> None:
    idle = IdleTracker(1.0)
    provider = LocalProvider(lambda: T0)
    db, engine, reconciler = _rig(tmp_path, provider, idle)
    a = make_job(id="a", schedule="every 60s")
    b = make_job(id="b", schedule="*/10 * * * * *")
    engine.apply_jobs([a, b])
    assert "reconcile" in idle.busy_reasons
    with anyio.fail_after(5):
        assert await reconciler.drain()
    assert provider.armed() == {"a": T0 + 60 * S, "b": T0 + 10 * S}
    assert "reconcile" not in idle.busy_reasons
    js = db.get_job("a")
    assert js is not None and js.armed_fire == T0 + 60 * S

    engine.apply_jobs([make_job(id="a", schedule="every 60s", paused=True)])
    with anyio.fail_after(5):
        assert await reconciler.drain()
    assert provider.armed() == {}
    assert db.get_job("b") is None  # removed and cancelled: forgotten
    assert db.get_meta("last_reconcile_error") is None
    db.close()


def _rig(
    tmp_path: Path, provider: LocalProvider | NasProvider, idle: IdleTracker | None = None
) -> tuple[StateDB, Engine, Reconciler]:
    db = StateDB.open(tmp_path / "state")
    clock = lambda: T0  # noqa: E731
    config = Config(jobs=tmp_path / "jobs.json", state_dir=tmp_path / "state")
    reconciler: Reconciler
    engine = Engine(
        config=config,
        db=db,
        owner="t:1:x",
        clock=clock,
        request_reconcile=lambda ids: reconciler.request(ids),
    )
    reconciler = Reconciler(engine=engine, provider=provider, db=db, idle=idle, clock=clock)
    return db, engine, reconciler


def _nas(tmp_path: Path, port: int) -> NasProvider:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    return NasProvider(
        NasConfig(
            url=f"http://127.0.0.1:{port}",
            callback_url="http://127.0.0.1:9",
            token_file=token,
            timeout=2.0,
        )
    )


@pytest.mark.anyio
async def test_settled_once_everything_asked_for_is_confirmed(tmp_path: Path) -> None:
    db, engine, reconciler = _rig(tmp_path, LocalProvider(lambda: T0))
    assert reconciler.settled  # nothing asked yet
    engine.apply_jobs([make_job(id="a", schedule="every 60s")])
    assert not reconciler.settled  # asked, not yet armed
    with anyio.fail_after(5):
        assert await reconciler.drain()
    assert reconciler.settled
    db.close()


@pytest.mark.anyio
async def test_not_settled_after_a_failed_arm(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: the arm is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db, engine, reconciler = _rig(tmp_path, _nas(tmp_path, port))
    engine.apply_jobs([make_job(id="a", schedule="every 60s")])
    with anyio.fail_after(10):
        assert not await reconciler.drain()
    assert not reconciler.settled
    assert reconciler.idle_now is False  # waiting out a backoff
    await reconciler.provider.aclose()
    db.close()


@pytest.mark.anyio
async def test_not_settled_after_a_pass_cut_short(tmp_path: Path) -> None:
    # A NAS that accepts and never answers: the pass is cancelled with its arm in flight.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        db, engine, reconciler = _rig(tmp_path, _nas(tmp_path, silent.getsockname()[1]))
        engine.apply_jobs([make_job(id="a", schedule="every 60s")])
        with anyio.move_on_after(0.5) as scope:
            await reconciler.drain()
        assert scope.cancelled_caught
        assert reconciler.idle_now  # nothing queued or in flight any more...
        assert not reconciler.settled  # ...but the arm was never confirmed
        await reconciler.provider.aclose()
    db.close()
