from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chronosd.errors import JobsFileError
from chronosd.jobs.file import (
    InvalidJobsFile,
    JobsFileMissing,
    JobsFileUnavailable,
    UnsafeJobsFile,
    check_file_safety,
    edit_jobs_file,
    read_jobs_file,
)
from chronosd.jobs.validate import JobDefaults

NOW = datetime(2025, 5, 5, 12, 0, 0, tzinfo=UTC)
DEFAULTS = JobDefaults()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OTHER_UID = 4242


def write(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(data)
    path.chmod(mode)
    return path


def doc(*records: dict[str, Any]) -> str:
    return json.dumps({"jobs": list(records)}, indent=2)


def rec(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "schedule": "every 1m", "command": ["true"], **fields}


@pytest.fixture
def jobs_path(tmp_path: Path) -> Path:
    return write(tmp_path / "jobs.json", doc(rec("a"), rec("b")))


def read(path: Path, **options: Any) -> Any:
    return read_jobs_file(path, defaults=DEFAULTS, now=NOW, **options)


# -- reading -----------------------------------------------------------------


def test_read_returns_jobs_digest_and_mtime(jobs_path: Path) -> None:
    loaded = read(jobs_path)
    assert [j.id for j in loaded.jobs] == ["a", "b"]
    assert loaded.problems == ()
    assert loaded.digest == hashlib.sha256(jobs_path.read_bytes()).hexdigest()
    assert loaded.mtime_ns == jobs_path.stat().st_mtime_ns
    assert loaded.path == jobs_path


def test_example_jobs_file_is_valid_without_warnings(tmp_path: Path) -> None:
    copy = tmp_path / "jobs.json"
    shutil.copyfile(EXAMPLES / "jobs.json", copy)
    copy.chmod(0o600)
    loaded = read(copy)
    assert loaded.problems == ()
    by_id = {job.id: job for job in loaded.jobs}
    assert by_id["heartbeat"].schedule.kind == "every"
    assert by_id["quarter-minute-clock"].schedule.cron is not None
    assert by_id["nightly-backup"].paused
    assert sum(job.active for job in loaded.jobs) == 3


def test_missing_file_says_so_and_is_marked_unreadable(tmp_path: Path) -> None:
    with pytest.raises(JobsFileMissing, match="does not exist") as caught:
        read(tmp_path / "nope.json")
    # chronosd validate exits 2 ("cannot read") for these.
    assert caught.value.unreadable


def test_known_schedules_reach_the_validation(tmp_path: Path) -> None:
    from chronosd.jobs.validate import schedule_key

    record = rec("once", schedule="at 2025-05-05T09:00:00+00:00")
    path = write(tmp_path / "jobs.json", doc(record))
    with pytest.raises(InvalidJobsFile, match="in the past by 3h"):
        read(path)
    earlier = datetime(2025, 5, 5, 8, 0, tzinfo=UTC)
    (seen,) = read_jobs_file(path, defaults=DEFAULTS, now=earlier).jobs
    loaded = read(path, known_schedules={"once": schedule_key(seen)})
    assert [j.id for j in loaded.jobs] == ["once"]


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobsFileUnavailable, match="is a directory"):
        read(tmp_path)


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "jobs.json"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(JobsFileUnavailable, match="not a regular file"):
        read(fifo)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_says_so(jobs_path: Path) -> None:
    jobs_path.chmod(0o000)
    with pytest.raises(JobsFileUnavailable, match="cannot be read"):
        read(jobs_path)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_group_or_other_writable_file_is_refused_with_the_fix(jobs_path: Path, mode: int) -> None:
    jobs_path.chmod(mode)
    expected = (
        f"jobs.json {jobs_path}: writable by group or others (mode {mode:04o}); "
        f"run: chmod go-w {jobs_path}"
    )
    with pytest.raises(UnsafeJobsFile) as caught:
        read(jobs_path)
    assert str(caught.value) == expected
    with pytest.raises(UnsafeJobsFile):
        check_file_safety(jobs_path)


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640, 0o400])
def test_modes_without_group_or_other_write_are_accepted(jobs_path: Path, mode: int) -> None:
    jobs_path.chmod(mode)
    check_file_safety(jobs_path)
    assert len(read(jobs_path).jobs) == 2


