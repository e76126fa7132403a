from __future__ import annotations

from pathlib import Path

import pytest

from chronosd.config import NEVER, load_config, parse_listen
from chronosd.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = load_config(environ={"HOME": str(tmp_path)})
    assert config.provider.kind == "local"
    assert config.listen == "127.0.0.1:8787"
    assert config.runner.max_concurrent == 4
    assert config.runner.default_command == ("hermes", "cron", "run", "{job_id}")
    assert config.idle_exit is None
    assert config.resolved_idle_exit(socket_activated=True) == 30.0
    assert config.resolved_idle_exit(socket_activated=False) is None
    assert config.auth.effective_mode("local") == "none"
    assert config.auth.effective_mode("nas") == "jwt"


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    config = load_config(environ={"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"})
    assert config.state_dir == tmp_path / "a"


def test_file_layer_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
jobs = "/srv/jobs.json"
idle_exit = "45s"
[provider]
kind = "nas"
fallback_after = "2m"
[provider.nas]
url = "http://127.0.0.1:9"
callback_url = "http://127.0.0.1:8787"
max_horizon = "7d"
[runner]
default_command = ["agent", "run", "{job_id}"]
keep_runs = 5
""",
    )
    config = load_config(config_path=path, environ={})
    assert config.jobs == Path("/srv/jobs.json")
    assert config.idle_exit == 45.0
    assert config.provider.kind == "nas"
    assert config.provider.fallback_after == 120.0
    assert config.provider.nas.max_horizon == 7 * 86400
    assert config.runner.default_command == ("agent", "run", "{job_id}")
    assert config.runner.keep_runs == 5
    assert config.source == path


def test_environment_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'timezone = "Europe/London"\n[runner]\nmax_concurrent = 2\n')
    env = {
        "CHRONOSD_TIMEZONE": "America/New_York",
        "CHRONOSD_RUNNER_MAX_CONCURRENT": "9",
        "CHRONOSD_RUNNER_PASS_ENV": "FOO BAR",
        "CHRONOSD_IDLE_EXIT": "never",
    }
    config = load_config(config_path=path, environ=env)
    assert config.timezone == "America/New_York"
    assert config.runner.max_concurrent == 9
    assert config.runner.pass_env == ("FOO", "BAR")
    assert config.idle_exit == NEVER
    assert config.resolved_idle_exit(socket_activated=True) is None


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'listen = "127.0.0.1:9999"\n')
    config = load_config(environ={"CHRONOSD_CONFIG": str(path)})
    assert config.listen == "127.0.0.1:9999"


def test_flags_beat_environment(tmp_path: Path) -> None:
    config = load_config(
        environ={"CHRONOSD_LISTEN": "127.0.0.1:1111", "CHRONOSD_PROVIDER_KIND": "local"},
        overrides={"listen": "127.0.0.1:2222", "idle_exit": "5"},
    )
    assert config.listen == "127.0.0.1:2222"
    assert config.idle_exit == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nonsense = 1\n", "unknown key 'nonsense'"),
        ('idle_exit = "soon"\n', "idle_exit"),
        ('[provider]\nkind = "cloud"\n', "provider.kind is 'cloud'"),
        ("[runner]\nmax_concurrent = 0\n", "runner.max_concurrent"),
        ('listen = "nowhere"\n', "HOST:PORT"),
        ("= broken", "c.toml"),
        ('[provider]\nkind = "nas"\n', "provider.nas.url"),
    ],
)
def test_bad_config_gives_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(config_path=path, environ={})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(config_path=tmp_path / "absent.toml", environ={})


def test_parse_listen_accepts_ipv6_brackets() -> None:
    assert parse_listen("[::1]:8787") == ("::1", 8787)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
