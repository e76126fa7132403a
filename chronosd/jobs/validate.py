"""Validate a parsed jobs.json document into Job values (DESIGN.md 3.1).

Pure: no I/O and no clock reads (``now`` is passed in). Every finding is a
Problem that names the job (its id, or ``jobs[3]`` when the id is missing or
invalid) and the field, and says how to fix it; all findings of a document are
collected, never only the first.

Document shape: a JSON object with a ``"jobs"`` list. A bare top-level list is
refused with a hint to wrap it, so that every file has one shape that the CLI
can edit in place. ``null`` in an optional field means "use the default".
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from chronosd.durations import format_duration, parse_duration
from chronosd.errors import DurationError, ScheduleError
from chronosd.jobs import hermes
from chronosd.jobs.model import OVERLAPS, Job, Overlap, Problem
from chronosd.jobs.schedule import (
    Schedule,
    default_misfire_grace,
    parse_schedule,
    validate_timezone,
)

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_RETRIES = 100
# state.db stores counts as SQLite integers; a bound far below 2**63 keeps arithmetic safe.
MAX_REPEAT = 2**31 - 1
MAX_SCHEDULE_CHARS = 256
_NOTHING_KNOWN: Mapping[str, str] = MappingProxyType({})

KNOWN_FIELDS = (
    "id",
    "name",
    "schedule",
    "timezone",
    "command",
    "enabled",
    "paused",
    "timeout",
    "overlap",
    "catch_up",
    "misfire_grace",
    "jitter",
    "repeat",
    "retries",
    "env",
    "cwd",
)
_KNOWN = frozenset(KNOWN_FIELDS)

# Fields compared by changed_fields(), in the order of the model.
COMPARED_FIELDS = tuple(name for name in KNOWN_FIELDS if name != "id")


@dataclass(frozen=True)
class JobDefaults:
    """Config values that fill fields a job leaves out."""

    timezone: str = "UTC"
    timeout: float = 3600.0


@dataclass(frozen=True)
class Validated:
    """The valid jobs of a document and every problem found in it.

    ``fatal`` holds the errors that invalidate the whole document even when
    the config says ``on_invalid_job = "skip"`` (top-level shape, duplicate
    ids); they are part of ``problems`` too.
    """

    jobs: tuple[Job, ...]
    problems: tuple[Problem, ...]
    fatal: tuple[Problem, ...] = ()
    # The results of this document's records, when validate_document was given a memo.
    memo: ValidationMemo | None = field(default=None, compare=False, repr=False)

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not any(p.severity == "error" for p in self.problems)


def validate_document(
    doc: object,
    *,
    defaults: JobDefaults,
    now: datetime,
    known_schedules: Mapping[str, str] = _NOTHING_KNOWN,
    memo: ValidationMemo | None = None,
) -> Validated:
    """Validate a parsed jobs.json document; collect every problem.

    ``known_schedules`` maps job ids to the schedule_key chronosd already
    planned (state.db). An ``at`` time in the past is an error only for a job
    whose schedule is new: a one-shot chronosd has already seen and then fired,
    or missed while down, stays in the file, and the catch-up rule decides it.

    With a ``memo`` (see ValidationMemo) a record found in it is not checked
    again, and the result carries a new memo holding this document's records.
    """
    if isinstance(doc, list):
        fatal = Problem(
            "",
            "",
            'the top level is a list; wrap it in an object: {"jobs": [ ... ]}',
        )
        return Validated((), (fatal,), (fatal,))
    if not isinstance(doc, dict):
        fatal = Problem(
            "",
            "",
            f'the top level is {_json_type(doc)}; write an object: {{"jobs": [ ... ]}}',
        )
        return Validated((), (fatal,), (fatal,))
    problems: list[Problem] = []
    fatal_problems: list[Problem] = []
    for key in doc:
        if key != "jobs" and key not in hermes.TOP_LEVEL_KEYS:
            problems.append(
                Problem("", key, f'unknown top-level field "{key}" is ignored', "warning")
            )
    if "jobs" not in doc:
        fatal = Problem("", "jobs", 'the "jobs" list is missing; write {"jobs": [ ... ]}')
        return Validated((), (fatal, *problems), (fatal,))
    records = doc["jobs"]
    if not isinstance(records, list):
        fatal = Problem(
            "",
            "jobs",
            f'"jobs" is {_json_type(records)}; it must be a list of job objects',
        )
        return Validated((), (fatal, *problems), (fatal,))

    ids = [_record_id(record) for record in records]
    counts = Counter(record_id for record_id in ids if record_id is not None)
    jobs: list[Job] = []
    first_index: dict[str, int] = {}
    remembered = memo if memo is not None and memo.defaults == defaults else None
    renewed = ValidationMemo(defaults) if memo is not None else None
    complete = True  # every record's result is in the renewed memo
    for index, (record, record_id) in enumerate(zip(records, ids, strict=True)):
        key = None if renewed is None or record_id is None else _memo_key(record)
        entry = None if key is None or remembered is None else remembered.lookup(key, record)
        if entry is None:
            job, job_problems, timeless = _validate_record(
                record, index, defaults=defaults, now=now, known_schedules=known_schedules
            )
            if key is not None and renewed is not None and timeless:
                complete = renewed.remember(key, job, job_problems) and complete
            else:
                complete = False
        else:
            assert key is not None and renewed is not None and remembered is not None
            renewed.adopt(key, remembered)
            job, job_problems = entry[0], list(entry[1])
        if record_id is not None and counts[record_id] > 1:
            # The id alone does not say which of the twins a finding is about.
            where = f"{record_id} (jobs[{index}])"
            job_problems = [replace(p, where=where) for p in job_problems]
        problems.extend(job_problems)
        if record_id is None:
            if job is not None:
                jobs.append(job)
            continue
        if record_id in first_index:
            duplicate = Problem(
                f"{record_id} (jobs[{index}])",
                "id",
                f'jobs[{first_index[record_id]}] uses "{record_id}" too; give every job its own id',
            )
            problems.append(duplicate)
            fatal_problems.append(duplicate)
            continue
        first_index[record_id] = index
        if job is not None:
            jobs.append(job)
    if renewed is not None:
        renewed.complete = complete
    return Validated(tuple(jobs), tuple(problems), tuple(fatal_problems), renewed)


def validate_job(
    record: object,
    index: int,
    *,
    defaults: JobDefaults,
    now: datetime,
    known_schedules: Mapping[str, str] = _NOTHING_KNOWN,
) -> tuple[Job | None, list[Problem]]:
    """Validate one record; return the Job (None if any error) and its problems.

    ``known_schedules`` as for validate_document.
    """
    job, problems, _ = _validate_record(
        record, index, defaults=defaults, now=now, known_schedules=known_schedules
    )
    return job, problems


def validate_record(
    record: object,
    index: int,
    *,
    defaults: JobDefaults,
    now: datetime,
    known_schedules: Mapping[str, str] = _NOTHING_KNOWN,
) -> tuple[Job | None, list[Problem], bool]:
    """validate_job, and whether the result depends on the record and defaults alone (it
    consulted neither the time nor state.db, and is not a one-shot at a fixed time)."""
    job, problems, timeless = _validate_record(
        record, index, defaults=defaults, now=now, known_schedules=known_schedules
    )
    return job, problems, timeless and (job is None or job.schedule.at is None)


def _validate_record(
    record: object,
    index: int,
    *,
    defaults: JobDefaults,
    now: datetime,
    known_schedules: Mapping[str, str],
) -> tuple[Job | None, list[Problem], bool]:
    """validate_job, and whether its result depends on nothing but the record and defaults."""
    if not isinstance(record, dict):
        return (
            None,
            [
                Problem(
                    f"jobs[{index}]",
                    "",
                    f'is {_json_type(record)}; each job must be an object such as {{"id": ...}}',
                )
            ],
            False,
        )
    check = _Checker(record, index)
    job = check.run(defaults, now, known_schedules)
    return job, check.problems, not check.consulted_time


def spec_hash(job: Job) -> str:
    """Stable hash of the fields that define a job's behaviour.

    Form: ``<schedule_key>:<sha256 hex>``. The prefix lets a diff against hashes
    stored in state.db tell whether the schedule changed (which re-anchors the
    job) without the old Job. Computed from the validated values, so defaults
    are applied and key order, spelling of durations (``"1h"`` vs ``3600``),
    ``name`` and unknown keys do not change it.
    """
    return _digest(_spec(job), job.schedule.kind)


def schedule_key(job: Job) -> str:
    """Hash of the schedule as it decides fire times; a change re-anchors the job.

    Built from the parser's canonical text, so spelling (``every 90s`` vs
    ``every 1m30s``, ``MON`` vs ``mon``, spacing) does not count. The time zone
    counts for cron only: ``every`` and ``in`` are elapsed time, and an ``at``
    text is already the resolved UTC instant (a naive ``at`` moves when the
    zone changes, and so does its text).
    """
    return _schedule_key(job.schedule.text, job.timezone, job.schedule.kind)


def changed_fields(old: Job, new: Job) -> tuple[str, ...]:
    """Names of the fields (including ``name``) whose values differ, in model order."""
    old_spec = _spec(old)
    new_spec = _spec(new)
    changed: list[str] = []
    for field_name in COMPARED_FIELDS:
        if field_name == "name":
            differs = old.name != new.name
        else:
            differs = old_spec[field_name] != new_spec[field_name]
        if differs:
            changed.append(field_name)
    return tuple(changed)


def _schedule_key(canonical: str, timezone: str, kind: str) -> str:
    # An "at" text already holds the resolved UTC instant, so only cron needs the zone.
    zone = timezone if kind == "cron" else ""
    # Canonical schedule text holds no newline, so the join is unambiguous.
    return hashlib.sha256(f"{canonical}\n{zone}".encode()).hexdigest()[:16]


def _digest(spec: dict[str, Any], kind: str) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    body = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{_schedule_key(spec['schedule'], spec['timezone'], kind)}:{body}"


def _spec(job: Job) -> dict[str, Any]:
    return _spec_values(
        schedule=job.schedule,
        timezone=job.timezone,
        command=job.command,
        enabled=job.enabled,
        paused=job.paused,
        timeout=job.timeout,
        overlap=job.overlap,
        catch_up=job.catch_up,
        misfire_grace=job.misfire_grace,
        jitter=job.jitter,
        repeat=job.repeat,
        retries=job.retries,
        env=job.env,
        cwd=job.cwd,
    )


def _spec_values(
    *,
    schedule: Schedule,
    timezone: str,
    command: tuple[str, ...] | str | None,
    enabled: bool,
    paused: bool,
    timeout: float,
    overlap: str,
    catch_up: bool,
    misfire_grace: float | None,
    jitter: float,
    repeat: int | None,
    retries: int,
    env: Mapping[str, str],
    cwd: str | None,
) -> dict[str, Any]:
    """The canonical form hashed by spec_hash; changing it changes every stored hash."""
    spelled: object
    if command is None:
        spelled = None
    elif isinstance(command, str):
        spelled = {"shell": command}
    else:
        spelled = {"argv": list(command)}
    return {
        # The parser's canonical text: "every 90s" = "every 1m30s", "@daily" = "0 0 * * *".
        "schedule": schedule.text,
        "timezone": timezone,
        "command": spelled,
        "enabled": enabled,
        "paused": paused,
        "timeout": float(timeout),
        "overlap": overlap,
        "catch_up": catch_up,
        "misfire_grace": None if misfire_grace is None else float(misfire_grace),
        "jitter": float(jitter),
        "repeat": repeat,
        "retries": retries,
        "env": dict(sorted(env.items())),
        "cwd": cwd,
    }


# -- the validation memo ---------------------------------------------------------------------

MEMO_FORMAT = 1
_JOB_FIELDS = tuple(f.name for f in fields(Job))
_SCHEDULE_FIELDS = tuple(f.name for f in fields(Schedule))
_MemoEntry = tuple[Job | None, tuple[Problem, ...]]
# Bad stored data surfaces as one of these while an entry is rebuilt; the record is then
# validated as if it had not been stored.
_DECODE_ERRORS = (TypeError, ValueError, KeyError, IndexError, AttributeError, ScheduleError)


class ValidationMemo:
    """Results of earlier validations by record, so that an unchanged record is not checked again.

    A record's result (its Job, or None, and its problems) is a function of the
    record and the defaults, except where a check consults the time or
    state.db (an ``at`` schedule, a jitter measured against a cron period):
    such records are checked every time and never remembered. A record with no
    valid id is never remembered either (its problems name its position).

    The key is ``repr`` of the parsed record, which tells ``true`` from ``1``
    and ``1`` from ``1.0`` where dict equality does not. ``dumps``/``loads``
    give the daemon a form to keep in state.db: it is checksummed and stamped
    with the code that made it, and anything that does not match (another
    chronosd, other defaults, a damaged text) loads as an empty memo, so the
    cost of a bad memo is a full validation, never a different result.
    """

    def __init__(self, defaults: JobDefaults) -> None:
        self.defaults = defaults
        self.digest: str | None = None  # sha256 of the jobs.json these results came from
        # Whether every record of that file has its result here: then validating the same
        # file again cannot come out differently (nothing in it consults the time or state).
        self.complete = False
        self._entries: dict[str, _MemoEntry] = {}
        # Stored forms (from loads()), rebuilt into entries on first use. adopt() does not
        # carry them along: a daemon keeps the memo, and 10,000 of them are ~10 MB.
        self._stored: dict[str, Any] = {}
        self._zones: set[str] = set()  # zone names found valid while rebuilding entries

    def __len__(self) -> int:
        return len(self._entries.keys() | self._stored.keys())

    def lookup(self, key: str, record: dict[str, Any]) -> _MemoEntry | None:
        """The remembered result for the record with this key (``record`` becomes Job.record)."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        # Taken out as it is rebuilt, so the stored forms are freed as the load goes on.
        stored = self._stored.pop(key, None)
        if stored is None:
            return None
        try:
            entry = _decode_entry(stored, record, self._zones)
        except _DECODE_ERRORS:
            return None
        self._entries[key] = entry
        return entry

    def remember(self, key: str, job: Job | None, problems: list[Problem]) -> bool:
        """Keep a fresh result (one that consulted no time; see _Checker.consulted_time).

        Returns whether it was kept (an ``at`` schedule never is).
        """
        if job is not None and job.schedule.at is not None:
            return False
        self._entries[key] = (job, tuple(problems))
        self._stored.pop(key, None)
        return True

    def adopt(self, key: str, source: ValidationMemo) -> None:
        """Take over the entry ``source.lookup`` just returned for ``key``."""
        self._entries[key] = source._entries[key]
        self._zones = source._zones

    def dumps(self) -> str:
        """This memo as text for loads(): a sha256 line, then JSON."""
        encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        # Entry by entry, so that no second copy of the whole memo exists as Python lists.
        parts = [f"{encode(key)}:{encode(stored)}" for key, stored in self._stored.items()]
        parts.extend(
            f"{encode(key)}:{encode(_encode_entry(job, problems))}"
            for key, (job, problems) in self._entries.items()
            if key not in self._stored
        )
        head = {"stamp": memo_stamp(self.defaults), "digest": self.digest}
        body = f'{encode(head)[:-1]},"entries":{{{",".join(parts)}}}}}'
        return f"{hashlib.sha256(body.encode()).hexdigest()}\n{body}"

    @classmethod
    def loads(cls, text: str | None, defaults: JobDefaults) -> ValidationMemo:
        """A memo from dumps() text; an empty one when the text is missing, damaged or stale."""
        memo = cls(defaults)
        if not text:
            return memo
        checksum, newline, body = text.partition("\n")
        try:
            if not newline or hashlib.sha256(body.encode()).hexdigest() != checksum:
                return memo
            data = json.loads(body)
            if data["stamp"] != memo_stamp(defaults):
                return memo
            digest, entries = data["digest"], data["entries"]
        except (ValueError, TypeError, KeyError, UnicodeError, RecursionError):
            return memo
        if isinstance(entries, dict) and (digest is None or isinstance(digest, str)):
            memo._stored = entries
            memo.digest = digest
        return memo