def test_file_owned_by_another_user_is_refused(jobs_path: Path) -> None:
    owner = jobs_path.stat().st_uid
    if owner == 0:
        # Root may own the file in any case, so give it to someone else first.
        os.chown(jobs_path, OTHER_UID, -1)
        owner = OTHER_UID
    daemon_uid = owner + 1
    with pytest.raises(UnsafeJobsFile, match=f"owned by .*uid {owner}.*run: chown {daemon_uid}"):
        check_file_safety(jobs_path, uid=daemon_uid)
    check_file_safety(jobs_path, uid=owner)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a root-owned file")
def test_file_owned_by_root_is_accepted_for_any_daemon_user(jobs_path: Path) -> None:
    check_file_safety(jobs_path, uid=OTHER_UID)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_read_checks_the_owner_against_the_effective_user(jobs_path: Path) -> None:
    os.chown(jobs_path, OTHER_UID, -1)
    # The effective user is root here, and root accepts only root-owned or its own files.
    with pytest.raises(UnsafeJobsFile, match="owned by"):
        read(jobs_path)


def test_check_owner_false_skips_the_safety_check(jobs_path: Path) -> None:
    jobs_path.chmod(0o666)
    assert len(read(jobs_path, check_owner=False).jobs) == 2


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", b"\xef\xbb\xbf" + doc(rec("a", name="Caf\u00e9")).encode())
    (job,) = read(path).jobs
    assert job.name == "Café"


def test_json_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", '{\n  "jobs": [\n    {"id": "a",}\n  ]\n}\n')
    with pytest.raises(InvalidJobsFile) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"jobs.json {path}: invalid JSON at line 3, column 16: ")
    assert "line 3, column 16" in caught.value.problems[0].message


def test_json_syntax_error_after_a_bom_counts_columns_from_the_text(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", b'\xef\xbb\xbf{"jobs": [,]}')
    with pytest.raises(InvalidJobsFile, match="line 1, column 11"):
        read(path)


def test_invalid_utf8_is_reported_with_its_position(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", b'{"jobs": [\n  {"id": "caf\xe9"}\n]}')
    with pytest.raises(
        InvalidJobsFile, match=r"not valid UTF-8 \(byte 0xe9 at line 2, column 14\)"
    ):
        read(path)


@pytest.mark.parametrize(
    "content",
    [
        "[" * 200_000,
        '{"jobs": [{"id": "a", "schedule": "every 1m", "x": ' + "[" * 100_000 + "]" * 100_000,
        '{"jobs": [' + "{" * 50_000,
    ],
)
def test_deep_nesting_is_a_jobs_file_error(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "jobs.json", content)
    with pytest.raises(JobsFileError):
        read(path)


def test_moderate_nesting_in_an_unknown_field_loads(tmp_path: Path) -> None:
    nested: Any = "leaf"
    for _ in range(200):
        nested = [nested]
    path = write(tmp_path / "jobs.json", doc(rec("a", extra=nested)))
    loaded = read(path)
    assert [p.field for p in loaded.problems] == ["extra"]


def test_huge_integer_is_a_jobs_file_error(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", '{"jobs": [{"id": "a", "retries": 1' + "0" * 6000 + "}]}")
    with pytest.raises(InvalidJobsFile, match="cannot be parsed"):
        read(path)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(tmp_path: Path, constant: str) -> None:
    path = write(tmp_path / "jobs.json", '{"jobs": [{"id": "a", "timeout": ' + constant + "}]}")
    with pytest.raises(InvalidJobsFile, match="JSON does not allow"):
        read(path)


@pytest.mark.parametrize("content", ["", "  \n", "\ufeff"])
def test_empty_file_says_what_to_write(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "jobs.json", content)
    with pytest.raises(InvalidJobsFile, match=r'is empty; write \{"jobs": \[\]\}'):
        read(path)


