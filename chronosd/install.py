"""``chronosd systemd install|uninstall``: write chronosd's systemd units, enable them, remove them.

The units are rendered here, from this installation: ``ExecStart`` runs the interpreter that
runs this command (``sys.executable -m chronosd``), so a virtual environment or a pipx install
works without a wrapper script. Every file written carries a checksum of its body; a re-install
overwrites its own untouched files, and refuses (without ``--force``) files someone edited or
that chronosd did not write, because local changes belong in drop-ins.

This module is imported for every ``chronosd`` command line (to register the sub-commands):
it imports nothing beyond the standard library's light modules at module level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from chronosd.cli import Context
    from chronosd.config import Config

Scope = Literal["system", "user"]
Action = Literal["created", "updated", "unchanged", "replaced", "kept", "removed"]

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_CONFIG = Path("/etc/chronosd/chronosd.toml")
SYSTEM_JOBS = Path("/etc/chronosd/jobs.json")
SYSTEM_STATE_DIR = Path("/var/lib/chronosd")
DEFAULT_LISTEN = "127.0.0.1:8787"
DEFAULT_NAS_LISTEN = "127.0.0.1:8788"

CHRONOSD_UNITS = ("chronosd.socket", "chronosd.service", "chronosd.path")
NAS_UNITS = ("chronosd-nas.socket", "chronosd-nas.service")
ALL_UNITS = CHRONOSD_UNITS + NAS_UNITS

MIN_STOP_TIMEOUT = 60
# After shutdown_grace the daemon SIGTERMs the jobs' process groups, SIGKILLs them 10 s later
# and waits at most 15 s more for them: 30 s on top of the grace covers all of it.
STOP_MARGIN = 30

CHECKSUM_PREFIX = "# chronosd-checksum: sha256:"


def stop_timeout_for(shutdown_grace: float) -> int:
    """``TimeoutStopSec=`` that lets a stop run its course before systemd SIGKILLs everything."""
    return max(MIN_STOP_TIMEOUT, math.ceil(shutdown_grace) + STOP_MARGIN)


@dataclass(frozen=True)
class UnitSpec:
    """Everything the unit files depend on; `render_units` turns it into text."""

    scope: Scope
    python: Path
    config: Path
    jobs: Path
    listen: str = DEFAULT_LISTEN
    stop_timeout: int = MIN_STOP_TIMEOUT
    home: Path | None = None  # user scope: paths under it are written as %h/...
    nas: bool = False
    nas_listen: str = DEFAULT_NAS_LISTEN
    nas_public_url: str | None = None

    def unit_names(self) -> tuple[str, ...]:
        return ALL_UNITS if self.nas else CHRONOSD_UNITS

    def enable_units(self) -> tuple[str, ...]:
        """The units with an [Install] section, in the order they are enabled."""
        names = ("chronosd.socket", "chronosd.path")
        return (*names, *NAS_UNITS) if self.nas else names


# ---------------------------------------------------------------------- escaping
def _escape(text: str) -> str:
    """*text* with systemd's specifier and variable characters taken literally."""
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        from chronosd.errors import ConfigError

        raise ConfigError(
            f"{text!r} contains control characters, which a unit file cannot carry; "
            "choose a path without them"
        )
    return text.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$")


def _path_text(path: Path, home: Path | None) -> str:
    """A path for a unit file; under the user's home it is written ``%h/...``."""
    if home is not None and path.is_relative_to(home) and path != home:
        return "%h/" + _escape(path.relative_to(home).as_posix())
    return _escape(str(path))


def _word(text: str) -> str:
    """One already-escaped ExecStart argument, quoted when it holds blanks or quotes."""
    if text and not any(char.isspace() or char in "\"'" for char in text):
        return text
    return '"' + text.replace('"', '\\"') + '"'


def _exec(spec: UnitSpec, *args: str | Path) -> str:
    words = [_word(_path_text(spec.python, spec.home)), "-m", "chronosd"]
    for arg in args:
        if isinstance(arg, Path):
            words.append(_word(_path_text(arg, spec.home)))
        else:
            words.append(_word(_escape(arg)))
    return " ".join(words)


