"""Logging: JSON lines for journald, readable console output on a TTY.

Events are ``noun.verb`` names with key-value context, structlog style
(``log.info("fire.claimed", job_id=...)``). chronosd starts on every
wake-up, so the JSON-lines path that runs under systemd is written out here
in a few lines and does not import structlog at all; structlog renders the
console output on a TTY, and serves every logger until ``setup_logging``
chose JSON lines (in-process use, tests that capture structlog events).
"""

from __future__ import annotations

import json
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_SECRET_KEYS = frozenset({"token", "authorization", "secret", "password", "jwt"})


class _Settings:
    json_lines = False  # set by setup_logging(); until then structlog serves
    level = 20


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Secrets must never reach the journal, whoever passes them by mistake.
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    return event


def setup_logging(level: str = "info", *, json_lines: bool | None = None) -> None:
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    _Settings.level = _LEVELS.get(level, 20)
    _Settings.json_lines = json_lines
    if not json_lines:
        _configure_structlog(level)


def _configure_structlog(level: str) -> None:
    import logging

    import structlog

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Logger:
    """The part of structlog's BoundLogger chronosd uses: level methods and bind()."""

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any] | None = None) -> None:
        self._context = context or {}

    def bind(self, **context: Any) -> Logger:
        return Logger({**self._context, **context})

    def debug(self, event: str, **kw: Any) -> None:
        self._emit("debug", 10, event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit("info", 20, event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit("warning", 30, event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit("error", 40, event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        import traceback  # only when something failed: off the start-up path

        kw.setdefault("exception", traceback.format_exc().rstrip())
        self._emit("error", 40, event, kw)

    def _emit(self, method: str, levelno: int, event: str, kw: dict[str, Any]) -> None:
        if not _Settings.json_lines:
            import structlog

            getattr(structlog.get_logger().bind(**self._context), method)(event, **kw)
            return
        if levelno < _Settings.level:
            return
        record: dict[str, Any] = {**self._context, **kw}
        _redact(None, method, record)
        record["event"] = event
        record["level"] = method
        record["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        line = json.dumps(record, default=str, ensure_ascii=False)
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed journal stream must not take the daemon down


def get_logger(name: str | None = None) -> Logger:
    """A logger; ``name`` is accepted for familiarity and not rendered."""
    return Logger()
