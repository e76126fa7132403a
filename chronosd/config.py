"""Config: TOML file, then CHRONOSD_* environment, then flags (later beats earlier).

The result is one frozen value; nothing else in chronosd reads the
environment for settings.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from chronosd.durations import parse_duration
from chronosd.errors import ChronosError, ConfigError

SYSTEM_CONFIG = Path("/etc/chronosd/chronosd.toml")
NEVER = float("inf")


def _home() -> Path:
    if os.environ.get("HOME"):
        return Path(os.environ["HOME"])
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        # A dynamic user without an nss entry has no home; the working directory stands in.
        return Path.cwd()


def user_config_path() -> Path:
    return _home() / ".config" / "chronosd" / "chronosd.toml"


def default_jobs_path() -> Path:
    return _home() / ".config" / "chronosd" / "jobs.json"


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    # systemd may pass several directories separated by ':'; the first is ours.
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return _home() / ".local" / "state" / "chronosd"


PREWAKE_MAX = 30.0


@dataclass(frozen=True)
class NasConfig:
    """``[provider.nas]``: where the NAS is and how we call it."""

    url: str = ""
    callback_url: str = ""
    token_file: Path | None = None
    timeout: float = 15.0
    list_every: float = 3600.0
    max_horizon: float | None = None
    # Arm this long before each occurrence; chronosd claims on that early call and starts the
    # job at the exact instant, so a cold start does not make the job late. 0: arm at the
    # occurrence itself (the arm's fire_at is the occurrence, as a hosted NAS would show it).
    prewake: float = 0.0


@dataclass(frozen=True)
class ProviderConfig:
    """``[provider]``: who keeps the timers (local, or the NAS)."""

    kind: Literal["local", "nas"] = "local"
    fallback_after: float = 600.0
    nas: NasConfig = field(default_factory=NasConfig)


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: who may call ``POST /api/cron/fire``."""

    mode: Literal["jwt", "hmac", "none"] | None = None  # None: jwt with a NAS, none otherwise
    jwks_url: str = ""
    audience: str = ""
    issuer: str = ""
    hmac_secret_file: Path | None = None

    def effective_mode(self, provider_kind: str) -> Literal["jwt", "hmac", "none"]:
        if self.mode is not None:
            return self.mode
        return "jwt" if provider_kind == "nas" else "none"


@dataclass(frozen=True)
class RunnerConfig:
    """``[runner]``: how jobs are started."""

    max_concurrent: int = 4
    default_timeout: float = 3600.0
    default_command: tuple[str, ...] = ("hermes", "cron", "run", "{job_id}")
    output_max_bytes: int = 1048576
    keep_runs: int = 50
    pass_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    """Every setting of chronosd, from `load_config`."""

    jobs: Path = field(default_factory=default_jobs_path)
    state_dir: Path = field(default_factory=default_state_dir)
    timezone: str = "UTC"
    listen: str = "127.0.0.1:8787"
    idle_exit: float | None = None  # None: 30 s when socket-activated, never otherwise
    shutdown_grace: float = 30.0
    on_invalid_job: Literal["reject", "skip"] = "reject"
    log_level: str = "info"
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    source: Path | None = None  # the file it was read from, if any

    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    def resolved_idle_exit(self, *, socket_activated: bool) -> float | None:
        """Seconds of idleness before exit, or None for never."""
        if self.idle_exit is None:
            return 30.0 if socket_activated else None
        return None if self.idle_exit == NEVER else self.idle_exit


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen {value!r} is not HOST:PORT; write e.g. 127.0.0.1:8787")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


# key path -> kind; the environment name is CHRONOSD_ + path joined by '_', upper case.
_KEYS: dict[tuple[str, ...], str] = {
    ("jobs",): "path",
    ("state_dir",): "path",
    ("timezone",): "str",
    ("listen",): "str",
    ("idle_exit",): "duration_or_never",
    ("shutdown_grace",): "duration",
    ("on_invalid_job",): "choice:reject,skip",
    ("log_level",): "choice:debug,info,warning,error",
    ("provider", "kind"): "choice:local,nas",
    ("provider", "fallback_after"): "duration",
    ("provider", "nas", "url"): "str",
    ("provider", "nas", "callback_url"): "str",
    ("provider", "nas", "token_file"): "path",
    ("provider", "nas", "timeout"): "duration",
    ("provider", "nas", "list_every"): "duration",
    ("provider", "nas", "max_horizon"): "duration_or_none",
    ("provider", "nas", "prewake"): "duration",
    ("auth", "mode"): "choice:jwt,hmac,none",
    ("auth", "jwks_url"): "str",
    ("auth", "audience"): "str",
    ("auth", "issuer"): "str",
    ("auth", "hmac_secret_file"): "path",
    ("runner", "max_concurrent"): "int",
    ("runner", "default_timeout"): "duration",
    ("runner", "default_command"): "argv",
    ("runner", "output_max_bytes"): "int",
    ("runner", "keep_runs"): "int",
    ("runner", "pass_env"): "names",
}


