"""Fire precision: lateness from the scheduled instant to the job's first instruction.

The job is ``/bin/date +%s.%N`` run directly (no shell): the stamp it prints is the first thing
it does, and chronosd keeps it in the run's log. Lateness = stamp - scheduled instant (from the
``runs`` table of state.db).

(a) resident: ``chronosd run`` with the local provider, one job ``* * * * * *``.
(b) scale-to-zero: the reference NAS holds the arms and calls back; chronosd is socket-activated
    per round (``tests/harness.py``'s SocketActivator, the systemd stand-in), verifies the NAS's
    JWT, claims, starts the jobs, re-arms on the NAS and idles out (idle_exit 0.5 s) before the
    next round. Several jobs ``*/8 * * * * *`` fire together in each round. Two variants: arms
    at the instant (the default) and ``provider.nas.prewake = 2s`` (the NAS calls 2 s early,
    chronosd claims then and starts the job at the instant).

Peers in the same run: APScheduler 3 (AsyncIOScheduler, interval job every second, the callback
records ``time.time()`` in-process, so it pays no process start), and Debian's cron (minute
granularity) in the full run when it can be run here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    PYTHON,
    Chronosd,
    Row,
    Section,
    Settings,
    base_env,
    free_port,
    make_chronosd,
    ms,
    nas_available,
    percentile,
    ratio,
    running_nas,
    start_chronosd,
    stop_popen,
    verdict,
    wait_popen,
    wait_until,
)

CRON_FILE = Path("/etc/cron.d/chronosd-bench")
# Seconds of pre-wake in the second (b) variant: more than a cold start here (0.3-0.9 s).
PREWAKE = 2
CRON_PID = Path("/run/crond.pid")


def _epoch(wire: str) -> float:
    return datetime.fromisoformat(wire).timestamp()


def _lateness(setup: Chronosd, since: float) -> list[float]:
    out = []
    for _job, scheduled, stamp in setup.run_stamps():
        instant = _epoch(scheduled)
        if instant >= since:
            out.append(stamp - instant)
    return out


def _stats(values: list[float]) -> str:
    if not values:
        return "no samples"
    return (
        f"n={len(values)}, p50 {ms(percentile(values, 50))}, p99 {ms(percentile(values, 99))}, "
        f"max {ms(max(values))}"
    )


def _start_cron(out: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """Debian's cron with one `* * * * *` job, when we may run it; (process, why not)."""
    cron = shutil.which("cron")
    if cron is None:
        return None, "cron is not installed (bench/run.sh installs it from Debian when root)"
    if os.geteuid() != 0:
        return None, "not root: cron needs a file in /etc/cron.d"
    if _running_cron() is not None:
        return None, "a cron daemon already runs here; not adding a job to the machine's cron"
    if CRON_FILE.exists():
        return None, f"{CRON_FILE} already exists"
    CRON_FILE.write_text(f"* * * * * root /bin/date +\\%s.\\%N >> {out}\n")
    CRON_FILE.chmod(0o644)
    proc = subprocess.Popen(
        [cron, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    return proc, ""


def _running_cron() -> int | None:
    """The pid of a live cron daemon according to its pid file, or None (a stale file is fine)."""
    try:
        pid = int(CRON_PID.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def _stop_cron(proc: subprocess.Popen[bytes]) -> None:
    stop_popen(proc)
    with contextlib.suppress(OSError):
        CRON_FILE.unlink()
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(CRON_PID.read_text().split()[0]) == proc.pid:
            CRON_PID.unlink()  # ours, and cron leaves it behind on SIGTERM


def _offset_lateness(path: Path, offset: float = 0.0) -> list[float]:
    """Lateness of each stamp from the nearest instant (whole second + *offset*)."""
    if not path.exists():
        return []
    stamps = [float(line) for line in path.read_text().split() if line.strip()]
    return [s - offset - round(s - offset) for s in stamps]


def _minute_lateness(path: Path) -> list[float]:
    """Lateness of each stamp from the whole minute it belongs to (cron's instants)."""
    if not path.exists():
        return []
    stamps = [float(line) for line in path.read_text().split() if line.strip()]
    return [s % 60 for s in stamps]


def run(settings: Settings) -> Section:
    section = Section("fire_precision", "Lateness from the scheduled instant to the job's start")
    quick = settings.quick
    work = settings.workdir
    duration_a = 10.0 if quick else 60.0
    duration_b = 18.0 if quick else 74.0
    jobs_b = 8 if quick else 20
    # Longer than chronosd's 5 s keep-alive timeout plus its idle_exit: with fires closer
    # together, the NAS's pooled connection alone keeps chronosd awake (bench/ANALYSIS.md).
    period_b = 8

    cron_out = work / "cron-stamps.txt"
    if quick:
        cron_proc, cron_why = None, "only measured in the full run"
    else:
        cron_proc, cron_why = _start_cron(cron_out)
    cron_started = time.time()
    try:
        # (a) resident, local timers, with the APScheduler peers alongside, offset by a third
        # of a second each so that no two fire at the same moment.
        peers = {
            mode: (
                work / f"aps-{mode}.txt",
                offset,
                subprocess.Popen(
                    [
                        PYTHON,
                        str(BENCH_DIR / "aps_peer.py"),
                        str(work / f"aps-{mode}.txt"),
                        str(duration_a + 2),
                        str(offset),
                        mode,
                    ],
                    env=base_env(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
            for mode, offset in (("inproc", 0.33), ("spawn", 0.66))
        }
        local = make_chronosd(
            work / "chronosd-local",
            jobs=[{"id": "tick", "schedule": "* * * * * *", "command": ["/bin/date", "+%s.%N"]}],
            auth="none",
            idle_exit="never",
            listen=f"127.0.0.1:{free_port()}",
        )
        proc = start_chronosd(local)
        since_a = time.time() + 2.0
        time.sleep(duration_a + 2)
        proc.send_signal(signal.SIGTERM)
        if wait_popen(proc, 30) is None:
            stop_popen(proc)
        for _out, _offset, peer in peers.values():
            if wait_popen(peer, 30) is None:
                stop_popen(peer)
        late_a = _lateness(local, since_a)
        late_aps = _offset_lateness(peers["inproc"][0], peers["inproc"][1])[1:]
        late_aps_spawn = _offset_lateness(peers["spawn"][0], peers["spawn"][1])[1:]

        # (b) scale-to-zero through the reference NAS, with the default arms (at the instant)
        # and with a pre-wake (armed PREWAKE s early; the job starts at the instant).
        scale: dict[int, tuple[list[float], int, int]] = {}
        have_nas, why = nas_available()
        if have_nas:
            for prewake in (0, PREWAKE):
                scale[prewake] = _scale_to_zero(
                    work / f"b{prewake}", jobs_b, period_b, duration_b, prewake=prewake
                )
        else:
            section.notes.append(f"(b) not measured: the reference NAS is unavailable ({why}).")
    finally:
        if cron_proc is not None:
            # Two whole minutes at least, so that two cron fires can be seen.
            wait_until(lambda: time.time() - cron_started > 125, 130, 1.0)
            _stop_cron(cron_proc)
    late_cron = _minute_lateness(cron_out)

    aps_p99 = percentile(late_aps, 99)
    spawn_p99 = percentile(late_aps_spawn, 99)
    p99_a = percentile(late_a, 99)
    section.rows.append(
        Row(
            f"(a) local, resident, every second: p99 lateness (n={len(late_a)})",
            ms(p99_a),
            f"APScheduler + spawn p99 {ms(spawn_p99)}",
            ratio(p99_a, spawn_p99),
            "≤ 20 ms",
            verdict(p99_a <= 0.020) if late_a else "n/a",
        )
    )
    for prewake, (late_b, _activations, _rounds) in scale.items():
        p99_b = percentile(late_b, 99)
        section.rows.append(
            Row(
                f"(b) NAS + socket activation + idle exit, {_prewake_label(prewake)}: "
                f"p99 lateness (n={len(late_b)})",
                ms(p99_b),
                f"APScheduler + spawn p99 {ms(spawn_p99)}",
                ratio(p99_b, spawn_p99),
                "≤ 250 ms",
                verdict(p99_b <= 0.250) if late_b else "n/a",
            )
        )
    section.rows.append(
        Row(f"APScheduler 3 peer, in-process callback: p99 (n={len(late_aps)})", ms(aps_p99))
    )
    section.rows.append(
        Row(
            f"APScheduler 3 peer, callback spawns /bin/date: p99 (n={len(late_aps_spawn)})",
            ms(spawn_p99),
        )
    )
    if late_cron:
        section.rows.append(
            Row(
                f"Debian cron peer (minute granularity): max lateness (n={len(late_cron)})",
                ms(max(late_cron)),
            )
        )
    lines = [
        "| scheduler | samples | p50 | p99 | max |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, values in (
        ("(a) chronosd, local provider, resident", late_a),
        *(
            (
                f"(b) chronosd, NAS + socket activation + idle exit, {_prewake_label(prewake)}",
                late_b,
            )
            for prewake, (late_b, _activations, _rounds) in scale.items()
        ),
        ("APScheduler 3, AsyncIOScheduler, in-process callback", late_aps),
        ("APScheduler 3, AsyncIOScheduler, callback spawns `/bin/date`", late_aps_spawn),
        ("Debian cron, `* * * * *` (minute granularity)", late_cron),
    ):
        if values:
            lines.append(
                f"| {label} | {len(values)} | {ms(percentile(values, 50))} | "
                f"{ms(percentile(values, 99))} | {ms(max(values))} |"
            )
    runs_b = "; ".join(
        f"{_prewake_label(prewake)}: {rounds} rounds measured, {activations} socket activations"
        for prewake, (_late, activations, rounds) in scale.items()
    )
    section.notes += [
        f"(a) ran {duration_a:.0f} s with APScheduler alongside ({duration_a:.0f} s); "
        f"(b) ran {duration_b:.0f} s per variant: {jobs_b} jobs `*/{period_b} * * * * *` "
        f"({runs_b}; the first round, which also fetches the JWKS, is left out; an activation "
        "per round means chronosd exited between fires). With `provider.nas.prewake` the NAS "
        "holds each arm that many seconds before the occurrence; chronosd claims on that call, "
        "answers 202 and starts the job from a local timer at the instant itself.",
        "",
        *lines,
        "",
        "chronosd's figure includes starting the job process (`/bin/date`, no shell); "
        "the first APScheduler peer's callback runs in-process and starts nothing, the second "
        "starts the same `/bin/date` (asyncio.create_subprocess_exec), which is the fair "
        "comparison and the baseline in the table. The peers fire 0.33 s and 0.66 s after "
        "each whole second, so no two schedulers compete for the CPU at the same moment.",
    ]
    if not late_cron:
        section.notes.append(f"Debian cron: not measured ({cron_why or 'no fire was seen'}).")
    else:
        section.notes.append(
            "Debian cron fires on minute boundaries only; its lateness is measured from the "
            f"whole minute over about two minutes ({_stats(late_cron)})."
        )
    return section


def _prewake_label(prewake: int) -> str:
    return f"prewake {prewake} s" if prewake else "arm at the instant (default)"


def _scale_to_zero(
    work: Path, jobs: int, period: int, duration: float, *, prewake: int = 0
) -> tuple[list[float], int, int]:
    from tests.harness import SocketActivator

    with running_nas(work) as nas:
        # The activator's port is the callback URL, so it must exist before the config.
        activator = SocketActivator(["true"], env=base_env(), stdout_path=work / "chronosd.log")
        activator.start()
        try:
            setup = make_chronosd(
                work / "chronosd",
                jobs=[
                    {
                        "id": f"job{i:02d}",
                        "schedule": f"*/{period} * * * * *",
                        "command": ["/bin/date", "+%s.%N"],
                    }
                    for i in range(jobs)
                ],
                nas=nas,
                callback_url=f"http://127.0.0.1:{activator.port}",
                auth="jwt",
                idle_exit="0.5s",
                prewake=prewake,
            )
            activator.argv = setup.argv()
            activator.trigger()  # as the path unit would: the first start arms everything
            started = time.time()
            time.sleep(duration)
            # Start measuring after the first round (JWKS fetch, page cache).
            since = (int(started) // period + 2) * period
            wait_until(lambda: not activator.running(), 15, 0.05)
        finally:
            activator.stop()
        late = _lateness(setup, since)
        rounds = len({sched for _j, sched, _s in setup.run_stamps() if _epoch(sched) >= since})
        return late, activator.activations, rounds