def normalize_listen(value: str) -> str:
    """``HOST:PORT`` as ``ListenStream=`` wants it (IPv6 in brackets); ConfigError if invalid."""
    from chronosd.config import parse_listen

    host, port = parse_listen(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------- rendering
_HARDENING_COMMON = """\
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
"""

# What a user manager can enforce without privileges: seccomp filters and no-new-privileges.
# Mount namespaces (ProtectSystem=, PrivateTmp=, ...) need unprivileged user namespaces in
# user units, which many kernels refuse, so they are left out rather than failing the start.
_HARDENING_USER = """\
NoNewPrivileges=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
"""


def _socket_unit(spec: UnitSpec) -> str:
    return f"""\
[Unit]
Description=chronosd callback socket ({spec.listen})

[Socket]
ListenStream={spec.listen}
# One chronosd serves every connection; connections that arrive while it exits wait
# in the backlog and start the next one.
Accept=no
FreeBind=yes
NoDelay=yes

[Install]
WantedBy=sockets.target
"""


def _service_unit(spec: UnitSpec) -> str:
    exec_start = _exec(spec, "run", "--config", spec.config, "--jobs", spec.jobs)
    head = f"""\
[Unit]
Description=chronosd scale-to-zero cron daemon
Requires=chronosd.socket
After=chronosd.socket
# chronosd.path starts us on every edit of jobs.json, and callbacks start us on every fire:
# the default start limit (5 in 10 s) would stop both for good.
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
SyslogIdentifier=chronosd
Restart=on-failure
RestartSec=5s
# SIGTERM goes to chronosd alone: it lets running jobs finish for shutdown_grace, then
# stops them itself and records them as killed. TimeoutStopSec covers that whole path.
KillMode=mixed
TimeoutStopSec={spec.stop_timeout}s
UMask=0077
"""
    if spec.scope == "user":
        return head + "\n# Hardening a user manager can enforce.\n" + _HARDENING_USER
    return (
        head
        + """# Jobs run as root, as under cron (User= also gives them HOME=/root), but stripped of
# root's capabilities below. A drop-in with User=NAME runs them as NAME instead; then
# chown the config, jobs.json and the token file to NAME.
User=root
StateDirectory=chronosd
StateDirectoryMode=0700

# Hardening: chronosd and its jobs can write only to /var/lib/chronosd, their private /tmp
# and what a drop-in adds with ReadWritePaths= (README: "what each setting costs a job").
# Jobs keep root's identity but no capabilities, may read /home, use the network, nice.
ProtectHome=read-only
"""
        + _HARDENING_COMMON
        + "SystemCallFilter=~@privileged\n"
    )


def _path_unit(spec: UnitSpec) -> str:
    return f"""\
[Unit]
Description=chronosd: reconcile when jobs.json changes

[Path]
# Fires on in-place writes and on renames over the file (chronosd add, editors, sed -i).
PathChanged={_path_text(spec.jobs, spec.home)}
Unit=chronosd.service

[Install]
WantedBy=paths.target
"""


def _nas_socket_unit(spec: UnitSpec) -> str:
    return f"""\
[Unit]
Description=chronosd reference NAS socket ({spec.nas_listen})

[Socket]
ListenStream={spec.nas_listen}
Accept=no
FreeBind=yes
NoDelay=yes

[Install]
WantedBy=sockets.target
"""


def _nas_service_unit(spec: UnitSpec) -> str:
    args: list[str | Path] = ["nas", "serve"]
    if spec.nas_public_url:
        args += ["--public-url", spec.nas_public_url]
    head = f"""\
[Unit]
Description=chronosd reference NAS (arms one-shots, calls agents back)
Requires=chronosd-nas.socket
After=chronosd-nas.socket
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
ExecStart={_exec(spec, *args)}
SyslogIdentifier=chronosd-nas
Restart=on-failure
RestartSec=5s
UMask=0077
"""
    if spec.scope == "user":
        return (
            head
            + "\n# Hardening a user manager can enforce.\n"
            + _HARDENING_USER
            + "MemoryDenyWriteExecute=yes\n\n[Install]\nWantedBy=default.target\n"
        )
    return (
        head
        + """# A user that exists only while the NAS runs; its keys and arms live in
# /var/lib/private/chronosd-nas. Run admin commands as the same user, e.g.
#   systemd-run --pipe --wait -p DynamicUser=yes -p User=chronosd-nas \\
#     -p StateDirectory=chronosd-nas -p Environment=HOME=/var/lib/chronosd-nas \\
#     <python> -m chronosd nas agent add ...
DynamicUser=yes
User=chronosd-nas
# A dynamic user has no passwd entry without nss-systemd; chronosd wants a home.
Environment=HOME=/var/lib/chronosd-nas
StateDirectory=chronosd-nas
StateDirectoryMode=0700

# The NAS only talks HTTP and signs tokens: it gets no file system, no devices, no /proc.
ProtectHome=yes
PrivateUsers=yes
ProcSubset=pid
DevicePolicy=closed
MemoryDenyWriteExecute=yes
"""
        + _HARDENING_COMMON
        + "SystemCallFilter=~@privileged @resources\n\n[Install]\nWantedBy=multi-user.target\n"
    )


_RENDERERS: dict[str, Callable[[UnitSpec], str]] = {
    "chronosd.socket": _socket_unit,
    "chronosd.service": _service_unit,
    "chronosd.path": _path_unit,
    "chronosd-nas.socket": _nas_socket_unit,
    "chronosd-nas.service": _nas_service_unit,
}


def _with_header(name: str, body: str) -> str:
    import hashlib

    digest = hashlib.sha256(body.encode()).hexdigest()
    return (
        "# Written by `chronosd systemd install`. Put local changes in a drop-in\n"
        f"# (systemctl edit {name}): a re-install overwrites this file.\n"
        f"{CHECKSUM_PREFIX}{digest}\n"
        f"{body}"
    )


def render_units(spec: UnitSpec) -> dict[str, str]:
    """The unit files for *spec*, name -> text (with the checksum header). Pure."""
    return {name: _with_header(name, _RENDERERS[name](spec)) for name in spec.unit_names()}


def file_origin(text: str) -> Literal["ours", "edited", "foreign"]:
    """Whether *text* is a unit file chronosd wrote and nobody changed since."""
    import hashlib

    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines[:5]):
        if line.startswith(CHECKSUM_PREFIX):
            recorded = line[len(CHECKSUM_PREFIX) :].strip()
            body = "".join(lines[index + 1 :])
            actual = hashlib.sha256(body.encode()).hexdigest()
            return "ours" if recorded == actual else "edited"
    return "foreign"


