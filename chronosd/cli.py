"""The command line (INTERFACE.md). Thin: parses, calls into the rooms, prints.

Errors are one line on stderr, ``chronosd: <what>: <why>``; a traceback only
with ``--log-level debug``.

``chronosd run`` is what every socket-activated wake-up executes, so its command line is read
without argparse (`_parse_run`), and argparse, the other commands' parsers and the rooms they
come from (the reference NAS, systemd installation) are loaded only for any other command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NoReturn

from chronosd import __version__
from chronosd.config import Config, load_config
from chronosd.durations import format_duration, parse_duration
from chronosd.errors import ChronosError, DurationError, JobsFileError, UnknownJobError
from chronosd.gcpause import collection_paused, end_startup_pause
from chronosd.methodcache import generated_methods_cached

if TYPE_CHECKING:
    import argparse

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class CliError(ChronosError):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------- parsing
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse with the one-line error format of INTERFACE.md (and no usage dump).

    Made on demand so that importing this module does not import argparse.
    """
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            what = self.prog.removeprefix("chronosd").strip() or "usage"
            self.exit(
                EXIT_USAGE,
                f"chronosd: {what}: {_one_line(message)}; see {self.prog} --help\n",
            )

    return _Parser


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    import argparse

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
    parser = _parser_class()(prog="chronosd", description="A scale-to-zero cron daemon.")
    parser.add_argument("--version", action="version", version=f"chronosd {__version__}")
    add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, **kwargs)
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
    p.add_argument("-n", type=_positive_int, default=5, metavar="N")
    p.add_argument(
        "--after", metavar="ISO", help="start after this instant (naive: in the job's zone)"
    )
    p.set_defaults(handler=cmd_next)

    p = command("status", "daemon-level view: provider, reconcile, unarmed jobs, jobs.json")
    p.set_defaults(handler=cmd_status)

    p = command(
        "add",
        "add a job to jobs.json",
        usage="chronosd add ID --schedule S (--command STRING | -- ARGV...) [options]",
        epilog="Everything after -- is the job's command as an argv list (no shell).",
    )
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
    # The argv after "--" is split off in main(): argparse would swallow it as an
    # empty nargs="*" positional right after ID and then reject the rest.
    p.set_defaults(handler=cmd_add, argv=[])

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
    p.add_argument("-n", type=_positive_int, default=20, metavar="N")
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
    from chronosd.install import register as register_systemd

    register_systemd(sub, command)


# ---------------------------------------------------------------------- context
class Context:
    def __init__(self, args: argparse.Namespace | SimpleNamespace) -> None:
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

    def read_jobs(self, path: Path | None = None, *, check_owner: bool = True) -> Any:
        from chronosd.jobs.file import read_jobs_file

        db = self.open_state()
        known = {}
        if db is not None:
            try:
                known = {job_id: js.schedule_key for job_id, js in db.all_jobs().items()}
            finally:
                db.close()
        return read_jobs_file(
            path or self.config.jobs,
            defaults=self.defaults(),
            now=self.now,
            check_owner=check_owner,
            on_invalid_job=self.config.on_invalid_job,
            known_schedules=known,
        )

    def open_state(self, *, create: bool = False) -> Any:
        """The state database, or None when there is none yet (and create is False).

        Without ``create`` this is a view: it never creates the state directory and
        opens read-only, so ``chronosd list`` works for a user who may read but not
        write the daemon's state. An older schema (not migrated yet) is opened
        read-write, which migrates it, as the daemon would.
        """
        from chronosd.errors import StateError
        from chronosd.state import StateDB

        if create:
            return StateDB.open(self.config.state_dir)
        if not (self.config.state_dir / "state.db").exists():
            return None
        try:
            return StateDB.open(self.config.state_dir, read_only=True)
        except StateError as read_only_error:
            try:
                return StateDB.open(self.config.state_dir)
            except StateError:
                raise read_only_error from None

    def emit(self, data: Any, table: Callable[[], str]) -> None:
        if self.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            text = table()
            if text:
                print(text)


