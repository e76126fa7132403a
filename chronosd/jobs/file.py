"""jobs.json on disk: a safe read for the daemon, atomic locked edits for the CLI.

Reading never trusts the file: it must be a regular file that neither group
nor others can write, owned by chronosd's user or root (whoever can write it
can run commands as chronosd), valid UTF-8 (a BOM is accepted) and valid JSON.
Every failure is a JobsFileError subclass with a one-line message:

- JobsFileUnavailable (JobsFileMissing for a missing file): cannot be read at all;
- UnsafeJobsFile: permissions or owner refuse it;
- InvalidJobsFile: bad bytes, bad JSON or invalid jobs; ``problems`` lists every finding.

Edits (``chronosd add|remove|pause|resume|edit``) take an exclusive lock on a
sibling ``<name>.lock`` file, re-read under the lock, write a temporary file
in the same directory, fsync it, rename it over the original and fsync the
directory, so a reader sees the old or the new file, never a torn one.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import os
import shlex
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from chronosd.errors import JobsFileError
from chronosd.jobs.model import Job, Problem
from chronosd.jobs.validate import JobDefaults, ValidationMemo, validate_document

# Far above any real file (50,000 jobs are ~10 MB) yet bounded, so a wrong path
# (a disk image, /dev/zero) cannot exhaust memory.
MAX_FILE_BYTES = 64 * 1024 * 1024
LOCK_TIMEOUT = 30.0
NEW_FILE_MODE = 0o600

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class JobsFileUnavailable(JobsFileError):
    """jobs.json cannot be read at all (``chronosd validate`` exits 2)."""

    unreadable = True


class JobsFileMissing(JobsFileUnavailable):
    """jobs.json does not exist."""


class UnsafeJobsFile(JobsFileError):
    """jobs.json is writable by others or owned by someone else; it is refused."""


class InvalidJobsFile(JobsFileError):
    """jobs.json is not UTF-8, not JSON, or holds invalid jobs; ``problems`` lists all."""

    def __init__(self, message: str, problems: tuple[Problem, ...]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class JobsFile:
    """One good load of jobs.json."""

    path: Path
    jobs: tuple[Job, ...]
    problems: tuple[Problem, ...]  # warnings, plus the errors of skipped jobs
    digest: str  # sha256 of the raw bytes
    mtime_ns: int
    text: str = field(default="", repr=False)  # the decoded text that was validated
    # This file's validation results, when read_jobs_file was given a memo (digest set).
    memo: ValidationMemo | None = field(default=None, compare=False, repr=False)


def read_jobs_file(
    path: str | os.PathLike[str],
    *,
    defaults: JobDefaults,
    now: datetime,
    check_owner: bool = True,
    on_invalid_job: Literal["reject", "skip"] = "reject",
    known_schedules: Mapping[str, str] = MappingProxyType({}),
    memo: ValidationMemo | None = None,
) -> JobsFile:
    """Read, check and validate jobs.json.

    ``check_owner=False`` skips the whole safety check (mode and owner): for
    ``chronosd validate FILE`` on a file chronosd will not run. With
    ``on_invalid_job="skip"`` a file whose shape is fine and whose ids are
    unique keeps its good jobs; the bad ones appear in ``problems`` as errors.
    ``known_schedules`` ({job id: schedule_key} from state.db) exempts one-shots
    chronosd has already planned from the "at is in the past" error.
    ``memo`` (see ValidationMemo) spares re-checking records validated before;
    the result's ``memo`` then holds this file's records.
    """
    file_path = Path(path)
    raw, info = _read(file_path, check_safety=check_owner)
    text = _decode(file_path, raw)
    doc, duplicate_keys = _parse_text(file_path, text)
    validated = validate_document(
        doc, defaults=defaults, now=now, known_schedules=known_schedules, memo=memo
    )
    problems = validated.problems + tuple(
        Problem(
            "",
            "",
            f'key "{key}" appears twice in one object; the last value is used, remove the other',
            "warning",
        )
        for key in duplicate_keys
    )
    if not validated.ok and (on_invalid_job == "reject" or validated.fatal):
        errors = [p for p in problems if p.severity == "error"]
        first = validated.fatal[0] if validated.fatal else errors[0]
        if len(errors) == 1:
            message = f"jobs.json {file_path}: 1 error: {first}"
        else:
            message = (
                f"jobs.json {file_path}: {len(errors)} errors, first: {first}; "
                "run chronosd validate to see all"
            )
        raise InvalidJobsFile(message, problems)
    digest = hashlib.sha256(raw).hexdigest()
    if validated.memo is not None:
        validated.memo.digest = digest
    return JobsFile(
        path=file_path,
        jobs=validated.jobs,
        problems=problems,
        digest=digest,
        mtime_ns=info.st_mtime_ns,
        text=text,
        memo=validated.memo,
    )


@dataclass(frozen=True)
class JobsDocument:
    """jobs.json read, checked and parsed as read_jobs_file does, not validated."""

    digest: str  # sha256 of the bytes
    text: str
    doc: object
    duplicate_keys: tuple[str, ...]  # keys repeated within one object


def read_jobs_text(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(sha256 of the bytes, text) of jobs.json, read and checked as read_jobs_file reads it;
    not parsed."""
    file_path = Path(path)
    raw, _info = _read(file_path, check_safety=True)
    return hashlib.sha256(raw).hexdigest(), _decode(file_path, raw)