def _memo_key(record: object) -> str | None:
    try:
        return repr(record)
    except (ValueError, RecursionError):  # an int past the digit limit, deep nesting
        return None


def memo_stamp(defaults: JobDefaults) -> list[Any]:
    """What a stored result depends on besides the record: format, defaults, the checking code."""
    from chronosd import durations
    from chronosd.jobs import model, schedule

    code: list[Any] = []
    for module_file in (
        __file__,
        schedule.__file__,
        hermes.__file__,
        model.__file__,
        durations.__file__,
    ):
        try:
            info = os.stat(module_file)
        except (OSError, TypeError):
            code.append(None)
        else:
            code.append([info.st_size, info.st_mtime_ns])
    return [
        MEMO_FORMAT,
        list(_JOB_FIELDS),
        list(_SCHEDULE_FIELDS),
        defaults.timezone,
        defaults.timeout,
        code,
    ]


def _encode_entry(job: Job | None, problems: tuple[Problem, ...]) -> list[Any]:
    found = [[p.where, p.field, p.message, p.severity] for p in problems]
    if job is None:
        return [None, found]
    schedule = job.schedule
    command = list(job.command) if isinstance(job.command, tuple) else job.command
    return [
        [
            job.id,
            job.schedule_text,
            [
                schedule.kind,
                schedule.text,
                schedule.timezone,
                schedule.cron,
                schedule.fixed_time,
                schedule.interval,
            ],
            job.timezone,
            command,
            job.name,
            job.enabled,
            job.paused,
            job.timeout,
            job.overlap,
            job.catch_up,
            job.misfire_grace,
            job.jitter,
            job.repeat,
            job.retries,
            dict(job.env),
            job.cwd,
            job.spec_hash,
        ],
        found,
    ]


