"""One exception tree, rooted at ChronosError.

Every message says what failed, why, and (where there is something to do)
what to do about it; the CLI prints it as one line: ``chronosd: <message>``.
"""

from __future__ import annotations


class ChronosError(Exception):
    """Base of every error chronosd raises on purpose."""


class ConfigError(ChronosError):
    """The configuration (file, environment or flags) is invalid."""


class DurationError(ChronosError, ValueError):
    """A duration string could not be parsed."""


class ScheduleError(ChronosError, ValueError):
    """A schedule string is invalid or can never fire."""


class JobsFileError(ChronosError):
    """jobs.json cannot be read, parsed or validated, or is unsafe."""


class UnknownJobError(ChronosError):
    """A command named a job that is not in jobs.json."""


class StateError(ChronosError):
    """The state database is unavailable or inconsistent."""


class ProviderError(ChronosError):
    """A provider (NAS or local) failed to arm, cancel or list."""
