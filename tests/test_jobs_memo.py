"""The validation memo: an unchanged record is not checked again, and nothing else changes.

Every test compares against a validation without a memo: the memo may only save time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronosd.jobs import validate
from chronosd.jobs.file import InvalidJobsFile, read_jobs_file
from chronosd.jobs.model import Job
from chronosd.jobs.schedule import Schedule
from chronosd.jobs.validate import JobDefaults, Validated, ValidationMemo, validate_document

NOW = datetime(2025, 5, 5, 12, 0, 0, tzinfo=UTC)
DEFAULTS = JobDefaults()


def rec(job_id: str, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"id": job_id, "schedule": "*/5 * * * *", "command": ["true"]}
    record.update(fields)
    return record


def plain(records: list[Any], now: datetime = NOW, **options: Any) -> Validated:
    return validate_document({"jobs": records}, defaults=DEFAULTS, now=now, **options)


def remembered(records: list[Any], now: datetime = NOW) -> ValidationMemo:
    """The memo of one validation, after a trip through its stored form."""
    memo = plain(records, now, memo=ValidationMemo(DEFAULTS)).memo
    assert memo is not None
    return ValidationMemo.loads(memo.dumps(), DEFAULTS)


def same_result(a: Validated, b: Validated) -> None:
    assert a.jobs == b.jobs
    assert [j.spec_hash for j in a.jobs] == [j.spec_hash for j in b.jobs]
    assert [dict(j.record) for j in a.jobs] == [dict(j.record) for j in b.jobs]
    assert a.problems == b.problems
    assert a.fatal == b.fatal


class CountingChecks:
    """Counts the records that were checked (not taken from a memo)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[object] = []
        original = validate._Checker.run

        def run(checker: Any, *args: Any) -> Job | None:
            self.ids.append(checker.record.get("id"))
            return original(checker, *args)

        monkeypatch.setattr(validate._Checker, "run", run)


def test_an_unchanged_document_is_rebuilt_from_the_memo_without_checking_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [
        rec("a"),
        rec("b", schedule="every 90s", timeout="2h", env={"X": "1"}, retries=2, name="B"),
        rec("c", schedule="in 10m", command="echo hi", cwd="/tmp", overlap="queue"),
        rec("d", schedule="@daily", timezone="Europe/London", paused=True, jitter="30s"),
        rec("e", schedule="0 3 * * *", misfire_grace="5m", repeat=3, typo=1),
    ]
    memo = remembered(records)
    checks = CountingChecks(monkeypatch)
    again = [json.loads(json.dumps(r)) for r in records]  # a new parse of the same text
    result = plain(again, memo=memo)
    assert checks.ids == ["d"]  # a cron schedule with jitter is measured against `now`
    same_result(result, plain(again))
    assert all(job.record is record for job, record in zip(result.jobs, again, strict=True))
    assert any(p.field == "typo" for p in result.problems)  # warnings come back too


def test_only_the_edited_record_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [rec(f"j{i}", schedule=f"{i} 4 * * *") for i in range(20)]
    memo = remembered(records)
    records[7] = rec("j7", schedule="9 9 * * *")
    checks = CountingChecks(monkeypatch)
    result = plain(records, memo=memo)
    assert checks.ids == ["j7"]
    same_result(result, plain(records))


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [("enabled", True, 1), ("retries", 0, False), ("paused", False, 0), ("timeout", 60, True)],
)
def test_a_value_that_only_compares_equal_is_not_taken_from_the_memo(
    field: str, good: object, bad: object
) -> None:
    memo = remembered([rec("j", **{field: good})])
    result = plain([rec("j", **{field: bad})], memo=memo)
    assert not result.ok
    assert [p.field for p in result.errors] == [field]
    same_result(result, plain([rec("j", **{field: bad})]))


def test_an_at_schedule_is_judged_against_the_time_of_each_validation() -> None:
    at = NOW + timedelta(hours=1)
    records = [rec("once", schedule=f"at {at.isoformat()}")]
    memo = remembered(records)
    later = NOW + timedelta(days=1)
    result = plain(records, later, memo=memo)
    assert [p.field for p in result.errors] == ["schedule"]
    assert "in the past" in result.errors[0].message
    same_result(result, plain(records, later))


def test_a_jitter_warning_follows_the_period_at_the_time_of_validation() -> None:
    # Fires on the 1st and the 2nd: a period of one day seen from the 1st, ~30 days from the 2nd.
    records = [rec("j", schedule="0 0 1,2 * *", jitter="2d")]
    first = datetime(2025, 5, 1, 6, tzinfo=UTC)
    second = datetime(2025, 5, 2, 6, tzinfo=UTC)
    assert plain(records, second).warnings and not plain(records, first).warnings
    memo = remembered(records, second)
    same_result(plain(records, first, memo=memo), plain(records, first))