# ---------------------------------------------------------------------- formatting
def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned table with upper-case headers (the people's output of every listing)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _local(instant: datetime | None, tz: str) -> str:
    from zoneinfo import ZoneInfo

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
    raise UnknownJobError(f"job {job_id!r}: not in jobs.json; chronosd list shows its jobs")


# ---------------------------------------------------------------------- commands
def cmd_run(ctx: Context) -> int:
    # Loading the daemon creates some thirty thousand objects that live as long as the
    # process; the collector would walk them some sixty times before a socket-activated start
    # answers its first fire (10-40 ms measured).
    # The dataclasses those modules make are compiled once and then read from the state
    # directory (chronosd.methodcache).
    with (
        collection_paused(freeze=True),
        generated_methods_cached(ctx.config.state_dir) as methods,
    ):
        # The first things anyio.run loads, loaded here to fall inside the window too.
        import asyncio  # noqa: F401

        with contextlib.suppress(ImportError):
            import anyio._backends._asyncio  # noqa: F401

        from chronosd.daemon.supervisor import RunOptions, run_daemon
        from chronosd.log import setup_logging

    setup_logging(ctx.config.log_level)
    options = RunOptions(config_path=ctx.args.config, overrides=tuple(ctx.overrides.items()))
    try:
        return int(run_daemon(ctx.config, options))
    finally:
        methods.save()  # new code for the next start (the state directory exists by now)


def cmd_validate(ctx: Context) -> int:
    path: Path = ctx.args.file or ctx.config.jobs
    # Mode and owner matter for the file chronosd runs; any other file is checked
    # for its content only (e.g. a draft before it is installed).
    check_owner = ctx.args.file is None or os.path.realpath(ctx.args.file) == os.path.realpath(
        ctx.config.jobs
    )
    try:
        jobs_file = ctx.read_jobs(path, check_owner=check_owner)
    except JobsFileError as exc:
        problems = getattr(exc, "problems", ())
        if not problems:
            code = 2 if getattr(exc, "unreadable", False) else 1
            if ctx.json:
                error = {"job": "", "field": "", "message": str(exc), "severity": "error"}
                print(
                    json.dumps(
                        {"valid": False, "path": str(path), "errors": [error], "warnings": []},
                        indent=2,
                    )
                )
            print(f"chronosd: {_one_line(str(exc))}", file=sys.stderr)
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


def _live_daemon(db: Any) -> dict[str, Any] | None:
    """The daemon's record in state.db while that process is alive, else None."""
    from chronosd.state import owner_alive

    raw = db.get_meta("daemon")
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if isinstance(record, dict) and owner_alive(str(record.get("owner", ""))):
        return record
    return None


def _is_armed(js: Any, *, timers_alive: bool) -> bool:
    # A confirmed arm of the local provider is a timer inside the daemon: it is
    # gone when the daemon is; a NAS arm outlives us.
    return (
        timers_alive
        and js is not None
        and js.armed_fire is not None
        and js.armed_confirmed_at is not None
    )


def cmd_list(ctx: Context) -> int:
    jobs_file = ctx.read_jobs()
    db = ctx.open_state()
    states: dict[str, Any] = {}
    daemon = None
    if db is not None:
        try:
            states = db.all_jobs()
            daemon = _live_daemon(db)
        finally:
            db.close()
    timers_alive = daemon is not None or ctx.config.provider.kind != "local"
    rows: list[dict[str, Any]] = []
    for job in jobs_file.jobs:
        js = states.get(job.id)
        nxt = _planned_next(job, js, ctx.now)
        rows.append(
            {
                "id": job.id,
                "schedule": job.schedule_text,
                "timezone": job.timezone,
                "state": _job_state_label(job, js),
                "next_fire": _wire(nxt),
                "next_fire_local": _local(nxt, job.timezone) if nxt is not None else None,
                "next_fire_relative": _relative(nxt, ctx.now) if nxt is not None else None,
                "last_status": js.last_status if js else None,
                "armed": _is_armed(js, timers_alive=timers_alive),
                "armed_fire": _wire(js.armed_fire) if js else None,
            }
        )

    def table() -> str:
        return format_table(
            ["id", "schedule", "timezone", "state", "next fire", "", "last run", "armed"],
            [
                [
                    r["id"],
                    r["schedule"],
                    r["timezone"],
                    r["state"],
                    r["next_fire_local"] or "-",
                    r["next_fire_relative"] or "",
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


def _after_instant(text: str, timezone: str) -> datetime:
    """``--after``: an ISO-8601 instant; without an offset it is read in the job's zone."""
    from zoneinfo import ZoneInfo

    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CliError(
            f"next: --after {text!r}: not an ISO-8601 time; write e.g. 2026-03-28T00:00:00Z",
            EXIT_USAGE,
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo(timezone))
    return value.astimezone(UTC)


def cmd_next(ctx: Context) -> int:
    from zoneinfo import ZoneInfo

    from chronosd import planner

    jobs_file = ctx.read_jobs()
    job = _find_job(jobs_file.jobs, ctx.args.job)
    db = ctx.open_state()
    js = None
    if db is not None:
        try:
            js = db.get_job(job.id)
        finally:
            db.close()
    after = _after_instant(ctx.args.after, job.timezone) if ctx.args.after else ctx.now
    anchor = js.anchor if js is not None else ctx.now
    instants: list[datetime] = []
    cursor = after
    runs = js.runs_started if js is not None else 0
    while len(instants) < ctx.args.n:
        nxt = planner.next_occurrence(job, cursor, anchor=anchor, runs_started=runs + len(instants))
        if nxt is None:
            break
        instants.append(nxt)
        cursor = nxt
    fires = [planner.arm_instant(job, i) for i in instants]
    rows = [
        {
            "job": job.id,
            "timezone": job.timezone,
            "local": _local(fire, job.timezone),
            "local_iso": fire.astimezone(ZoneInfo(job.timezone)).isoformat(),
            "utc": str(_wire(fire)),
        }
        for fire in fires
    ]
    ctx.emit(
        rows,
        lambda: (
            format_table([f"{job.timezone}", "utc"], [[r["local"], str(r["utc"])] for r in rows])
            if rows
            else f"{job.id}: no further fires"
        ),
    )
    return 0


def cmd_status(ctx: Context) -> int:
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
        try:
            info["daemon"] = _live_daemon(db)
            info["last_reconcile_at"] = db.get_meta("last_reconcile_at")
            info["last_reconcile_error"] = db.get_meta("last_reconcile_error")
            if not jobs_error and db.get_meta("jobs_error"):
                info["jobs_error"] = db.get_meta("jobs_error")
            states = db.all_jobs()
            timers_alive = info["daemon"] is not None or ctx.config.provider.kind != "local"
            for job in jobs:
                js = states.get(job.id)
                wanted = job.active and not (js is not None and js.completed)
                if wanted and not _is_armed(js, timers_alive=timers_alive):
                    info["unarmed"].append(job.id)
            info["running"] = [
                {"job": r.job_id, "run_id": r.run_id, "pid": r.pid, "started": _wire(r.started_at)}
                for r in db.running_runs()
            ]
        finally:
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
        daemon = f"running, pid {d.get('pid')} since {d.get('started')}" if d else "not running"
        lines = [
            f"provider:        {info['provider']}",
            f"daemon:          {daemon}",
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
    from chronosd.timefmt import to_wire

    args = ctx.args
    record: dict[str, Any] = {"id": args.id}
    if args.name:
        record["name"] = args.name
    schedule = args.schedule.strip()
    if schedule.lower().startswith("in "):
        # A relative one-shot is written as the absolute instant it means now:
        # "in" counts from when chronosd first sees the job, which is not now.
        try:
            seconds = parse_duration(schedule[3:])
        except DurationError as exc:
            raise CliError(f"add: job {args.id}: schedule: {schedule!r}: {exc}") from None
        if seconds <= 0:
            raise CliError(
                f"add: job {args.id}: schedule: {schedule!r} is not in the future; "
                "give a positive duration such as in 10m"
            )
        schedule = "at " + to_wire(ctx.now + timedelta(seconds=seconds))
    record["schedule"] = schedule
    if args.timezone:
        record["timezone"] = args.timezone
    if args.argv and args.shell_command:
        raise CliError(f"add: job {args.id}: give either --command or an argv after --, not both")
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
                raise CliError(f"add: job {args.id}: --env {item!r} is not KEY=VALUE")
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
    for problem in problems:
        print(f"chronosd: add: warning: {problem}", file=sys.stderr)

    def mutate(doc: dict[str, Any]) -> None:
        jobs = _jobs_list(doc)
        if any(isinstance(j, dict) and j.get("id") == record["id"] for j in jobs):
            raise CliError(
                f"add: job {record['id']}: already in jobs.json; choose another id "
                "or remove the existing job first"
            )
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
        raise UnknownJobError(f"job {job_id!r}: not in jobs.json; chronosd list shows its jobs")

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
        output = run.output_path.read_bytes()
    except OSError:
        output = b""
    code: int | None = run.exit_code
    # A signal (negative exit code) maps to 128+N as in a shell; no exit code at
    # all (spawn error) is a plain failure.
    status = EXIT_FAIL if code is None else (code if code >= 0 else 128 - code)
    if ctx.json:
        print(json.dumps({**_run_dict(run), "output": output.decode(errors="replace")}, indent=2))
    else:
        sys.stdout.buffer.write(output)
        sys.stdout.flush()
        print(
            f"chronosd: job {job.id}: run {run.run_id} {run.status} (exit {run.exit_code})",
            file=sys.stderr,
        )
    return status


def _run_dict(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job": run.job_id,
        "occurrence": _wire(run.scheduled_at),
        "trigger": run.trigger,
        "attempt": run.attempt,
        "started": _wire(run.started_at),
        "duration": (run.ended_at - run.started_at).total_seconds() if run.ended_at else None,
        "status": run.status,
        "exit_code": run.exit_code,
    }


def cmd_runs(ctx: Context) -> int:
    db = ctx.open_state()
    runs = []
    if db is not None:
        try:
            runs = db.runs(ctx.args.job, limit=ctx.args.n)
        finally:
            db.close()
    rows = [_run_dict(r) for r in runs]
    tz = ctx.config.timezone

    def table() -> str:
        return format_table(
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
    job_id: str = ctx.args.job
    run_id: str | None = ctx.args.run_id
    db = ctx.open_state()
    run = None
    if db is not None:
        try:
            if run_id:
                run = db.get_run(run_id)
                if run is not None and run.job_id != job_id:
                    run = None
            else:
                runs = db.runs(job_id, limit=1)
                run = runs[0] if runs else None
        finally:
            db.close()
    if run is None:
        if run_id:
            raise CliError(
                f"logs: job {job_id}: no run {run_id}; chronosd runs {job_id} lists its runs"
            )
        raise CliError(f"logs: job {job_id}: no runs recorded; chronosd fire {job_id} runs it now")
    try:
        data = run.output_path.read_bytes()
    except FileNotFoundError as exc:
        # A run whose process never started (claimed and not started yet, or interrupted
        # before it started) has no log yet: the runner creates it. That output is empty.
        if run.pid is not None:
            raise CliError(
                f"logs: job {job_id}: run {run.run_id}: its output is gone ({exc.strerror})"
            ) from None
        data = b""
    except OSError as exc:
        raise CliError(
            f"logs: job {job_id}: run {run.run_id}: its output is gone ({exc.strerror})"
        ) from None
    if ctx.json:
        print(json.dumps({**_run_dict(run), "output": data.decode(errors="replace")}, indent=2))
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------- entry
def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split the command line at the first ``--``: options, then a job's argv."""
    args = list(argv)
    if "--" in args:
        at = args.index("--")
        return args[:at], args[at + 1 :]
    return args, []


def _command_name(args: argparse.Namespace | SimpleNamespace) -> str:
    return (
        " ".join(name for name in (args.command, getattr(args, "nas_command", None)) if name)
        or "chronosd"
    )


# The options `chronosd [GLOBAL...] run [GLOBAL|RUN...]` takes, by flag: (attribute, choices).
_GLOBAL_VALUE_OPTIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "--config": ("config", None),
    "--jobs": ("jobs", None),
    "--state-dir": ("state_dir", None),
    "--log-level": ("log_level", ("debug", "info", "warning", "error")),
}
_RUN_VALUE_OPTIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "--listen": ("listen", None),
    "--provider": ("provider", ("local", "nas")),
    "--idle-exit": ("idle_exit", None),
}
_PATH_OPTIONS = frozenset({"config", "jobs", "state_dir"})


def _parse_run(arguments: Sequence[str]) -> SimpleNamespace | None:
    """The arguments of a plain ``chronosd run``, as `build_parser` would parse them.

    None for anything else or anything unusual (another command, --help, an abbreviated,
    repeated-value or unknown option, a value that starts with "-", a choice not on the list,
    ``--``): argparse then parses it and words any error exactly as before.
    """
    values: dict[str, Any] = {
        "config": None,
        "jobs": None,
        "state_dir": None,
        "json": None,
        "log_level": None,
        "listen": None,
        "provider": None,
        "idle_exit": None,
    }
    seen_run = False
    position = 0
    while position < len(arguments):
        token = arguments[position]
        position += 1
        if token == "run" and not seen_run:
            seen_run = True
            continue
        if token == "--json":
            values["json"] = True
            continue
        flag, has_value, value = token.partition("=")
        option = _GLOBAL_VALUE_OPTIONS.get(flag) or (
            _RUN_VALUE_OPTIONS.get(flag) if seen_run else None
        )
        if option is None:
            return None
        if not has_value:
            if position == len(arguments):
                return None
            value = arguments[position]
            position += 1
        attribute, choices = option
        if not value or value.startswith("-") or (choices is not None and value not in choices):
            return None
        values[attribute] = Path(value) if attribute in _PATH_OPTIONS else value
    if not seen_run:
        return None
    return SimpleNamespace(**values, command="run", handler=cmd_run)


def _parse_any(arguments: Sequence[str]) -> argparse.Namespace | int:
    """Any command line, with the full parser: the arguments, or the exit status of a refusal."""
    parser = build_parser()
    options, job_argv = _split_argv(arguments)
    args, extra = parser.parse_known_args(options)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = _command_name(args)
    if extra or (job_argv and args.handler is not cmd_add):
        unknown = " ".join(extra + (["--", *job_argv] if args.handler is not cmd_add else []))
        hint = f"see chronosd {command} --help"
        print(f"chronosd: {command}: unrecognized arguments: {unknown}; {hint}", file=sys.stderr)
        return EXIT_USAGE
    if args.handler is cmd_add:
        args.argv = job_argv
    return args


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | SimpleNamespace
    fast = _parse_run(arguments)
    if fast is not None:
        args = fast  # the daemon ends the start-up pause once the request that woke it is out
    else:
        end_startup_pause()  # any other command (argparse may exit from here: --help)
        parsed = _parse_any(arguments)
        if isinstance(parsed, int):
            return parsed
        args = parsed
    command = _command_name(args)
    debug = args.log_level == "debug" or os.environ.get("CHRONOSD_LOG_LEVEL") == "debug"
    try:
        ctx = Context(args)
        code: int = args.handler(ctx)
        return code
    except CliError as exc:
        print(f"chronosd: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except ChronosError as exc:
        if debug:
            raise
        print(f"chronosd: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:
        if debug:
            raise
        # Not one of ours: still one line, with the way to the traceback.
        print(
            f"chronosd: {command}: unexpected {type(exc).__name__}: {_one_line(str(exc))}; "
            "run with --log-level debug for the traceback",
            file=sys.stderr,
        )
        return EXIT_FAIL


def _silence_stdout() -> None:
    # The reader went away (chronosd list | head): point stdout at /dev/null so
    # the interpreter's final flush does not print a BrokenPipeError of its own.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