# ---------------------------------------------------------------------- planning
@dataclass(frozen=True)
class FileChange:
    """One unit file to write, and whether it differs from what is there."""

    path: Path
    action: Action
    text: str | None = None  # what to write, for created/updated/replaced
    note: str = ""


def _fail(message: str, code: int = 1) -> Exception:
    from chronosd.cli import CliError

    return CliError(message, code)


def _refusal(path: Path, origin: str, verb: str) -> str:
    unit = path.name
    why = (
        "was edited since chronosd wrote it"
        if origin == "edited"
        else "was not written by chronosd systemd install"
    )
    return (
        f"systemd {verb}: {path} {why}; move local changes to a drop-in "
        f"(systemctl edit {unit}) or pass --force to {verb} it anyway"
    )


def plan_units(unit_dir: Path, rendered: Mapping[str, str], *, force: bool) -> list[FileChange]:
    """What writing *rendered* into *unit_dir* does; CliError when it would clobber edits."""
    changes: list[FileChange] = []
    for name, text in rendered.items():
        path = unit_dir / name
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            changes.append(FileChange(path, "created", text))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise _fail(f"systemd install: cannot read {path}: {reason}") from None
        if current == text:
            changes.append(FileChange(path, "unchanged"))
            continue
        origin = file_origin(current)
        if origin != "ours" and not force:
            raise _fail(_refusal(path, origin, "install"))
        changes.append(FileChange(path, "updated" if origin == "ours" else "replaced", text))
    return changes


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.chronosd-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- paths per scope
def _user_home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def default_unit_dir(scope: Scope) -> Path:
    if scope == "system":
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(_user_home() / ".config")
    return Path(config_home) / "systemd" / "user"


def default_config(scope: Scope) -> Path:
    from chronosd.config import user_config_path

    return SYSTEM_CONFIG if scope == "system" else user_config_path()


def default_jobs(scope: Scope) -> Path:
    from chronosd.config import default_jobs_path

    return SYSTEM_JOBS if scope == "system" else default_jobs_path()


def default_state_dir(scope: Scope) -> Path:
    if scope == "system":
        return SYSTEM_STATE_DIR
    return _user_home() / ".local" / "state" / "chronosd"