def test_a_memo_made_with_other_defaults_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [rec("j")]
    memo = remembered(records)
    other = JobDefaults(timezone="Europe/Paris", timeout=60.0)
    checks = CountingChecks(monkeypatch)
    result = validate_document({"jobs": records}, defaults=other, now=NOW, memo=memo)
    assert checks.ids == ["j"]
    assert result.jobs[0].timezone == "Europe/Paris"
    assert result.jobs[0].timeout == 60.0
    assert ValidationMemo.loads(memo.dumps(), other).__len__() == 0


def test_records_without_a_valid_id_are_not_remembered() -> None:
    records: list[Any] = [rec("bad id!"), {"schedule": "@daily"}, "text", rec("ok")]
    memo = plain(records, memo=ValidationMemo(DEFAULTS)).memo
    assert memo is not None and len(memo) == 1
    same_result(plain(records, memo=memo), plain(records))


def test_a_duplicate_id_is_still_fatal_with_every_record_remembered() -> None:
    records = [rec("twin"), rec("other"), rec("twin", schedule="@hourly")]
    memo = remembered([rec("twin"), rec("other"), rec("single", schedule="@hourly")])
    result = plain(records, memo=memo)
    assert result.fatal
    same_result(result, plain(records))


def damaged_texts(text: str) -> list[str]:
    checksum, _, body = text.partition("\n")
    data = json.loads(body)
    data["stamp"][0] = -1
    restamped = json.dumps(data)
    return [
        "",
        "garbage",
        text[:-10],
        checksum + "\n" + body.replace('"skip"', '"skiq"', 1),  # the checksum no longer matches
        hashlib.sha256(b"[1, 2]").hexdigest() + "\n[1, 2]",
        hashlib.sha256(b"{}").hexdigest() + "\n{}",
        hashlib.sha256(restamped.encode()).hexdigest() + "\n" + restamped,
    ]


def test_a_damaged_or_stale_memo_loads_empty_and_changes_nothing() -> None:
    records = [rec("a"), rec("b", schedule="every 1h")]
    stored = remembered(records).dumps()
    for text in damaged_texts(stored):
        memo = ValidationMemo.loads(text, DEFAULTS)
        assert len(memo) == 0, text[:80]
        same_result(plain(records, memo=memo), plain(records))


def restored_text(mutate: Any, records: list[dict[str, Any]]) -> str:
    """A memo text whose entries were changed by *mutate*, with a checksum that matches."""
    _, _, body = remembered(records).dumps().partition("\n")
    data = json.loads(body)
    for entry in data["entries"].values():
        mutate(entry)
    body = json.dumps(data)
    return hashlib.sha256(body.encode()).hexdigest() + "\n" + body


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.__setitem__(0, e[0][:5]),  # too few fields
        lambda e: e[0].__setitem__(0, "someone-else"),  # not this record's id
        lambda e: e[0][2].__setitem__(0, "at"),  # not a kind the memo keeps
        lambda e: e[0].__setitem__(9, "sometimes"),  # not an overlap
        lambda e: e[0].__setitem__(3, "Mars/Olympus"),  # a zone that does not exist (any more)
        lambda e: e[0].__setitem__(15, ["not", "a", "mapping"]),
        lambda e: e.__setitem__(1, [["j", "f", "m", "fatal"]]),  # not a severity
        lambda e: e.__setitem__(1, 7),
    ],
)
def test_an_entry_that_does_not_fit_is_validated_afresh(mutate: Any) -> None:
    records = [rec("j", env={"A": "b"})]
    memo = ValidationMemo.loads(restored_text(mutate, records), DEFAULTS)
    assert len(memo) == 1
    same_result(plain(records, memo=memo), plain(records))


def test_a_job_rebuilt_from_the_memo_is_the_same_value_as_a_validated_one() -> None:
    records = [rec("j", schedule="every 2h", env={"K": "v"}, timeout=30, repeat=4, name="N")]
    fresh = plain(records).jobs[0]
    rebuilt = plain(records, memo=remembered(records)).jobs[0]
    assert rebuilt is not fresh
    names = {f.name for f in dataclasses.fields(Job)}
    assert set(vars(rebuilt)) == names
    assert set(vars(rebuilt.schedule)) == {f.name for f in dataclasses.fields(Schedule)}
    assert rebuilt == fresh and hash(rebuilt.schedule) == hash(fresh.schedule)
    assert isinstance(rebuilt.command, tuple)
    assert dataclasses.replace(rebuilt, name="M").name == "M"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rebuilt.name = "M"  # type: ignore[misc]


def test_read_jobs_file_hands_back_a_memo_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    text = json.dumps({"jobs": [rec("a"), rec("b", schedule="@weekly")]})
    path.write_text(text)
    path.chmod(0o600)
    loaded = read_jobs_file(path, defaults=DEFAULTS, now=NOW, memo=ValidationMemo(DEFAULTS))
    assert loaded.memo is not None and loaded.memo.digest == loaded.digest
    assert loaded.text == text
    again = read_jobs_file(path, defaults=DEFAULTS, now=NOW, memo=loaded.memo)
    assert again.jobs == loaded.jobs and again.problems == loaded.problems