def text_digest(text: str) -> str:
    """sha256 of a jobs.json text as state.db keeps it (UTF-8, lone surrogates passed through):
    the digest a settled start compares the applied text and its layout by."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def parse_jobs_text(text: str, *, tagged: bool = False) -> tuple[object, list[str]]:
    """Parse a jobs.json text as read_jobs_file does: the value and the keys repeated within
    an object; InvalidJobsFile when it does not parse."""
    return _parse_text(Path("jobs.json"), text, tagged=tagged)


def read_jobs_document(path: str | os.PathLike[str], *, tagged: bool = False) -> JobsDocument:
    """Read, check and parse jobs.json (same errors as read_jobs_file); no validation.

    ``tagged``: numbers are parsed as ``tag_number`` gives them (see there).
    """
    file_path = Path(path)
    raw, _info = _read(file_path, check_safety=True)
    text = _decode(file_path, raw)
    doc, duplicates = _parse_text(file_path, text, tagged=tagged)
    return JobsDocument(hashlib.sha256(raw).hexdigest(), text, doc, tuple(duplicates))


def tag_int(text: str) -> tuple[str, str]:
    """A JSON number in a form that compares equal only to the same literal kind and text.

    Parsed as Python values, ``1``, ``1.0`` and ``true`` are all equal, and validation tells
    them apart; parsed with these tags (``parse_int=tag_int, parse_float=tag_float``), two
    records compare equal only when validating them cannot differ. ``untag`` gives the
    plain value back.
    """
    return ("int", text)


def tag_float(text: str) -> tuple[str, str]:
    """See tag_int."""
    return ("float", text)


def untag(value: Any) -> Any:
    """A value parsed with tag_int/tag_float as json.loads parses it by default."""
    if isinstance(value, tuple):
        kind, text = value
        return int(text) if kind == "int" else float(text)
    if isinstance(value, dict):
        return {key: untag(item) for key, item in value.items()}
    if isinstance(value, list):
        return [untag(item) for item in value]
    return value


def read_job_records(path: str | os.PathLike[str]) -> tuple[str, dict[str, tuple[int, object]]]:
    """The sha256 of jobs.json and its records by id ({id: (index, record)}), unvalidated.

    Read, checked and parsed as read_jobs_file does (same errors); a record without a text
    id is left out, and of records sharing an id the first is kept.
    """
    document = read_jobs_document(path)
    doc = document.doc
    records = doc.get("jobs") if isinstance(doc, dict) else None
    if not isinstance(records, list):
        raise _invalid(Path(path), 'has no "jobs" list; run chronosd validate')
    by_id: dict[str, tuple[int, object]] = {}
    for index, record in enumerate(records):
        if isinstance(record, dict):
            job_id = record.get("id")
            if isinstance(job_id, str):
                by_id.setdefault(job_id, (index, record))
    return document.digest, by_id


def check_file_safety(path: str | os.PathLike[str], *, uid: int | None = None) -> None:
    """Refuse a file that group or others can write, or that is owned by someone else.

    ``uid`` is chronosd's user (default: the effective uid); root may own it too.
    """
    file_path = Path(path)
    try:
        info = os.stat(file_path)
    except FileNotFoundError as exc:
        raise JobsFileMissing(_missing_message(file_path)) from exc
    except OSError as exc:
        raise JobsFileUnavailable(_unreadable_message(file_path, exc)) from exc
    _check_stat(file_path, info, uid)


def edit_jobs_file(
    path: str | os.PathLike[str],
    mutate: Callable[[dict[str, Any]], None],
    *,
    create: bool = True,
    lock_timeout: float = LOCK_TIMEOUT,
) -> None:
    """Apply ``mutate`` to the parsed document and write it back atomically.

    Runs under an exclusive lock on ``<name>.lock`` next to the file, with the
    file re-read under the lock, so concurrent edits never lose each other.
    Unknown fields and key order survive; the output has 2-space indentation
    and a trailing newline; owner and mode of an existing file are kept (a new
    file gets 0600). A symlink is followed and its target edited, so the link
    stays. Exceptions raised by ``mutate`` propagate and nothing is written.
    """
    file_path = Path(os.path.realpath(path))
    lock_path = file_path.with_name(file_path.name + ".lock")
    if create:
        try:
            file_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise JobsFileUnavailable(
                f"jobs.json {file_path}: cannot create its directory: {exc.strerror}"
            ) from exc
    with _exclusive_lock(file_path, lock_path, lock_timeout):
        raw: bytes | None
        info: os.stat_result | None
        try:
            raw, info = _read(file_path, check_safety=False)
        except JobsFileMissing:
            if not create:
                raise
            raw, info = None, None
        if raw is None:
            doc: object = {"jobs": []}
            bom = False
        else:
            doc, _ = _parse(file_path, raw)
            bom = raw.startswith(codecs.BOM_UTF8)
        if not isinstance(doc, dict):
            raise InvalidJobsFile(
                f'jobs.json {file_path}: the top level is not an object; write {{"jobs": [ ... ]}}',
                (Problem("", "", 'the top level must be an object {"jobs": [ ... ]}'),),
            )
        mutate(doc)
        text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        data = (codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8")
        if data == raw:
            return  # nothing changed: do not wake the path unit for nothing
        _write_atomically(file_path, data, info)


# -- reading ---------------------------------------------------------------


def _read(path: Path, *, check_safety: bool) -> tuple[bytes, os.stat_result]:
    try:
        # O_NONBLOCK: opening a FIFO put where jobs.json should be must not hang.
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError as exc:
        raise JobsFileMissing(_missing_message(path)) from exc
    except OSError as exc:
        raise JobsFileUnavailable(_unreadable_message(path, exc)) from exc
    try:
        # Check the opened file itself, so a rename between check and read cannot swap it.
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise JobsFileUnavailable(
                f"jobs.json {path}: is a directory; point --jobs at the jobs.json file"
            )
        if not stat.S_ISREG(info.st_mode):
            raise JobsFileUnavailable(
                f"jobs.json {path}: is not a regular file; point --jobs at a plain file"
            )
        if check_safety:
            _check_stat(path, info, None)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise InvalidJobsFile(
                    f"jobs.json {path}: is larger than {MAX_FILE_BYTES >> 20} MiB; "
                    "is --jobs pointing at the right file?",
                    (Problem("", "", f"the file is larger than {MAX_FILE_BYTES >> 20} MiB"),),
                )
            chunks.append(chunk)
    except OSError as exc:
        raise JobsFileUnavailable(_unreadable_message(path, exc)) from exc
    finally:
        os.close(fd)
    return b"".join(chunks), info


def _parse(path: Path, raw: bytes) -> tuple[object, list[str]]:
    """Decode and parse; return the document and the keys that repeat within an object."""
    return _parse_text(path, _decode(path, raw))


def _decode(path: Path, raw: bytes) -> str:
    """The text of the file: UTF-8, a leading BOM dropped."""
    body = raw[len(codecs.BOM_UTF8) :] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(raw) - len(body))
        line = raw.count(b"\n", 0, offset) + 1
        column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
        where = f"byte 0x{raw[offset]:02x} at line {line}, column {column}"
        raise _invalid(path, f"is not valid UTF-8 ({where}); save the file as UTF-8") from exc


def _parse_text(path: Path, text: str, *, tagged: bool = False) -> tuple[object, list[str]]:
    """Parse decoded text; return the document and the keys that repeat within an object."""
    if not text.strip():
        raise _invalid(path, 'is empty; write {"jobs": []} for a file without jobs')
    duplicates: list[str] = []

    def build_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key not in duplicates:
                    duplicates.append(key)
                seen.add(key)
        return obj

    def refuse_constant(name: str) -> object:
        raise _invalid(path, f"holds {name}, which JSON does not allow; write a number or text")

    try:
        if tagged:
            doc = json.loads(
                text,
                object_pairs_hook=build_object,
                parse_constant=refuse_constant,
                parse_int=tag_int,
                parse_float=tag_float,
            )
        else:
            doc = json.loads(text, object_pairs_hook=build_object, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise _invalid(
            path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    except RecursionError as exc:
        raise _invalid(path, "is nested too deeply to parse; flatten the document") from exc
    except ValueError as exc:  # e.g. an integer with thousands of digits
        raise _invalid(path, f"cannot be parsed: {exc}") from exc
    return doc, duplicates


def _invalid(path: Path, what: str) -> InvalidJobsFile:
    return InvalidJobsFile(f"jobs.json {path}: {what}", (Problem("", "", what),))


def _check_stat(path: Path, info: os.stat_result, uid: int | None) -> None:
    mode = stat.S_IMODE(info.st_mode)
    quoted = shlex.quote(str(path))
    if mode & 0o022:
        raise UnsafeJobsFile(
            f"jobs.json {path}: writable by group or others (mode {mode:04o}); "
            f"run: chmod go-w {quoted}"
        )
    expected = os.geteuid() if uid is None else uid
    if info.st_uid not in (expected, 0):
        raise UnsafeJobsFile(
            f"jobs.json {path}: owned by {_user(info.st_uid)}, not by chronosd's user "
            f"{_user(expected)} or root, and its owner could run commands as chronosd; "
            f"run: chown {expected} {quoted}"
        )


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _missing_message(path: Path) -> str:
    return (
        f"jobs.json {path}: does not exist; create it (chronosd add does) "
        "or point --jobs at your file"
    )


def _unreadable_message(path: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return f"jobs.json {path}: cannot be read: {reason}; check its permissions"
    return f"jobs.json {path}: cannot be read: {reason}"


# -- editing ---------------------------------------------------------------


@contextmanager
def _exclusive_lock(path: Path, lock_path: Path, timeout: float) -> Iterator[None]:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, NEW_FILE_MODE)
    except OSError as exc:
        raise JobsFileUnavailable(
            f"jobs.json {path}: cannot open the lock file {lock_path}: {exc.strerror}"
        ) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise JobsFileError(
                        f"jobs.json {path}: another edit has held {lock_path} for over "
                        f"{timeout:g}s; try again when it has finished"
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _write_atomically(path: Path, data: bytes, original: os.stat_result | None) -> None:
    import tempfile  # only writers need it; it pulls in shutil, bz2, lzma and random

    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            if original is not None:
                _keep_owner(fd, path, original)
            # After the chown: changing the owner may clear mode bits.
            os.fchmod(fd, stat.S_IMODE(original.st_mode) if original else NEW_FILE_MODE)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp_name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp_name)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _keep_owner(fd: int, path: Path, original: os.stat_result) -> None:
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) == (original.st_uid, original.st_gid):
        return
    try:
        os.fchown(fd, original.st_uid, original.st_gid)
    except PermissionError:
        if current.st_uid != original.st_uid:
            raise JobsFileError(
                f"jobs.json {path}: is owned by {_user(original.st_uid)} and rewriting it as "
                f"{_user(current.st_uid)} would change its owner; run the command as that user "
                "or root"
            ) from None
        # Only the group differs and we may not set it: the mode (never group-writable
        # for a safe file) still decides access, so keep going.
