from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pytest

from chronosd.daemon.watcher import watch_jobs_file

DEBOUNCE_MS = 100
# Comfortably longer than the debounce: a second, spurious call would have
# arrived by then.
SETTLE = 0.5


class Recorder:
    """The on_change callback: counts calls and lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.calls = 0
        self.contents: list[str | None] = []
        self._changed = anyio.Event()
        self.path: Path | None = None

    async def __call__(self) -> None:
        self.calls += 1
        assert self.path is not None
        try:
            self.contents.append(self.path.read_text())
        except FileNotFoundError:
            self.contents.append(None)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, calls: int, timeout: float = 5) -> None:
        with anyio.fail_after(timeout):
            while self.calls < calls:
                await self._changed.wait()


@asynccontextmanager
async def watching(path: Path, recorder: Recorder, **kwargs: object) -> AsyncIterator[anyio.Event]:
    recorder.path = path
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(
            partial(
                watch_jobs_file,
                path,
                recorder,
                stop_event=stop,
                **{"debounce_ms": DEBOUNCE_MS, **kwargs},  # type: ignore[arg-type]
            )
        )
        yield stop
        stop.set()


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.json"
    path.write_text('{"version": 1, "jobs": []}\n')
    (tmp_path / "notes.txt").write_text("unrelated\n")
    return path


def atomic_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def in_place_rewrite(path: Path, text: str) -> None:
    # Truncate, then write in two pieces: several events for one edit.
    with open(path, "w") as handle:
        handle.write(text[:5])
        handle.flush()
        handle.write(text[5:])


def sed_in_place(path: Path, text: str) -> None:
    # jobs.json is one line here; the replacement has no '&', '\\' or '/'.
    line = text.rstrip("\n")
    subprocess.run(["sed", "-i", "-e", f"s/.*/{line}/", str(path)], check=True, timeout=10)


EDITS: dict[str, Callable[[Path, str], None]] = {
    "atomic_rename": atomic_rename,
    "in_place_rewrite": in_place_rewrite,
    "sed_in_place": sed_in_place,
}


@pytest.mark.anyio
@pytest.mark.parametrize("edit", sorted(EDITS))
async def test_each_edit_gives_exactly_one_call(edit: str, jobs_file: Path) -> None:
    recorder = Recorder()
    async with watching(jobs_file, recorder):
        for round_ in range(1, 4):
            text = f'{{"version": 1, "jobs": ["edit-{round_}"]}}\n'
            await anyio.to_thread.run_sync(EDITS[edit], jobs_file, text)
            await recorder.wait_for(round_)
            await anyio.sleep(SETTLE)
            assert recorder.calls == round_
            assert recorder.contents[-1] == text


@pytest.mark.anyio
async def test_change_right_after_start_is_seen(jobs_file: Path) -> None:
    recorder = Recorder()
    async with watching(jobs_file, recorder):
        # No sleep: started() means the watch is already installed.
        jobs_file.write_text('{"version": 1, "jobs": ["x"]}\n')
        await recorder.wait_for(1)


@pytest.mark.anyio
async def test_unrelated_files_in_the_directory_are_ignored(jobs_file: Path) -> None:
    recorder = Recorder()
    directory = jobs_file.parent
    async with watching(jobs_file, recorder):
        (directory / "notes.txt").write_text("changed\n")
        (directory / "jobs.json.bak").write_text("{}\n")
        (directory / "other.json").write_text("{}\n")
        os.replace(directory / "other.json", directory / "renamed.json")
        (directory / "sub").mkdir()
        (directory / "sub" / "jobs.json").write_text("{}\n")
        (directory / "notes.txt").unlink()
        await anyio.sleep(SETTLE)
        assert recorder.calls == 0
        # The watch is still alive: the real file still counts.
        atomic_rename(jobs_file, '{"version": 1, "jobs": ["after"]}\n')
        await recorder.wait_for(1)
        await anyio.sleep(SETTLE)
        assert recorder.calls == 1


@pytest.mark.anyio
async def test_survives_delete_and_recreate(jobs_file: Path) -> None:
    recorder = Recorder()
    async with watching(jobs_file, recorder):
        jobs_file.unlink()
        await recorder.wait_for(1)
        assert recorder.contents == [None]
        jobs_file.write_text('{"version": 1, "jobs": ["back"]}\n')
        await recorder.wait_for(2)
        assert recorder.contents[-1] == '{"version": 1, "jobs": ["back"]}\n'
        # And later edits are still seen.
        atomic_rename(jobs_file, '{"version": 1, "jobs": ["again"]}\n')
        await recorder.wait_for(3)


@pytest.mark.anyio
async def test_burst_of_edits_within_debounce_gives_one_call(jobs_file: Path) -> None:
    recorder = Recorder()
    async with watching(jobs_file, recorder):
        for index in range(5):
            atomic_rename(jobs_file, f'{{"version": 1, "jobs": ["{index}"]}}\n')
        await recorder.wait_for(1)
        await anyio.sleep(SETTLE)
        assert recorder.calls == 1
        assert recorder.contents == ['{"version": 1, "jobs": ["4"]}\n']


@pytest.mark.anyio
async def test_edits_spaced_within_debounce_give_one_call(jobs_file: Path) -> None:
    recorder = Recorder()
    # Spaced wider than the watching thread's batching step, so only the
    # quiet-period logic can merge them.
    async with watching(jobs_file, recorder, debounce_ms=400):
        for index in range(4):
            in_place_rewrite(jobs_file, f'{{"version": 1, "jobs": ["{index}"]}}\n')
            await anyio.sleep(0.08)
        await recorder.wait_for(1)
        await anyio.sleep(SETTLE + 0.4)
        assert recorder.calls == 1
        assert recorder.contents == ['{"version": 1, "jobs": ["3"]}\n']


@pytest.mark.anyio
async def test_change_during_callback_gives_one_more_call(jobs_file: Path) -> None:
    entered = anyio.Event()
    release = anyio.Event()
    calls = 0

    async def slow_callback() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await release.wait()

    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(
            partial(watch_jobs_file, jobs_file, slow_callback, stop_event=stop, debounce_ms=50)
        )
        jobs_file.write_text("first\n")
        with anyio.fail_after(5):
            await entered.wait()
        jobs_file.write_text("second\n")
        await anyio.sleep(0.2)  # let the watching thread (not running now) miss nothing
        release.set()
        with anyio.fail_after(5):
            while calls < 2:
                await anyio.sleep(0.02)
        await anyio.sleep(SETTLE)
        assert calls == 2
        stop.set()


@pytest.mark.anyio
async def test_stop_event_ends_the_watch(jobs_file: Path) -> None:
    recorder = Recorder()
    stop = anyio.Event()
    finished = anyio.Event()

    async def run() -> None:
        await watch_jobs_file(jobs_file, recorder, stop_event=stop)
        finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.sleep(0.1)
        stop.set()
        with anyio.fail_after(2):
            await finished.wait()
    assert recorder.calls == 0


@pytest.mark.anyio
async def test_cancellation_ends_the_watch(jobs_file: Path) -> None:
    recorder = Recorder()
    with anyio.fail_after(2):
        async with anyio.create_task_group() as tg:
            await tg.start(partial(watch_jobs_file, jobs_file, recorder))
            tg.cancel_scope.cancel()
    assert recorder.calls == 0


@pytest.mark.anyio
async def test_callback_error_propagates(jobs_file: Path) -> None:
    async def failing() -> None:
        raise LookupError("reload failed")

    caught: list[BaseException] = []
    with anyio.fail_after(5):
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(partial(watch_jobs_file, jobs_file, failing))
                jobs_file.write_text("x\n")
        except* LookupError as group:
            caught.extend(group.exceptions)
    assert [str(error) for error in _leaves(caught)] == ["reload failed"]


def _leaves(errors: list[BaseException]) -> list[BaseException]:
    flat: list[BaseException] = []
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            flat.extend(_leaves(list(error.exceptions)))
        else:
            flat.append(error)
    return flat


@pytest.mark.anyio
async def test_missing_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await watch_jobs_file(tmp_path / "nope" / "jobs.json", Recorder())


def test_watchfiles_is_not_imported_by_loading_the_module() -> None:
    code = (
        "import sys, chronosd.daemon.watcher, chronosd.daemon.idle, chronosd.daemon.systemd;"
        "print('watchfiles' in sys.modules, 'structlog' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    ).stdout
    assert out.split() == ["False", "False"]
