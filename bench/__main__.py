"""Run the benchmarks: ``python -m bench [--quick] [--only NAME ...]`` from the repository root.

Prints one table and writes it, with the machine and the command, to ``bench/RESULTS.md``.
Benchmarks report figures and whether each target was met; they never fail on a target. A
benchmark that breaks is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.common import BENCH_DIR, Section, Settings, machine_info

BENCHMARKS = (
    "cold_start",
    "fire_precision",
    "reconcile_scale",
    "footprint",
    "nas_delivery",
    "listener",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (under ~2 minutes)")
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=BENCH_DIR / "RESULTS.md",
        help="where to write the markdown report (default bench/RESULTS.md)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    return parser


def _run_one(name: str, quick: bool, keep: bool) -> Section:
    workdir = Path(tempfile.mkdtemp(prefix=f"chronosd-bench-{name}-"))
    started = time.monotonic()
    try:
        module = importlib.import_module(f"bench.{name}")
        section: Section = module.run(Settings(quick=quick, workdir=workdir))
    except Exception as exc:  # one broken benchmark must not cost the others
        section = Section(name, name, error=f"{type(exc).__name__}: {exc}")
        section.notes.append("```\n" + traceback.format_exc().rstrip() + "\n```")
    finally:
        if keep:
            print(f"[bench] {name}: work directory kept at {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    section.seconds = time.monotonic() - started
    return section


HEADERS = ("benchmark", "metric", "value", "baseline (same run)", "ratio", "target", "verdict")


def _cells(sections: list[Section]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for section in sections:
        if section.error:
            rows.append((section.name, "ERROR", section.error, "", "", "", ""))
        for row in section.rows:
            rows.append(
                (
                    section.name,
                    row.metric,
                    row.value,
                    row.baseline,
                    row.ratio,
                    row.target,
                    row.verdict,
                )
            )
    return rows


def text_table(sections: list[Section]) -> str:
    rows = [HEADERS, *_cells(sections)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(sections: list[Section], command: str, started: datetime, seconds: float) -> str:
    info = machine_info()
    out = [
        "# chronosd benchmarks",
        "",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')} (took {seconds:.0f} s)",
        f"- command: `{command}`",
        f"- machine: `nproc` = {info['nproc']}, CPU {info['cpu']}, Linux {info['kernel']}",
        f"- Python {info['python']}",
        "",
        "Figures that depend on the machine are shown beside a baseline measured in the same run;",
        "the ratio is value / baseline. A verdict says whether the target was met; missing one",
        "never fails the run. Everything runs on 127.0.0.1.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for cells in _cells(sections):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for section in sections:
        out += ["", f"## {section.name}: {section.title} ({section.seconds:.0f} s)", ""]
        out += section.notes or ["(no notes)"]
    analysis = BENCH_DIR / "ANALYSIS.md"
    if analysis.exists():
        # Hand-written: why targets were missed, from profiles; dated, not regenerated.
        out += ["", analysis.read_text().strip()]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    started = datetime.now(UTC)
    clock = time.monotonic()
    sections: list[Section] = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        section = _run_one(name, args.quick, args.keep)
        sections.append(section)
        print(text_table([section]) + f"\n[bench] {name}: {section.seconds:.0f} s\n", flush=True)
    seconds = time.monotonic() - clock
    command = "python -m bench" + (" " + shlex.join(argv if argv is not None else sys.argv[1:]))
    print(text_table(sections))
    args.output.write_text(markdown(sections, command.strip(), started, seconds))
    print(f"\n[bench] {len(sections)} benchmarks in {seconds:.0f} s; report: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