def test_repeated_key_in_an_object_is_a_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path / "jobs.json",
        '{"jobs": [{"id": "a", "schedule": "every 5m", "schedule": "every 1m"}]}',
    )
    loaded = read(path)
    assert loaded.jobs[0].schedule_text == "every 1m"
    assert [p.severity for p in loaded.problems] == ["warning"]
    assert '"schedule" appears twice' in loaded.problems[0].message


def test_invalid_document_reports_count_and_first_error_and_keeps_the_full_list(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "jobs.json",
        doc(rec("a", timeout="soon"), rec("b", schedule="30m"), rec("c", colour="red")),
    )
    with pytest.raises(InvalidJobsFile) as caught:
        read(path)
    message = str(caught.value)
    assert message.startswith(f"jobs.json {path}: 2 errors, first: job a: timeout: ")
    assert message.endswith("run chronosd validate to see all")
    assert [(p.where, p.field, p.severity) for p in caught.value.problems] == [
        ("a", "timeout", "error"),
        ("b", "schedule", "error"),
        ("c", "colour", "warning"),
    ]


def test_skip_mode_keeps_good_jobs_and_reports_the_bad_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", doc(rec("a"), rec("b", timeout="soon"), rec("c")))
    loaded = read(path, on_invalid_job="skip")
    assert [j.id for j in loaded.jobs] == ["a", "c"]
    assert [(p.where, p.field, p.severity) for p in loaded.problems] == [("b", "timeout", "error")]


def test_skip_mode_still_rejects_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", doc(rec("a"), rec("a")))
    with pytest.raises(InvalidJobsFile, match=r"1 error: job a \(jobs\[1\]\): id: "):
        read(path, on_invalid_job="skip")


@pytest.mark.parametrize("content", ['[{"id": "a"}]', '{"job": []}', '{"jobs": {}}', '"x"'])
def test_skip_mode_still_rejects_a_bad_top_level(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "jobs.json", content)
    with pytest.raises(InvalidJobsFile):
        read(path, on_invalid_job="skip")


def test_fifty_thousand_job_file_loads(tmp_path: Path) -> None:
    records = [
        rec(f"job-{i}", schedule=("every 90s", "*/5 * * * *", "0 3 * * MON-FRI")[i % 3])
        for i in range(50_000)
    ]
    path = write(tmp_path / "jobs.json", doc(*records))
    loaded = read(path)
    assert len(loaded.jobs) == 50_000
    assert loaded.jobs[-1].id == "job-49999"


# -- editing -----------------------------------------------------------------


HAND_WRITTEN = """{
  "comment": "kept",
  "jobs": [
    {
      "schedule": "every 1m",
      "id": "a",
      "x-owner": {"team": "ops", "tags": ["b", "a"]},
      "command": ["true"]
    }
  ],
  "zeta": 1
}
"""


def add_job(job_id: str) -> Any:
    def mutate(document: dict[str, Any]) -> None:
        document["jobs"].append(rec(job_id))

    return mutate


def test_edit_keeps_unknown_fields_key_order_indent_and_trailing_newline(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "jobs.json", HAND_WRITTEN)
    edit_jobs_file(path, add_job("b"))
    text = path.read_text(encoding="utf-8")
    expected = {
        "comment": "kept",
        "jobs": [
            {
                "schedule": "every 1m",
                "id": "a",
                "x-owner": {"team": "ops", "tags": ["b", "a"]},
                "command": ["true"],
            },
            rec("b"),
        ],
        "zeta": 1,
    }
    assert text == json.dumps(expected, indent=2) + "\n"
    assert list(json.loads(text)) == ["comment", "jobs", "zeta"]
    assert list(json.loads(text)["jobs"][0]) == ["schedule", "id", "x-owner", "command"]
    assert '\n  "jobs": [\n    {\n      "schedule"' in text


