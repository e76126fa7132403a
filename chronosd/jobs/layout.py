"""Where each job record lies in a jobs.json text, so that an edit's records are found without
parsing the ones it did not touch (pure: texts in, records out).

An edit of a 10,000-job file changes a few records; comparing the two files record by record
meant parsing both whole (with tagged numbers, see `chronosd.jobs.file.tag_int`), 50-85 ms of
a start by the path unit. With the applied text's layout (the offsets and ids of its records,
kept beside the text), the part of the two texts that differs is found from their common prefix
and suffix; only the records it touches, and one neighbour on each side, are parsed. Everything
outside is the same text as the applied file, so it holds the same records.

`window_changes` declines (None) whenever that reasoning does not carry, and the caller then
compares the whole files as before: the layout does not belong to the text, the change reaches
outside the jobs array, the changed part does not parse as a run of records, a record has no
text id, or a new id is also used outside the changed part. A record list from a changed part
can only be accepted if the whole edited text is valid JSON with that list in place: the part
is parsed between brackets of our own, so it must be a complete, comma-separated run of values;
its surroundings come unchanged from the applied (valid) text.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from json.decoder import JSONDecoder
from typing import Any

from chronosd.jobs.file import tag_float, tag_int, text_digest

LAYOUT_VERSION = 1
# JSON's whitespace, as json.decoder skips it.
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class RecordLayout:
    """The jobs array of one text: its brackets and each record's [start, end) and id."""

    digest: str
    open: int
    close: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    ids: tuple[str, ...]

    def dumps(self) -> str:
        return json.dumps(
            {
                "version": LAYOUT_VERSION,
                "digest": self.digest,
                "open": self.open,
                "close": self.close,
                "starts": self.starts,
                "ends": self.ends,
                "ids": self.ids,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, stored: str) -> RecordLayout | None:
        """A stored layout; None unless it is whole and consistent."""
        try:
            raw = json.loads(stored)
            layout = cls(
                digest=raw["digest"],
                open=raw["open"],
                close=raw["close"],
                starts=tuple(raw["starts"]),
                ends=tuple(raw["ends"]),
                ids=tuple(raw["ids"]),
            )
            if raw["version"] != LAYOUT_VERSION:
                return None
        except (ValueError, KeyError, TypeError):
            return None
        numbers = (layout.open, layout.close, *layout.starts, *layout.ends)
        if (
            not isinstance(layout.digest, str)
            or not all(type(n) is int for n in numbers)
            or not all(isinstance(i, str) for i in layout.ids)
            or not len(layout.starts) == len(layout.ends) == len(layout.ids)
        ):
            return None
        # "[" < start < end < start < ... < end <= "]" (a record may end right at the bracket).
        bounds = [layout.open]
        for start, end in zip(layout.starts, layout.ends, strict=True):
            bounds += [start, end]
        if any(a >= b for a, b in itertools.pairwise(bounds)) or bounds[-1] > layout.close:
            return None
        return layout


@dataclass(frozen=True)
class RecordChanges:
    """The records of the changed part, by id: (index in the jobs list, tagged record)."""

    before: dict[str, tuple[int, object]]
    after: dict[str, tuple[int, object]]


def _skip(text: str, index: int) -> int:
    """The offset of the first character at or after *index* that is not JSON whitespace."""
    match = _WHITESPACE.match(text, index)
    return index if match is None else match.end()


def _after_item(text: str, index: int, closer: str) -> tuple[int, bool] | None:
    """After an item of an array or object ending at *index*: (where the next item starts,
    True) past a comma, (where *closer* is, False) at the end, None for anything else."""
    index = _skip(text, index)
    if text[index : index + 1] == ",":
        return _skip(text, index + 1), True
    if text[index : index + 1] == closer:
        return index, False
    return None


class _Refused(Exception):
    pass


def _refuse_constant(name: str) -> object:
    raise _Refused(name)


def record_layout(text: str) -> RecordLayout | None:
    """The layout of a jobs.json text; None unless it is one object whose "jobs" is a list of
    objects with unique text ids, and no object anywhere repeats a key."""
    repeated: list[bool] = []

    def build_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            repeated.append(True)
        return obj

    decoder = JSONDecoder(
        object_pairs_hook=build_object,
        parse_int=tag_int,
        parse_float=tag_float,
        parse_constant=_refuse_constant,
    )
    # The decoder's own scanner: one JSON value from an offset, and the offset after it.
    scan: Callable[[str, int], tuple[Any, int]] = decoder.scan_once  # type: ignore[attr-defined]
    found: tuple[int, int, list[int], list[int], list[str]] | None = None
    keys: set[str] = set()
    try:
        i = _skip(text, 0)
        if text[i : i + 1] != "{":
            return None
        i = _skip(text, i + 1)
        while True:
            if text[i : i + 1] != '"':
                return None
            key, i = scan(text, i)
            if key in keys:
                return None
            keys.add(key)
            i = _skip(text, i)
            if text[i : i + 1] != ":":
                return None
            i = _skip(text, i + 1)
            if key == "jobs":
                if text[i : i + 1] != "[":
                    return None
                opened = i
                starts: list[int] = []
                ends: list[int] = []
                ids: list[str] = []
                i = _skip(text, i + 1)
                if text[i : i + 1] != "]":
                    while True:
                        record, end = scan(text, i)
                        job_id = record.get("id") if isinstance(record, dict) else None
                        if not isinstance(job_id, str):
                            return None
                        starts.append(i)
                        ends.append(end)
                        ids.append(job_id)
                        following = _after_item(text, end, "]")
                        if following is None:
                            return None
                        i, more = following
                        if not more:
                            break
                found = (opened, i, starts, ends, ids)
                i += 1
            else:
                _, i = scan(text, i)
            following = _after_item(text, i, "}")
            if following is None:
                return None
            i, more = following
            if not more:
                break
        if _skip(text, i + 1) != len(text):
            return None
    except (StopIteration, ValueError, RecursionError, _Refused):
        return None
    if found is None or repeated or len(set(found[4])) != len(found[4]):
        return None
    opened, closed, starts, ends, ids = found
    return RecordLayout(
        digest=text_digest(text),
        open=opened,
        close=closed,
        starts=tuple(starts),
        ends=tuple(ends),
        ids=tuple(ids),
    )


def common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix (compared a growing chunk at a time)."""
    limit = min(len(a), len(b))
    start, step = 0, 4096
    while start < limit:
        stop = min(start + step, limit)
        if a[start:stop] != b[start:stop]:
            # a[:start] == b[:start]; the first difference lies in [start, stop).
            low, high = start, stop
            while high - low > 1:
                middle = (low + high) // 2
                if a[low:middle] == b[low:middle]:
                    low = middle
                else:
                    high = middle
            return low
        start, step = stop, step * 2
    return limit


def common_suffix(a: str, b: str, limit: int) -> int:
    """The length of the longest common suffix, at most *limit*."""
    la, lb = len(a), len(b)
    limit = min(limit, la, lb)
    done, step = 0, 4096
    while done < limit:
        upto = min(done + step, limit)
        if a[la - upto : la - done] != b[lb - upto : lb - done]:
            # The last `done` characters agree; the first difference from the end lies
            # among the next ones, up to `upto`.
            low, high = done, upto
            while high - low > 1:
                middle = (low + high) // 2
                if a[la - middle : la - low] == b[lb - middle : lb - low]:
                    low = middle
                else:
                    high = middle
            return low
        done, step = upto, step * 2
    return limit


def _records(text: str) -> list[object] | None:
    """The run of values in *text* as a list (tagged numbers, no repeated keys), or None."""
    from chronosd.errors import JobsFileError
    from chronosd.jobs.file import parse_jobs_text

    try:
        value, repeated = parse_jobs_text("[" + text + "]", tagged=True)
    except JobsFileError:
        return None
    return value if isinstance(value, list) and not repeated else None


def window_changes(before: str, after: str, layout: RecordLayout) -> RecordChanges | None:
    """The records of the part of *after* that differs from *before* (whose layout is given),
    and those they replace; None when only a comparison of the whole files can tell."""
    count = len(layout.ids)
    if layout.digest != text_digest(before) or count == 0 or before == after:
        return None
    prefix = common_prefix(before, after)
    suffix = common_suffix(before, after, min(len(before), len(after)) - prefix)
    changed_end = len(before) - suffix  # the changed part of before: [prefix, changed_end)
    if prefix <= layout.open or changed_end > layout.close:
        return None  # the brackets of the jobs array, or something outside it, changed
    # The records the change touches, and one neighbour on each side: the part parsed is then
    # never empty unless the whole array was emptied, and never starts or ends with a comma.
    first = max(bisect.bisect_left(layout.ends, prefix) - 1, 0)
    last = min(bisect.bisect_right(layout.starts, changed_end), count - 1)
    if first > last:
        return None
    low, high = layout.starts[first], layout.ends[last]
    if low > prefix or high < changed_end:
        return None
    high_after = high + len(after) - len(before)
    if high_after < low:
        return None
    old = _records(before[low:high])
    new = _records(after[low:high_after])
    if old is None or new is None or len(old) != last - first + 1:
        return None
    if not new and (first != 0 or last != count - 1):
        return None
    before_records: dict[str, tuple[int, object]] = {}
    for offset, record in enumerate(old):
        job_id = layout.ids[first + offset]
        if not isinstance(record, dict) or record.get("id") != job_id:
            return None
        before_records[job_id] = (first + offset, record)
    outside = set(layout.ids[:first])
    outside.update(layout.ids[last + 1 :])
    after_records: dict[str, tuple[int, object]] = {}
    for offset, record in enumerate(new):
        new_id = record.get("id") if isinstance(record, dict) else None
        if not isinstance(new_id, str) or new_id in after_records or new_id in outside:
            return None
        after_records[new_id] = (first + offset, record)
    return RecordChanges(before=before_records, after=after_records)


__all__ = [
    "RecordChanges",
    "RecordLayout",
    "common_prefix",
    "common_suffix",
    "record_layout",
    "text_digest",
    "window_changes",
]