def _absolute(path: Path) -> Path:
    # Never resolve symlinks: a venv's bin/python is one, and resolving it leaves the venv.
    return Path(os.path.abspath(path.expanduser()))


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def config_text(scope: Scope, *, jobs: Path, listen: str) -> str:
    """A starting chronosd.toml that agrees with the units (see README "Configuration")."""
    return f"""\
# chronosd configuration, written by `chronosd systemd install` (README: "Configuration").
jobs = {_toml_string(str(jobs))}
state_dir = {_toml_string(str(default_state_dir(scope)))}
# Used only when systemd passes no socket (chronosd run by hand).
listen = {_toml_string(listen)}
# Under systemd chronosd exits after idle_exit without work (default 30s) and is started
# again by the socket (callbacks) or the path unit (edits of jobs.json).
# shutdown_grace = "30s"    # re-run `chronosd systemd install` after changing it

# Without a NAS chronosd times jobs itself and stays up. To scale to zero, arm on a NAS:
# [provider]
# kind = "nas"
# [provider.nas]
# url = "https://nas.example.net"
# callback_url = "http://{listen}"
# token_file = "/etc/chronosd/nas-token"
# [auth]
# mode = "jwt"
# jwks_url = "https://nas.example.net/.well-known/jwks.json"
# audience = "agent:<name given to chronosd nas agent add>"
# issuer = "https://nas.example.net"
"""


# ---------------------------------------------------------------------- systemctl
def _systemctl(scope: Scope, *args: str) -> list[str]:
    return ["systemctl", "--user", *args] if scope == "user" else ["systemctl", *args]


def _run_commands(commands: Sequence[Sequence[str]], *, echo: bool) -> None:
    import subprocess

    for argv in commands:
        if echo:
            print(f"  running: {' '.join(argv)}", flush=True)
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        except OSError as exc:
            raise _fail(
                f"{argv[0]}: cannot run it ({exc.strerror}); the files are in place, "
                "run the commands above yourself on a machine booted with systemd"
            ) from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            reason = detail[-1] if detail else f"exit status {done.returncode}"
            hint = ""
            if argv[:2] == ["systemctl", "--user"]:
                hint = "; is a user manager running (log in, or `loginctl enable-linger $USER`)?"
            raise _fail(f"{' '.join(argv)} failed: {reason}{hint}")


# ---------------------------------------------------------------------- handlers
def _scope(ctx: Context) -> Scope:
    return "user" if ctx.args.user_units else "system"


def _unit_dir(ctx: Context, scope: Scope) -> tuple[Path, bool]:
    """The directory to write to, and whether it is a staging one (``--unit-dir``)."""
    if ctx.args.unit_dir is not None:
        return _absolute(ctx.args.unit_dir), True
    if scope == "system" and os.geteuid() != 0:
        raise _fail(
            f"systemd: writing {SYSTEM_UNIT_DIR} needs root; run it with sudo, "
            "or pass --user for units of your own user manager",
            1,
        )
    return default_unit_dir(scope), False


def _target_config(ctx: Context, scope: Scope) -> tuple[Path, Config | None, Path | None]:
    """The config file the units will use, its Config (None while the file does not exist)
    and the jobs path it names, if it names one."""
    import tomllib

    from chronosd.config import load_config

    path = _absolute(ctx.args.unit_config or default_config(scope))
    if not path.is_file():
        return path, None, None
    # Only the file counts: the installing shell's CHRONOSD_* variables do not reach the unit.
    config = load_config(config_path=path, environ={})
    named = tomllib.loads(path.read_text(encoding="utf-8")).get("jobs")
    return path, config, _absolute(config.jobs) if named else None