def test_edit_keeps_non_ascii_text_and_a_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", b"\xef\xbb\xbf" + doc(rec("a", name="Caf\u00e9")).encode())
    edit_jobs_file(path, add_job("b"))
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")
    assert "Café".encode() in raw
    assert [j.id for j in read(path).jobs] == ["a", "b"]


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644, 0o400])
def test_edit_keeps_the_mode(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path / "jobs.json", doc(rec("a")), mode)
    edit_jobs_file(path, add_job("b"))
    assert stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_edit_keeps_the_owner(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", doc(rec("a")))
    os.chown(path, OTHER_UID, OTHER_UID)
    edit_jobs_file(path, add_job("b"))
    info = path.stat()
    assert (info.st_uid, info.st_gid) == (OTHER_UID, OTHER_UID)


def test_edit_creates_a_missing_file_private(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "chronosd" / "jobs.json"
    edit_jobs_file(path, add_job("a"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"jobs": [rec("a")]}
    assert [j.id for j in read(path).jobs] == ["a"]


def test_edit_without_create_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobsFileMissing):
        edit_jobs_file(tmp_path / "jobs.json", add_job("a"), create=False)
    assert not (tmp_path / "jobs.json").exists()


def test_failed_mutation_writes_nothing_and_leaves_no_temp_file(jobs_path: Path) -> None:
    before = jobs_path.read_bytes()

    def fail(document: dict[str, Any]) -> None:
        document["jobs"].clear()
        raise KeyError("no such job")

    with pytest.raises(KeyError):
        edit_jobs_file(jobs_path, fail)
    assert jobs_path.read_bytes() == before
    assert sorted(p.name for p in jobs_path.parent.iterdir()) == ["jobs.json", "jobs.json.lock"]


def test_unchanged_document_is_not_rewritten(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", json.dumps({"jobs": [rec("a")]}, indent=2) + "\n")
    inode = path.stat().st_ino
    edit_jobs_file(path, lambda document: None)
    assert path.stat().st_ino == inode


def test_edit_replaces_the_file_atomically(jobs_path: Path) -> None:
    inode = jobs_path.stat().st_ino
    edit_jobs_file(jobs_path, add_job("c"))
    assert jobs_path.stat().st_ino != inode
    assert [p.name for p in jobs_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_edit_through_a_symlink_edits_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = write(tmp_path / "real.json", doc(rec("a")))
    link = tmp_path / "jobs.json"
    link.symlink_to(real)
    edit_jobs_file(link, add_job("b"))
    assert link.is_symlink()
    assert [j["id"] for j in json.loads(real.read_text())["jobs"]] == ["a", "b"]


def test_edit_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", '{"jobs": [')
    with pytest.raises(InvalidJobsFile, match="invalid JSON at line 1"):
        edit_jobs_file(path, add_job("a"))
    assert path.read_text() == '{"jobs": ['


def test_edit_refuses_a_top_level_that_is_not_an_object(tmp_path: Path) -> None:
    path = write(tmp_path / "jobs.json", "[]")
    with pytest.raises(InvalidJobsFile, match="not an object"):
        edit_jobs_file(path, add_job("a"))


def test_edit_waits_for_the_lock_and_gives_up_after_the_timeout(jobs_path: Path) -> None:
    import fcntl

    lock = os.open(jobs_path.with_name("jobs.json.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(JobsFileError, match="another edit has held"):
            edit_jobs_file(jobs_path, add_job("c"), lock_timeout=0.2)
        done = threading.Event()

        def edit() -> None:
            edit_jobs_file(jobs_path, add_job("c"), lock_timeout=30)
            done.set()

        worker = threading.Thread(target=edit)
        worker.start()
        assert not done.wait(0.3)  # blocked behind our lock
        fcntl.flock(lock, fcntl.LOCK_UN)
        worker.join(timeout=30)
        assert done.is_set()
    finally:
        os.close(lock)
    assert [j.id for j in read(jobs_path).jobs] == ["a", "b", "c"]


def test_twenty_concurrent_processes_each_add_a_job_and_none_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    script = textwrap.dedent(
        """
        import sys
        from chronosd.jobs.file import edit_jobs_file

        def add(document):
            document["jobs"].append(
                {"id": sys.argv[2], "schedule": "every 1m", "command": ["true"]}
            )

        edit_jobs_file(sys.argv[1], add)
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path, env.get("PYTHONPATH")]))
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), f"job-{n}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(20)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
    loaded = read(path)
    assert sorted(j.id for j in loaded.jobs) == sorted(f"job-{n}" for n in range(20))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
