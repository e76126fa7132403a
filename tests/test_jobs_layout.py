"""chronosd.jobs.layout: an edit found from the applied text's layout equals the full comparison."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronosd.daemon.supervisor import _records_by_id
from chronosd.errors import JobsFileError
from chronosd.jobs.file import parse_jobs_text, tag_float, tag_int
from chronosd.jobs.layout import (
    RecordLayout,
    common_prefix,
    common_suffix,
    record_layout,
    text_digest,
    window_changes,
)

Records = dict[str, tuple[int, object]]
Outcome = tuple[set[str], set[str], Records, Records]

# Text that looks like JSON structure inside strings, and characters that need escaping.
TRICKY = st.text(alphabet='ab}{][,:" \\\n\té€\U0001f600', max_size=8)
NUMBERS = st.sampled_from([1, 1.0, True, 0, -0.0, 2.5, 1e21, 10**20])


@st.composite
def records(draw: Any, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": job_id, "schedule": draw(TRICKY), "command": [draw(TRICKY)]}
    if draw(st.booleans()):
        record["timeout"] = draw(NUMBERS)
    if draw(st.booleans()):
        record["env"] = {draw(st.sampled_from("XYZ")): draw(TRICKY)}
    return record


def dump(doc: dict[str, Any], style: int) -> str:
    if style == 0:
        return json.dumps(doc)
    if style == 1:
        return json.dumps(doc, indent=2) + "\n"
    if style == 2:
        return json.dumps(doc, separators=(",", ":"))
    return json.dumps(doc, indent=4, ensure_ascii=False)


def full_comparison(before: str, after: str) -> Outcome | None:
    """What _load_edit compares without a layout (the oracle)."""
    try:
        after_doc, repeated = parse_jobs_text(after, tagged=True)
    except JobsFileError:
        return None
    before_doc = json.loads(before, parse_int=tag_int, parse_float=tag_float)
    if (
        repeated
        or not isinstance(after_doc, dict)
        or not isinstance(before_doc, dict)
        or after_doc.keys() != before_doc.keys()
    ):
        return None
    old, new = _records_by_id(before_doc.get("jobs")), _records_by_id(after_doc.get("jobs"))
    if old is None or new is None:
        return None
    return outcome(old, new)


def outcome(old: Records, new: Records) -> Outcome:
    edited = {job_id for job_id in new if job_id not in old or old[job_id][1] != new[job_id][1]}
    gone = set(old) - set(new)
    return (
        edited,
        gone,
        {job_id: new[job_id] for job_id in edited},
        {job_id: old[job_id] for job_id in (gone | edited) & set(old)},
    )


def by_window(before: str, after: str) -> Outcome | None:
    layout = record_layout(before)
    assert layout is not None
    assert RecordLayout.loads(layout.dumps()) == layout
    changes = window_changes(before, after, layout)
    return None if changes is None else outcome(changes.before, changes.after)


EDITS = st.sampled_from(["field", "delete", "insert", "swap", "number", "text", "clash", "noop"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_an_edit_found_by_window_is_the_edit_found_by_comparing_whole_files(data: Any) -> None:
    count = data.draw(st.integers(min_value=1, max_value=7))
    jobs = [data.draw(records(f"job-{n}")) for n in range(count)]
    extra = data.draw(st.sampled_from([{}, {"version": 1}, {"zz": [1, {"a": "]"}]}]))
    doc = {**extra, "jobs": jobs} if data.draw(st.booleans()) else {"jobs": jobs, **extra}
    style = data.draw(st.integers(min_value=0, max_value=3))
    before = dump(doc, style)
    edited_jobs = [dict(job) for job in jobs]
    edit = data.draw(EDITS)
    where = data.draw(st.integers(min_value=0, max_value=count - 1))
    if edit == "field":
        edited_jobs[where]["schedule"] = data.draw(TRICKY)
    elif edit == "delete":
        del edited_jobs[where]
    elif edit == "insert":
        edited_jobs.insert(where, data.draw(records(f"new-{where}")))
    elif edit == "swap" and count > 1:
        other = data.draw(st.integers(min_value=0, max_value=count - 1))
        edited_jobs[where], edited_jobs[other] = edited_jobs[other], edited_jobs[where]
    elif edit == "number":
        edited_jobs[where]["timeout"] = data.draw(NUMBERS)
    elif edit == "clash":  # a record takes the id of another
        edited_jobs[where]["id"] = f"job-{(where + 1) % count}"
    after = dump({**doc, "jobs": edited_jobs}, style)
    if edit == "text":  # any one character added or removed, valid JSON or not
        at = data.draw(st.integers(min_value=0, max_value=len(before)))
        if data.draw(st.booleans()) and at < len(before):
            after = before[:at] + before[at + 1 :]
        else:
            after = before[:at] + data.draw(st.sampled_from(list(',]}{"[ 1a\\'))) + before[at:]

    found = by_window(before, after)
    if found is not None:
        assert found == full_comparison(before, after)
    if edit == "field" and style != 0 and count > 0:
        # An ordinary edit of one record is found from the window, not left to the full path.
        assert found is not None or before == after


def test_edits_at_either_end_and_a_small_change_of_one_record_use_the_window() -> None:
    jobs = [
        {"id": f"job-{n:05d}", "schedule": f"{n % 60} * * * *", "command": ["x"]} for n in range(50)
    ]
    before = json.dumps({"jobs": jobs}, indent=2)
    cases = {
        "first": [{**jobs[0], "schedule": "7 7 * * *"}, *jobs[1:]],
        "middle": [*jobs[:20], {**jobs[20], "command": ["y"]}, *jobs[21:]],
        "last": [*jobs[:-1], {**jobs[-1], "timeout": 5}],
        "appended": [*jobs, {"id": "extra", "schedule": "1 * * * *", "command": ["z"]}],
        "prepended": [{"id": "extra", "schedule": "1 * * * *", "command": ["z"]}, *jobs],
        "removed": [*jobs[:10], *jobs[11:]],
    }
    for name, edited in cases.items():
        after = json.dumps({"jobs": edited}, indent=2)
        found = by_window(before, after)
        assert found is not None, name
        assert found == full_comparison(before, after), name
    # Emptied, the array's own whitespace changed: left to the full comparison.
    assert by_window(before, json.dumps({"jobs": []}, indent=2)) is None
    edited_ids, gone, new, _ = by_window(
        before, json.dumps({"jobs": cases["middle"]}, indent=2)
    ) or (
        set(),
        set(),
        {},
        {},
    )
    assert edited_ids == {"job-00020"} and gone == set()
    assert new["job-00020"] == (20, {**jobs[20], "command": ["y"]})


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ('{"jobs": [{"id": "a"}]}', '{"jobs": [{"id": "a"}], "x": 1}'),  # outside the array
        ('{"jobs": [{"id": "a"}, {"id": "b"}]}', '{"jobs": [{"id": "a"}, , {"id": "b"}]}'),
        ('{"jobs": [{"id": "a"}, {"id": "b"}]}', '{"jobs": [{"id": "a"}, {"id": "a"}]}'),
        ('{"jobs": [{"id": "a"}, {"id": "b"}]}', '{"jobs": [{"id": "a"}, {"id": 3}]}'),
        ('{"jobs": [{"id": "a"}, {"id": "b"}]}', '{"jobs": [{"id": "a", "id": "c"}, {"id": "b"}]}'),
        ('{"jobs": [{"id": "a"}, {"id": "b"}]}', '{"jobs": [{"id": "a"}, {"id": "b"},]}'),
        ('{"jobs": [{"id": "a"}]}', '{"jobs": [{"id": "a"}]]}'),
        ('{"jobs": [{"id": "a"}]}', '{"jobs": [{"id": "a"}]'),
    ],
)
def test_what_only_a_full_comparison_can_tell_is_left_to_it(before: str, after: str) -> None:
    assert by_window(before, after) is None


@pytest.mark.parametrize(
    "text",
    [
        '{"jobs": {"id": "a"}}',
        '{"jobs": [{"id": "a"}, {"id": "a"}]}',
        '{"jobs": [{"id": 1}]}',
        '{"jobs": [["a"]]}',
        '{"jobs": [{"id": "a", "id": "b"}]}',
        '{"jobs": [{"id": "a"}], "jobs": []}',
        '{"x": 1}',
        '{"jobs": [{"id": "a", "n": NaN}]}',
        '{"jobs": [{"id": "a"}]} trailing',
        '[{"id": "a"}]',
    ],
)
def test_no_layout_for_a_text_it_cannot_describe(text: str) -> None:
    assert record_layout(text) is None


def test_a_stored_layout_is_used_only_for_its_own_text() -> None:
    text = '{"jobs": [{"id": "a"}, {"id": "b"}]}'
    layout = record_layout(text)
    assert layout is not None and layout.digest == text_digest(text)
    assert window_changes(text.replace("b", "c"), text, layout) is None
    for broken in (
        "",
        "{}",
        "[]",
        '{"version": 2}',
        layout.dumps().replace('"open":9', '"open":99'),
    ):
        assert RecordLayout.loads(broken) is None


def test_common_prefix_and_suffix_match_a_plain_scan() -> None:
    rng = random.Random(7)
    for _ in range(200):
        size = rng.choice([0, 1, 5, 5000, 20000])
        a = "".join(rng.choice("ab") for _ in range(size))
        b = list(a)
        for _ in range(rng.randint(0, 3)):
            if b:
                b[rng.randrange(len(b))] = rng.choice("abc")
        if rng.random() < 0.3:
            b = b[: rng.randint(0, len(b))]
        other = "".join(b)
        prefix = 0
        while prefix < min(len(a), len(other)) and a[prefix] == other[prefix]:
            prefix += 1
        suffix = 0
        limit = min(len(a), len(other)) - prefix
        while suffix < limit and a[-1 - suffix] == other[-1 - suffix]:
            suffix += 1
        assert common_prefix(a, other) == prefix
        assert common_suffix(a, other, limit) == suffix