def _decode_entry(stored: Any, record: dict[str, Any], valid_zones: set[str]) -> _MemoEntry:
    values, found = stored
    problems = tuple(_decode_problem(*item) for item in found) if found else ()
    if values is None:
        return None, problems
    (
        job_id,
        schedule_text,
        schedule_values,
        timezone,
        command,
        name,
        enabled,
        paused,
        timeout,
        overlap,
        catch_up,
        misfire_grace,
        jitter,
        repeat,
        retries,
        env,
        cwd,
        job_spec_hash,
    ) = values
    kind, text, schedule_zone, cron, fixed_time, interval = schedule_values
    if kind not in ("cron", "every", "in") or overlap not in OVERLAPS:
        raise ValueError("not a stored job")
    if record.get("id") != job_id or not isinstance(env, dict):
        raise ValueError("not this record's job")
    # The zone database may have changed since: an unknown zone must be reported, not kept.
    for zone in (timezone, schedule_zone):
        if zone not in valid_zones:
            validate_timezone(zone)
            valid_zones.add(zone)
    schedule = _restore(
        Schedule,
        {
            "kind": kind,
            "text": text,
            "timezone": schedule_zone,
            "cron": cron,
            "fixed_time": fixed_time,
            "interval": interval,
            "at": None,
        },
    )
    job = _restore(
        Job,
        {
            "id": job_id,
            "schedule_text": schedule_text,
            "schedule": schedule,
            "timezone": timezone,
            "command": tuple(command) if isinstance(command, list) else command,
            "name": name,
            "enabled": enabled,
            "paused": paused,
            "timeout": timeout,
            "overlap": overlap,
            "catch_up": catch_up,
            "misfire_grace": misfire_grace,
            "jitter": jitter,
            "repeat": repeat,
            "retries": retries,
            "env": env,
            "cwd": cwd,
            "spec_hash": job_spec_hash,
            "record": record,
        },
    )
    return job, problems