def cmd_install(ctx: Context) -> int:
    args = ctx.args
    scope = _scope(ctx)
    unit_dir, staging = _unit_dir(ctx, scope)
    config_path, config, configured_jobs = _target_config(ctx, scope)
    jobs = _absolute(args.jobs) if args.jobs else configured_jobs or _absolute(default_jobs(scope))
    listen_given = args.listen or (config.listen if config is not None else DEFAULT_LISTEN)
    grace = config.shutdown_grace if config is not None else 30.0
    if not sys.executable and not args.python:
        raise _fail("systemd install: cannot tell which python runs chronosd; pass --python", 2)
    python = _absolute(args.python) if args.python else Path(sys.executable)
    spec = UnitSpec(
        scope=scope,
        python=python,
        config=config_path,
        jobs=jobs,
        listen=normalize_listen(listen_given),
        stop_timeout=stop_timeout_for(grace),
        home=_user_home() if scope == "user" else None,
        nas=args.nas,
        nas_listen=normalize_listen(args.nas_listen),
        nas_public_url=args.nas_public_url,
    )
    changes = plan_units(unit_dir, render_units(spec), force=args.force)
    extra: list[FileChange] = []
    notes: list[str] = []
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        for change in changes:
            if change.text is not None:
                _write_atomic(change.path, change.text, 0o644)
        if not staging:
            extra = _ensure_config_and_jobs(scope, config_path, jobs, spec.listen)
    except OSError as exc:
        raise _fail(f"systemd install: cannot write {exc.filename}: {exc.strerror}") from None
    if config is not None and scope == "system" and config.state_dir != SYSTEM_STATE_DIR:
        notes.append(
            f"{config_path} sets state_dir = {str(config.state_dir)!r}: the service can write "
            f"only {SYSTEM_STATE_DIR} unless a drop-in adds ReadWritePaths={config.state_dir}"
        )
    commands: list[list[str]] = []
    if not staging:
        commands.append(_systemctl(scope, "daemon-reload"))
        commands.append(_systemctl(scope, "enable", "--now", *spec.enable_units()))
        for change in changes:
            if change.path.name.endswith(".socket") and change.action in ("updated", "replaced"):
                commands.append(_systemctl(scope, "restart", change.path.name))
    if scope == "user" and not staging:
        notes.append(
            "to keep your units running while you are logged out: "
            f"loginctl enable-linger {os.environ.get('USER') or '$USER'}"
        )
    if spec.nas and scope == "system" and not staging:
        notes.append(
            "register chronosd with the NAS as the NAS's own user: systemd-run --pipe --wait "
            "-p DynamicUser=yes -p User=chronosd-nas -p StateDirectory=chronosd-nas "
            "-p Environment=HOME=/var/lib/chronosd-nas "
            f"{python} -m chronosd nas agent add NAME --callback-url http://{spec.listen}"
        )
    run_now = bool(args.now) and not staging
    _report(ctx, scope, unit_dir, [*changes, *extra], commands, run_now, notes)
    if run_now:
        _run_commands(commands, echo=not ctx.json)
    return 0


def _ensure_config_and_jobs(
    scope: Scope, config_path: Path, jobs: Path, listen: str
) -> list[FileChange]:
    """Create the config file and an empty jobs.json when missing; never touch existing ones."""
    dir_mode = 0o755 if scope == "system" else 0o700
    changes: list[FileChange] = []
    wanted: list[tuple[Path, Callable[[], str]]] = [
        (config_path, lambda: config_text(scope, jobs=jobs, listen=listen)),
        (jobs, lambda: '{\n  "jobs": []\n}\n'),
    ]
    for path, make in wanted:
        if path.exists():
            changes.append(FileChange(path, "kept", note="exists"))
            continue
        path.parent.mkdir(mode=dir_mode, parents=True, exist_ok=True)
        # jobs.json must not be writable by others (whoever can write it runs commands).
        _write_atomic(path, make(), 0o600)
        changes.append(FileChange(path, "created"))
    return changes


def _report(
    ctx: Context,
    scope: Scope,
    unit_dir: Path,
    changes: Sequence[FileChange],
    commands: Sequence[Sequence[str]],
    run_now: bool,
    notes: Sequence[str],
) -> None:
    if ctx.json:
        document = {
            "scope": scope,
            "unit_dir": str(unit_dir),
            "files": [
                {"path": str(c.path), "action": c.action, **({"note": c.note} if c.note else {})}
                for c in changes
            ],
            "commands": [list(argv) for argv in commands],
            "ran": run_now,
            "notes": list(notes),
        }
        print(json.dumps(document, indent=2))
        return
    width = max((len(c.action) for c in changes), default=0)
    for change in changes:
        suffix = f" ({change.note})" if change.note else ""
        print(f"{change.action.ljust(width)}  {change.path}{suffix}")
    for note in notes:
        print(f"note: {note}")
    if commands and not run_now:
        print("now run:")
        for argv in commands:
            print(f"  {' '.join(argv)}")


