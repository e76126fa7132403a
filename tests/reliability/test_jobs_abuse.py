"""jobs.json abuse: `chronosd validate` never raises or hangs; a running daemon keeps its set.

Hypothesis mutates a valid document (wrong types anywhere, deep nesting, huge strings,
invalid UTF-8, truncation, byte flips, odd encodings); `chronosd validate` runs in-process
on each file under an alarm and must exit 0, 1 or 2 with its own one-line messages (the CLI
prints "unexpected <Exception>" only for an exception nobody handled). A few files that need a
real process (50,000 jobs, special files behind a symlink) go through the command line with a
timeout. The running daemon is fed the same kinds of abuse by atomic replacement and must keep
firing its last good set.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronosd.cli import main as chronosd_main
from tests.daemon_support import CHRONOSD, child_env, jobs_text, wait_until, write_private
from tests.reliability.conftest import Report
from tests.reliability.support import World, read_starts, recording, scaled

pytestmark = pytest.mark.slow

GOOD: dict[str, Any] = {
    "jobs": [
        {
            "id": "backup",
            "name": "Nightly backup",
            "schedule": "30 2 * * *",
            "timezone": "Europe/London",
            "command": ["/usr/local/bin/backup", "--full"],
            "enabled": True,
            "timeout": "2h",
            "overlap": "skip",
            "catch_up": True,
            "misfire_grace": "10m",
            "jitter": "0s",
            "repeat": None,
            "retries": 0,
            "env": {"TARGET": "s3://bucket"},
            "cwd": "/srv",
        },
        {"id": "tick", "schedule": "every 90s", "command": "echo tick"},
        {"id": "hermes", "schedule": {"kind": "interval", "minutes": 5}, "prompt": "hi"},
    ]
}

# ---------------------------------------------------------------------- strategies
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

FIELDS = sorted({key for job in GOOD["jobs"] for key in job} | {"state", "paused", "kind"})


def nested(depth: int, *, as_object: bool) -> str:
    if as_object:
        return '{"a": ' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, bytes]:
    """(what was done, the bytes of a mutated jobs.json)."""
    doc = json.loads(json.dumps(GOOD))
    how = draw(
        st.sampled_from(
            [
                "wrong-type",
                "top-level",
                "jobs-value",
                "deep-nesting",
                "huge-string",
                "many-fields",
                "bytes",
                "encoding",
                "numbers",
            ]
        )
    )
    if how == "wrong-type":
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            job = draw(st.sampled_from(doc["jobs"]))
            job[draw(st.sampled_from(FIELDS))] = draw(json_values)
    elif how == "top-level":
        doc = draw(json_values)
    elif how == "jobs-value":
        doc["jobs"] = draw(json_values)
    elif how == "deep-nesting":
        depth = draw(st.sampled_from([50, 500, 990, 1000, 5000, 200_000]))
        text = nested(depth, as_object=draw(st.booleans()))
        where = draw(st.sampled_from(["env", "command", "schedule", "extra", "jobs", "root"]))
        if where == "root":
            return how, text.encode()
        if where == "jobs":
            return how, ('{"jobs": ' + text + "}").encode()
        job = json.loads(json.dumps(GOOD["jobs"][0]))
        job[where] = "@"
        return how, json.dumps({"jobs": [job]}).replace('"@"', text).encode()
    elif how == "huge-string":
        size = draw(st.sampled_from([70, 10_000, 1_000_000, 4_000_000]))
        job = draw(st.sampled_from(doc["jobs"]))
        field = draw(st.sampled_from(["id", "schedule", "command", "timezone", "cwd", "name"]))
        job[field] = draw(st.sampled_from(["x", "é", "\u202e", "\x00", "*"])) * size
    elif how == "many-fields":
        job = doc["jobs"][0]
        for n in range(draw(st.integers(min_value=100, max_value=3000))):
            job[f"unknown_{n}"] = n
    elif how == "numbers":
        job = draw(st.sampled_from(doc["jobs"]))
        field = draw(st.sampled_from(["retries", "repeat", "timeout", "jitter", "enabled"]))
        literal = draw(
            st.sampled_from(["1e999", "-1e999", "9" * 5000, "NaN", "Infinity", "-0", "1.5e308"])
        )
        job[field] = "@"
        return how, json.dumps(doc).replace('"@"', literal).encode()
    data = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8")
    if how == "bytes":
        data = draw(mutated_bytes(data))
    elif how == "encoding":
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"]))
        text = json.dumps(doc, ensure_ascii=False) + "é\u20ac"
        bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf"]))
        data = bom + text.encode(codec, errors="replace")
    return how, data


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "invalid-utf8"]))
        at = draw(st.integers(min_value=0, max_value=max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(min_value=1, max_value=8))]
        elif op == "truncate":
            del out[at:]
        else:
            out[at:at] = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]))
    return bytes(out)


# ---------------------------------------------------------------------- in-process validate
class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise Hang(f"chronosd validate did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def validate_in_process(path: Path, config: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), alarm(30):
        code = chronosd_main(["validate", str(path), "--config", str(config)])
    return code, out.getvalue(), err.getvalue()


def assert_handled(code: int, out: str, err: str, what: str) -> None:
    assert code in (0, 1, 2), (what, code, err[-500:])
    assert "unexpected" not in err, (what, err[-1000:])
    assert "Traceback" not in out + err, (what, err[-1000:])
    if code:
        assert err.strip(), (what, "an invalid file must say why")


def test_validate_never_raises_nor_hangs_on_mutated_jobs_files(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path)
    world.write_jobs([])
    world.write_config()
    outcomes: dict[int, int] = {}
    kinds: dict[str, int] = {}
    slowest = 0.0

    @settings(
        max_examples=scaled(400),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(documents())
    def check(case: tuple[str, bytes]) -> None:
        nonlocal slowest
        how, data = case
        kinds[how] = kinds.get(how, 0) + 1
        draft = tmp_path / "draft.json"
        draft.write_bytes(data)
        began = time.monotonic()
        code, out, err = validate_in_process(draft, world.config)
        slowest = max(slowest, time.monotonic() - began)
        outcomes[code] = outcomes.get(code, 0) + 1
        assert_handled(code, out, err, how)

    check()
    report(
        files=sum(kinds.values()),
        mutations=",".join(f"{k}x{v}" for k, v in sorted(kinds.items())),
        valid=outcomes.get(0, 0),
        invalid=outcomes.get(1, 0),
        unreadable=outcomes.get(2, 0),
        unhandled=0,
        slowest_s=round(slowest, 2),
    )


# ---------------------------------------------------------------------- the command line
def run_validate(world: World, path: Path | None = None, timeout: float = 120) -> tuple[int, str]:
    args = [*CHRONOSD, "validate", *([str(path)] if path else []), "--config", str(world.config)]
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=child_env(world.root),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert_handled(done.returncode, done.stdout, done.stderr, " ".join(args))
    return done.returncode, done.stdout + done.stderr


def test_fifty_thousand_jobs_validate_in_one_pass(tmp_path: Path, report: Report) -> None:
    world = World(tmp_path)
    count = 50_000
    schedules = ["every 1h", "*/5 * * * *", "30 2 * * MON-FRI", "@daily", "every 90s"]
    world.write_jobs(
        [
            {
                "id": f"job-{n:05d}",
                "schedule": schedules[n % len(schedules)],
                "timezone": "Europe/London" if n % 2 else "UTC",
                "command": ["true", str(n)],
            }
            for n in range(count)
        ]
    )
    world.write_config()
    began = time.monotonic()
    code, output = run_validate(world)
    seconds = time.monotonic() - began
    report(jobs=count, bytes=world.jobs.stat().st_size, exit=code, seconds=round(seconds, 1))
    assert code == 0, output[-500:]
    assert f"valid: {count} job(s)" in output


def special_files(root: Path) -> dict[str, Path]:
    """Targets for a symlinked jobs.json that must not hang or exhaust anything."""
    fifo = root / "a-fifo"
    os.mkfifo(fifo)
    directory = root / "a-directory"
    directory.mkdir()
    loop = root / "loop"
    loop.symlink_to(root / "loop")
    sparse = root / "sparse.json"
    with open(sparse, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)  # over the 64 MiB bound, costs no disk
    sparse.chmod(0o600)
    deep = write_private(root / "deep.json", "[" * 1_000_000)
    return {
        "fifo": fifo,
        "dev-zero": Path("/dev/zero"),
        "dev-null": Path("/dev/null"),
        "dev-urandom": Path("/dev/urandom"),
        "directory": directory,
        "dangling": root / "nowhere",
        "loop": loop,
        "etc-passwd": Path("/etc/passwd"),
        "sparse-65MiB": sparse,
        "deep-1e6": deep,
    }


def test_validate_of_a_jobs_json_symlinked_anywhere_exits_cleanly(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path / "world")
    world.write_config()
    codes: dict[str, int] = {}
    for name, target in special_files(tmp_path).items():
        with contextlib.suppress(FileNotFoundError):
            world.jobs.unlink()
        world.jobs.symlink_to(target)
        code, output = run_validate(world, timeout=60)
        codes[name] = code
        assert code in (1, 2), (name, output)
    report(
        targets=len(codes),
        exits=",".join(f"{name}={code}" for name, code in codes.items()),
        hangs=0,
        unhandled=0,
    )


# ---------------------------------------------------------------------- the running daemon
def bad_versions(root: Path) -> list[tuple[str, Any]]:
    """(name, bytes or a symlink target or a callable that installs it) for jobs.json."""
    versions: list[tuple[str, Any]] = [
        ("invalid-utf8", b'{"jobs": [{"id": "keeper\xff", "schedule": "every 1s"}]}'),
        ("deep-nesting", b"[" * 200_000),
        ("wrong-types", json.dumps({"jobs": [{"id": 7, "schedule": ["every", 1]}]}).encode()),
        ("top-level-list", b"[]"),
        ("empty", b""),
        ("huge-string", json.dumps({"jobs": [{"id": "x" * 5_000_000}]}).encode()),
        ("invalid-job", jobs_text([{"id": "keeper", "schedule": "30m"}]).encode()),
        ("nan", b'{"jobs": [{"id": "keeper", "schedule": "every 1s", "retries": NaN}]}'),
        # Two unreadable versions in a row look alike (no digest): one readable between.
        ("symlink-etc-passwd", Path("/etc/passwd")),
        ("symlink-dangling", root / "nowhere"),
        ("world-writable", ("mode", 0o666)),
        ("symlink-directory", root),
    ]
    if os.geteuid() == 0:
        versions.append(("owned-by-nobody", ("owner", 65534)))
    return versions


def install(world: World, name: str, version: Any, good: bytes) -> None:
    tmp = world.jobs.with_name(".jobs.json.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if isinstance(version, bytes):
        tmp.write_bytes(version)
        tmp.chmod(0o600)
    elif isinstance(version, Path):
        tmp.symlink_to(version)
    else:
        what, value = version
        # The good content, but unsafe: whoever could write it could run commands as us.
        tmp.write_bytes(good.replace(b'"keeper"', b'"intruder"'))
        tmp.chmod(0o600)
        if what == "mode":
            tmp.chmod(value)
        else:
            os.chown(tmp, value, value)
    os.replace(tmp, world.jobs)


def test_a_running_daemon_keeps_its_last_good_set_through_abusive_edits(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path / "world")
    good = world.write_jobs(
        [{"id": "keeper", "schedule": "every 1s", "command": recording(world.starts)}]
    )
    world.write_config()
    rejected: dict[str, str] = {}
    with world.running() as daemon:
        daemon.log.wait_for("watch.started", timeout=20)
        for name, version in bad_versions(tmp_path):
            before = daemon.log.count("jobs.rejected")
            install(world, name, version, good)
            event = daemon.log.wait_for("jobs.rejected", count=before + 1, timeout=30)[-1]
            rejected[name] = event["error"]
            # The last good set still fires: a new start after the rejection.
            seen = len(read_starts(world.starts))
            wait_until(
                lambda: len(read_starts(world.starts)) > seen,  # noqa: B023
                timeout=15,
                what=f"keeper to fire after {name}",
            )
            assert daemon.process is not None and daemon.process.poll() is None
        assert daemon.log.count("jobs.loaded") == 1
        # A good edit is taken again.
        with_more = [
            {"id": "keeper", "schedule": "every 1s", "command": recording(world.starts)},
            {"id": "newcomer", "schedule": "every 1s", "command": recording(world.starts)},
        ]
        os.replace(write_private(world.root / ".good", jobs_text(with_more)), world.jobs)
        daemon.log.wait_for("jobs.loaded", count=2, timeout=30)
        wait_until(
            lambda: any(s.job_id == "newcomer" for s in read_starts(world.starts)),
            timeout=15,
            what="the newcomer to fire",
        )
        assert daemon.stop() == 0
    intruders = [s for s in read_starts(world.starts) if s.job_id != "keeper"]
    report(
        abusive_edits=len(rejected),
        rejected=len(rejected),
        daemon_alive=1,
        foreign_starts=len([s for s in intruders if s.job_id != "newcomer"]),
    )
    assert all(s.job_id in ("keeper", "newcomer") for s in read_starts(world.starts))
    assert "writable by group or others" in rejected["world-writable"]
    if "owned-by-nobody" in rejected:
        assert "owned by" in rejected["owned-by-nobody"]


# Regression test for a fixed bug: chronosd/daemon/supervisor.py _digest_of reads jobs.json with
# Path.read_bytes(): a symlink to a FIFO blocks the event loop in open() for good (and one to
# /dev/zero reads without bound); it must open O_NONBLOCK, accept only a regular file and cap the
# read, as chronosd/jobs/file.py _read does


def test_a_running_daemon_survives_jobs_json_replaced_by_a_symlink_to_a_fifo(
    tmp_path: Path,
) -> None:
    world = World(tmp_path / "world")
    world.write_jobs([{"id": "keeper", "schedule": "every 1s", "command": recording(world.starts)}])
    world.write_config()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    with world.running() as daemon:
        daemon.log.wait_for("watch.started", timeout=20)
        install(world, "fifo", fifo, b"")
        time.sleep(2)  # the watcher has seen it by now
        seen = len(read_starts(world.starts))
        try:
            wait_until(
                lambda: len(read_starts(world.starts)) > seen + 1,
                timeout=10,
                what="keeper to keep firing",
            )
            assert daemon.log.count("jobs.rejected") >= 1
        finally:
            # Unblock a daemon stuck opening the FIFO, so that it can be stopped.
            with contextlib.suppress(OSError):
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
