"""Security: who may write jobs.json, who may read chronosd's files, what leaks, what a caller
can smuggle in.

- jobs.json writable by group or others, or owned by someone else, is refused (validate and
  the daemon), also behind a symlink;
- the state directory is created 0700, state.db and run logs 0600, even under umask 000;
- the NAS token, the HMAC secret and JWTs never appear in the daemon's log (at debug level),
  the reference NAS's log or the output of `chronosd status`, `list`, `runs`, `logs`;
- a job receives no descriptor but 0, 1 and 2 (never the listening socket) and no variable
  of chronosd's environment but those INTERFACE.md allows;
- ``job_id`` values from the network never become paths or commands.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from chronosd.http.auth import sign_hmac
from chronosd.nas.keys import KeyRing
from chronosd.timefmt import to_wire
from tests.daemon_support import (
    CHRONOSD,
    EventLog,
    ReferenceNas,
    child_env,
    fire_body,
    http_request,
    jobs_text,
    run_cli,
    wait_until,
    write_private,
)
from tests.harness import SocketActivator
from tests.reliability.conftest import Report
from tests.reliability.support import World, read_starts, recording, rows, try_fire

pytestmark = pytest.mark.slow

ROOT = os.geteuid() == 0


def soon(seconds: int = 50) -> str:
    return to_wire(datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds))


# ---------------------------------------------------------------------- unsafe jobs.json
def unsafe_variants(world: World) -> Iterator[tuple[str, str]]:
    """Make jobs.json unsafe in one way after another; yield (name, expected message part)."""
    for mode in (0o666, 0o620, 0o602):
        world.jobs.chmod(mode)
        yield f"mode-{mode:04o}", "writable by group or others"
    world.jobs.chmod(0o600)
    if ROOT:
        os.chown(world.jobs, 65534, 65534)
        yield "owned-by-nobody", "owned by"
        os.chown(world.jobs, 0, 0)
    # A safe-looking symlink to an unsafe file: the file itself is what counts.
    real = world.root / "real-jobs.json"
    os.replace(world.jobs, real)
    real.chmod(0o646)
    world.jobs.symlink_to(real)
    yield "symlink-to-mode-0646", "writable by group or others"


DAEMON_VARIANTS = ("mode-0666", "owned-by-nobody", "symlink-to-mode-0646")


def test_unsafe_jobs_json_is_refused_by_validate_and_by_the_daemon(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path)
    world.write_jobs(
        [{"id": "intruder", "schedule": "every 1s", "command": recording(world.starts)}]
    )
    world.write_config()
    refused: dict[str, str] = {}
    for name, expected in unsafe_variants(world):
        done = run_cli("validate", config=world.config, home=world.root)
        assert done.returncode == 1, (name, done.stdout, done.stderr)
        assert expected in done.stderr, (name, done.stderr)
        refused[name] = done.stderr
        if name not in DAEMON_VARIANTS:
            continue
        with world.running() as daemon:
            event = daemon.log.wait_for("jobs.rejected", timeout=20)[0]
            assert expected in event["error"], (name, event)
            status = run_cli("status", "--json", config=world.config, home=world.root)
            assert json.loads(status.stdout)["jobs_valid"] is False
            time.sleep(1.5)  # "every 1s" would have fired by now
            assert daemon.stop() == 0
    starts = read_starts(world.starts)
    report(variants=len(refused), refused=len(refused), intruder_starts=len(starts))
    assert starts == []


# ---------------------------------------------------------------------- file modes
def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_state_directory_is_0700_and_run_logs_0600_even_under_umask_000(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path / "world")
    world.state_dir = tmp_path / "var" / "lib" / "chronosd"
    world.write_jobs([{"id": "logger", "schedule": "every 1s", "command": ["echo", "private"]}])
    world.write_config()
    log_path = world.root / "daemon.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                "sh",
                "-c",
                'umask 000; exec "$@"',
                "sh",
                *CHRONOSD,
                "run",
                "--config",
                str(world.config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in child_env(world.root).items() if k != "PYTHONDONTWRITEBYTECODE"},
            start_new_session=True,
        )
    try:

        def two_runs() -> bool:
            try:
                return len(world.state.finished_runs("logger")) >= 2
            except sqlite3.OperationalError:
                return False  # created, not migrated yet

        wait_until(two_runs, timeout=30, what="two runs of logger")
        process.terminate()
        assert process.wait(30) == 0, EventLog(log_path).tail()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    state = world.state_dir
    runs_dir = state / "runs"
    logs = sorted((runs_dir / "logger").glob("*.log"))
    files = {
        "state dir": mode(state),
        "state.db": mode(state / "state.db"),
        "runs dir": mode(runs_dir),
        "runs/logger dir": mode(runs_dir / "logger"),
        **{
            f"state.db{suffix}": mode(state / f"state.db{suffix}")
            for suffix in ("-wal", "-shm")
            if (state / f"state.db{suffix}").exists()
        },
        **{f"log {p.name}": mode(p) for p in logs},
        # Written at exit (chronosd.methodcache; the child runs without PYTHONDONTWRITEBYTECODE).
        **{p.name: mode(p) for p in state.glob("dataclass-methods.*")},
    }
    report(
        files=len(files),
        run_logs=len(logs),
        modes=",".join(sorted({f"{m:04o}" for m in files.values()})),
    )
    assert len(logs) >= 2
    assert any(name.startswith("dataclass-methods.") for name in files)
    for name, value in files.items():
        wanted = 0o700 if "dir" in name else 0o600
        assert value == wanted, (name, f"{value:04o}")


# Regression test for a fixed bug: chronosd/state.py _make_private_dir: Path.mkdir(mode=0o700,
# parents=True) creates the missing parents of the state directory with the default mode (0777 &
# ~umask), so under umask 000 they are world-writable and anyone could rename the state directory
# away and put their own state.db in its place; create each missing parent 0700 as well


def test_missing_parents_of_the_state_directory_are_not_created_writable_by_others(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "var" / "lib" / "chronosd"
    code = (
        "import os, sys; from chronosd.state import StateDB; os.umask(0); "
        "StateDB.open(__import__('pathlib').Path(sys.argv[1])).close()"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(state_dir)],
        check=True,
        timeout=60,
        env=child_env(tmp_path),
        capture_output=True,
    )
    assert mode(state_dir) == 0o700
    for parent in (state_dir.parent, state_dir.parent.parent):
        assert not mode(parent) & 0o022, (parent, f"{mode(parent):04o}")


# ---------------------------------------------------------------------- secrets
def fire_with(address: tuple[str, int], token: str, job_id: str, at: str) -> int:
    answer = http_request(
        address,
        "POST",
        "/api/cron/fire",
        fire_body(job_id, at),
        {"authorization": f"Bearer {token}"},
    )
    return answer.status


ENV_DUMP = [sys.executable, "-c", "import os, json; print(json.dumps(dict(os.environ)))"]


def cli_outputs(world: World) -> str:
    text = ""
    for args in (
        ("status",),
        ("status", "--json"),
        ("list",),
        ("list", "--json"),
        ("runs", "--json"),
        ("logs", "dump"),
    ):
        done = run_cli(*args, config=world.config, home=world.root)
        text += done.stdout + done.stderr
    return text


def test_nas_token_hmac_secret_and_jwts_never_appear_in_logs_or_status(
    tmp_path: Path, report: Report
) -> None:
    # --- life 1: the reference NAS, its agent token and JWT-authenticated fires
    nas = ReferenceNas(tmp_path / "nas", tmp_path, tmp_path / "nas.log")
    world = World(tmp_path / "world")
    from tests.reliability.support import free_port

    port = free_port()
    token = nas.add_agent("sec-agent", f"http://127.0.0.1:{port}")
    nas.start()
    token_file = write_private(world.root / "nas-token", token + "\n")
    at = soon()
    world.write_jobs(
        [
            {"id": "dump", "schedule": f"at {at}", "command": ENV_DUMP},
            {"id": "hourly", "schedule": "every 1h", "command": ["true"]},
        ]
    )
    world.write_config(
        listen=f"127.0.0.1:{port}",
        provider={"kind": "nas"},
        nas={
            "url": nas.base_url,
            "callback_url": f"http://127.0.0.1:{port}",
            "token_file": str(token_file),
        },
        auth={
            "mode": "jwt",
            "jwks_url": f"{nas.base_url}/.well-known/jwks.json",
            "audience": "agent:sec-agent",
            "issuer": nas.base_url,
        },
    )
    ring = KeyRing.load_or_create(nas.state_dir)
    jwts: list[str] = []
    wrong_token = "wrongtoken" + os.urandom(16).hex()
    try:
        with world.running(extra_args=("--log-level", "debug")) as daemon:
            address = ("127.0.0.1", port)
            daemon.log.wait_for("arm.confirmed", job_id="hourly", timeout=30)
            good = ring.mint_fire_token(
                issuer=nas.base_url, audience="agent:sec-agent", job_id="dump"
            )
            wrong_audience = ring.mint_fire_token(
                issuer=nas.base_url, audience="agent:someone-else", job_id="dump"
            )
            forged = good.rsplit(".", 1)[0] + "." + "A" * 86
            jwts += [good, wrong_audience, forged]
            assert fire_with(address, wrong_audience, "dump", at) == 401
            assert fire_with(address, forged, "dump", at) == 401
            assert fire_with(address, good, "dump", at) == 202
            assert fire_with(address, good, "dump", at) == 401  # replayed jti
            wait_until(lambda: world.state.finished_runs("dump"), timeout=20, what="dump's run")
            # A wrong token on disk: the NAS refuses it and the error is reported.
            write_private(token_file, wrong_token + "\n")
            edited = jobs_text(
                [
                    {"id": "dump", "schedule": f"at {at}", "command": ENV_DUMP},
                    {"id": "hourly", "schedule": "every 2h", "command": ["true"]},
                ]
            )
            os.replace(write_private(world.root / ".jobs.new", edited), world.jobs)
            daemon.log.wait_for("reconcile.failed", timeout=30)
            first_outputs = cli_outputs(world)
            assert daemon.stop() == 0
    finally:
        nas.stop()

    # --- life 2: auth hmac with a secret
    secret = "hmacsecret" + os.urandom(16).hex()
    secret_file = write_private(world.root / "hmac-secret", secret + "\n")
    hmac_world = World(tmp_path / "hmac-world")
    hmac_at = soon()
    hmac_world.write_jobs([{"id": "dump", "schedule": f"at {hmac_at}", "command": ENV_DUMP}])
    hmac_world.write_config(auth={"mode": "hmac", "hmac_secret_file": str(secret_file)})
    signatures: list[str] = []
    with hmac_world.running(extra_args=("--log-level", "debug")) as daemon:
        address = daemon.address()
        body = fire_body("dump", hmac_at)
        signature = sign_hmac(secret.encode(), body, int(time.time()))
        bad = sign_hmac(b"not-the-secret", body, int(time.time()))
        signatures += [signature.split("v1=")[1], bad.split("v1=")[1]]
        headers = {"content-type": "application/json", "chronos-signature": signature}
        assert http_request(address, "POST", "/api/cron/fire", body, headers).status == 202
        assert http_request(address, "POST", "/api/cron/fire", body, headers).status == 401
        bad_headers = {**headers, "chronos-signature": bad}
        assert http_request(address, "POST", "/api/cron/fire", body, bad_headers).status == 401
        wait_until(lambda: hmac_world.state.finished_runs("dump"), timeout=20, what="the run")
        second_outputs = cli_outputs(hmac_world)
        assert daemon.stop() == 0

    texts = {
        "daemon logs": "".join(
            p.read_text(errors="replace")
            for w in (world, hmac_world)
            for p in sorted(w.root.glob("life-*.log"))
        ),
        "nas log": (tmp_path / "nas.log").read_text(errors="replace"),
        "cli output": first_outputs + second_outputs,
    }
    run_logs = "".join(
        p.read_text(errors="replace")
        for w in (world, hmac_world)
        for p in sorted((w.state_dir / "runs").rglob("*.log"))
    )
    secrets = {
        "nas token": token,
        "wrong nas token": wrong_token,
        "hmac secret": secret,
        **{f"jwt {n}": jwt for n, jwt in enumerate(jwts)},
        **{f"jwt signature {n}": jwt.rsplit(".", 1)[1] for n, jwt in enumerate(jwts)},
        **{f"hmac signature {n}": sig for n, sig in enumerate(signatures)},
    }
    leaks = [
        f"{secret_name} in {where}"
        for secret_name, value in secrets.items()
        for where, text in {**texts, "job output": run_logs}.items()
        if value in text
    ]
    report(
        secrets=len(secrets),
        places=len(texts) + 1,
        log_lines=texts["daemon logs"].count("\n") + texts["nas log"].count("\n"),
        leaks=len(leaks),
    )
    assert "reconcile" in texts["cli output"]  # the failure itself is reported...
    assert leaks == []  # ...without the token


# ---------------------------------------------------------------------- a job's inheritance
PROBE = textwrap.dedent(
    """
    import json, os, stat, sys
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            fds[name] = None
    print(json.dumps({
        "fds": fds,
        "env": dict(os.environ),
        "stdin_is_pipe": stat.S_ISFIFO(os.fstat(0).st_mode),
        "stdin": json.loads(sys.stdin.read() or "null"),
        "own_session": os.getsid(0) == os.getpid(),
    }))
    """
)
ALLOWED_ENV = {"PATH", "HOME", "LANG", "TZ"}
CHRONOS_ENV = {
    "CHRONOS_JOB_ID",
    "CHRONOS_RUN_ID",
    "CHRONOS_SCHEDULED_AT",
    "CHRONOS_TRIGGER",
    "CHRONOS_ATTEMPT",
}


def test_a_job_gets_no_socket_and_only_the_environment_interface_md_allows(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path)
    at = soon()
    world.write_jobs(
        [
            {
                "id": "probe",
                "schedule": f"at {at}",
                "command": [sys.executable, "-c", PROBE],
                "env": {"JOB_OWN": "yes"},
            }
        ]
    )
    world.write_config(
        runner={"pass_env": ["PASSED_ON", "LISTEN_FDS", "NOTIFY_SOCKET", "LISTEN_PID"]}
    )
    env = child_env(
        world.root,
        PASSED_ON="fine",
        DATABASE_PASSWORD="hunter2-" + os.urandom(8).hex(),
        AWS_SECRET_ACCESS_KEY="aws-" + os.urandom(8).hex(),
        CHRONOSD_AUTH_MODE="none",
        LANG="C.UTF-8",
        TZ="UTC",
    )
    argv = [*CHRONOSD, "run", "--config", str(world.config)]
    activator = SocketActivator(argv, env=env, stdout_path=world.root / "daemon.log", notify=True)
    with activator:
        answer = try_fire(activator.address, "probe", at)
        assert answer is not None and answer.status == 202, answer
        (run,) = wait_until(
            lambda: world.state.finished_runs("probe"), timeout=20, what="the probe's run"
        )
    probe: dict[str, Any] = json.loads(world.state.output(run))
    names = set(probe["env"])
    allowed = ALLOWED_ENV | CHRONOS_ENV | {"JOB_OWN", "PASSED_ON"}
    sockets = [t for t in probe["fds"].values() if t and t.startswith("socket:")]
    extra_fds = [n for n, t in probe["fds"].items() if n not in ("0", "1", "2") and t]
    report(
        env_vars=len(names),
        env_not_allowed=len(names - allowed),
        sockets=len(sockets),
        fds_beyond_012=len(extra_fds),
        own_session=int(probe["own_session"]),
    )
    assert names <= allowed, names - allowed
    assert names >= CHRONOS_ENV | {"JOB_OWN", "PASSED_ON", "PATH", "HOME"}
    assert sockets == []
    assert extra_fds == []
    assert probe["stdin_is_pipe"] and probe["stdin"]["id"] == "probe"
    assert probe["own_session"]


# ---------------------------------------------------------------------- job ids from the network
def hostile_ids(canary: Path) -> list[str]:
    return [
        "../../etc/passwd",
        "../state",
        "known/../../x",
        "/etc/passwd",
        "a;rm -rf /",
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"a|touch {canary}",
        f"a && touch {canary}",
        ".",
        "..",
        "-rf",
        "--help",
        "known\x00",
        "known\n",
        "known ",
        "known%2F..%2F..",
        "ｋｎｏｗｎ",
        "KNOWN",
        "a" * 65,
        "a" * 10_000,
        "k" * 60_000,
        "",
    ]


def test_job_ids_from_the_network_never_build_paths_or_commands(
    tmp_path: Path, report: Report
) -> None:
    world = World(tmp_path / "world")
    canary = tmp_path / "canary"
    at = soon()
    world.write_jobs(
        [
            # The default command puts the job id into an argv element: never a shell.
            {"id": "known", "schedule": f"at {at}"},
        ]
    )
    world.write_config(
        runner={"default_command": ["sh", "-c", 'echo "$0" >> ' + str(world.starts), "{job_id}"]}
    )
    outcomes: dict[str, int] = {}
    with world.running() as daemon:
        address = daemon.address()
        for job_id in hostile_ids(canary):
            for fire_at in (at, "2026-01-01T00:00:00+00:00"):
                answer = try_fire(address, job_id, fire_at)
                assert answer is not None, job_id
                outcomes[f"{answer.status}:{answer.body.get('status', 'error')}"] = (
                    outcomes.get(f"{answer.status}:{answer.body.get('status', 'error')}", 0) + 1
                )
                assert answer.status in (400, 200), (job_id, answer)
                if answer.status == 200:
                    assert answer.body["status"] == "gone", (job_id, answer)
        control = try_fire(address, "known", at)
        assert control is not None and control.status == 202
        wait_until(lambda: world.state.finished_runs("known"), timeout=20, what="known's run")
        assert daemon.stop() == 0
    runs_dirs = sorted(p.name for p in (world.state_dir / "runs").iterdir())
    ids_in_state = {
        r["job_id"]
        for table in ("job_state", "occurrences", "runs")
        for r in rows(world.state_dir, f"SELECT DISTINCT job_id FROM {table}")
    }
    report(
        hostile_ids=len(hostile_ids(canary)),
        answers=",".join(f"{k}x{v}" for k, v in sorted(outcomes.items())),
        canary_created=int(canary.exists()),
        run_dirs=len(runs_dirs),
    )
    assert not canary.exists()
    assert runs_dirs == ["known"]
    assert ids_in_state == {"known"}
    assert [s for s in world.starts.read_text().splitlines()] == ["known"]
    assert list(tmp_path.glob("*passwd*")) == []
