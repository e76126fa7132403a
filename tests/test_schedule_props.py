"""Property tests: cron fires agree with a brute-force walk of real time (DESIGN.md 4 DST rule).

The oracle shares no code with chronosd.jobs.schedule: it walks UTC minute by
minute, reads each instant's wall clock in the zone and applies the rule as
written. Fixed-time jobs: a wall time fires on its first pass only, and wall
times skipped by a gap fire at the first instant after the gap. Other jobs:
every instant whose wall time matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.jobs.schedule import parse_schedule

ZONES = ("Europe/London", "America/New_York", "Australia/Lord_Howe", "America/Sao_Paulo", "UTC")
WINDOW_START = datetime(2025, 1, 1, tzinfo=UTC)
WINDOW_END = datetime(2027, 1, 1, tzinfo=UTC)
# Sao Paulo has had no DST since 2019; its last transitions are walked as well.
EXTRA_WINDOWS = {
    "America/Sao_Paulo": (datetime(2018, 10, 1, tzinfo=UTC), datetime(2019, 3, 1, tzinfo=UTC))
}
ORACLE_CAP_MINUTES = 2 * 24 * 60
ITERATIONS = 6
DST_ITERATIONS = 10
ANCHOR = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Expr:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday (7 folded in)
    day_or: bool  # Vixie: both day fields restricted (neither starts with "*")
    fixed: bool


def _field(
    low: int, high: int, hot: tuple[int, ...] = ()
) -> st.SearchStrategy[tuple[str, frozenset[int]]]:
    """Field text with the set it denotes; ``hot`` values are drawn more often."""

    def star_step(step: int) -> tuple[str, frozenset[int]]:
        return f"*/{step}", frozenset(range(low, high + 1, step))

    def single(value: int) -> tuple[str, frozenset[int]]:
        return str(value), frozenset({value})

    def ranged(bounds: tuple[int, int], step: int) -> tuple[str, frozenset[int]]:
        start, end = sorted(bounds)
        text = f"{start}-{end}" if step == 1 else f"{start}-{end}/{step}"
        return text, frozenset(range(start, end + 1, step))

    value = (
        st.one_of(st.sampled_from(hot), st.integers(low, high)) if hot else st.integers(low, high)
    )
    term = st.one_of(
        st.builds(single, value),
        st.builds(ranged, st.tuples(value, value), st.integers(1, 4)),
    )

    def joined(terms: list[tuple[str, frozenset[int]]]) -> tuple[str, frozenset[int]]:
        return ",".join(t for t, _ in terms), frozenset().union(*(v for _, v in terms))

    return st.one_of(
        st.just(("*", frozenset(range(low, high + 1)))),
        st.builds(star_step, st.integers(1, 12)),
        term,
        st.lists(term, min_size=2, max_size=3).map(joined),
    )


MINUTE_FIELDS = _field(0, 59)
# The local hours in which the zones under test change their clocks.
HOUR_FIELDS = _field(0, 23, hot=(0, 1, 2, 3, 22, 23))
# Days are drawn broad so that most next fires fall inside the oracle's window.
DAY_FIELDS = st.one_of(
    st.just(("*", frozenset(range(1, 32)))),
    st.sampled_from(
        [
            ("*/2", frozenset(range(1, 32, 2))),
            ("1-31/3", frozenset(range(1, 32, 3))),
            ("2-30/2", frozenset(range(2, 31, 2))),
        ]
    ),
    _field(1, 31),
)
WEEKDAY_FIELDS = st.one_of(st.just(("*", frozenset(range(8)))), _field(0, 7))


@st.composite
def expressions(draw: st.DrawFn) -> Expr:
    minute_text, minutes = draw(MINUTE_FIELDS)
    hour_text, hours = draw(HOUR_FIELDS)
    day_text, days = draw(DAY_FIELDS)
    weekday_text, weekdays = draw(WEEKDAY_FIELDS)
    return Expr(
        text=f"{minute_text} {hour_text} {day_text} * {weekday_text}",
        minutes=minutes,
        hours=hours,
        days=days,
        months=frozenset(range(1, 13)),
        weekdays=frozenset(day % 7 for day in weekdays),
        day_or=not day_text.startswith("*") and not weekday_text.startswith("*"),
        fixed="*" not in minute_text and "*" not in hour_text,
    )


def _matches(expr: Expr, wall: datetime) -> bool:
    if wall.minute not in expr.minutes or wall.hour not in expr.hours:
        return False
    if wall.month not in expr.months:
        return False
    dom = wall.day in expr.days
    dow = (wall.isoweekday() % 7) in expr.weekdays
    return (dom or dow) if expr.day_or else (dom and dow)


def _oracle_fires(expr: Expr, local: datetime, previous: datetime) -> bool:
    """Whether the instant with wall clock ``local`` fires; ``previous`` is a minute earlier."""
    if not expr.fixed:
        return _matches(expr, local)
    if local.fold == 0 and _matches(expr, local):
        return True
    # Wall minutes skipped between the previous minute and this one (a gap).
    wall_now = local.replace(tzinfo=None)
    skipped = previous.replace(tzinfo=None) + timedelta(minutes=1)
    while skipped < wall_now:
        if _matches(expr, skipped):
            return True
        skipped += timedelta(minutes=1)
    return False


def _oracle_next(expr: Expr, zone: ZoneInfo, after: datetime) -> int | None:
    """First fire (POSIX seconds) strictly after ``after`` within the cap, else None."""
    first = (int(after.timestamp() // 1) // 60 + 1) * 60
    previous = datetime.fromtimestamp(first - 60, zone)
    for step in range(ORACLE_CAP_MINUTES):
        instant = first + 60 * step
        local = datetime.fromtimestamp(instant, zone)
        if _oracle_fires(expr, local, previous):
            return instant
        previous = local
    return None


@cache
def _transitions(zone_name: str) -> tuple[datetime, ...]:
    zone = ZoneInfo(zone_name)
    windows = [
        (WINDOW_START, WINDOW_END),
        *([EXTRA_WINDOWS[zone_name]] if zone_name in EXTRA_WINDOWS else []),
    ]
    found: list[datetime] = []
    for start, end in windows:
        probe = start
        while probe < end:
            nxt = probe + timedelta(hours=1)
            if probe.astimezone(zone).utcoffset() != nxt.astimezone(zone).utcoffset():
                found.append(nxt)
            probe = nxt
    return tuple(found)


@st.composite
def starts(draw: st.DrawFn, zone_name: str) -> datetime:
    """An instant in 2025-2026, often within a day of a DST transition."""
    transitions = _transitions(zone_name)
    jitter = timedelta(
        seconds=draw(st.integers(0, 59)), microseconds=draw(st.sampled_from([0, 1, 500_000]))
    )
    near_transition = draw(st.booleans())
    if transitions and near_transition:
        near = draw(st.sampled_from(transitions))
        return near + timedelta(minutes=draw(st.integers(-24 * 60, 24 * 60))) + jitter
    span = int((WINDOW_END - WINDOW_START).total_seconds() // 60)
    return WINDOW_START + timedelta(minutes=draw(st.integers(0, span))) + jitter


@st.composite
def cases(draw: st.DrawFn) -> tuple[Expr, str, datetime]:
    zone_name = draw(st.sampled_from(ZONES))
    return draw(expressions()), zone_name, draw(starts(zone_name))


def _check_against_oracle(expr: Expr, zone_name: str, start: datetime, iterations: int) -> None:
    zone = ZoneInfo(zone_name)
    schedule = parse_schedule(expr.text, zone_name)
    assert schedule.fixed_time == expr.fixed
    after = start
    for _ in range(iterations):
        got = schedule.next_after(after, anchor=ANCHOR)
        assert got is not None
        assert got > after
        assert got.tzinfo == UTC and got.microsecond == 0
        expected = _oracle_next(expr, zone, after)
        if expected is None:
            # Nothing within the oracle's window: the engine must agree that the
            # next fire lies beyond it.
            cap_end = (int(after.timestamp() // 60) + 1 + ORACLE_CAP_MINUTES) * 60
            assert got.timestamp() >= cap_end
            return
        assert got == datetime.fromtimestamp(expected, UTC), (
            f"{expr.text} in {zone_name} after {after.isoformat()}: "
            f"got {got.astimezone(zone).isoformat()}, "
            f"oracle {datetime.fromtimestamp(expected, zone).isoformat()}"
        )
        after = got


@settings(max_examples=250, deadline=None)
@given(cases())
def test_cron_next_after_agrees_with_a_walk_of_real_time(case: tuple[Expr, str, datetime]) -> None:
    expr, zone_name, start = case
    _check_against_oracle(expr, zone_name, start, ITERATIONS)


DST_TRANSITIONS = tuple((zone, moment) for zone in ZONES for moment in _transitions(zone))


def _hours_around(zone_name: str, transition: datetime) -> tuple[int, ...]:
    """Local hours from one hour before a transition to two after, skipped ones included."""
    wall = (transition - timedelta(minutes=1)).astimezone(ZoneInfo(zone_name)).replace(tzinfo=None)
    return tuple(sorted({(wall + timedelta(minutes=m)).hour for m in range(-60, 121, 30)}))


@st.composite
def dst_cases(draw: st.DrawFn) -> tuple[Expr, str, datetime]:
    """Daily jobs whose hours straddle a DST transition, started shortly before it."""
    zone_name, transition = draw(st.sampled_from(DST_TRANSITIONS))
    minute_text, minutes = draw(MINUTE_FIELDS)
    chosen = draw(
        st.lists(
            st.sampled_from(_hours_around(zone_name, transition)),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    shape = draw(st.sampled_from(["list", "range", "star"]))
    if shape == "list":
        hour_text, hours = ",".join(map(str, sorted(chosen))), frozenset(chosen)
    elif shape == "range":
        hour_text = f"{min(chosen)}-{max(chosen)}"
        hours = frozenset(range(min(chosen), max(chosen) + 1))
    else:
        hour_text, hours = "*", frozenset(range(24))
    expr = Expr(
        text=f"{minute_text} {hour_text} * * *",
        minutes=minutes,
        hours=hours,
        days=frozenset(range(1, 32)),
        months=frozenset(range(1, 13)),
        weekdays=frozenset(range(7)),
        day_or=False,
        fixed="*" not in minute_text and "*" not in hour_text,
    )
    start = transition - timedelta(
        minutes=draw(st.integers(0, 4 * 60)), seconds=draw(st.integers(0, 59))
    )
    return expr, zone_name, start


@settings(max_examples=200, deadline=None)
@given(dst_cases())
def test_cron_next_after_agrees_with_a_walk_across_dst_transitions(
    case: tuple[Expr, str, datetime],
) -> None:
    expr, zone_name, start = case
    _check_against_oracle(expr, zone_name, start, DST_ITERATIONS)


@settings(max_examples=150, deadline=None)
@given(
    interval=st.integers(1, 3 * 86400),
    anchor_offset=st.integers(0, 2 * 365 * 86400),
    steps=st.lists(st.integers(0, 5 * 86400), min_size=1, max_size=4),
    microsecond=st.integers(0, 999_999),
)
def test_every_fires_on_exact_multiples_of_the_interval_from_the_anchor(
    interval: int, anchor_offset: int, steps: list[int], microsecond: int
) -> None:
    schedule = parse_schedule(f"every {interval}s", "Europe/London")
    anchor = WINDOW_START + timedelta(seconds=anchor_offset, microseconds=microsecond)
    base = anchor.replace(microsecond=0)
    after = anchor
    previous: datetime | None = None
    for step in steps:
        after = after + timedelta(seconds=step)
        got = schedule.next_after(after, anchor=anchor)
        assert got is not None
        assert got > after
        multiple, remainder = divmod(int((got - base).total_seconds()), interval)
        assert multiple >= 1 and remainder == 0
        # The first multiple past ``after``: the one before it is not past it.
        assert multiple == 1 or got - timedelta(seconds=interval) <= after
        if previous is not None:
            assert got >= previous
        previous = got


def test_oracle_models_both_dst_directions() -> None:
    """The oracle itself: a fixed job collapses a gap and skips second passes."""
    london = ZoneInfo("Europe/London")
    fixed = Expr(
        "30 1 * * *",
        frozenset({30}),
        frozenset({1}),
        frozenset(range(1, 32)),
        frozenset(range(1, 13)),
        frozenset(range(7)),
        False,
        True,
    )
    spring = _oracle_next(fixed, london, datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert spring == int(datetime(2026, 3, 29, 1, tzinfo=UTC).timestamp())
    fall = _oracle_next(fixed, london, datetime(2026, 10, 25, 0, 31, tzinfo=UTC))
    assert fall == int(datetime(2026, 10, 26, 1, 30, tzinfo=UTC).timestamp())
    hourly = Expr(
        "0 * * * *",
        frozenset({0}),
        frozenset(range(24)),
        frozenset(range(1, 32)),
        frozenset(range(1, 13)),
        frozenset(range(7)),
        False,
        False,
    )
    second_pass = _oracle_next(hourly, london, datetime(2026, 10, 25, 0, 30, tzinfo=UTC))
    assert second_pass == int(datetime(2026, 10, 25, 1, tzinfo=UTC).timestamp())
