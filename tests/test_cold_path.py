"""The cold fire path imports neither httpx nor watchfiles before it answers (DESIGN.md 6).

Nor, since each costs a wake-up tens of milliseconds: structlog (JSON lines are written by
chronosd.log itself), PyJWT and ``cryptography.x509`` (a fire token is checked with
``cryptography``'s Ed25519 primitive alone), argparse and the other commands' modules
(``chronosd run`` has a parser of its own).

The daemon runs socket-activated under ``python -X importtime``, which writes one line per
first import to stderr, in order with the daemon's own log lines (the same stream). The
``fire.claimed`` event is logged while the fire is being answered, before the 202 is written;
so every module named before it was imported on the way to the reply.

Measured is the start a fire causes once the daemon has run before (its arms are confirmed at
the NAS and, with jwt, the NAS's keys are cached in state.db), which is the every-day wake-up;
with local timers the very first start is measured instead, as nothing is ever armed remotely.
"""

from __future__ import annotations

import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from chronosd.methodcache import cache_path, read_cache
from chronosd.nas.keys import KeyRing
from chronosd.timefmt import to_wire
from tests.daemon_support import (
    EventLog,
    ReferenceNas,
    StateReader,
    child_env,
    fire_body,
    hmac_headers,
    http_request,
    jobs_text,
    toml_config,
    write_private,
)
from tests.harness import SocketActivator

SECRET = b"cold-path-secret"
AGENT = "cold-agent"
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)$")
# Never on the way to the first reply, whatever the mode (top-level package names).
# h11 too: the listener parses a plain request and writes its answer itself (h11 reads only
# what falls outside that path).
NEVER_BEFORE_REPLY = ("httpx", "watchfiles", "structlog", "jwt", "argparse", "h11")
# Only the jwt mode needs this to verify a fire.
JWT_ONLY = ("cryptography",)
# Modules (with their submodules) never on the way to the first reply, whatever the mode: the
# NAS signs with Ed25519, so neither X.509 nor the RSA and EC families are needed.
NEVER_BEFORE_REPLY_MODULES = (
    "cryptography.x509",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.hazmat.primitives.asymmetric.ec",
    "chronosd.nas",
    "chronosd.install",
    "chronosd.runner",  # imported when the first run starts, after the reply
)


def imported(lines: list[str]) -> list[str]:
    names = []
    for line in lines:
        match = IMPORT_LINE.match(line)
        if match:
            names.append(match.group(2))
    return names