def env_name(path: tuple[str, ...]) -> str:
    return "CHRONOSD_" + "_".join(path).upper()


def _convert(path: tuple[str, ...], kind: str, value: Any, *, from_env: bool) -> Any:
    name = ".".join(path)
    try:
        if kind == "path":
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{name} must be a non-empty path")
            return Path(value).expanduser()
        if kind == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string")
            return value
        if kind.startswith("choice:"):
            choices = kind.removeprefix("choice:").split(",")
            if value not in choices:
                raise ConfigError(f"{name} is {value!r}; use one of {', '.join(choices)}")
            return value
        if kind == "duration":
            return parse_duration(value)
        if kind == "duration_or_never":
            return NEVER if value in ("never", "none", "off") else parse_duration(value)
        if kind == "duration_or_none":
            return None if value in (None, "", "none", "never") else parse_duration(value)
        if kind == "int":
            if from_env and isinstance(value, str):
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer")
            return value
        if kind in ("argv", "names"):
            if from_env and isinstance(value, str):
                value = json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of strings")
            if kind == "argv" and not value:
                raise ConfigError(f"{name} must not be empty")
            return tuple(value)
    except ChronosError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    raise AssertionError(kind)


def _flatten(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in data.items():
        path = (*prefix, key)
        if isinstance(value, dict) and path not in _KEYS:
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def find_config_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    if explicit is not None:
        return explicit
    if environ.get("CHRONOSD_CONFIG"):
        return Path(environ["CHRONOSD_CONFIG"]).expanduser()
    for candidate in (SYSTEM_CONFIG, user_config_path()):
        if candidate.is_file():
            return candidate
    return None


def load_config(
    *,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: defaults < file < environment < overrides (flags).

    ``overrides`` uses dotted key names (``"provider.kind"``) with raw values.
    """
    env = os.environ if environ is None else environ
    values: dict[tuple[str, ...], Any] = {}
    source = find_config_file(config_path, env)
    if source is not None:
        # Imported here: without a config file (CHRONOSD_* only) the parser is not needed.
        import tomllib

        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config {source}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"config {source}: cannot read: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config {source}: {exc}") from None
        for path, value in _flatten(raw).items():
            if path not in _KEYS:
                raise ConfigError(f"config {source}: unknown key {'.'.join(path)!r}")
            values[path] = _convert(path, _KEYS[path], value, from_env=False)
    for path, kind in _KEYS.items():
        name = env_name(path)
        if name in env and env[name] != "":
            values[path] = _convert(path, kind, env[name], from_env=True)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        path = tuple(dotted.split("."))
        if path not in _KEYS:
            raise ConfigError(f"unknown setting {dotted!r}")
        values[path] = _convert(path, _KEYS[path], value, from_env=isinstance(value, str))
    return _build(values, source, env)


def _build(
    values: dict[tuple[str, ...], Any], source: Path | None, env: Mapping[str, str]
) -> Config:
    def section(prefix: tuple[str, ...]) -> dict[str, Any]:
        n = len(prefix)
        return {p[n]: v for p, v in values.items() if p[:n] == prefix and len(p) == n + 1}

    nas = NasConfig(**section(("provider", "nas")))
    provider = ProviderConfig(**section(("provider",)), nas=nas)
    top = section(())
    if "state_dir" not in top:
        top["state_dir"] = default_state_dir(env)
    config = Config(
        **top,
        provider=provider,
        auth=AuthConfig(**section(("auth",))),
        runner=RunnerConfig(**section(("runner",))),
        source=source,
    )
    config.listen_address()  # validates
    if config.provider.kind == "nas":
        missing = [k for k in ("url", "callback_url") if not getattr(nas, k)]
        if missing:
            raise ConfigError(
                "provider.kind is nas but provider.nas."
                + " and provider.nas.".join(missing)
                + " is not set"
            )
    if not 0 <= nas.prewake <= PREWAKE_MAX or nas.prewake != int(nas.prewake):
        raise ConfigError(
            f"provider.nas.prewake must be whole seconds from 0 to {PREWAKE_MAX:.0f}s "
            f"(a fire more than 60 s early is refused), got {nas.prewake:g}s"
        )
    return config
