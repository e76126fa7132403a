from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from chronosd.jobs.diff import JobChange, JobsDiff, diff_jobs
from chronosd.jobs.model import Job
from chronosd.jobs.validate import JobDefaults, validate_document

NOW = datetime(2025, 5, 5, 12, 0, 0, tzinfo=UTC)


def jobs(*records: dict[str, Any]) -> list[Job]:
    result = validate_document({"jobs": list(records)}, defaults=JobDefaults(), now=NOW)
    assert result.ok, [str(p) for p in result.problems]
    return list(result.jobs)


def rec(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "schedule": "*/5 * * * *", "command": ["true"], **fields}


def by_id(items: list[Job]) -> dict[str, Job]:
    return {job.id: job for job in items}


def hashes(items: list[Job]) -> dict[str, str]:
    return {job.id: job.spec_hash for job in items}


def test_identical_sets_give_an_empty_diff() -> None:
    old = jobs(rec("a"), rec("b"))
    diff = diff_jobs(by_id(old), jobs(rec("a"), rec("b")))
    assert diff.empty
    assert diff == JobsDiff((), (), ())
    assert diff.job_ids() == ()


def test_added_changed_and_removed_are_reported_in_order() -> None:
    old = jobs(rec("keep"), rec("edit"), rec("gone"), rec("also-gone"))
    new = jobs(rec("fresh"), rec("edit", timeout="5m", retries=2), rec("keep"))
    diff = diff_jobs(by_id(old), new)
    assert diff.added == ("fresh",)
    assert diff.changed == (JobChange("edit", ("timeout", "retries"), False),)
    assert diff.removed == ("gone", "also-gone")
    assert diff.job_ids() == ("fresh", "edit", "gone", "also-gone")
    assert not diff.empty


def test_schedule_change_is_flagged() -> None:
    old = jobs(rec("a"))
    diff = diff_jobs(by_id(old), jobs(rec("a", schedule="*/10 * * * *")))
    assert diff.changed == (JobChange("a", ("schedule",), True),)


def test_zone_change_of_a_cron_job_is_a_schedule_change() -> None:
    diff = diff_jobs(by_id(jobs(rec("a"))), jobs(rec("a", timezone="Asia/Tokyo")))
    assert diff.changed == (JobChange("a", ("timezone",), True),)


def test_zone_change_of_an_every_job_changes_the_job_but_not_its_schedule() -> None:
    old = jobs(rec("a", schedule="every 10m"))
    diff = diff_jobs(by_id(old), jobs(rec("a", schedule="every 10m", timezone="Asia/Tokyo")))
    assert diff.changed == (JobChange("a", ("timezone",), False),)


def test_pause_is_a_change_without_re_anchoring() -> None:
    diff = diff_jobs(by_id(jobs(rec("a"))), jobs(rec("a", paused=True)))
    assert diff.changed == (JobChange("a", ("paused",), False),)


def test_name_key_order_and_unknown_keys_are_not_changes() -> None:
    old = jobs(rec("a", name="one", env={"A": "1", "B": "2"}))
    record = dict(reversed(list(rec("a", env={"B": "2", "A": "1"}).items())))
    record.update(name="two", note="hello")
    diff = diff_jobs(by_id(old), jobs(record))
    assert diff.empty


def test_respelled_schedule_is_not_a_change() -> None:
    old = jobs(rec("a", schedule="every 90s"))
    assert diff_jobs(by_id(old), jobs(rec("a", schedule="every 1m30s"))).empty


def test_name_is_listed_when_it_changes_along_with_behaviour() -> None:
    diff = diff_jobs(by_id(jobs(rec("a", name="x"))), jobs(rec("a", name="y", retries=1)))
    assert diff.changed == (JobChange("a", ("name", "retries"), False),)


def test_stored_hashes_detect_changes_and_schedule_changes_without_old_jobs() -> None:
    stored = hashes(jobs(rec("same"), rec("timeout"), rec("sched"), rec("removed")))
    new = jobs(
        rec("same"),
        rec("timeout", timeout="2m"),
        rec("sched", schedule="0 * * * *"),
        rec("new"),
    )
    diff = diff_jobs(stored, new)
    assert diff.added == ("new",)
    assert diff.removed == ("removed",)
    assert diff.changed == (
        JobChange("timeout", (), False),
        JobChange("sched", (), True),
    )


def test_a_stored_hash_without_the_schedule_prefix_is_read_as_a_schedule_change() -> None:
    new = jobs(rec("a"))
    diff = diff_jobs({"a": "0" * 64}, new)
    assert diff.changed == (JobChange("a", (), True),)


def test_old_and_new_sides_may_mix_jobs_and_hashes() -> None:
    old_jobs = jobs(rec("a"), rec("b"))
    mixed: dict[str, str | Job] = {"a": old_jobs[0], "b": old_jobs[1].spec_hash}
    diff = diff_jobs(mixed, jobs(rec("a", retries=1), rec("b", retries=1)))
    assert diff.changed == (JobChange("a", ("retries",), False), JobChange("b", (), False))


def test_a_job_without_a_precomputed_hash_is_hashed_on_the_fly() -> None:
    from dataclasses import replace

    (old,) = jobs(rec("a"))
    (new,) = jobs(rec("a"))
    assert diff_jobs({"a": replace(old, spec_hash="")}, [replace(new, spec_hash="")]).empty


ids = st.sets(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=6)
timeouts = st.sampled_from(["1m", "2m"])


@settings(max_examples=60, deadline=None)
@given(ids, ids, st.dictionaries(st.sampled_from("abcdef"), timeouts))
def test_diff_partitions_ids_and_reversing_swaps_added_and_removed(
    old_ids: set[str], new_ids: set[str], timeout_of: dict[str, str]
) -> None:
    old = jobs(*(rec(i) for i in sorted(old_ids)))
    new = jobs(*(rec(i, timeout=timeout_of.get(i, "1h")) for i in sorted(new_ids)))
    diff = diff_jobs(by_id(old), new)
    assert set(diff.added) == new_ids - old_ids
    assert set(diff.removed) == old_ids - new_ids
    changed = {c.job_id for c in diff.changed}
    assert changed == {i for i in old_ids & new_ids if i in timeout_of}
    back = diff_jobs(by_id(new), old)
    assert (set(back.added), set(back.removed)) == (set(diff.removed), set(diff.added))
    assert {c.job_id for c in back.changed} == changed
    assert diff_jobs(hashes(old), new).job_ids() == diff.job_ids()