def top_level(names: list[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def within(names: list[str], modules: tuple[str, ...]) -> list[str]:
    """The *names* that are one of *modules* or a submodule of one."""
    return sorted(
        name for name in names if any(name == m or name.startswith(m + ".") for m in modules)
    )


@pytest.mark.parametrize(("mode", "provider"), [("none", "local"), ("hmac", "nas"), ("jwt", "nas")])
def test_cold_fire_path_answers_before_importing_httpx_or_watchfiles(
    tmp_path: Path, mode: str, provider: str
) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    instants = {"first": t0 + timedelta(seconds=40), "second": t0 + timedelta(seconds=41)}
    jobs = tmp_path / "jobs.json"
    write_private(
        jobs,
        jobs_text(
            [
                {"id": job_id, "schedule": f"at {to_wire(at)}", "command": ["true"]}
                for job_id, at in instants.items()
            ]
        ),
    )
    log = EventLog(tmp_path / "daemon.log")
    argv = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "chronosd",
        "run",
        "--config",
        str(tmp_path / "chronosd.toml"),
    ]
    env = child_env(tmp_path)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as under systemd: the method cache is written
    activator = SocketActivator(argv, env=env, stdout_path=log.path)
    nas = ReferenceNas(tmp_path / "nas", tmp_path, tmp_path / "nas.log")
    activator.start()
    try:
        callback = f"http://127.0.0.1:{activator.port}"
        settings: dict[str, object] = {"extra": 'idle_exit = "1s"'}
        if provider == "nas":
            token = nas.add_agent(AGENT, callback)
            nas.start()
            settings["provider"] = {"kind": "nas"}
            settings["nas"] = {
                "url": nas.base_url,
                "callback_url": callback,
                "token_file": str(write_private(tmp_path / "nas-token", token)),
            }
        if mode == "hmac":
            secret_file = write_private(tmp_path / "secret", SECRET.decode())
            settings["auth"] = {"mode": "hmac", "hmac_secret_file": str(secret_file)}
        elif mode == "jwt":
            settings["auth"] = {
                "mode": "jwt",
                "jwks_url": nas.base_url + "/.well-known/jwks.json",
                "audience": f"agent:{AGENT}",
                "issuer": nas.base_url,
            }
        else:
            settings["auth"] = {"mode": "none"}
        write_private(
            tmp_path / "chronosd.toml",
            toml_config(jobs=jobs, state_dir=tmp_path / "state", **settings),  # type: ignore[arg-type]
        )

        def send_fire(job_id: str) -> None:
            body = fire_body(job_id, instants[job_id])
            headers: dict[str, str] = {}
            if mode == "hmac":
                headers = hmac_headers(SECRET, body)
            elif mode == "jwt":
                ring = KeyRing.load_or_create(nas.state_dir)
                headers = {
                    "authorization": "Bearer "
                    + ring.mint_fire_token(
                        issuer=nas.base_url, audience=f"agent:{AGENT}", job_id=job_id
                    )
                }
            answer = http_request(activator.address, "POST", "/api/cron/fire", body, headers)
            assert answer.status == 202, (answer, log.tail())

        if provider == "nas":
            # The previous wake-up: arms confirmed at the NAS, keys fetched (jwt).
            send_fire("first")
            assert activator.wait_exited(1, timeout=30), log.tail()
            measured_from = len(log.lines())
            # The first start compiled its dataclasses' methods and kept them in the state
            # directory as it exited; the measured start runs them from there (and so writes
            # nothing).
            cache = cache_path(tmp_path / "state")
            written = cache.read_bytes()
            assert any("def __init__(self,job_id:" in source for source in read_cache(cache))
        else:
            measured_from = 0
        send_fire("second")
        log.wait_for("watch.started", count=2 if provider == "nas" else 1)
        log.wait_for("run.finished", job_id="second")
        if provider == "nas":
            assert activator.wait_exited(2, timeout=30), log.tail()
    finally:
        activator.stop()
        nas.stop()

    lines = log.lines()[measured_from:]
    claimed = next(i for i, line in enumerate(lines) if '"fire.claimed"' in line)
    before = imported(lines[:claimed])
    after = imported(lines[claimed:])
    # The measurement sees the start-up imports, so an absence below means something.
    assert "chronosd.daemon.supervisor" in before
    assert "anyio" in top_level(before)
    forbidden = NEVER_BEFORE_REPLY + (JWT_ONLY if mode != "jwt" else ())
    assert not top_level(before) & set(forbidden), sorted(
        name for name in before if name.split(".")[0] in forbidden
    )
    # ... and they do come afterwards: the watcher once the reply is out, httpx for the NAS.
    assert "watchfiles" in top_level(after)
    if provider == "nas":
        # The NAS client: httpx, or chronosd's own h11 client where the provider uses that.
        assert "httpx" in top_level(after) or "chronosd.http.client" in after
    assert within(before, NEVER_BEFORE_REPLY_MODULES) == []
    if mode == "jwt":
        # The token was checked with cryptography's Ed25519 primitive, before the reply.
        assert "cryptography.hazmat.primitives.asymmetric.ed25519" in before
    if provider == "nas":
        assert cache.read_bytes() == written
    else:  # the only start, stopped by SIGTERM, kept what it compiled too
        assert read_cache(cache_path(tmp_path / "state"))
    # The measured fire ran, once.
    runs = StateReader(tmp_path / "state").runs("second")
    assert [r["status"] for r in runs] == ["ok"]