def cmd_uninstall(ctx: Context) -> int:
    args = ctx.args
    scope = _scope(ctx)
    unit_dir, staging = _unit_dir(ctx, scope)
    present: list[Path] = []
    for name in ALL_UNITS:
        path = unit_dir / name
        if not path.is_file():
            continue
        try:
            origin = file_origin(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            origin = "foreign"
        if origin != "ours" and not args.force:
            raise _fail(_refusal(path, origin, "uninstall"))
        present.append(path)
    names = [p.name for p in present]
    enabled = [n for n in names if n != "chronosd.service"]
    running = [n for n in names if n == "chronosd.service"]
    before: list[list[str]] = []
    after: list[list[str]] = []
    if not staging and names:
        if args.now:
            if enabled:
                before.append(_systemctl(scope, "disable", "--now", *enabled))
            if running:
                before.append(_systemctl(scope, "stop", *running))
        else:
            after.append(_systemctl(scope, "stop", *names))
        after.append(_systemctl(scope, "daemon-reload"))
    run_now = bool(args.now) and not staging
    if run_now:
        _run_commands(before, echo=not ctx.json)
    changes: list[FileChange] = []
    try:
        # What `systemctl disable` would remove: the [Install] symlinks next to the units.
        for link in sorted(unit_dir.glob("*.wants/*")) + sorted(unit_dir.glob("*.requires/*")):
            if link.name in names and link.is_symlink():
                link.unlink()
                changes.append(FileChange(link, "removed"))
        for path in present:
            path.unlink()
            changes.append(FileChange(path, "removed"))
    except OSError as exc:
        raise _fail(f"systemd uninstall: cannot remove {exc.filename}: {exc.strerror}") from None
    notes = []
    if not staging:
        notes.append("the config, jobs.json, the state and any drop-ins (*.d/) are left in place")
    _report(ctx, scope, unit_dir, changes, [*before, *after], run_now, notes)
    if run_now:
        _run_commands(after, echo=not ctx.json)
    return 0


# ---------------------------------------------------------------------- argparse
def register(sub: Any, command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``chronosd systemd install|uninstall`` to the top-level sub-commands *sub*."""
    from chronosd.cli import add_global_options

    group = command("systemd", "install chronosd's systemd units (socket, service, path)")
    group_sub = group.add_subparsers(dest="systemd_command", metavar="COMMAND")

    def usage(ctx: Context) -> int:
        group.print_help(sys.stderr)
        return 2

    group.set_defaults(handler=usage)

    def nested(name: str, help_text: str) -> argparse.ArgumentParser:
        # "resolve": --config is redefined below as the file the units use, which need not
        # exist yet (the global --config would make the command fail before it can create it).
        parser: argparse.ArgumentParser = group_sub.add_parser(
            name, help=help_text, description=help_text, conflict_handler="resolve"
        )
        add_global_options(parser, suppress=True)
        parser.add_argument(
            "--user",
            dest="user_units",
            action="store_true",
            help="units of your user manager (systemctl --user) in ~/.config/systemd/user",
        )
        parser.add_argument(
            "--force", action="store_true", help="overwrite or remove unit files edited by hand"
        )
        parser.add_argument(
            "--now", action="store_true", help="run the systemctl commands instead of printing"
        )
        parser.add_argument(
            "--unit-dir",
            type=Path,
            metavar="DIR",
            help="only write (or remove) the unit files, in DIR: for packaging and tests",
        )
        return parser

    p = nested("install", "write the units, the config and jobs.json if missing; enable them")
    p.add_argument(
        "--config",
        dest="unit_config",
        type=Path,
        metavar="PATH",
        help="config file the units pass to chronosd; created when missing "
        f"(default {SYSTEM_CONFIG}, with --user ~/.config/chronosd/chronosd.toml)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address of chronosd.socket (default: the config's listen, else {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--nas", action="store_true", help="also install the reference NAS (chronosd-nas.*)"
    )
    p.add_argument(
        "--nas-listen",
        default=DEFAULT_NAS_LISTEN,
        metavar="HOST:PORT",
        help=f"address of chronosd-nas.socket (default {DEFAULT_NAS_LISTEN})",
    )
    p.add_argument(
        "--nas-public-url", metavar="URL", help="the NAS's --public-url (default http://LISTEN)"
    )
    p.add_argument(
        "--python",
        type=Path,
        metavar="PATH",
        help="interpreter the units run chronosd with (default: the one running this)",
    )
    p.set_defaults(handler=cmd_install)

    p = nested("uninstall", "disable and remove the units (config, jobs and state stay)")
    p.set_defaults(handler=cmd_uninstall)
