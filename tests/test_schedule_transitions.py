"""Finding a zone's offset changes: the kept per-zone transitions answer as probing did."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.jobs import schedule
from chronosd.jobs.schedule import _PROBE, _first_change, _fixed_offset, _offset, parse_schedule

ZONES = [
    "Europe/London",
    "America/New_York",
    "Australia/Lord_Howe",  # a 30-minute shift
    "Pacific/Apia",  # skipped 2011-12-30 entirely
    "America/Sao_Paulo",  # stopped daylight saving in 2019
    "Asia/Tokyo",
    "Africa/Casablanca",  # suspends its offset for Ramadan, twice a year
    "UTC",
    "Etc/GMT+5",
]


def probed_first_change(zone: ZoneInfo, start: int, end: int, offset: int) -> int | None:
    """The day-by-day probing the kept transitions replaced."""
    low = start
    while low < end:
        high = min(low + _PROBE, end)
        if _offset(zone, high) != offset:
            while high - low > 1:
                middle = (low + high) // 2
                if _offset(zone, middle) == offset:
                    low = middle
                else:
                    high = middle
            return high
        low = high
    return None


SECONDS = st.integers(
    int(datetime(2005, 1, 1, tzinfo=UTC).timestamp()),
    int(datetime(2035, 1, 1, tzinfo=UTC).timestamp()),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(ZONES), start=SECONDS, span=st.integers(0, 3 * 366 * 86400))
def test_the_first_change_is_the_one_probing_finds(name: str, start: int, span: int) -> None:
    zone = ZoneInfo(name)
    offset = _offset(zone, start)
    end = start + span
    assert _first_change(zone, start, end, offset) == probed_first_change(zone, start, end, offset)


@pytest.mark.parametrize("name", ZONES)
def test_every_change_over_two_years_is_found_in_order(name: str) -> None:
    zone = ZoneInfo(name)
    cursor = int(datetime(2011, 1, 1, tzinfo=UTC).timestamp())
    end = int(datetime(2013, 1, 1, tzinfo=UTC).timestamp())
    found: list[int] = []
    while (change := _first_change(zone, cursor, end, _offset(zone, cursor))) is not None:
        assert _offset(zone, change) != _offset(zone, change - 1)
        found.append(change)
        cursor = change
    expected: list[int] = []
    cursor = int(datetime(2011, 1, 1, tzinfo=UTC).timestamp())
    while (change := probed_first_change(zone, cursor, end, _offset(zone, cursor))) is not None:
        expected.append(change)
        cursor = change
    assert found == expected
    assert bool(found) == (name not in ("UTC", "Etc/GMT+5", "Asia/Tokyo"))


@pytest.mark.parametrize("chunk", [3600, 7200, 86400 * 3])
def test_a_change_on_either_side_of_a_chunk_boundary_is_found(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    zone = ZoneInfo("Europe/London")
    # 2005-03-27 01:00 UTC, a spring-forward, lies on a boundary of hour-long chunks.
    change = int(datetime(2005, 3, 27, 1, tzinfo=UTC).timestamp())
    monkeypatch.setattr(schedule, "_CHUNK", chunk)
    schedule._changes_in_chunk.cache_clear()
    try:
        for start in range(change - 3, change + 2):
            for end in (change - 1, change, change + 1, change + 5 * 86400):
                offset = _offset(zone, start)
                assert _first_change(zone, start, end, offset) == probed_first_change(
                    zone, start, end, offset
                ), (start, end)
    finally:
        schedule._changes_in_chunk.cache_clear()


@pytest.mark.parametrize(
    ("name", "fixed"),
    [("UTC", True), ("Etc/GMT+5", True), ("Etc/UTC", True), ("Europe/London", False)],
)
def test_zones_without_transitions_are_recognised(name: str, fixed: bool) -> None:
    assert _fixed_offset(ZoneInfo(name)) is fixed


@pytest.mark.parametrize("zone", ["UTC", "Etc/GMT-3", "Europe/Berlin"])
def test_a_cron_schedule_parses_to_the_same_value_in_any_zone(zone: str) -> None:
    parsed = parse_schedule("30 2 * * 1-5", zone)
    assert (parsed.kind, parsed.cron, parsed.fixed_time) == ("cron", "0 30 2 * * 1-5", True)
    reference = datetime(2025, 3, 28, tzinfo=UTC)
    fires = parsed.upcoming(reference, anchor=reference, count=3)
    assert len(fires) == 3 and fires == sorted(fires)
