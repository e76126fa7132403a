"""Job: one validated record of jobs.json (a frozen value).

Validation of whole documents lives in ``chronosd.jobs.validate``; this module
only holds the value types so that every room can import them cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from chronosd.jobs.schedule import Schedule

Overlap = Literal["skip", "allow", "queue", "replace"]
OVERLAPS: tuple[Overlap, ...] = ("skip", "allow", "queue", "replace")

# Defaults of DESIGN.md 3.1 (the config may override timezone and timeout).
DEFAULT_TIMEOUT = 3600.0
KILL_AFTER = 10.0


@dataclass(frozen=True)
class Job:
    """One validated job of jobs.json, with its defaults filled in."""

    id: str
    schedule_text: str  # as written (Hermes objects are rendered to the text form)
    schedule: Schedule
    timezone: str
    command: tuple[str, ...] | str | None  # argv, shell string, or None = runner.default_command
    name: str | None = None
    enabled: bool = True
    paused: bool = False
    timeout: float = DEFAULT_TIMEOUT  # seconds
    overlap: Overlap = "skip"
    catch_up: bool = True
    misfire_grace: float | None = None  # seconds; None = derived from the schedule
    jitter: float = 0.0  # seconds
    repeat: int | None = None  # max occurrences started; None = forever
    retries: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    spec_hash: str = ""  # stable hash of the fields that define behaviour
    record: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the raw JSON record

    @property
    def active(self) -> bool:
        """Whether the job wants to be armed (enabled and not paused)."""
        return self.enabled and not self.paused


@dataclass(frozen=True)
class Problem:
    """One validation finding; ``where`` is the job id or ``jobs[3]``, ``field`` may be empty."""

    where: str
    field: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        place = f"job {self.where}" if self.where else "file"
        if self.field:
            place += f": {self.field}"
        return f"{place}: {self.message}"
