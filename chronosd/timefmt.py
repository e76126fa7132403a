"""Instants on the wire: UTC, whole seconds, ``YYYY-MM-DDTHH:MM:SS+00:00``."""

from __future__ import annotations

import functools
from datetime import UTC, datetime


def to_wire(instant: datetime) -> str:
    """Format an aware instant as UTC with whole seconds."""
    if instant.tzinfo is UTC:
        return _utc_wire(instant)
    if instant.tzinfo is None:
        raise ValueError("naive datetime given where an instant is required")
    return _utc_wire(instant.astimezone(UTC))


# A fire formats the same few instants a score of times (the occurrence, its next fire, now),
# in logs, rows and requests; they are UTC. Only UTC datetimes are keys: two datetimes of one
# zone that differ only in fold compare (and hash) equal but are different instants.
@functools.lru_cache(maxsize=1024)
def _utc_wire(instant: datetime) -> str:
    return instant.replace(microsecond=0).isoformat()


def parse_instant(text: str) -> datetime:
    """Parse an ISO-8601 instant with an explicit offset; return it in UTC.

    Raises ValueError for a naive or malformed timestamp.
    """
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("instant must be an ISO-8601 string with an offset")
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"instant {text!r} has no UTC offset")
    return value.astimezone(UTC)


def utc_now() -> datetime:
    """The wall clock as an aware UTC datetime (the only place that reads it)."""
    return datetime.now(UTC)