_T = TypeVar("_T")


def _restore(cls: type[_T], values: dict[str, Any]) -> _T:
    """An instance of a frozen dataclass (no __post_init__, no slots) from every field's value.

    For values a validation produced before: the generated __init__ sets each field through
    object.__setattr__, which is half the cost of rebuilding 10,000 jobs from the memo. The
    result is indistinguishable from a constructed one (tests check the field set).
    """
    instance = object.__new__(cls)
    object.__setattr__(instance, "__dict__", values)
    return instance


def _decode_problem(
    where: str, field_name: str, message: str, severity: Literal["error", "warning"]
) -> Problem:
    if severity not in ("error", "warning"):
        raise ValueError("not a stored problem")
    return Problem(where, field_name, message, severity)


@functools.lru_cache(maxsize=16384)
def _parse_schedule(text: str, timezone: str) -> Schedule:
    # Big files repeat a few schedules many times; Schedule is a frozen value
    # and parsing without first_seen is pure, so sharing results is safe.
    return parse_schedule(text, timezone)


@functools.lru_cache(maxsize=256)
def _parse_duration_text(text: str) -> float:
    return parse_duration(text)


def _record_id(record: object) -> str | None:
    if isinstance(record, dict):
        value = record.get("id")
        if isinstance(value, str) and ID_PATTERN.fullmatch(value):
            return value
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short JSON rendering of a value for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    """Collects the problems of one record while building its Job."""

    def __init__(self, record: dict[str, Any], index: int) -> None:
        self.record = record
        self.index = index
        self.problems: list[Problem] = []
        self.failed = False
        raw_id = record.get("id")
        self.id = raw_id if isinstance(raw_id, str) and ID_PATTERN.fullmatch(raw_id) else None
        self.where = self.id if self.id is not None else f"jobs[{index}]"
        self.fields: dict[str, Any] = record
        # Set when a finding may depend on `now` or on state.db, so the result is not memoised.
        self.consulted_time = False

    def error(self, field_name: str, message: str) -> None:
        self.failed = True
        self.problems.append(Problem(self.where, field_name, message, "error"))

    def warning(self, field_name: str, message: str) -> None:
        self.problems.append(Problem(self.where, field_name, message, "warning"))

    # -- the whole record -------------------------------------------------

    def run(
        self, defaults: JobDefaults, now: datetime, known_schedules: Mapping[str, str]
    ) -> Job | None:
        self.check_id()
        is_hermes = hermes.is_hermes_record(self.record)
        schedule_failed = False
        if is_hermes:
            self.fields, hermes_errors = hermes.translate(self.record)
            for exc in hermes_errors:
                self.error(exc.field, exc.message)
                schedule_failed = schedule_failed or exc.field == "schedule"
        self.check_unknown_keys(is_hermes)

        name = self.optional_str("name")
        timezone = self.check_timezone(defaults)
        schedule_text, schedule = (
            (None, None) if schedule_failed else self.check_schedule(timezone or "UTC")
        )
        command = self.check_command()
        enabled = self.optional_bool("enabled", True)
        paused = self.optional_bool("paused", False)
        catch_up = self.optional_bool("catch_up", True)
        timeout = self.optional_duration("timeout", defaults.timeout, positive=True)
        misfire_grace = self.optional_duration("misfire_grace", None)
        jitter = self.optional_duration("jitter", 0.0) or 0.0
        overlap = self.check_overlap()
        repeat = self.check_repeat(schedule)
        retries = self.check_retries()
        env = self.check_env()
        cwd = self.check_cwd()

        if schedule is not None:
            # check_past_at reads `now` and state.db for an `at` schedule; check_jitter
            # measures a cron schedule's period from `now`, which varies (0 0 1,2 * *).
            self.consulted_time = schedule.kind == "at" or (jitter > 0 and schedule.kind == "cron")
            known = self.id is not None and known_schedules.get(self.id) == _schedule_key(
                schedule.text, timezone or "UTC", schedule.kind
            )
            if not known:
                self.check_past_at(schedule, misfire_grace, enabled and not paused, now)
            self.check_jitter(schedule, jitter, now)

        if self.failed or self.id is None or schedule is None or schedule_text is None:
            return None
        assert timezone is not None and timeout is not None
        spec = _spec_values(
            schedule=schedule,
            timezone=timezone,
            command=command,
            enabled=enabled,
            paused=paused,
            timeout=timeout,
            overlap=overlap,
            catch_up=catch_up,
            misfire_grace=misfire_grace,
            jitter=jitter,
            repeat=repeat,
            retries=retries,
            env=env,
            cwd=cwd,
        )
        return Job(
            id=self.id,
            schedule_text=schedule_text,
            schedule=schedule,
            timezone=timezone,
            command=command,
            name=name,
            enabled=enabled,
            paused=paused,
            timeout=timeout,
            overlap=overlap,
            catch_up=catch_up,
            misfire_grace=misfire_grace,
            jitter=jitter,
            repeat=repeat,
            retries=retries,
            env=env,
            cwd=cwd,
            spec_hash=_digest(spec, schedule.kind),
            record=self.record,
        )

    # -- single fields ----------------------------------------------------

    def check_id(self) -> None:
        if "id" not in self.record or self.record["id"] is None:
            self.error("id", 'is missing; add "id" with a name such as "nightly-backup"')
            return
        value = self.record["id"]
        if not isinstance(value, str):
            self.error("id", f"must be a string, not {_json_type(value)} {_show(value)}")
        elif self.id is None:
            self.error(
                "id",
                f"{_show(value)} is not a valid id; use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit",
            )

    def check_unknown_keys(self, is_hermes: bool) -> None:
        for key in self.record:
            if key in _KNOWN or (is_hermes and hermes.is_ignored_key(key)):
                continue
            import difflib  # only for the did-you-mean hint of an unknown field

            hint = difflib.get_close_matches(key, KNOWN_FIELDS, n=1, cutoff=0.75)
            suggestion = f'; did you mean "{hint[0]}"?' if hint else "; remove it if it is a typo"
            self.warning(key, f"unknown field is ignored{suggestion}")

    def optional_str(self, name: str) -> str | None:
        value = self.fields.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(name, f"must be a string, not {_json_type(value)} {_show(value)}")
            return None
        return value

    def optional_bool(self, name: str, default: bool) -> bool:
        value = self.fields.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.error(name, f"must be true or false, not {_show(value)}")
            return default
        return value

    def optional_duration(
        self, name: str, default: float | None, *, positive: bool = False
    ) -> float | None:
        value = self.fields.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.error(
                name,
                f'must be a duration such as "90s", "30m" or "1h30m", not {_show(value)}',
            )
            return default
        try:
            seconds = (
                _parse_duration_text(value) if isinstance(value, str) else parse_duration(value)
            )
        except DurationError as exc:
            self.error(name, f"{exc}")
            return default
        if not math.isfinite(seconds):
            self.error(name, f"{_show(value)} is not a finite duration; write e.g. 30m")
            return default
        if positive and seconds <= 0:
            self.error(name, f"must be longer than 0s, not {_show(value)}; write e.g. 1h")
            return default
        return seconds

    def check_timezone(self, defaults: JobDefaults) -> str | None:
        value = self.fields.get("timezone")
        if value is None:
            return defaults.timezone
        if not isinstance(value, str):
            self.error(
                "timezone",
                f'must be an IANA zone name such as "Europe/London", not {_show(value)}',
            )
            return None
        try:
            validate_timezone(value)
        except ScheduleError as exc:
            self.error("timezone", f"{exc}")
            return None
        return value

    def check_schedule(self, timezone: str) -> tuple[str | None, Schedule | None]:
        value = self.fields.get("schedule")
        if value is None:
            self.error(
                "schedule",
                'is missing; add e.g. "schedule": "0 3 * * *", "every 30m" '
                'or "at 2030-01-01T09:00"',
            )
            return None, None
        if not isinstance(value, str):
            self.error(
                "schedule",
                f'must be a string such as "0 3 * * *" or "every 30m", not {_show(value)}',
            )
            return None, None
        if not value.strip():
            self.error("schedule", 'is empty; write e.g. "0 3 * * *" or "every 30m"')
            return None, None
        if len(value) > MAX_SCHEDULE_CHARS:
            self.error(
                "schedule",
                f"is {len(value)} characters long; a schedule has at most {MAX_SCHEDULE_CHARS}",
            )
            return None, None
        try:
            schedule = _parse_schedule(value, timezone)
        except (ScheduleError, ValueError, OverflowError) as exc:
            message = str(exc)
            # 'schedule "30m" is ambiguous' reads better after the field name without the echo.
            if message.startswith("schedule "):
                message = message[len("schedule ") :]
            self.error("schedule", message)
            return None, None
        return value, schedule

    def check_command(self) -> tuple[str, ...] | str | None:
        value = self.fields.get("command")
        if value is None:
            return None
        if isinstance(value, str):
            if not value.strip():
                self.error(
                    "command",
                    "is an empty string; write a shell command, an argv list, "
                    "or leave it out to run runner.default_command",
                )
                return None
            if "\x00" in value:
                self.error("command", "contains a NUL character, which no command can hold")
                return None
            return value
        if isinstance(value, list):
            if not value:
                self.error(
                    "command",
                    'is an empty list; write an argv list such as ["/usr/bin/backup", "--full"] '
                    "or leave it out to run runner.default_command",
                )
                return None
            ok = True
            for position, item in enumerate(value):
                if not isinstance(item, str):
                    self.error(
                        "command",
                        f"argument {position} is {_json_type(item)} {_show(item)}; every argument "
                        f'must be a string (write "{item}" in quotes if you meant the text)',
                    )
                    ok = False
                elif not item:
                    self.error(
                        "command",
                        f"argument {position} is an empty string; remove it or give it a value",
                    )
                    ok = False
                elif "\x00" in item:
                    self.error("command", f"argument {position} contains a NUL character")
                    ok = False
            return tuple(value) if ok else None
        self.error(
            "command",
            f"must be an argv list of strings or a shell command string, not {_show(value)}",
        )
        return None

    def check_overlap(self) -> Overlap:
        value = self.fields.get("overlap")
        if value is None:
            return "skip"
        for choice in OVERLAPS:
            if value == choice:
                return choice
        self.error(
            "overlap",
            f"{_show(value)} is not one of {', '.join(OVERLAPS)}; the default is skip",
        )
        return "skip"

    def check_repeat(self, schedule: Schedule | None) -> int | None:
        value = self.fields.get("repeat")
        one_shot = schedule is not None and schedule.one_shot
        repeat: int | None = None
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(
                    "repeat",
                    f"must be a whole number of runs or null (forever), not {_show(value)}",
                )
            elif value < 1:
                self.error(
                    "repeat",
                    f"must be at least 1, not {value}; use null to repeat forever",
                )
            elif value > MAX_REPEAT:
                self.error("repeat", f"must be at most {MAX_REPEAT}; use null to repeat forever")
            else:
                repeat = value
        if one_shot:
            if repeat is not None and repeat != 1:
                self.warning(
                    "repeat",
                    f"{repeat} is ignored: a one-shot schedule fires once; remove repeat",
                )
            return 1
        return repeat

    def check_retries(self) -> int:
        value = self.fields.get("retries")
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            self.error("retries", f"must be a whole number such as 3, not {_show(value)}")
            return 0
        if not 0 <= value <= MAX_RETRIES:
            self.error("retries", f"must be between 0 and {MAX_RETRIES}, not {value}")
            return 0
        return value

    def check_env(self) -> dict[str, str]:
        value = self.fields.get("env")
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(
                "env",
                f'must be an object of strings such as {{"TARGET": "s3://bucket"}}, '
                f"not {_show(value)}",
            )
            return {}
        env: dict[str, str] = {}
        for key, item in value.items():
            if not ENV_NAME_PATTERN.fullmatch(key):
                self.error(
                    "env",
                    f"{_show(key)} is not a valid variable name; use letters, digits and '_', "
                    "not starting with a digit",
                )
            elif not isinstance(item, str):
                self.error(
                    "env",
                    f"{key} must be a string, not {_json_type(item)} {_show(item)}; "
                    "put the value in quotes",
                )
            elif "\x00" in item:
                self.error("env", f"{key} contains a NUL character")
            else:
                env[key] = item
        return env

    def check_cwd(self) -> str | None:
        value = self.fields.get("cwd")
        if value is None:
            return None
        if not isinstance(value, str):
            self.error("cwd", f"must be an absolute path string, not {_show(value)}")
            return None
        if not value.startswith("/"):
            self.error(
                "cwd",
                f"{_show(value)} is not an absolute path; write the full path from /",
            )
            return None
        if "\x00" in value:
            self.error("cwd", "contains a NUL character")
            return None
        return value

    # -- rules across fields ---------------------------------------------

    def check_past_at(
        self, schedule: Schedule, misfire_grace: float | None, active: bool, now: datetime
    ) -> None:
        # A paused or disabled one-shot never fires, so its past time harms nothing.
        if schedule.kind != "at" or schedule.at is None or not active:
            return
        grace = (
            misfire_grace
            if misfire_grace is not None
            else default_misfire_grace(schedule, anchor=now)
        )
        late = (now - schedule.at).total_seconds()
        if late > grace:
            self.error(
                "schedule",
                f"{schedule.text.strip()} is in the past by {format_duration(late)}; "
                "remove the job or set a future time",
            )

    def check_jitter(self, schedule: Schedule, jitter: float, now: datetime) -> None:
        if jitter <= 0 or schedule.one_shot:
            return
        period = schedule.period(anchor=now)
        if period is not None and jitter >= period:
            self.warning(
                "jitter",
                f"{format_duration(jitter)} is not shorter than the schedule's period "
                f"{format_duration(period)}, so fires may run out of order; lower the jitter",
            )
