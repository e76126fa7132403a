"""Footprint with 10,000 jobs: peak RSS while awake and CPU per second while idle but awake.

From /proc/<pid>/status (VmHWM: the peak resident set) and /proc/<pid>/stat (utime + stime),
beside the same figures for ``python -c "import time; time.sleep(30)"`` measured alongside.

- local provider: ``chronosd run --idle-exit never`` holding 10,000 in-process timers;
- NAS provider (full run only): the first start arms all 10,000 on the reference NAS (the peak
  includes that reconcile), then ``--idle-exit never`` keeps it awake with nothing to do.

Jobs are daily/weekly/monthly/yearly at times at least an hour away (as in reconcile_scale), so
nothing fires while we measure.
"""

from __future__ import annotations

import subprocess
import time

from bench.common import (
    PYTHON,
    Chronosd,
    Row,
    Section,
    Settings,
    base_env,
    free_port,
    make_chronosd,
    nas_available,
    proc_cpu_seconds,
    proc_status,
    ratio,
    running_nas,
    start_chronosd,
    stop_popen,
    verdict,
    wait_until,
)
from bench.reconcile_scale import _jobs

JOBS = 10000


def _settled(setup: Chronosd, nas_expected: int | None, nas_stats: object) -> bool:
    try:
        text = setup.log_path.read_bytes()
    except OSError:
        return False
    if b"watch.started" not in text:
        return False
    if nas_expected is None:
        return True
    assert callable(nas_stats)
    return int(nas_stats()["provisions"]) >= nas_expected


def _quiet(pid: int) -> bool:
    before = proc_cpu_seconds(pid)
    time.sleep(1.0)
    after = proc_cpu_seconds(pid)
    return before is None or after is None or after - before < 0.02


def _measure(
    setup: Chronosd, idle_seconds: float, *, nas: object = None, timeout: float = 300
) -> tuple[float, float, float, float]:
    """(chronosd peak RSS MB, chronosd CPU %, baseline peak RSS MB, baseline CPU %)."""
    proc = start_chronosd(setup, "--idle-exit", "never")
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"], env=base_env())
    try:
        stats = getattr(nas, "stats", None)
        expected = JOBS if stats is not None else None
        if not wait_until(lambda: _settled(setup, expected, stats), timeout, 0.2):
            return (float("nan"),) * 4
        # Start-up is over once the process stops using the CPU: 1 s with under 2 ticks.
        wait_until(lambda: _quiet(proc.pid), timeout, 0.0)
        cpu0, base0, wall0 = (
            proc_cpu_seconds(proc.pid),
            proc_cpu_seconds(sleeper.pid),
            time.monotonic(),
        )
        time.sleep(idle_seconds)
        cpu1, base1, wall1 = (
            proc_cpu_seconds(proc.pid),
            proc_cpu_seconds(sleeper.pid),
            time.monotonic(),
        )
        wall = wall1 - wall0
        rss = proc_status(proc.pid).get("VmHWM", 0) / 1024
        base_rss = proc_status(sleeper.pid).get("VmHWM", 0) / 1024
        cpu = 100 * ((cpu1 or 0) - (cpu0 or 0)) / wall
        base_cpu = 100 * ((base1 or 0) - (base0 or 0)) / wall
        return rss, cpu, base_rss, base_cpu
    finally:
        stop_popen(proc)
        stop_popen(sleeper)


def run(settings: Settings) -> Section:
    section = Section("footprint", f"Memory and idle CPU with {JOBS:,} jobs")
    idle_seconds = 3.0 if settings.quick else 10.0
    work = settings.workdir
    results: list[tuple[str, tuple[float, float, float, float]]] = []
    local = make_chronosd(
        work / "local", jobs=_jobs(JOBS), listen=f"127.0.0.1:{free_port()}", auth="none"
    )
    results.append(("local provider, 10,000 timers", _measure(local, idle_seconds)))
    have_nas, why = nas_available()
    if settings.quick:
        section.notes.append("NAS provider: measured in the full run only (arming takes a while).")
    elif not have_nas:
        section.notes.append(
            f"NAS provider: not measured, the reference NAS is unavailable ({why})."
        )
    else:
        with running_nas(work / "nas") as nas:
            setup = make_chronosd(
                work / "nas-chronosd",
                jobs=_jobs(JOBS),
                nas=nas,
                listen=f"127.0.0.1:{free_port()}",
                auth="jwt",
            )
            results.append(
                ("NAS provider, after arming 10,000", _measure(setup, idle_seconds, nas=nas))
            )
    for label, (rss, cpu, base_rss, base_cpu) in results:
        section.rows += [
            Row(
                f"{label}: peak RSS (VmHWM)",
                f"{rss:.1f} MB",
                f"sleeping python {base_rss:.1f} MB",
                ratio(rss, base_rss),
                "≤ 80 MB",
                verdict(rss <= 80) if rss == rss else "n/a",
            ),
            Row(
                f"{label}: CPU while idle and awake ({idle_seconds:.0f} s)",
                f"{cpu:.2f} % of a core",
                f"sleeping python {base_cpu:.2f} %",
                "—",
                "≤ 1 %",
                verdict(cpu <= 1.0) if cpu == cpu else "n/a",
            ),
        ]
    section.notes.append(
        f"CPU is (utime + stime) over {idle_seconds:.0f} s of wall time, sampled once start-up "
        "was over (the watcher running, for the NAS provider every arm provisioned, and then "
        "a whole second with under 20 ms of CPU); /proc's resolution is one clock tick "
        f"(10 ms), so figures under {100 * 0.01 / idle_seconds:.2f} % read as 0."
    )
    return section
