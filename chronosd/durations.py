"""Durations as people write them: `90s`, `30m`, `2h`, `1d`, `1h30m`; numbers are seconds."""

from __future__ import annotations

import re

from chronosd.errors import DurationError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+")


def parse_duration(value: str | int | float) -> float:
    """Return the duration in seconds; raise DurationError with the accepted forms."""
    if isinstance(value, bool):
        raise DurationError(f"duration {value!r} is not a duration; write e.g. 90s, 30m, 1h30m")
    if isinstance(value, int | float):
        if value < 0:
            raise DurationError(f"duration {value!r} is negative")
        return float(value)
    text = value.strip().lower().replace(" ", "")
    if not text:
        raise DurationError("duration is empty; write e.g. 90s, 30m, 1h30m")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds < 0:
            raise DurationError(f"duration {value!r} is negative")
        return seconds
    if not _WHOLE.fullmatch(text):
        raise DurationError(
            f"duration {value!r} is not understood; write e.g. 90s, 30m, 2h, 1d, 1h30m"
        )
    return sum(float(num) * _UNITS[unit] for num, unit in _PART.findall(text))


def format_duration(seconds: float) -> str:
    """Compact human form: 0s, 45s, 1m30s, 2h, 1d2h (whole seconds)."""
    total = round(abs(seconds))
    if total == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, total = divmod(total, size)
        if count:
            parts.append(f"{count}{unit}")
    return ("-" if seconds < 0 else "") + "".join(parts)
