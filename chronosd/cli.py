"""The command line (INTERFACE.md). Thin: parses, calls into the rooms, prints.

Errors are one line on stderr, ``chronosd: <what>: <why>``; a traceback only
with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from chronosd import __version__
from chronosd.config import Config, load_config
from chronosd.durations import format_duration, parse_duration
from chronosd.errors import ChronosError, JobsFileError, UnknownJobError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class CliError(ChronosError):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- parsing
def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="config file (default: $CHRONOSD_CONFIG, /etc/chronosd/chronosd.toml, "
        "~/.config/chronosd/chronosd.toml)",
    )
    parser.add_argument("--jobs", type=Path, default=default, metavar="PATH", help="jobs.json")
    parser.add_argument("--state-dir", type=Path, default=default, metavar="DIR")
    parser.add_argument(
        "--json", action="store_true", default=default, help="machine-readable output on stdout"
    )
    parser.add_argument(
        "--log-level",
        default=default,
        metavar="LEVEL",
        choices=["debug", "info", "warning", "error"],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chronosd", description="A scale-to-zero cron daemon.")
    parser.add_argument("--version", action="version", version=f"chronosd {__version__}")
    add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_global_options(p, suppress=True)
        return p

    p = command("run", "run the daemon (adopts systemd sockets when present)")
    p.add_argument("--listen", metavar="HOST:PORT")
    p.add_argument("--provider", choices=["local", "nas"])
    p.add_argument("--idle-exit", metavar="SECONDS|never")
    p.set_defaults(handler=cmd_run)

    p = command("validate", "parse and validate jobs.json; print every error")
    p.add_argument("file", nargs="?", type=Path)
    p.set_defaults(handler=cmd_validate)

    p = command("list", "one row per job: schedule, state, next fire, last run, armed")
    p.set_defaults(handler=cmd_list)

    p = command("next", "the next fire instants of a job")
    p.add_argument("job")
    p.add_argument("-n", type=int, default=5, metavar="N")
    p.add_argument("--after", metavar="ISO")
    p.set_defaults(handler=cmd_next)

    p = command("status", "daemon-level view: provider, reconcile, unarmed jobs, jobs.json")
    p.set_defaults(handler=cmd_status)

    p = command("add", "add a job to jobs.json")
    p.add_argument("id")
    p.add_argument("--schedule", required=True)
    p.add_argument(
        "--command",
        dest="shell_command",
        metavar="STRING",
        help="a command line run with /bin/sh -c (or give argv after --)",
    )
    p.add_argument("--name")
    p.add_argument("--timezone")
    p.add_argument("--timeout")
    p.add_argument("--overlap", choices=["skip", "allow", "queue", "replace"])
    p.add_argument("--catch-up", dest="catch_up", action="store_true", default=None)
    p.add_argument("--no-catch-up", dest="catch_up", action="store_false")
    p.add_argument("--misfire-grace")
    p.add_argument("--jitter")
    p.add_argument("--repeat", type=int)
    p.add_argument("--retries", type=int)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cwd")
    p.add_argument("--paused", action="store_true")
    p.add_argument("--disabled", action="store_true")
    p.add_argument("argv", nargs="*", help="the command as argv (after --)")
    p.set_defaults(handler=cmd_add)

    for name, help_text in (
        ("remove", "remove a job from jobs.json"),
        ("pause", "pause a job (stays in jobs.json, not armed)"),
        ("resume", "resume a paused job"),
    ):
        p = command(name, help_text)
        p.add_argument("job")
        p.set_defaults(handler=cmd_edit_one, action=name)

    p = command("fire", "run a job now through the claim path (trigger manual)")
    p.add_argument("job")
    p.set_defaults(handler=cmd_fire)

    p = command("runs", "run history")
    p.add_argument("job", nargs="?")
    p.add_argument("-n", type=int, default=20, metavar="N")
    p.set_defaults(handler=cmd_runs)

    p = command("logs", "the captured output of a run (newest by default)")
    p.add_argument("job")
    p.add_argument("run_id", nargs="?")
    p.set_defaults(handler=cmd_logs)

    _register_extra_commands(sub, command)
    return parser


def _register_extra_commands(
    sub: Any, command: Callable[[str, str], argparse.ArgumentParser]
) -> None:
    """Sub-commands of other rooms (the reference NAS, systemd installation)."""
    from chronosd.nas.cli import register as register_nas

    register_nas(sub, command)


# ---------------------------------------------------------------------- context
class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        overrides: dict[str, Any] = {}
        if args.jobs is not None:
            overrides["jobs"] = str(args.jobs)
        if args.state_dir is not None:
            overrides["state_dir"] = str(args.state_dir)
        if args.log_level is not None:
            overrides["log_level"] = args.log_level
        for flag, key in (
            ("listen", "listen"),
            ("provider", "provider.kind"),
            ("idle_exit", "idle_exit"),
        ):
            value = getattr(args, flag, None)
            if value is not None:
                overrides[key] = value
        self.overrides = overrides
        self.config: Config = load_config(config_path=args.config, overrides=overrides)
        self.json = bool(args.json)
        self.now = datetime.now(UTC).replace(microsecond=0)

    def defaults(self) -> Any:
        from chronosd.jobs.validate import JobDefaults

        return JobDefaults(
            timezone=self.config.timezone, timeout=self.config.runner.default_timeout
        )

    def read_jobs(self, path: Path | None = None) -> Any:
        from chronosd.jobs.file import read_jobs_file

        db = self.open_state()
        known = {}
        if db is not None:
            known = {job_id: js.schedule_key for job_id, js in db.all_jobs().items()}
            db.close()
        return read_jobs_file(
            path or self.config.jobs,
            defaults=self.defaults(),
            now=self.now,
            on_invalid_job=self.config.on_invalid_job,
            known_schedules=known,
        )

    def open_state(self, *, create: bool = False) -> Any:
        """The state database, or None when there is none yet (and create is False)."""
        from chronosd.state import StateDB

        if not create and not (self.config.state_dir / "state.db").exists():
            return None
        return StateDB.open(self.config.state_dir)

    def emit(self, data: Any, table: Callable[[], str]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            text = table()
            if text:
                print(text)


# ---------------------------------------------------------------------- formatting
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _local(instant: datetime | None, tz: str) -> str:
    if instant is None:
        return "-"
    return instant.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _relative(instant: datetime | None, now: datetime) -> str:
    if instant is None:
        return ""
    delta = (instant - now).total_seconds()
    return f"in {format_duration(delta)}" if delta >= 0 else f"{format_duration(-delta)} ago"


def _wire(instant: datetime | None) -> str | None:
    from chronosd.timefmt import to_wire

    return to_wire(instant) if instant is not None else None


def _find_job(jobs: Sequence[Any], job_id: str) -> Any:
    for job in jobs:
        if job.id == job_id:
            return job
    raise UnknownJobError(f"job {job_id!r}: not in jobs.json")


# ---------------------------------------------------------------------- commands
def cmd_run(ctx: Context) -> int:
    from chronosd.daemon.supervisor import RunOptions, run_daemon
    from chronosd.log import setup_logging

    setup_logging(ctx.config.log_level)
    options = RunOptions(config_path=ctx.args.config, overrides=tuple(ctx.overrides.items()))
    return int(run_daemon(ctx.config, options))


def cmd_validate(ctx: Context) -> int:
    path = ctx.args.file or ctx.config.jobs
    try:
        jobs_file = ctx.read_jobs(path)
    except JobsFileError as exc:
        problems = getattr(exc, "problems", ())
        if not problems:
            code = 2 if getattr(exc, "unreadable", False) else 1
            if ctx.json:
                print(json.dumps({"valid": False, "errors": [str(exc)]}, indent=2))
            else:
                print(f"chronosd: {exc}", file=sys.stderr)
            return code
        errors = [p for p in problems if p.severity == "error"]
        warnings = [p for p in problems if p.severity != "error"]
        if ctx.json:
            print(
                json.dumps(
                    {
                        "valid": False,
                        "path": str(path),
                        "errors": [_problem_dict(p) for p in errors],
                        "warnings": [_problem_dict(p) for p in warnings],
                    },
                    indent=2,
                )
            )
        else:
            for p in problems:
                print(f"{path}: {p.severity}: {p}", file=sys.stderr)
            print(
                f"{path}: invalid: {len(errors)} error(s), {len(warnings)} warning(s)",
                file=sys.stderr,
            )
        return 1
    warnings = [p for p in jobs_file.problems if p.severity != "error"]
    errors = [p for p in jobs_file.problems if p.severity == "error"]
    if ctx.json:
        print(
            json.dumps(
                {
                    "valid": not errors,
                    "path": str(path),
                    "jobs": len(jobs_file.jobs),
                    "errors": [_problem_dict(p) for p in errors],
                    "warnings": [_problem_dict(p) for p in warnings],
                },
                indent=2,
            )
        )
    else:
        for p in jobs_file.problems:
            print(f"{path}: {p.severity}: {p}", file=sys.stderr)
        print(
            f"{path}: {'valid' if not errors else 'invalid jobs skipped'}: "
            f"{len(jobs_file.jobs)} job(s)"
        )
    return 1 if errors else 0


def _problem_dict(problem: Any) -> dict[str, str]:
    return {
        "job": problem.where,
        "field": problem.field,
        "message": problem.message,
        "severity": problem.severity,
    }


def _job_state_label(job: Any, js: Any) -> str:
    if not job.enabled:
        return "disabled"
    if job.paused:
        return "paused"
    if js is not None and js.completed:
        return "completed"
    return "active"


def _planned_next(job: Any, js: Any, now: datetime) -> datetime | None:
    from chronosd import planner

    if not job.active or (js is not None and js.completed):
        return None
    if js is not None and js.next_fire is not None:
        return planner.arm_instant(job, js.next_fire)
    anchor = js.anchor if js is not None else now
    nxt = planner.next_occurrence(
        job, now, anchor=anchor, runs_started=js.runs_started if js else 0
    )
    return planner.arm_instant(job, nxt) if nxt is not None else None


def cmd_list(ctx: Context) -> int:
    jobs_file = ctx.read_jobs()
    db = ctx.open_state()
    states = db.all_jobs() if db is not None else {}
    rows: list[dict[str, Any]] = []
    for job in jobs_file.jobs:
        js = states.get(job.id)
        nxt = _planned_next(job, js, ctx.now)
        armed = js is not None and js.armed_fire is not None and js.armed_confirmed_at is not None
        rows.append(
            {
                "id": job.id,
                "schedule": job.schedule_text,
                "timezone": job.timezone,
                "state": _job_state_label(job, js),
                "next_fire": _wire(nxt),
                "last_status": js.last_status if js else None,
                "armed": armed,
                "armed_fire": _wire(js.armed_fire) if js else None,
            }
        )
    if db is not None:
        db.close()

    def table() -> str:
        return _table(
            ["id", "schedule", "timezone", "state", "next fire", "", "last run", "armed"],
            [
                [
                    r["id"],
                    r["schedule"],
                    r["timezone"],
                    r["state"],
                    _local(_parse(r["next_fire"]), r["timezone"]),
                    _relative(_parse(r["next_fire"]), ctx.now),
                    r["last_status"] or "-",
                    "yes" if r["armed"] else "no",
                ]
                for r in rows
            ],
        )

    ctx.emit(rows, table)
    return 0


def _parse(text: str | None) -> datetime | None:
    from chronosd.timefmt import parse_instant

    return parse_instant(text) if text else None


def cmd_next(ctx: Context) -> int:
    from chronosd import planner
    from chronosd.timefmt import parse_instant

    jobs_file = ctx.read_jobs()
    job = _find_job(jobs_file.jobs, ctx.args.job)
    db = ctx.open_state()
    js = db.get_job(job.id) if db is not None else None
    if db is not None:
        db.close()
    try:
        after = parse_instant(ctx.args.after) if ctx.args.after else ctx.now
    except ValueError as exc:
        raise CliError(f"--after: {exc}", EXIT_USAGE) from None
    anchor = js.anchor if js is not None else ctx.now
    instants: list[datetime] = []
    cursor = after
    runs = js.runs_started if js is not None else 0
    while len(instants) < max(0, ctx.args.n):
        nxt = planner.next_occurrence(job, cursor, anchor=anchor, runs_started=runs + len(instants))
        if nxt is None:
            break
        instants.append(nxt)
        cursor = nxt
    rows = [
        {
            "local": _local(planner.arm_instant(job, i), job.timezone),
            "utc": str(_wire(planner.arm_instant(job, i))),
        }
        for i in instants
    ]
    ctx.emit(
        {"job": job.id, "schedule": job.schedule_text, "timezone": job.timezone, "next": rows},
        lambda: (
            _table([f"{job.timezone}", "utc"], [[r["local"], str(r["utc"])] for r in rows])
            if rows
            else f"{job.id}: no further fires"
        ),
    )
    return 0


def cmd_status(ctx: Context) -> int:
    from chronosd.state import owner_alive

    degraded: list[str] = []
    jobs: list[Any] = []
    jobs_valid = True
    jobs_error: str | None = None
    try:
        jobs = list(ctx.read_jobs().jobs)
    except JobsFileError as exc:
        jobs_valid = False
        jobs_error = str(exc)
        degraded.append("jobs.json is invalid")
    db = ctx.open_state()
    info: dict[str, Any] = {
        "provider": ctx.config.provider.kind,
        "jobs_file": str(ctx.config.jobs),
        "jobs_valid": jobs_valid,
        "jobs_error": jobs_error,
        "daemon": None,
        "last_reconcile_at": None,
        "last_reconcile_error": None,
        "unarmed": [],
        "running": [],
    }
    if db is not None:
        daemon = db.get_meta("daemon")
        if daemon:
            record = json.loads(daemon)
            if owner_alive(record.get("owner", "")):
                info["daemon"] = record
        info["last_reconcile_at"] = db.get_meta("last_reconcile_at")
        info["last_reconcile_error"] = db.get_meta("last_reconcile_error")
        if not jobs_error and db.get_meta("jobs_error"):
            info["jobs_error"] = db.get_meta("jobs_error")
        states = db.all_jobs()
        for job in jobs:
            js = states.get(job.id)
            if job.active and not (js is not None and js.completed):
                armed = js is not None and js.armed_fire is not None and js.armed_confirmed_at
                if not armed or (not info["daemon"] and ctx.config.provider.kind == "local"):
                    info["unarmed"].append(job.id)
        info["running"] = [
            {"job": r.job_id, "run_id": r.run_id, "pid": r.pid, "started": _wire(r.started_at)}
            for r in db.running_runs()
        ]
        db.close()
    else:
        info["unarmed"] = [j.id for j in jobs if j.active]
    if info["last_reconcile_error"]:
        degraded.append("last reconcile failed")
    if info["unarmed"]:
        degraded.append(f"{len(info['unarmed'])} job(s) not armed")
    info["healthy"] = not degraded
    info["problems"] = degraded

    def table() -> str:
        d = info["daemon"]
        lines = [
            f"provider:        {info['provider']}",
            f"daemon:          {'running, pid ' + str(d['pid']) + ' since ' + d['started'] if d else 'not running'}",
            f"jobs.json:       {info['jobs_file']} ({'valid' if jobs_valid else 'INVALID'})",
        ]
        if info["jobs_error"]:
            lines.append(f"jobs.json error: {info['jobs_error']}")
        lines.append(f"last reconcile:  {info['last_reconcile_at'] or 'never'}")
        if info["last_reconcile_error"]:
            lines.append(f"reconcile error: {info['last_reconcile_error']}")
        lines.append(f"unarmed jobs:    {', '.join(info['unarmed']) or 'none'}")
        running = ", ".join(f"{r['job']} (pid {r['pid']})" for r in info["running"])
        lines.append(f"running:         {running or 'none'}")
        lines.append(
            f"health:          {'ok' if not degraded else 'degraded: ' + '; '.join(degraded)}"
        )
        return "\n".join(lines)

    ctx.emit(info, table)
    return EXIT_OK if not degraded else EXIT_FAIL


def _job_record_from_args(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    record: dict[str, Any] = {"id": args.id}
    if args.name:
        record["name"] = args.name
    schedule = args.schedule.strip()
    if schedule.lower().startswith("in "):
        # A relative one-shot is written as the absolute instant it means now.
        seconds = parse_duration(schedule[3:])
        schedule = "at " + _wire(ctx.now + timedelta(seconds=seconds))  # type: ignore[operator]
    record["schedule"] = schedule
    if args.timezone:
        record["timezone"] = args.timezone
    if args.argv and args.shell_command:
        raise CliError("add: give either --command or an argv after --, not both", EXIT_USAGE)
    if args.argv:
        record["command"] = list(args.argv)
    elif args.shell_command:
        record["command"] = args.shell_command
    for flag in (
        "timeout",
        "misfire_grace",
        "jitter",
        "overlap",
        "repeat",
        "retries",
        "cwd",
        "catch_up",
    ):
        value = getattr(args, flag)
        if value is not None:
            record[flag] = value
    if args.env:
        env: dict[str, str] = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"add: --env {item!r} is not KEY=VALUE", EXIT_USAGE)
            env[key] = value
        record["env"] = env
    if args.paused:
        record["paused"] = True
    if args.disabled:
        record["enabled"] = False
    return record


def cmd_add(ctx: Context) -> int:
    from chronosd.jobs.file import edit_jobs_file
    from chronosd.jobs.validate import validate_job

    record = _job_record_from_args(ctx)
    job, problems = validate_job(record, 0, defaults=ctx.defaults(), now=ctx.now)
    errors = [p for p in problems if p.severity == "error"]
    if job is None or errors:
        raise CliError("add: " + "; ".join(str(p) for p in errors))

    def mutate(doc: dict[str, Any]) -> None:
        jobs = _jobs_list(doc)
        if any(isinstance(j, dict) and j.get("id") == record["id"] for j in jobs):
            raise CliError(f"add: job {record['id']!r} already exists in jobs.json")
        jobs.append(record)

    edit_jobs_file(ctx.config.jobs, mutate)
    ctx.emit({"added": record}, lambda: f"added job {record['id']} ({record['schedule']})")
    return 0


def _jobs_list(doc: dict[str, Any]) -> list[Any]:
    jobs = doc.setdefault("jobs", [])
    if not isinstance(jobs, list):
        raise JobsFileError('jobs.json: "jobs" is not a list; fix the file by hand first')
    return jobs


def cmd_edit_one(ctx: Context) -> int:
    from chronosd.jobs.file import edit_jobs_file

    action: str = ctx.args.action
    job_id: str = ctx.args.job

    def mutate(doc: dict[str, Any]) -> None:
        jobs = _jobs_list(doc)
        for index, record in enumerate(jobs):
            if isinstance(record, dict) and record.get("id") == job_id:
                if action == "remove":
                    del jobs[index]
                elif action == "pause":
                    if record.get("state") == "paused" or "state" in record:
                        record["state"] = "paused"  # a Hermes record keeps its own vocabulary
                    record["paused"] = True
                else:
                    if record.get("state") == "paused":
                        record["state"] = "scheduled"
                    record["paused"] = False
                return
        raise UnknownJobError(f"job {job_id!r}: not in jobs.json")

    edit_jobs_file(ctx.config.jobs, mutate, create=False)
    verb = {"remove": "removed", "pause": "paused", "resume": "resumed"}[action]
    ctx.emit({verb: job_id}, lambda: f"{verb} job {job_id}")
    return 0


def cmd_fire(ctx: Context) -> int:
    import anyio

    from chronosd.fire import Engine
    from chronosd.log import setup_logging
    from chronosd.state import owner_token

    setup_logging(ctx.config.log_level if ctx.args.log_level else "warning")
    jobs_file = ctx.read_jobs()
    job = _find_job(jobs_file.jobs, ctx.args.job)
    db = ctx.open_state(create=True)
    engine = Engine(config=ctx.config, db=db, owner=owner_token())
    engine.jobs = {j.id: j for j in jobs_file.jobs}

    async def main() -> str | None:
        run_id: str | None = None
        async with anyio.create_task_group() as tg:
            engine.bind(tg)
            result = engine.fire_manual(job.id)
            if result.start is not None:
                result.start()
            run_id = result.run_id
        return run_id

    try:
        run_id = anyio.run(main)
        runs = [r for r in db.runs(job.id, limit=50) if r.run_id == run_id] if run_id else []
    finally:
        db.close()
    if not runs:
        raise CliError(f"fire: job {job.id!r}: the run was not recorded")
    run = runs[0]
    try:
        sys.stdout.write(run.output_path.read_text(errors="replace"))
    except OSError:
        pass
    print(
        f"chronosd: job {job.id}: run {run.run_id} {run.status} (exit {run.exit_code})",
        file=sys.stderr,
    )
    code: int | None = run.exit_code
    if code is None:
        return EXIT_FAIL
    return code if code >= 0 else 128 - code


def cmd_runs(ctx: Context) -> int:
    db = ctx.open_state()
    runs = db.runs(ctx.args.job, limit=ctx.args.n) if db is not None else []
    if db is not None:
        db.close()
    rows = [
        {
            "run_id": r.run_id,
            "job": r.job_id,
            "occurrence": _wire(r.scheduled_at),
            "trigger": r.trigger,
            "attempt": r.attempt,
            "started": _wire(r.started_at),
            "duration": (r.ended_at - r.started_at).total_seconds() if r.ended_at else None,
            "status": r.status,
            "exit_code": r.exit_code,
        }
        for r in runs
    ]
    tz = ctx.config.timezone

    def table() -> str:
        return _table(
            ["run", "job", "occurrence", "trigger", "started", "duration", "status", "exit"],
            [
                [
                    r["run_id"],
                    r["job"],
                    _local(_parse(r["occurrence"]), tz),
                    r["trigger"],
                    _local(_parse(r["started"]), tz),
                    format_duration(r["duration"]) if r["duration"] is not None else "-",
                    r["status"] or "-",
                    "-" if r["exit_code"] is None else str(r["exit_code"]),
                ]
                for r in rows
            ],
        )

    ctx.emit(rows, table)
    return 0


def cmd_logs(ctx: Context) -> int:
    db = ctx.open_state()
    if db is None:
        raise CliError(f"logs: job {ctx.args.job!r}: no runs recorded")
    try:
        if ctx.args.run_id:
            run = db.get_run(ctx.args.run_id)
            if run is not None and run.job_id != ctx.args.job:
                run = None
        else:
            runs = db.runs(ctx.args.job, limit=1)
            run = runs[0] if runs else None
    finally:
        db.close()
    if run is None:
        raise CliError(f"logs: job {ctx.args.job!r}: no such run")
    try:
        data = run.output_path.read_bytes()
    except OSError as exc:
        raise CliError(f"logs: run {run.run_id}: output is gone ({exc.strerror})") from None
    if ctx.json:
        print(
            json.dumps(
                {"run_id": run.run_id, "job": run.job_id, "output": data.decode(errors="replace")}
            )
        )
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------- entry
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    debug = args.log_level == "debug" or os.environ.get("CHRONOSD_LOG_LEVEL") == "debug"
    try:
        ctx = Context(args)
        code: int = args.handler(ctx)
        return code
    except CliError as exc:
        print(f"chronosd: {exc}", file=sys.stderr)
        return exc.code
    except UnknownJobError as exc:
        print(f"chronosd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except ChronosError as exc:
        if debug:
            raise
        print(f"chronosd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
