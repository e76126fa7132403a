"""The daemon: one anyio task group owning the listener, the watcher, the
reconcile worker, the timers, every running job, the idle monitor and the
signal handler. Idle exit and SIGTERM take the same path: stop accepting,
let the work that must finish finish, then cancel the group.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import select
import signal
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from chronosd.config import Config, load_config
from chronosd.daemon import systemd
from chronosd.daemon.children import child_watcher
from chronosd.daemon.idle import IdleTracker
from chronosd.errors import ChronosError, ConfigError, JobsFileError, StateError
from chronosd.fire import Engine, FireResult
from chronosd.gcpause import collection_paused, end_startup_pause
from chronosd.http.auth import FireAuthenticator
from chronosd.http.routes import DaemonRoutes
from chronosd.http.server import (
    DEFAULT_LIMITS,
    HTTPServer,
    Request,
    Response,
    bind_listener,
    format_listener_address,
    listener_from_fd,
)
from chronosd.jobs.file import (
    check_file_safety,
    read_job_records,
    read_jobs_file,
    text_digest,
)
from chronosd.jobs.model import Job, Problem
from chronosd.jobs.validate import (
    JobDefaults,
    ValidationMemo,
    memo_stamp,
    validate_document,
    validate_job,
    validate_record,
)
from chronosd.log import get_logger
from chronosd.providers.base import Provider
from chronosd.providers.local import LocalProvider
from chronosd.reconcile import Reconciler
from chronosd.state import META_ARMS_SETTLED, JobState, StateDB, owner_token
from chronosd.timefmt import to_wire, utc_now

log = get_logger("chronosd.daemon")

META_LAST_GOOD = "jobs_last_good"
# Where each record lies in META_LAST_GOOD's text (chronosd.jobs.layout), with its digest.
META_LAST_GOOD_LAYOUT = "jobs_last_good_layout"
# The validation results of the last good jobs.json (ValidationMemo.dumps), so that a start
# with an unchanged file, or with a few records edited, does not check every job again.
META_JOBS_MEMO = "jobs_memo"
META_JOBS_ERROR = "jobs_error"
META_DAEMON = "daemon"
SETTLED_FORMAT = 1

# The memo is written this long after the load that made it, so that the reconcile and the fire
# path that load started go first; an exit before then writes it on the way out.
MEMO_SAVE_DELAY = 1.0

# Under socket activation an idle keep-alive connection (a NAS's pooled one) must not keep the
# process up past its idle exit; the next request simply opens a new connection.
SOCKET_ACTIVATED_KEEPALIVE = 1.0

# The cold fire path answers before watchfiles (a Rust extension, and multiprocessing with it)
# is imported: the watcher starts once the first request has been answered (or its connection
# closed unanswered), or this long after READY when no connection is open (a path-unit start).
# Edits made before the watch is installed are caught by comparing jobs.json with what was
# loaded as soon as it is; the idle exit compares once more.
WATCH_DELAY = 0.5
# An edit is applied once jobs.json has been quiet this long: editors and `chronosd` itself
# replace the file in one rename, and a truncate-and-write finishes well within it (a file
# read half-written is only rejected, and read again at the next event).
WATCH_DEBOUNCE_MS = 50


@dataclass(frozen=True)
class RunOptions:
    """What `chronosd run` was asked for on top of the Config."""

    config_path: Path | None = None
    overrides: tuple[tuple[str, Any], ...] = ()


def job_defaults(config: Config) -> JobDefaults:
    return JobDefaults(timezone=config.timezone, timeout=config.runner.default_timeout)


class Daemon:
    def __init__(self, config: Config, options: RunOptions | None = None) -> None:
        self.config = config
        self.options = options or RunOptions()
        self.owner = owner_token()
        self.sockets = systemd.listen_fds()
        self.socket_activated = bool(self.sockets)
        self.idle = IdleTracker(config.resolved_idle_exit(socket_activated=self.socket_activated))
        self.db = StateDB.open(config.state_dir)
        self.provider = self._make_provider()
        self.engine = Engine(
            config=config,
            db=self.db,
            owner=self.owner,
            idle=self.idle,
            request_reconcile=self._request_reconcile,
            max_horizon=config.provider.nas.max_horizon if config.provider.kind == "nas" else None,
        )
        self.reconciler = Reconciler(
            engine=self.engine,
            provider=self.provider,
            db=self.db,
            idle=self.idle,
            fallback_after=config.provider.fallback_after,
            list_every=config.provider.nas.list_every,
        )
        self.jobs_digest: str | None = None
        self.jobs_error: str | None = None
        self._memo: ValidationMemo | None = None
        self._memo_saved: str | None = None  # digest of the jobs.json whose memo state.db holds
        self._memo_changed = anyio.Event()
        self._last_good_digest: str | None = None  # sha256 of the text META_LAST_GOOD holds
        self._last_good_pending: str | None = None  # applied, not yet written to META_LAST_GOOD
        self._layout_pending: str | None = None  # written to META_LAST_GOOD, layout not yet
        # The digest and records (by id) of the file whose jobs are deferred (_deferred_job).
        self._deferred_records: tuple[str, dict[str, tuple[int, object]]] | None = None
        self.server: HTTPServer | None = None
        self._stopping = False
        self._conn_held = False
        self._first_reply = anyio.Event()
        self._served = anyio.Event()  # set when the server has answered its last request
        self._connections = 0
        self._listener_fds: list[int] = []

    # ---------------------------------------------------------------- parts
    def _make_provider(self) -> Provider:
        if self.config.provider.kind == "nas":
            from chronosd.providers.nas import NasProvider

            return NasProvider(self.config.provider.nas)
        return LocalProvider()

    def _request_reconcile(self, job_ids: Sequence[str]) -> None:
        # The Engine is built before the Reconciler but only asks once the daemon runs.
        self.reconciler.request(job_ids)

    def _authenticator(self, listeners: Sequence[anyio.abc.SocketListener]) -> FireAuthenticator:
        from chronosd.http.auth import check_none_allowed, make_authenticator

        auth = self.config.auth
        mode = auth.effective_mode(self.config.provider.kind)
        if mode == "none":
            check_none_allowed(listeners)
            log.warning("auth.disabled", reason="auth.mode is none; loopback listeners only")
        return make_authenticator(mode, config=auth, db=self.db)

    async def _listeners(self) -> list[anyio.abc.SocketListener]:
        if self.sockets:
            return [await listener_from_fd(s.fd) for s in self.sockets]
        host, port = self.config.listen_address()
        return [await bind_listener(host, port)]

    # ---------------------------------------------------------------- jobs.json
    def load_jobs(self, *, startup: bool = False, reconcile_all: bool | None = None) -> bool:
        """Read jobs.json; apply it when valid. A bad file changes nothing that is armed.

        ``reconcile_all`` (default: ``startup``) asks the reconciler about every job, not only
        those the file changed.
        """
        with collection_paused():
            return self._load_jobs(
                startup=startup, reconcile_all=startup if reconcile_all is None else reconcile_all
            )

    def _load_jobs(self, *, startup: bool, reconcile_all: bool) -> bool:
        path = self.config.jobs
        jobs = self.engine.jobs
        if (
            not startup
            and isinstance(jobs, DeferredJobs)
            and not jobs.loaded
            and self._load_edit(jobs.digest, len(jobs), jobs.active)
        ):
            return True  # an edit of the deferred file: its changed records applied alone
        try:
            jobs_file = read_jobs_file(
                path,
                defaults=job_defaults(self.config),
                now=utc_now(),
                on_invalid_job=self.config.on_invalid_job,
                known_schedules=_KnownSchedules(self.db),
                memo=self._validation_memo(),
            )
        except JobsFileError as exc:
            self.jobs_error = str(exc)
            self.jobs_digest = _digest_of(path)
            self._set_meta(META_JOBS_ERROR, self.jobs_error)
            log.error("jobs.rejected", path=str(path), error=str(exc))
            if startup:
                self._restore_last_good()
            return False
        self.jobs_digest = jobs_file.digest
        self.jobs_error = None
        self._set_meta(META_JOBS_ERROR, None)
        for problem in jobs_file.problems:
            log.warning(
                "jobs.problem", path=str(path), problem=str(problem), severity=problem.severity
            )
        diff = self.engine.apply_jobs(jobs_file.jobs, reconcile_all=reconcile_all)
        self._save_last_good(jobs_file.text)
        if jobs_file.memo is not None:
            self._memo = jobs_file.memo
            if jobs_file.digest != self._memo_saved:
                self._memo_changed.set()
        log.info(
            "jobs.loaded",
            path=str(path),
            jobs=len(jobs_file.jobs),
            added=len(diff.added),
            changed=len(diff.changed),
            removed=len(diff.removed),
        )
        return True

    def _validation_memo(self) -> ValidationMemo:
        """The results of the last good file: in memory once loaded, else from state.db."""
        defaults = job_defaults(self.config)
        if self._memo is None or self._memo.defaults != defaults:
            stored: str | None = None
            try:
                stored = self.db.get_meta(META_JOBS_MEMO)
            except ChronosError as exc:
                log.warning("jobs.memo_unreadable", error=str(exc))
            self._memo = ValidationMemo.loads(stored, defaults)
            self._memo_saved = self._memo.digest
        return self._memo

    def _save_memo(self) -> None:
        memo = self._memo
        if memo is None or memo.digest is None or memo.digest == self._memo_saved:
            return
        if self._set_meta(META_JOBS_MEMO, memo.dumps()):
            self._memo_saved = memo.digest

    async def _keep_memo(self) -> None:
        """Write the memo of each newly loaded file, a little after the load (MEMO_SAVE_DELAY)."""
        while True:
            await self._memo_changed.wait()
            self._memo_changed = anyio.Event()
            await anyio.sleep(MEMO_SAVE_DELAY)
            self._flush_last_good()
            self._save_memo()
            self._save_layout()

    def _last_good_text(self) -> str | None:
        """The text of the file applied last (written to state.db, or about to be)."""
        if self._last_good_pending is not None:
            return self._last_good_pending
        return self.db.get_meta(META_LAST_GOOD)

    def _flush_last_good(self) -> None:
        text = self._last_good_pending
        if text is not None:
            self._save_last_good(text)

    def _save_last_good(self, text: str) -> None:
        """Keep the text of the file just applied; an unchanged one is not written again.

        A failed write stays pending (see _last_good_pending) and is tried again later.
        """
        self._last_good_pending = text
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self._last_good_digest is None:
            stored: str | None = None
            try:
                stored = self.db.get_meta(META_LAST_GOOD)
            except ChronosError as exc:
                log.warning("jobs.last_good_unreadable", error=str(exc))
            self._last_good_digest = "" if stored is None else text_digest(stored)
        if digest == self._last_good_digest:
            self._last_good_pending = None
        elif self._set_meta(META_LAST_GOOD, text):
            self._last_good_digest = digest
            self._last_good_pending = None
            self._layout_pending = text

    def _save_layout(self) -> None:
        """Keep the layout of the text just kept as the last good one (chronosd.jobs.layout):
        the next edit is then found by its changed part. Written after the text, off the way of
        any fire (with the memo, or at exit); none is kept for a text it cannot describe."""
        text = self._layout_pending
        if text is None:
            return
        from chronosd.jobs.layout import record_layout

        layout = record_layout(text)
        if self._set_meta(META_LAST_GOOD_LAYOUT, None if layout is None else layout.dumps()):
            self._layout_pending = None

    # ---------------------------------------------------------------- the settled mark
    # A start-up used to compare every job's arm with its plan (reconcile_all), and to read and
    # apply all of jobs.json, because a previous process may have left either half done. The
    # mark says they were not: written at a clean exit when the reconciler had nothing left to
    # do, it records the settings the arms were planned with and the file that was applied.
    # Any write to job_state deletes it (a trigger in state.db), so a mark that is present
    # describes job_state as it is. With it, a start-up reconciles only what the file changed,
    # and when the file is the one applied, the jobs are loaded on first use (a fire, an edit,
    # a job due) rather than at once: an unchanged start of 10,000 jobs reads none of them.
    def _settled_params(self) -> str:
        """What the planned arms depend on besides job_state and the jobs themselves."""
        text = json.dumps(
            [
                SETTLED_FORMAT,
                repr(self.config.provider),
                str(self.config.jobs),
                self.config.on_invalid_job,
                memo_stamp(job_defaults(self.config)),
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def _read_settled(self) -> dict[str, Any] | None:
        """The mark, when it was made with the current settings (else None)."""
        if not self.provider.persistent:
            return None  # a local provider's timers live in memory: every start arms them all
        try:
            text = self.db.get_meta(META_ARMS_SETTLED)
            mark = json.loads(text) if text else None
        except (ChronosError, ValueError) as exc:
            log.warning("jobs.settled_mark_unreadable", error=str(exc))
            return None
        if not isinstance(mark, dict) or mark.get("params") != self._settled_params():
            return None
        return mark

    def _load_at_startup(self) -> None:
        mark = self._read_settled()
        if mark is None:
            self.load_jobs(startup=True)
            return
        path = self.config.jobs
        digest: str | None = None
        try:
            check_file_safety(path)
            digest = _digest_of(path)
        except JobsFileError:
            pass  # the full load below reports it
        count, active = mark.get("jobs"), mark.get("active")
        if digest is None or not isinstance(count, int) or not isinstance(active, int):
            self.load_jobs(startup=True, reconcile_all=False)
            return
        if digest != mark.get("file"):
            if not (mark.get("file") and self._load_edit(mark["file"], count, active)):
                self.load_jobs(startup=True, reconcile_all=False)
            return
        self.jobs_digest = digest
        self.jobs_error = None
        self.engine.jobs = DeferredJobs(
            self._load_deferred,
            partial(self._deferred_job, digest),
            digest=digest,
            count=count,
            active=active,
        )
        log.info("jobs.loaded", path=str(path), jobs=count, deferred=True)

    def _load_edit(self, applied: str, count: int, active: int) -> bool:
        """Apply an edit of the applied file (sha256 ``applied``, ``count``/``active`` jobs), by
        its changed records only: at a settled start-up, or while the jobs are deferred.

        The records of jobs.json are compared by id (numbers tagged, see tag_int) with those
        of the applied file (its text is kept as the last good one), and only the new,
        edited and removed ones are validated and applied; the others are looked up when
        used (DeferredJobs), as after an unchanged start. Returns False, having changed
        nothing, for anything this cannot decide as a full load would: the full load then
        runs and reports (a file that does not parse, an invalid job, repeated ids or keys,
        other top-level fields, a change of more than SMALL_APPLY jobs, a record whose
        validation consults the time or state.db).
        """
        from chronosd.fire import SMALL_APPLY
        from chronosd.jobs.file import untag

        try:
            before_text = self._last_good_text()
        except ChronosError:
            return False
        if before_text is None or text_digest(before_text) != applied:
            return False
        # Numbers tagged: records then compare equal only when their validation cannot differ
        # (1, 1.0 and true are equal as plain values). Records that differ are untagged before
        # they are validated.
        compared = self._compare_by_layout(applied, before_text) or self._compare_whole(before_text)
        if compared is None:
            return False
        after_digest, after_text, before, after = compared
        edited = [
            job_id
            for job_id, (_, record) in after.items()
            if job_id not in before or before[job_id][1] != record
        ]
        gone = [job_id for job_id in before if job_id not in after]
        if len(edited) + len(gone) > SMALL_APPLY:
            return False
        defaults, now, known = job_defaults(self.config), utc_now(), _KnownSchedules(self.db)

        def validated(
            records: Mapping[str, tuple[int, object]], job_id: str
        ) -> tuple[Job | None, list[Problem]] | None:
            """The job (None: invalid, skipped) and its problems; None when only a full load
            can tell (a rejected job, a result that consulted the time or state.db, a number
            Python cannot hold)."""
            index, tagged = records[job_id]
            try:
                record = untag(tagged)
            except ValueError:
                return None
            job, problems, timeless = validate_record(
                record, index, defaults=defaults, now=now, known_schedules=known
            )
            if not timeless or (job is None and self.config.on_invalid_job == "reject"):
                return None
            return job, problems

        changed: list[Job] = []
        removed: list[str] = list(gone)
        found: dict[str, Job | None] = {}
        problems: list[Problem] = []
        for job_id in edited:
            result = validated(after, job_id)
            if result is None:
                return False
            job, job_problems = result
            found[job_id] = job
            problems.extend(job_problems)
            if job is not None:
                changed.append(job)
            elif job_id in before:
                removed.append(job_id)  # its edit made it invalid: skipped, so it leaves
        for job_id in [*edited, *gone]:
            old = validated(before, job_id) if job_id in before else None
            if old is not None and old[0] is not None:  # what the counts held for it
                count -= 1
                active -= old[0].active
        count += len(changed)
        active += sum(job.active for job in changed)
        table = DeferredJobs(
            self._load_deferred,
            partial(self._deferred_job, after_digest),
            digest=after_digest,
            count=count,
            active=active,
        )
        table.seed(found)
        self.jobs_digest = after_digest
        self.jobs_error = None
        for problem in problems:
            log.warning(
                "jobs.problem",
                path=str(self.config.jobs),
                problem=str(problem),
                severity=problem.severity,
            )
        diff = self.engine.apply_changes(changed, removed, table)
        # Written a little later (with the memo) or on the way out: until it is, a start-up
        # finds no mark for this file (apply_changes wrote job_state) and loads it in full.
        self._last_good_pending = after_text
        self._memo_changed.set()
        log.info(
            "jobs.loaded",
            path=str(self.config.jobs),
            jobs=count,
            added=len(diff.added),
            changed=len(diff.changed),
            removed=len(diff.removed),
            deferred=True,
        )
        return True

    def _compare_by_layout(self, applied: str, before_text: str) -> _Compared | None:
        """The changed records found from the applied text's layout (chronosd.jobs.layout):
        only the part of jobs.json that differs is parsed. None: compare whole files."""
        from chronosd.jobs.file import read_jobs_text
        from chronosd.jobs.layout import RecordLayout, window_changes

        try:
            stored = self.db.get_meta(META_LAST_GOOD_LAYOUT)
            if stored is None:
                return None
            layout = RecordLayout.loads(stored)
            if layout is None or layout.digest != applied:
                return None
            digest, text = read_jobs_text(self.config.jobs)
        except ChronosError:
            return None
        changes = window_changes(before_text, text, layout)
        if changes is None:
            return None
        return digest, text, changes.before, changes.after

    def _compare_whole(self, before_text: str) -> _Compared | None:
        """Both files parsed whole and their records indexed by id; None for anything only a
        full load can report (see _load_edit)."""
        from chronosd.jobs.file import read_jobs_document, tag_float, tag_int

        try:
            document = read_jobs_document(self.config.jobs, tagged=True)
            before_doc = json.loads(before_text, parse_int=tag_int, parse_float=tag_float)
        except (ChronosError, ValueError, RecursionError):
            return None
        after_doc = document.doc
        if (
            document.duplicate_keys
            or not isinstance(before_doc, dict)
            or not isinstance(after_doc, dict)
            or before_doc.keys() != after_doc.keys()
        ):
            return None
        before, after = (
            _records_by_id(before_doc.get("jobs")),
            _records_by_id(after_doc.get("jobs")),
        )
        if before is None or after is None:
            return None
        return document.digest, document.text, before, after

    def _deferred_job(self, applied: str, job_id: str) -> Job | None:
        """One job of the deferred file whose sha256 is ``applied``, validated alone.

        That file was applied as it is, so its ids are unique, and every record's result
        depends on the record alone (the mark's condition): the job is what validating the
        whole file would give. Raises JobsFileError when jobs.json is no longer that file
        (DeferredJobs then loads it as a whole, which applies or rejects the new one).
        """
        if self._deferred_records is None or self._deferred_records[0] != applied:
            self._deferred_records = read_job_records(self.config.jobs)
            if self._deferred_records[0] != applied:
                raise JobsFileError("jobs.json changed since it was applied")
        found = self._deferred_records[1].get(job_id)
        if found is None:
            return None
        index, record = found
        job, _problems = validate_job(
            record,
            index,
            defaults=job_defaults(self.config),
            now=utc_now(),
            known_schedules=_KnownSchedules(self.db),
        )
        return job

    def _load_deferred(self) -> Mapping[str, Job]:
        """Load and apply the file a settled start-up found unchanged (DeferredJobs' loader)."""
        log.info("jobs.load_deferred", path=str(self.config.jobs))
        self.load_jobs(startup=True, reconcile_all=False)
        return self.engine.jobs

    def _save_settled(self) -> None:
        """Write the mark at a clean exit when the arms match the plan (else remove it)."""
        if not self.provider.persistent:
            return
        value: str | None = None
        jobs = self.engine.jobs
        if (
            self.reconciler.settled
            and self.jobs_error is None
            and self.jobs_digest is not None
            and self._last_good_pending is None  # the mark's file must be the last good one
        ):
            if isinstance(jobs, DeferredJobs) and not jobs.loaded:
                count, active = len(jobs), jobs.active
            else:
                count, active = len(jobs), sum(1 for job in jobs.values() if job.active)
            memo = self._memo
            deferred = isinstance(jobs, DeferredJobs) and not jobs.loaded
            # The jobs may be loaded lazily next time only when validating the file again cannot
            # come out differently: every record's result is in the memo (none consulted the
            # time or state.db), or this process itself deferred the same file.
            same_again = deferred or (
                memo is not None and memo.complete and memo.digest == self.jobs_digest
            )
            value = json.dumps(
                {
                    "params": self._settled_params(),
                    "file": self.jobs_digest if same_again else None,
                    "jobs": count,
                    "active": active,
                }
            )
        self._set_meta(META_ARMS_SETTLED, value)

    def _restore_last_good(self) -> None:
        text = self._last_good_text()
        if not text:
            self.engine.apply_jobs([], reconcile_all=True)
            return
        validated = validate_document(
            json.loads(text),
            defaults=job_defaults(self.config),
            now=utc_now(),
            memo=self._validation_memo(),
        )
        jobs: list[Job] = list(validated.jobs)
        self.engine.apply_jobs(jobs, reconcile_all=True)
        log.warning("jobs.kept_last_good", jobs=len(jobs))

    def _set_meta(self, key: str, value: str | None) -> bool:
        try:
            self.db.set_meta(key, value)
        except ChronosError as exc:
            log.error("state.write_failed", key=key, error=str(exc))
            return False
        return True

    async def _on_jobs_changed(self) -> None:
        if _digest_of(self.config.jobs) == self.jobs_digest:
            return
        with self.idle.hold("reload"):
            self.load_jobs()

    # ---------------------------------------------------------------- fire entry points
    # Once shutdown has begun nothing new is claimed: a run started now would only be stopped
    # at the end of shutdown_grace. An unclaimed occurrence is not lost: the caller retries a
    # 503 (and under socket activation reaches the next instance), and a local timer's
    # occurrence is caught up at the next start.
    async def fire(self, job_id: str, fire_at: object) -> FireResult:
        assert isinstance(fire_at, datetime)
        if self._stopping:
            return FireResult("unavailable", 503, job_id, error="chronosd is shutting down")
        return await self.engine.fire(job_id, fire_at)

    async def _on_local_due(self, job_id: str, fire_at: datetime) -> None:
        if self._stopping:
            log.info("fire.deferred", job_id=job_id, fire_at=to_wire(fire_at), reason="stopping")
            return
        # Called a little ahead of the instant (providers/local.py LEAD): the claim is made
        # durable now and the run starts at the instant.
        result = await self.engine.fire(job_id, fire_at, at_instant=True)
        if result.start is not None:
            result.start()

    def health(self) -> dict[str, object]:
        return {"provider": self.provider.name, "jobs": len(self.engine.jobs)}

    def status_line(self) -> str:
        jobs = self.engine.jobs
        if isinstance(jobs, DeferredJobs) and not jobs.loaded:
            armed = jobs.active
        else:
            armed = sum(1 for j in jobs.values() if j.active)
        text = f"{armed} jobs active, provider {self.provider.name}"
        if self.jobs_error:
            text += "; jobs.json invalid (kept last good)"
        if self.reconciler.last_error:
            text += f"; reconcile failing: {self.reconciler.last_error}"
        return text

    # ---------------------------------------------------------------- life cycle
    async def run(self) -> int:
        listeners = await self._listeners()
        raw = [lst.extra(anyio.abc.SocketAttribute.raw_socket, None) for lst in listeners]
        self._listener_fds = [sock.fileno() for sock in raw if sock is not None]
        authenticator = self._authenticator(listeners)
        routes = DaemonRoutes(authenticator=authenticator, fire=self.fire, health=self.health)
        limits = DEFAULT_LIMITS
        if self.socket_activated:
            limits = dataclasses.replace(limits, keepalive_timeout=SOCKET_ACTIVATED_KEEPALIVE)
        self.server = HTTPServer(
            partial(self._answer, routes), on_connections=self._on_connections, limits=limits
        )
        self._set_meta(
            META_DAEMON,
            json.dumps({"owner": self.owner, "pid": os.getpid(), "started": to_wire(utc_now())}),
        )
        watching = child_watcher()  # until every run has ended (the task group's exit)
        watching.__enter__()
        try:
            async with anyio.create_task_group() as tg:
                startup = self.idle.hold("startup")
                startup.__enter__()
                self.engine.bind(tg)
                # Jobs first: recover() decides retries by each job's `retries`.
                with collection_paused():
                    self._load_at_startup()
                    self.engine.recover()
                    self.engine.catch_up()
                    self.engine.start_pending_retries()
                await tg.start(self._serve, listeners)
                # SIGTERM is handled from here on: before READY, and before the tasks below,
                # whose first steps (importing watchfiles, say) hold the loop for a while.
                await tg.start(self._signals, tg.cancel_scope)
                await tg.start(self.reconciler.run, self._on_local_due, self._settled)
                if isinstance(self.provider, LocalProvider):
                    tg.start_soon(self._run_local, self.provider)
                tg.start_soon(self._watch)
                tg.start_soon(self._end_startup_pause)
                tg.start_soon(self._keep_memo)
                startup.__exit__(None, None, None)
                systemd.notify_ready(self.status_line())
                log.info(
                    "daemon.started",
                    pid=os.getpid(),
                    provider=self.provider.name,
                    socket_activated=self.socket_activated,
                    idle_exit=self.idle.idle_exit,
                    listen=[format_listener_address(lst) for lst in listeners],
                )
                await self._idle_monitor()
                await self._shutdown(reason="idle")
                tg.cancel_scope.cancel()
        finally:
            watching.__exit__(None, None, None)
            await self.provider.aclose()
            self._flush_last_good()
            self._save_memo()
            self._save_layout()
            self._save_settled()
            self._set_meta(META_DAEMON, None)
            self.db.close()
        log.info("daemon.stopped", pid=os.getpid())
        return 0

    async def _serve(
        self,
        listeners: Sequence[anyio.abc.SocketListener],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        assert self.server is not None
        try:
            await self.server.serve(listeners, task_status=task_status)
        finally:
            self._served.set()

    async def _run_local(self, provider: LocalProvider) -> None:
        # Residency follows the timers' arms (the reconciler keeps the idle tracker told).
        await provider.run(self._on_local_due)

    async def _answer(self, routes: DaemonRoutes, request: Request) -> Response:
        """The routes' answer; the first one sent releases the watcher (see WATCH_DELAY)."""
        response = await routes(request)
        if self._first_reply.is_set():
            return response
        then = response.on_sent

        def sent() -> None:
            try:
                if then is not None:
                    then()
            finally:
                self._first_reply.set()

        return dataclasses.replace(response, on_sent=sent)

    def _on_connections(self, count: int) -> None:
        """The server reports its open connection count; any open one keeps us up."""
        if count and not self._conn_held:
            self.idle.acquire("connection")
        elif not count and self._conn_held:
            self.idle.release("connection")
        if count < self._connections:
            self._first_reply.set()  # a connection closed without an answer counts as one
        self._connections = count
        self._conn_held = bool(count)

    async def _settled(self) -> None:
        """Return once the request that woke us (if any) has been answered (see WATCH_DELAY)."""
        if not (self._first_reply.is_set() or self._conn_held or self._connection_waiting()):
            # Nothing came through the socket (a path unit, a plain start): no reply to wait
            # for, and waiting would only delay the start-up reconcile.
            return
        with anyio.move_on_after(WATCH_DELAY):
            await self._first_reply.wait()
        if self._conn_held:
            # A request still on its way in (a slow client, a loaded machine) is answered first.
            await self._first_reply.wait()

    def _connection_waiting(self) -> bool:
        """Whether a listener has a connection not yet accepted (the one that woke us)."""
        if not self._listener_fds:
            return self.socket_activated  # cannot tell: wait as for a request
        poller = select.poll()
        for fd in self._listener_fds:
            poller.register(fd, select.POLLIN)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True  # cannot tell: wait as for a request

    async def _end_startup_pause(self) -> None:
        """The collector, held off since ``python -m chronosd`` began, runs again once the
        request that woke us was answered (nothing made before that is garbage)."""
        await self._settled()
        end_startup_pause()

    async def _watch(self) -> None:
        await self._settled()
        if self._stopping:
            return
        from chronosd.daemon.watcher import watch_jobs_file

        try:
            async with anyio.create_task_group() as tg:
                await tg.start(
                    partial(watch_jobs_file, debounce_ms=WATCH_DEBOUNCE_MS),
                    self.config.jobs,
                    self._on_jobs_changed,
                )
                log.info("watch.started", path=str(self.config.jobs))
                await self._on_jobs_changed()
        except Exception as exc:  # a watcher failure must not take the fire path down
            log.error("watcher.failed", error=str(exc))

    async def _idle_monitor(self) -> None:
        assert self.server is not None
        while True:
            await self.idle.wait_idle()
            self.server.pause_accepting()
            # Edits that arrived while we ran may have coalesced into a path-unit trigger
            # that is already spent: re-read jobs.json before leaving.
            changed = _digest_of(self.config.jobs) != self.jobs_digest
            if changed:
                self.load_jobs()
            if changed or not self.idle.is_idle:
                self.server.resume_accepting()
                continue
            return

    async def _shutdown(self, *, reason: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        systemd.notify_stopping(f"stopping ({reason})")
        log.info("daemon.stopping", reason=reason, running=self.engine.active_runs)
        if self.server is not None:
            self.server.stop_accepting()
        # Requests already being received or handled are answered (a claim committed for one
        # must still start its run), then the runs get what is left of the grace.
        with anyio.move_on_after(self.config.shutdown_grace):
            await self._served.wait()
            await self.engine.wait_runs()
        if self.engine.active_runs:
            log.warning("daemon.stopping_runs", running=self.engine.active_runs)
            self.engine.stop_runs()
            with anyio.move_on_after(15):
                await self.engine.wait_runs()

    async def _signals(
        self,
        scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload_config()
                    continue
                await self._shutdown(reason=signal.Signals(signum).name)
                scope.cancel()
                return

    def _reload_config(self) -> None:
        try:
            config = load_config(
                config_path=self.options.config_path, overrides=dict(self.options.overrides)
            )
        except ConfigError as exc:
            log.error("config.rejected", error=str(exc))
            return
        self.config = config
        self.engine.config = config
        log.info("config.reloaded", source=str(config.source) if config.source else None)
        self.load_jobs()


class _NeedsLoad(Exception):
    """A DeferredJobs lookup that only loading the whole file can answer."""


class DeferredJobs(Mapping[str, Job]):
    """The job table of a start-up that found jobs.json as it last applied it (see the mark).

    Until loaded only its size is known. A lookup of one job (a fire, its re-arm, a job due)
    validates that job alone through ``lookup`` (None: no such job); past POINT_LOOKUPS of
    them, or when ``lookup`` cannot answer, or for anything that needs every job, the file
    is loaded through ``load``, which applies it to the Engine (replacing this table there)
    and returns the new table.
    """

    POINT_LOOKUPS = 64

    def __init__(
        self,
        load: Callable[[], Mapping[str, Job]],
        lookup: Callable[[str], Job | None],
        *,
        digest: str,
        count: int,
        active: int,
    ) -> None:
        self.digest = digest  # sha256 of the jobs.json these jobs are of (applied as it is)
        self._load = load
        self._lookup = lookup
        self._jobs: Mapping[str, Job] | None = None
        self._found: dict[str, Job | None] = {}
        self._count = count
        self.active = active  # how many of them are enabled and not paused

    def seed(self, jobs: Mapping[str, Job | None]) -> None:
        """Answers known already (jobs just validated and applied); they count as lookups."""
        self._found.update(jobs)

    def _point(self, job_id: str) -> Job | None:
        """The job by a lookup of its own; raises _NeedsLoad when only a load can tell."""
        if job_id in self._found:
            return self._found[job_id]
        if len(self._found) >= self.POINT_LOOKUPS:
            raise _NeedsLoad(job_id)
        try:
            job = self._lookup(job_id)
        except ChronosError as exc:
            raise _NeedsLoad(job_id) from exc
        self._found[job_id] = job
        return job

    @property
    def loaded(self) -> bool:
        return self._jobs is not None

    def _table(self) -> Mapping[str, Job]:
        if self._jobs is None:
            jobs = self._load()
            if isinstance(jobs, DeferredJobs):
                raise StateError("the jobs of the settled start-up could not be loaded")
            self._jobs = jobs
        return self._jobs

    def __getitem__(self, job_id: str) -> Job:
        if self._jobs is None:
            try:
                job = self._point(job_id)
            except _NeedsLoad:
                pass
            else:
                if job is None:
                    raise KeyError(job_id)
                return job
        return self._table()[job_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return self._count if self._jobs is None else len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        if isinstance(job_id, str):
            try:
                self[job_id]
            except KeyError:
                return False
            return True
        return job_id in self._table()


class _KnownSchedules(Mapping[str, str]):
    """{job id: schedule_key} of state.db, read per id when asked.

    Validation asks only about `at` jobs (a one-shot that already fired stays in jobs.json and
    its past `at` is not an error), and records it remembers are not asked about at all, so
    reading the state of every job up front would mostly be wasted. Past a few questions the
    whole table is read once.
    """

    _SINGLE_READS = 64

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._asked = 0
        self._all: dict[str, JobState] | None = None

    def __getitem__(self, job_id: str) -> str:
        if self._all is None and self._asked < self._SINGLE_READS:
            self._asked += 1
            js = self._db.get_job(job_id)
        else:
            js = self._states().get(job_id)
        if js is None:
            raise KeyError(job_id)
        return js.schedule_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._states())

    def __len__(self) -> int:
        return len(self._states())

    def _states(self) -> dict[str, JobState]:
        if self._all is None:
            self._all = self._db.all_jobs()
        return self._all


# (sha256 of jobs.json, its text, the compared records of the applied file, those of jobs.json)
_Compared = tuple[str, str, dict[str, tuple[int, object]], dict[str, tuple[int, object]]]


def _records_by_id(records: object) -> dict[str, tuple[int, object]] | None:
    """{id: (index, record)} of a "jobs" list; None if a record has no text id or two share
    one (only a full load reports those as it should)."""
    if not isinstance(records, list):
        return None
    by_id: dict[str, tuple[int, object]] = {}
    for index, record in enumerate(records):
        job_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(job_id, str) or job_id in by_id:
            return None
        by_id[job_id] = (index, record)
    return by_id


def _digest_of(path: Path) -> str | None:
    """sha256 of jobs.json; None when it is not a readable regular file of sane size.

    Opened as chronosd/jobs/file.py reads it: a FIFO or a device behind a symlink must not
    block the event loop or be read without end.
    """
    from chronosd.jobs.file import MAX_FILE_BYTES

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        total = 0
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                return None
            digest.update(chunk)
        return digest.hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def run_daemon(config: Config, options: RunOptions | None = None) -> int:
    daemon = Daemon(config, options)
    return anyio.run(daemon.run, backend="asyncio")


__all__ = ["Daemon", "RunOptions", "run_daemon"]
