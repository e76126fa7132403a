"""chronosd.jobs.schedule: grammar, errors, fire instants and the DST rule (DESIGN.md 3.1, 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest

from chronosd.errors import ScheduleError
from chronosd.jobs.schedule import (
    Schedule,
    default_misfire_grace,
    parse_schedule,
    validate_timezone,
)

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local_fires(text: str, zone: str, start: datetime, end: datetime) -> list[str]:
    """Fires in [start, end) as local ISO strings (offset included), in order."""
    schedule = parse_schedule(text, zone)
    found: list[str] = []
    cursor = start - timedelta(seconds=1)
    while True:
        fire = schedule.next_after(cursor, anchor=ANCHOR)
        assert fire is not None
        if fire >= end:
            return found
        assert fire > cursor
        found.append(fire.astimezone(ZoneInfo(zone)).isoformat())
        cursor = fire


def local_day(zone: str, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    """The real instants of one local calendar day (its first to its last instant)."""
    tz = ZoneInfo(zone)
    start = datetime(year, month, day, tzinfo=tz).astimezone(UTC)
    end = (datetime(year, month, day, tzinfo=tz) + timedelta(days=1)).astimezone(UTC)
    return start, end


def next_fires(text: str, zone: str, after: datetime, count: int = 3) -> list[datetime]:
    return parse_schedule(text, zone).upcoming(after, anchor=ANCHOR, count=count)


# --- grammar ---------------------------------------------------------------------------------


def test_five_field_cron_is_normalized_to_six_fields_with_seconds_first() -> None:
    schedule = parse_schedule("30 2 * * *", "Europe/London")
    assert schedule == Schedule(
        kind="cron",
        text="0 30 2 * * *",
        timezone="Europe/London",
        cron="0 30 2 * * *",
        fixed_time=True,
    )
    assert not schedule.one_shot


def test_whitespace_and_lowercase_names_are_normalized() -> None:
    schedule = parse_schedule("  0   9 * jan   mon-fri ", "UTC")
    assert schedule.cron == "0 0 9 * JAN MON-FRI"
    assert next_fires("0 9 * jan mon-fri", "UTC", utc(2026, 1, 2, 12)) == [
        utc(2026, 1, 5, 9),
        utc(2026, 1, 6, 9),
        utc(2026, 1, 7, 9),
    ]


def test_six_field_cron_fires_on_its_seconds() -> None:
    schedule = parse_schedule("*/20 * * * * *", "UTC")
    assert schedule.cron == "*/20 * * * * *"
    assert schedule.upcoming(utc(2026, 1, 1, 12, 0, 5), anchor=ANCHOR, count=3) == [
        utc(2026, 1, 1, 12, 0, 20),
        utc(2026, 1, 1, 12, 0, 40),
        utc(2026, 1, 1, 12, 1, 0),
    ]


@pytest.mark.parametrize(
    ("macro", "cron", "fixed"),
    [
        ("@yearly", "0 0 0 1 1 *", True),
        ("@annually", "0 0 0 1 1 *", True),
        ("@monthly", "0 0 0 1 * *", True),
        ("@weekly", "0 0 0 * * 0", True),
        ("@daily", "0 0 0 * * *", True),
        ("@midnight", "0 0 0 * * *", True),
        ("@hourly", "0 0 * * * *", False),
        ("@DAILY", "0 0 0 * * *", True),
    ],
)
def test_macros_expand_to_their_five_field_equivalents(macro: str, cron: str, fixed: bool) -> None:
    schedule = parse_schedule(macro, "UTC")
    assert (schedule.kind, schedule.cron, schedule.text, schedule.fixed_time) == (
        "cron",
        cron,
        cron,
        fixed,
    )


def test_weekly_macro_fires_on_sundays_at_midnight() -> None:
    assert next_fires("@weekly", "UTC", utc(2026, 1, 1)) == [
        utc(2026, 1, 4),
        utc(2026, 1, 11),
        utc(2026, 1, 18),
    ]


def test_lists_ranges_steps_and_month_names_select_their_values() -> None:
    assert next_fires("0 9,17 * FEB-MAR/1 *", "UTC", utc(2026, 1, 20), 3) == [
        utc(2026, 2, 1, 9),
        utc(2026, 2, 1, 17),
        utc(2026, 2, 2, 9),
    ]
    assert next_fires("10-20/5 3 * * *", "UTC", utc(2026, 1, 1), 4) == [
        utc(2026, 1, 1, 3, 10),
        utc(2026, 1, 1, 3, 15),
        utc(2026, 1, 1, 3, 20),
        utc(2026, 1, 2, 3, 10),
    ]


def test_a_one_value_range_with_a_step_is_that_value() -> None:
    assert parse_schedule("5-5/10 * * * *", "UTC").cron == "0 5 * * * *"
    assert next_fires("5-5/10 * * * *", "UTC", utc(2026, 1, 1), 2) == [
        utc(2026, 1, 1, 0, 5),
        utc(2026, 1, 1, 1, 5),
    ]


def test_l_is_the_last_day_of_the_month() -> None:
    assert next_fires("0 0 L * *", "UTC", utc(2026, 2, 1)) == [
        utc(2026, 2, 28),
        utc(2026, 3, 31),
        utc(2026, 4, 30),
    ]


def test_lw_is_the_last_weekday_of_the_month() -> None:
    # 2026-05-31 is a Sunday: the last weekday of May is Friday the 29th.
    assert next_fires("0 0 LW 5 *", "UTC", utc(2026, 5, 1), 1) == [utc(2026, 5, 29)]


def test_hash_is_the_nth_weekday_of_the_month() -> None:
    assert next_fires("0 0 * * MON#2", "UTC", utc(2026, 1, 1), 2) == [
        utc(2026, 1, 12),
        utc(2026, 2, 9),
    ]


def test_day_number_and_l_is_the_last_such_weekday_of_the_month() -> None:
    assert next_fires("0 0 * * 5L", "UTC", utc(2026, 1, 1), 2) == [
        utc(2026, 1, 30),
        utc(2026, 2, 27),
    ]


def test_day_of_week_seven_is_sunday() -> None:
    assert next_fires("0 0 * * 7", "UTC", utc(2026, 1, 1), 1) == [utc(2026, 1, 4)]


def test_day_fields_are_ored_when_both_are_restricted() -> None:
    # Fridays of April 2026 are 3, 10, 17, 24; the 13th is a Monday.
    assert next_fires("0 0 13 * FRI", "UTC", utc(2026, 4, 1), 4) == [
        utc(2026, 4, 3),
        utc(2026, 4, 10),
        utc(2026, 4, 13),
        utc(2026, 4, 17),
    ]


def test_day_fields_are_anded_when_one_starts_with_a_star() -> None:
    assert next_fires("0 0 */2 * FRI", "UTC", utc(2026, 4, 1), 4) == [
        utc(2026, 4, 3),
        utc(2026, 4, 17),
        utc(2026, 5, 1),
        utc(2026, 5, 15),
    ]


def test_leap_day_schedule_is_accepted_and_fires_in_the_next_leap_year() -> None:
    assert next_fires("0 0 29 2 *", "UTC", utc(2026, 1, 1), 2) == [
        utc(2028, 2, 29),
        utc(2032, 2, 29),
    ]


@pytest.mark.parametrize(
    ("text", "fixed"),
    [
        ("30 1 * * *", True),
        ("0 9,17 * * 1-5", True),
        ("0-59 1 * * *", True),
        ("*/15 1 * * *", False),
        ("0 * * * *", False),
        ("0 */2 * * *", False),
        ("0 1-3,*/6 * * *", False),
        ("@hourly", False),
        ("@daily", True),
        ("* 30 1 * * *", True),
        ("*/10 30 1 * * *", True),
        ("30 * 1 * * *", False),
        ("0 30 */2 * * *", False),
    ],
)
def test_fixed_time_means_no_star_in_the_minute_or_hour_field(text: str, fixed: bool) -> None:
    assert parse_schedule(text, "Europe/London").fixed_time is fixed


def test_every_is_normalized_and_fires_on_multiples_of_the_interval_from_the_anchor() -> None:
    schedule = parse_schedule("Every 90m", "Europe/London")
    assert (schedule.kind, schedule.text, schedule.interval, schedule.cron) == (
        "every",
        "every 1h30m",
        5400.0,
        None,
    )
    anchor = datetime(2026, 1, 1, 10, 0, 0, 700_000, tzinfo=UTC)
    # The anchor counts in whole seconds, like every stored instant.
    assert schedule.next_after(anchor, anchor=anchor) == utc(2026, 1, 1, 11, 30)
    assert schedule.next_after(utc(2026, 1, 1, 11, 30), anchor=anchor) == utc(2026, 1, 1, 13)
    assert schedule.next_after(utc(2026, 1, 1, 12), anchor=anchor) == utc(2026, 1, 1, 13)
    # Never at the anchor itself, even when asked from before it.
    assert schedule.next_after(utc(2025, 12, 1), anchor=anchor) == utc(2026, 1, 1, 11, 30)


def test_every_30m_is_exact_elapsed_time_across_both_dst_transitions() -> None:
    schedule = parse_schedule("every 30m", "Europe/London")
    for transition in (utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)):
        anchor = transition - timedelta(hours=3, minutes=10)
        fires = schedule.upcoming(anchor, anchor=anchor, count=12)
        gaps = {(later - earlier).total_seconds() for earlier, later in pairwise(fires)}
        assert gaps == {1800.0}
        assert fires[0] == anchor + timedelta(minutes=30)
        assert fires[0] < transition < fires[-1]


def test_at_with_an_offset_is_stored_in_utc() -> None:
    schedule = parse_schedule("at 2026-06-18T12:34:56+02:00", "Europe/London")
    assert schedule == Schedule(
        kind="at",
        text="at 2026-06-18T10:34:56+00:00",
        timezone="Europe/London",
        at=utc(2026, 6, 18, 10, 34, 56),
    )
    assert schedule.one_shot


@pytest.mark.parametrize(
    "text", ["2026-06-18T10:34:56Z", "2026-06-18T10:34:56z", "AT 2026-06-18T12:34:56+02:00"]
)
def test_bare_iso_timestamps_and_any_case_at_are_at_schedules(text: str) -> None:
    assert parse_schedule(text, "Asia/Tokyo").at == utc(2026, 6, 18, 10, 34, 56)


@pytest.mark.parametrize("text", ["at 2026-06-18T12:00:00", "2026-06-18 12:00:00"])
def test_naive_at_is_read_in_the_job_zone(text: str) -> None:
    assert parse_schedule(text, "Europe/London").at == utc(2026, 6, 18, 11)
    assert parse_schedule(text, "America/New_York").at == utc(2026, 6, 18, 16)


def test_naive_at_in_a_skipped_wall_time_fires_at_the_end_of_the_gap() -> None:
    assert parse_schedule("at 2026-03-29T01:30:00", "Europe/London").at == utc(2026, 3, 29, 1)
    assert parse_schedule("at 2018-11-04T00:00", "America/Sao_Paulo").at == utc(2018, 11, 4, 3)


def test_naive_at_in_a_repeated_wall_time_fires_on_the_first_pass() -> None:
    assert parse_schedule("at 2026-10-25T01:30:00", "Europe/London").at == utc(2026, 10, 25, 0, 30)


def test_fractional_at_rounds_up_to_the_next_whole_second() -> None:
    schedule = parse_schedule("at 2026-06-18T10:34:56.25+00:00", "UTC")
    assert schedule.at == utc(2026, 6, 18, 10, 34, 57)


def test_at_fires_once_and_then_never() -> None:
    schedule = parse_schedule("at 2026-06-18T10:00:00Z", "UTC")
    assert schedule.next_after(utc(2026, 6, 18, 9, 59, 59), anchor=ANCHOR) == utc(2026, 6, 18, 10)
    assert schedule.next_after(utc(2026, 6, 18, 10), anchor=ANCHOR) is None
    assert schedule.upcoming(utc(2026, 1, 1), anchor=ANCHOR, count=3) == [utc(2026, 6, 18, 10)]
    assert schedule.period(anchor=ANCHOR) is None


def test_in_fires_once_after_the_anchor() -> None:
    schedule = parse_schedule("in 30m", "Europe/London")
    assert (schedule.kind, schedule.text, schedule.interval, schedule.one_shot) == (
        "in",
        "in 30m",
        1800.0,
        True,
    )
    anchor = datetime(2026, 1, 1, 10, 0, 0, 400_000, tzinfo=UTC)
    assert schedule.next_after(anchor, anchor=anchor) == utc(2026, 1, 1, 10, 30)
    assert schedule.next_after(utc(2025, 1, 1), anchor=anchor) == utc(2026, 1, 1, 10, 30)
    assert schedule.next_after(utc(2026, 1, 1, 10, 30), anchor=anchor) is None
    assert schedule.period(anchor=anchor) is None


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30m", 'schedule "30m" is ambiguous; write "every 30m" or "in 30m"'),
        ("1h30m", 'schedule "1h30m" is ambiguous; write "every 1h30m" or "in 1h30m"'),
        ("90", 'schedule "90" is ambiguous; write "every 90" or "in 90"'),
        ("61 * * * *", 'schedule "61 * * * *": minute field: 61 is out of range 0-59'),
        ("0 24 * * *", 'schedule "0 24 * * *": hour field: 24 is out of range 0-23'),
        ("0 0 0 * *", 'schedule "0 0 0 * *": day-of-month field: 0 is out of range 1-31'),
        ("0 0 1 13 *", 'schedule "0 0 1 13 *": month field: 13 is out of range 1-12'),
        ("0 0 * * 8", 'schedule "0 0 * * 8": day-of-week field: 8 is out of range 0-7'),
        ("60 0 0 * * *", 'schedule "60 0 0 * * *": second field: 60 is out of range 0-59'),
        (
            "0 0 * FOO *",
            "schedule \"0 0 * FOO *\": month field: 'FOO' is not a number 1-12 "
            "or a month name (JAN-DEC)",
        ),
        (
            "0 0 * * FUN",
            "schedule \"0 0 * * FUN\": day-of-week field: 'FUN' is not a number 0-7 "
            "or a day name (SUN-SAT)",
        ),
        ("MON * * * *", "schedule \"MON * * * *\": minute field: 'MON' is not a number 0-59"),
        (
            "0 0 * * 5-1",
            "schedule \"0 0 * * 5-1\": day-of-week field: range '5-1' runs backwards; "
            "write the smaller value first",
        ),
        (
            "*/0 * * * *",
            "schedule \"*/0 * * * *\": minute field: '*/0': the step after / must be "
            "a whole number of at least 1",
        ),
        (
            "0 0 * * MON#6",
            'schedule "0 0 * * MON#6": day-of-week field: '
            "'MON#6': the number after # must be 1-5",
        ),
        (
            "0 0 * * FRIL",
            "schedule \"0 0 * * FRIL\": day-of-week field: 'FRIL': write the last weekday "
            "of the month as a number and L, e.g. 5L",
        ),
        (
            "1,,2 * * * *",
            'schedule "1,,2 * * * *": minute field: empty item in a list; remove the extra comma',
        ),
        ("0 1- * * *", 'schedule "0 1- * * *": hour field: a value is missing'),
        (
            "@reboot",
            'schedule "@reboot" is not a known macro; use one of @yearly @annually '
            "@monthly @weekly @daily @midnight @hourly",
        ),
        ("every", 'schedule "every" needs a duration; write e.g. "every 30m"'),
        ("in", 'schedule "in" needs a duration; write e.g. "in 30m"'),
        ("every 0s", 'schedule "every 0s": the duration must be longer than 0s'),
        (
            "every 101y",
            "schedule \"every 101y\": duration '101y' is not understood; "
            "write e.g. 90s, 30m, 2h, 1d, 1h30m",
        ),
        (
            "in 5300w",
            'schedule "in 5300w": the duration must be at most 36500d (100 years)',
        ),
        ("at", 'schedule "at" needs a timestamp; write e.g. "at 2026-06-18T12:00:00"'),
        (
            "-5m",
            'schedule "-5m" is not understood; write a cron expression, "every 30m", '
            '"in 30m" or "at 2026-06-18T12:00:00"',
        ),
        (
            "soon please",
            'schedule "soon please" is not understood; write a cron expression, "every 30m", '
            '"in 30m" or "at 2026-06-18T12:00:00"',
        ),
        ("in 0", 'schedule "in 0": the duration must be longer than 0s'),
        (
            "every 1.5s",
            'schedule "every 1.5s": the duration must be a whole number of seconds (got 1.5s)',
        ),
        (
            "every 500ms",
            'schedule "every 500ms": the duration must be a whole number of seconds (got 0.5s)',
        ),
        (
            "every soon",
            "schedule \"every soon\": duration 'soon' is not understood; "
            "write e.g. 90s, 30m, 2h, 1d, 1h30m",
        ),
        (
            "at tomorrow",
            "schedule \"at tomorrow\": 'tomorrow' is not an ISO-8601 timestamp; "
            "write e.g. at 2026-06-18T12:00:00 or at 2026-06-18T12:00:00+02:00",
        ),
        (
            "",
            'schedule is empty; write a cron expression, "every 30m", "in 30m" '
            'or "at 2026-06-18T12:00:00"',
        ),
    ],
)
def test_invalid_schedules_are_rejected_with_a_precise_message(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "UTC")
    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["1 2 3", "0 9 * *", "0 0 1 1 * * *", "next tuesday at noon"])
def test_wrong_number_of_fields_names_the_count_and_the_forms(text: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "UTC")
    count = len(text.split())
    assert str(caught.value) == (
        f'schedule "{text}" is not understood: it has {count} fields, but a cron expression '
        "has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first); "
        'other forms are "every 30m", "in 30m" and "at 2026-06-18T12:00:00"'
    )


def test_a_non_string_schedule_is_rejected() -> None:
    with pytest.raises(ScheduleError, match="is not a string"):
        parse_schedule(30, "UTC")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["0 0 31 2 *", "0 0 30 2 *", "0 0 30,31 2 *", "0 0 31 4,6,9,11 *", "0 0 */10 2 MON#5"]
)
def test_an_expression_that_can_never_fire_is_rejected(text: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse_schedule(text, "Europe/London")
    assert str(caught.value) == (
        f'schedule "{text}" never fires: no calendar date matches its day-of-month, '
        "month and day-of-week fields"
    )


def test_an_expression_whose_wall_times_all_fall_in_a_dst_gap_is_rejected_in_that_zone() -> None:
    # The last Sunday of March at 01:xx never exists in London; in UTC it does.
    with pytest.raises(ScheduleError) as caught:
        parse_schedule("* 1 * 3 0L", "Europe/London")
    assert str(caught.value) == (
        'schedule "* 1 * 3 0L" never fires in Europe/London: every wall time it names falls '
        "in an hour skipped by daylight saving; pick another time or time zone"
    )
    assert parse_schedule("* 1 * 3 0L", "UTC").fixed_time is False
    # A fixed-time job in the same gap fires at the end of it instead.
    assert next_fires("30 1 * 3 0L", "Europe/London", utc(2026, 1, 1), 1) == [utc(2026, 3, 29, 1)]


def test_first_seen_moves_the_never_fires_check_without_changing_the_schedule() -> None:
    seen = utc(2030, 5, 1)
    assert parse_schedule("0 0 29 2 *", "UTC", first_seen=seen) == parse_schedule(
        "0 0 29 2 *", "UTC"
    )


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../../etc/passwd", "Europe/"])
def test_unknown_time_zones_are_rejected(name: str) -> None:
    message = f"unknown time zone {name!r}; use an IANA name such as Europe/London"
    with pytest.raises(ScheduleError) as caught:
        validate_timezone(name)
    assert str(caught.value) == message
    with pytest.raises(ScheduleError) as caught:
        parse_schedule("@daily", name)
    assert str(caught.value) == message


def test_known_time_zones_are_returned() -> None:
    assert validate_timezone("America/New_York") == ZoneInfo("America/New_York")


# --- instants --------------------------------------------------------------------------------


def test_next_after_is_strictly_after_in_utc_with_whole_seconds() -> None:
    schedule = parse_schedule("*/20 * * * * *", "Asia/Kolkata")
    assert schedule.next_after(utc(2026, 1, 1, 12, 0, 20), anchor=ANCHOR) == utc(
        2026, 1, 1, 12, 0, 40
    )
    just_after = datetime(2026, 1, 1, 12, 0, 20, 1, tzinfo=UTC)
    fire = schedule.next_after(just_after, anchor=ANCHOR)
    assert fire == utc(2026, 1, 1, 12, 0, 40)
    assert fire is not None and fire.tzinfo is UTC
    just_before = datetime(2026, 1, 1, 12, 0, 19, 999_999, tzinfo=UTC)
    assert schedule.next_after(just_before, anchor=ANCHOR) == utc(2026, 1, 1, 12, 0, 20)


def test_next_after_accepts_an_instant_in_any_zone() -> None:
    schedule = parse_schedule("0 9 * * *", "Europe/London")
    after = datetime(2026, 6, 1, 4, 30, tzinfo=ZoneInfo("America/New_York"))  # 08:30Z
    assert schedule.next_after(after, anchor=ANCHOR) == utc(2026, 6, 2, 8)


def test_next_after_refuses_naive_datetimes() -> None:
    schedule = parse_schedule("@daily", "UTC")
    with pytest.raises(ValueError, match="aware"):
        schedule.next_after(datetime(2026, 1, 1), anchor=ANCHOR)
    with pytest.raises(ValueError, match="aware"):
        schedule.next_after(ANCHOR, anchor=datetime(2026, 1, 1))


def test_weekday_job_keeps_its_local_time_across_dst() -> None:
    assert local_fires("0 9 * * 1-5", "America/New_York", utc(2026, 3, 6), utc(2026, 3, 10)) == [
        "2026-03-06T09:00:00-05:00",
        "2026-03-09T09:00:00-04:00",
    ]


def test_period_is_the_gap_between_the_first_two_fires() -> None:
    assert parse_schedule("*/5 * * * *", "UTC").period(anchor=ANCHOR) == 300.0
    thursday_noon = utc(2026, 1, 1, 12)  # first fires: Friday 09:00, then Monday 09:00
    assert parse_schedule("0 9 * * 1-5", "UTC").period(anchor=thursday_noon) == 86400.0 * 3
    assert parse_schedule("every 2h", "UTC").period(anchor=ANCHOR) == 7200.0


@pytest.mark.parametrize(
    ("text", "grace"),
    [
        ("every 10s", 120.0),
        ("every 1h", 1800.0),
        ("every 1d", 7200.0),
        ("*/5 * * * *", 150.0),
        ("*/30 * * * *", 900.0),
        ("@daily", 7200.0),
        ("in 1d", 120.0),
        ("at 2026-06-18T10:00:00Z", 120.0),
    ],
)
def test_default_misfire_grace_is_half_the_period_clamped(text: str, grace: float) -> None:
    assert default_misfire_grace(parse_schedule(text, "UTC"), anchor=ANCHOR) == grace


def test_upcoming_lists_the_next_fires_in_order() -> None:
    schedule = parse_schedule("@hourly", "UTC")
    assert schedule.upcoming(utc(2026, 1, 1, 0, 30), anchor=ANCHOR, count=3) == [
        utc(2026, 1, 1, 1),
        utc(2026, 1, 1, 2),
        utc(2026, 1, 1, 3),
    ]
    assert schedule.upcoming(ANCHOR, anchor=ANCHOR, count=0) == []


# --- DST: Europe/London (2026-03-29 01:00Z spring forward, 2026-10-25 01:00Z fall back) ----


def test_london_fixed_time_job_in_the_gap_fires_once_at_the_end_of_the_gap() -> None:
    assert local_fires("30 1 * * *", "Europe/London", utc(2026, 3, 28), utc(2026, 3, 31)) == [
        "2026-03-28T01:30:00+00:00",
        "2026-03-29T02:00:00+01:00",
        "2026-03-30T01:30:00+01:00",
    ]


def test_london_several_skipped_wall_times_collapse_into_one_instant() -> None:
    start, end = local_day("Europe/London", 2026, 3, 29)
    assert local_fires("0,15,30,45 1 * * *", "Europe/London", start, end) == [
        "2026-03-29T02:00:00+01:00"
    ]
    # 02:00 BST is both the end of the gap and a wall time of its own: one fire.
    assert local_fires("0 1,2 * * *", "Europe/London", start, end) == ["2026-03-29T02:00:00+01:00"]
    assert local_fires("*/20 30 1 * * *", "Europe/London", start, end) == [
        "2026-03-29T02:00:00+01:00"
    ]


def test_london_fixed_time_job_in_the_repeated_hour_fires_on_the_first_pass_only() -> None:
    assert local_fires("30 1 * * *", "Europe/London", utc(2026, 10, 24), utc(2026, 10, 27)) == [
        "2026-10-24T01:30:00+01:00",
        "2026-10-25T01:30:00+01:00",
        "2026-10-26T01:30:00+00:00",
    ]


def test_london_fixed_time_job_asked_during_the_second_pass_waits_for_the_next_day() -> None:
    schedule = parse_schedule("30,45 1 * * *", "Europe/London")
    second_pass = utc(2026, 10, 25, 1, 10)  # 01:10 GMT, after 01:30 and 01:45 BST fired
    assert schedule.next_after(second_pass, anchor=ANCHOR) == utc(2026, 10, 26, 1, 30)


def test_london_hourly_job_fires_twice_in_the_repeated_hour() -> None:
    start, end = local_day("Europe/London", 2026, 10, 25)
    fires = local_fires("0 * * * *", "Europe/London", start, end)
    assert len(fires) == 25
    assert fires[1:4] == [
        "2026-10-25T01:00:00+01:00",
        "2026-10-25T01:00:00+00:00",
        "2026-10-25T02:00:00+00:00",
    ]


def test_london_hourly_job_skips_the_missing_hour() -> None:
    start, end = local_day("Europe/London", 2026, 3, 29)
    fires = local_fires("@hourly", "Europe/London", start, end)
    assert len(fires) == 23
    assert fires[:2] == ["2026-03-29T00:00:00+00:00", "2026-03-29T02:00:00+01:00"]


def test_london_quarter_hourly_job_fires_eight_times_in_the_repeated_hour() -> None:
    start, end = local_day("Europe/London", 2026, 10, 25)
    assert local_fires("*/15 1 * * *", "Europe/London", start, end) == [
        "2026-10-25T01:00:00+01:00",
        "2026-10-25T01:15:00+01:00",
        "2026-10-25T01:30:00+01:00",
        "2026-10-25T01:45:00+01:00",
        "2026-10-25T01:00:00+00:00",
        "2026-10-25T01:15:00+00:00",
        "2026-10-25T01:30:00+00:00",
        "2026-10-25T01:45:00+00:00",
    ]


def test_london_quarter_hourly_job_does_not_fire_in_the_skipped_hour() -> None:
    start, end = local_day("Europe/London", 2026, 3, 29)
    assert local_fires("*/15 1 * * *", "Europe/London", start, end) == []


# --- DST: America/New_York (2026-03-08 07:00Z spring forward, 2026-11-01 06:00Z fall back) --


def test_new_york_fixed_time_job_in_the_gap_fires_at_three_am() -> None:
    start, end = local_day("America/New_York", 2026, 3, 8)
    assert local_fires("30 2 * * *", "America/New_York", start, end) == [
        "2026-03-08T03:00:00-04:00"
    ]


def test_new_york_fixed_time_job_in_the_repeated_hour_fires_once() -> None:
    start, end = local_day("America/New_York", 2026, 11, 1)
    assert local_fires("30 1 * * *", "America/New_York", start, end) == [
        "2026-11-01T01:30:00-04:00"
    ]


def test_new_york_non_fixed_job_fires_on_both_passes_and_not_in_the_gap() -> None:
    start, end = local_day("America/New_York", 2026, 11, 1)
    assert local_fires("*/30 1 * * *", "America/New_York", start, end) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
    ]
    start, end = local_day("America/New_York", 2026, 3, 8)
    assert local_fires("*/30 2 * * *", "America/New_York", start, end) == []


# --- DST: Australia/Lord_Howe (30-minute shift) --------------------------------------------


def test_lord_howe_fixed_time_job_in_the_half_hour_gap_fires_at_its_end() -> None:
    # 2026-10-04 02:00 (+10:30) jumps to 02:30 (+11:00).
    start, end = local_day("Australia/Lord_Howe", 2026, 10, 4)
    assert local_fires("15 2 * * *", "Australia/Lord_Howe", start, end) == [
        "2026-10-04T02:30:00+11:00"
    ]
    assert local_fires("*/10 2 * * *", "Australia/Lord_Howe", start, end) == [
        "2026-10-04T02:30:00+11:00",
        "2026-10-04T02:40:00+11:00",
        "2026-10-04T02:50:00+11:00",
    ]


def test_lord_howe_repeated_half_hour_fires_once_for_fixed_and_twice_otherwise() -> None:
    # 2026-04-05 02:00 (+11:00) falls back to 01:30 (+10:30).
    start, end = local_day("Australia/Lord_Howe", 2026, 4, 5)
    assert local_fires("45 1 * * *", "Australia/Lord_Howe", start, end) == [
        "2026-04-05T01:45:00+11:00"
    ]
    assert local_fires("*/15 1 * * *", "Australia/Lord_Howe", start, end) == [
        "2026-04-05T01:00:00+11:00",
        "2026-04-05T01:15:00+11:00",
        "2026-04-05T01:30:00+11:00",
        "2026-04-05T01:45:00+11:00",
        "2026-04-05T01:30:00+10:30",
        "2026-04-05T01:45:00+10:30",
    ]


# --- DST: America/Sao_Paulo (midnight skipped 2018-11-04, fall back 2019-02-17) -------------


def test_sao_paulo_midnight_job_fires_at_one_when_midnight_does_not_exist() -> None:
    assert local_fires("0 0 * * *", "America/Sao_Paulo", utc(2018, 11, 3), utc(2018, 11, 6)) == [
        "2018-11-03T00:00:00-03:00",
        "2018-11-04T01:00:00-02:00",
        "2018-11-05T00:00:00-02:00",
    ]
    start, end = local_day("America/Sao_Paulo", 2018, 11, 4)
    assert local_fires("30 0 * * *", "America/Sao_Paulo", start, end) == [
        "2018-11-04T01:00:00-02:00"
    ]


def test_sao_paulo_non_fixed_job_in_the_missing_midnight_hour_does_not_fire() -> None:
    start, end = local_day("America/Sao_Paulo", 2018, 11, 4)
    assert local_fires("* 0 * * *", "America/Sao_Paulo", start, end) == []
    fires = local_fires("0 * * * *", "America/Sao_Paulo", start, end)
    assert len(fires) == 23
    assert fires[0] == "2018-11-04T01:00:00-02:00"


def test_sao_paulo_fall_back_repeats_eleven_pm() -> None:
    # 2019-02-17 00:00 (-02:00) falls back to 2019-02-16 23:00 (-03:00).
    assert local_fires(
        "0 23 * * *", "America/Sao_Paulo", utc(2019, 2, 16, 12), utc(2019, 2, 19)
    ) == [
        "2019-02-16T23:00:00-02:00",
        "2019-02-17T23:00:00-03:00",
    ]
    start, end = local_day("America/Sao_Paulo", 2019, 2, 16)
    assert len(local_fires("*/15 23 * * *", "America/Sao_Paulo", start, end)) == 8
    start, end = local_day("America/Sao_Paulo", 2019, 2, 17)
    assert local_fires("0 0 * * *", "America/Sao_Paulo", start, end) == [
        "2019-02-17T00:00:00-03:00"
    ]


def test_new_york_seconds_of_a_non_fixed_job_fire_on_both_passes_and_never_in_the_gap() -> None:
    start, end = local_day("America/New_York", 2026, 11, 1)
    fires = local_fires("*/20 * 1 * * *", "America/New_York", start, end)
    assert len(fires) == 2 * 60 * 3
    assert fires[178:182] == [
        "2026-11-01T01:59:20-04:00",
        "2026-11-01T01:59:40-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:00:20-05:00",
    ]
    start, end = local_day("America/New_York", 2026, 3, 8)
    assert local_fires("*/20 * 2 * * *", "America/New_York", start, end) == []


def test_jobs_sharing_a_cron_schedule_share_one_walk() -> None:
    # A burst of fires of jobs with one schedule asks the same question many times.
    from chronosd.jobs import schedule as module

    anchor = datetime(2026, 1, 1, tzinfo=UTC)
    after = datetime(2026, 3, 29, 0, 59, 59, tzinfo=UTC)
    first, second = (parse_schedule("30 2 * * *", "Europe/Berlin") for _ in range(2))
    module._next_cron.cache_clear()
    found = first.next_after(after, anchor=anchor)
    assert second.next_after(after, anchor=anchor) == found
    assert module._next_cron.cache_info().hits == 1
    # The cached answer is the walk's: 02:30 does not exist that night in Berlin, so 03:00.
    fresh = module._next_cron.__wrapped__
    zone = ZoneInfo("Europe/Berlin")
    start = int(after.timestamp())
    assert found is not None
    assert fresh("0 30 2 * * *", zone, True, start, start + module._HORIZON) == found.timestamp()
    assert found == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_wire_text_of_an_instant_does_not_depend_on_its_zone_or_on_earlier_calls() -> None:
    from chronosd.timefmt import to_wire

    utc = datetime(2026, 11, 26, 12, 0, 0, 999_999, tzinfo=UTC)
    berlin = utc.astimezone(ZoneInfo("Europe/Berlin"))
    assert to_wire(berlin) == to_wire(utc) == "2026-11-26T12:00:00+00:00"
    assert to_wire(utc + timedelta(seconds=1)) == "2026-11-26T12:00:01+00:00"
    for _ in range(2):  # refused every time, not remembered
        with pytest.raises(ValueError, match="naive"):
            to_wire(datetime(2026, 11, 26, 12, 0, 0))
    # 02:30 happens twice in Berlin that night; the two compare equal but are an hour apart.
    first = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    second = first.replace(fold=1)
    assert (to_wire(first), to_wire(second)) == (
        "2026-10-25T00:30:00+00:00",
        "2026-10-25T01:30:00+00:00",
    )


@pytest.mark.parametrize("dow", ["*", "1", "MON#5", "5L", "SAT,SUN", "*/3", "2-4"])
def test_every_day_of_every_month_always_finds_a_fire(dow: str) -> None:
    # Parsing does not walk the calendar for these (any day-of-week exists): they do fire.
    schedule = parse_schedule(f"0 30 12 * * {dow}", "Europe/Berlin")
    found = schedule.next_after(
        datetime(2026, 1, 1, tzinfo=UTC), anchor=datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert found is not None and found.year <= 2027