def test_a_file_made_invalid_is_rejected_the_same_way_with_a_memo(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    records = [rec("a"), rec("b")]
    path.write_text(json.dumps({"jobs": records}))
    path.chmod(0o600)
    memo = read_jobs_file(path, defaults=DEFAULTS, now=NOW, memo=ValidationMemo(DEFAULTS)).memo
    records[1] = rec("b", schedule="61 * * * *")
    path.write_text(json.dumps({"jobs": records}))
    with pytest.raises(InvalidJobsFile) as with_memo:
        read_jobs_file(path, defaults=DEFAULTS, now=NOW, memo=memo)
    with pytest.raises(InvalidJobsFile) as without:
        read_jobs_file(path, defaults=DEFAULTS, now=NOW)
    assert str(with_memo.value) == str(without.value)
    assert with_memo.value.problems == without.value.problems
    skipped = read_jobs_file(path, defaults=DEFAULTS, now=NOW, on_invalid_job="skip", memo=memo)
    assert [j.id for j in skipped.jobs] == ["a"]


# -- any document, any earlier document: the memo changes no result -----------------------

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 5),
    st.sampled_from([0.0, 1.0, 2.5, -1.0]),
    st.sampled_from(["", "x", "30s", "1h", "skip", "queue", "/tmp", "rel/dir", "UTC"]),
    st.lists(st.sampled_from(["true", "", "a b"]), max_size=2),
    st.dictionaries(st.sampled_from(["A", "1B", "c_d"]), st.sampled_from(["v", ""]), max_size=2),
)
schedules = st.sampled_from(
    [
        "*/5 * * * *",
        "0 3 * * *",
        "0 0 1,2 * *",
        "30 2 * * *",
        "@daily",
        "every 90s",
        "every 0s",
        "in 10m",
        "at 2025-05-05T13:00:00",
        "at 2025-05-01T00:00:00",
        "61 * * * *",
        "0 0 31 2 *",
        "30m",
        "",
        "every",
    ]
)
zones = st.sampled_from(["UTC", "Europe/London", "America/New_York", "Nowhere/City", "Etc/GMT+5"])
field_names = st.sampled_from(
    [
        "name",
        "enabled",
        "paused",
        "timeout",
        "overlap",
        "catch_up",
        "misfire_grace",
        "jitter",
        "repeat",
        "retries",
        "env",
        "cwd",
        "command",
        "extra",
    ]
)


@st.composite
def records(draw: st.DrawFn) -> object:
    if draw(st.integers(0, 15)) == 0:
        return draw(values)
    record: dict[str, Any] = {"id": draw(st.sampled_from(["a", "b", "c", "d", "bad id", 3]))}
    if draw(st.booleans()):
        record["schedule"] = draw(schedules)
    if draw(st.booleans()):
        record["timezone"] = draw(zones)
    record.update(draw(st.dictionaries(field_names, values, max_size=4)))
    return record


documents = st.lists(records(), max_size=6)
instants = st.sampled_from(
    [
        NOW,
        NOW + timedelta(days=3),
        datetime(2025, 5, 1, 6, tzinfo=UTC),
        datetime(2031, 1, 1, tzinfo=UTC),
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=documents, after=documents, then=instants, now=instants)
def test_validating_with_the_memo_of_any_earlier_document_gives_the_same_result(
    before: list[Any], after: list[Any], then: datetime, now: datetime
) -> None:
    memo = remembered(before, then)
    # The earlier records, some of them again, and new ones.
    document = after + before[: len(before) // 2]
    same_result(plain(document, now, memo=memo), plain(document, now))
    # And the memo that comes back serves the next validation just as well.
    renewed = plain(document, now, memo=memo).memo
    assert renewed is not None
    same_result(plain(document, now, memo=renewed), plain(document, now))


def test_the_memo_is_complete_only_when_every_record_is_in_it() -> None:
    records = [rec("a"), rec("b", schedule="every 10m"), rec("bad", timeout="soon")]
    first = plain(records, memo=ValidationMemo(DEFAULTS)).memo
    assert first is not None and first.complete  # an invalid record is remembered too
    again = plain(records, memo=ValidationMemo.loads(first.dumps(), DEFAULTS)).memo
    assert again is not None and again.complete  # taken from the memo: still every record
    assert not ValidationMemo.loads(first.dumps(), DEFAULTS).complete  # a loaded one: unknown
    # A one-shot at a fixed time consults the clock: it is checked every time, never kept.
    later = (NOW + timedelta(hours=1)).isoformat()
    timed = plain([*records, rec("once", schedule=f"at {later}")], memo=ValidationMemo(DEFAULTS))
    assert timed.memo is not None and not timed.memo.complete
    # A record without a valid id is never kept either (its problems name its position).
    nameless = plain([*records, rec("no id!")], memo=ValidationMemo(DEFAULTS))
    assert nameless.memo is not None and not nameless.memo.complete
