"""The provider seam: whatever holds the one-shot wake-ups (the NAS or local timers)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from chronosd.errors import ProviderError

# Called by a resident provider when an armed instant comes due.
DueCallback = Callable[[str, datetime], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Arm:
    """One arm a provider holds."""

    job_id: str
    fire_at: datetime
    schedule_id: str = ""


class ProviderRejected(ProviderError):
    """The provider refused the request for good (401/403, another 4xx): no retry loop."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class ProviderUnavailable(ProviderError):
    """A transient failure (429, 5xx, timeout, connection error); retry with backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Provider(Protocol):
    name: str
    # Whether arms outlive this process (the NAS) or vanish with it (local timers).
    persistent: bool

    @property
    def resident(self) -> bool:
        """Whether the process must stay up for armed jobs to fire."""
        ...

    async def arm(self, job_id: str, fire_at: datetime, *, dedup_key: str) -> str:
        """Arm (or replace) the one-shot of ``job_id``; return the provider's schedule id."""
        ...

    async def cancel(self, job_id: str) -> None: ...

    async def list_armed(self) -> list[Arm]: ...

    async def aclose(self) -> None: ...
