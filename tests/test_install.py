"""`chronosd systemd install|uninstall` writing into temporary directories (chronosd/install.py).

The units under a real systemd are tested by tests/system. Regenerate the shipped units in
systemd/ after changing the templates with:  python -m tests.test_install
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chronosd import cli, install
from chronosd.config import load_config
from chronosd.install import UnitSpec, file_origin, render_units, stop_timeout_for

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "systemd"

# What systemd/ holds: the units `chronosd systemd install --nas` writes for a venv in
# /opt/chronosd (system) and for a pipx install (user), with the default paths.
CANONICAL: dict[str, UnitSpec] = {
    "system": UnitSpec(
        scope="system",
        python=Path("/opt/chronosd/bin/python"),
        config=install.SYSTEM_CONFIG,
        jobs=install.SYSTEM_JOBS,
        nas=True,
    ),
    "user": UnitSpec(
        scope="user",
        python=Path("/home/user/.local/share/pipx/venvs/chronosd/bin/python"),
        config=Path("/home/user/.config/chronosd/chronosd.toml"),
        jobs=Path("/home/user/.config/chronosd/jobs.json"),
        home=Path("/home/user"),
        nas=True,
    ),
}

Main = Callable[..., int]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setenv("USER", "tester")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for name in list(os.environ):
        if name.startswith("CHRONOSD_"):
            monkeypatch.delenv(name)
    return path


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[Main]:
    # Until cli.py registers `systemd` itself, add it the way it will: through register().
    original = cli._register_extra_commands

    def extra(sub: object, command: Callable[..., object]) -> None:
        original(sub, command)  # type: ignore[arg-type]
        if "systemd" not in sub.choices:  # type: ignore[attr-defined]
            install.register(sub, command)  # type: ignore[arg-type]

    monkeypatch.setattr(cli, "_register_extra_commands", extra)
    yield cli.main


def line_of(text: str, key: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(key + "=")]
    assert len(found) == 1, f"{key}= appears {len(found)} times"
    return found[0].removeprefix(key + "=")


def test_shipped_units_are_what_install_writes() -> None:
    for scope, spec in CANONICAL.items():
        rendered = render_units(spec)
        shipped = {p.name: p.read_text() for p in (SHIPPED / scope).iterdir() if p.is_file()}
        assert shipped == rendered, f"systemd/{scope} is stale; run: python -m tests.test_install"


def test_install_writes_units_running_this_interpreter(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    jobs = tmp_path / "etc" / "jobs.json"
    config = str(tmp_path / "c.toml")
    args = ["--unit-dir", str(units), "--jobs", str(jobs), "--listen", "127.0.0.1:9911"]
    code = main(["systemd", "install", *args, "--config", config])
    assert code == 0
    assert sorted(p.name for p in units.iterdir()) == sorted(install.CHRONOSD_UNITS)
    service = (units / "chronosd.service").read_text()
    assert line_of(service, "ExecStart") == (
        f"{sys.executable} -m chronosd run --config {tmp_path / 'c.toml'} --jobs {jobs}"
    )
    assert line_of(service, "Type") == "notify"
    assert line_of(service, "StateDirectory") == "chronosd"
    assert line_of(service, "StartLimitIntervalSec") == "0"
    assert line_of(service, "Restart") == "on-failure"
    assert line_of(service, "KillMode") == "mixed"
    assert line_of((units / "chronosd.socket").read_text(), "ListenStream") == "127.0.0.1:9911"
    assert line_of((units / "chronosd.socket").read_text(), "Accept") == "no"
    path_unit = (units / "chronosd.path").read_text()
    assert line_of(path_unit, "PathChanged") == str(jobs)
    assert line_of(path_unit, "Unit") == "chronosd.service"
    out = capsys.readouterr().out
    assert "created" in out and "systemctl" not in out  # --unit-dir: files only
    assert not jobs.exists() and not (tmp_path / "c.toml").exists()


def test_user_units_write_paths_under_home_with_percent_h(
    main: Main, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["systemd", "install", "--user", "--nas"]) == 0
    units = home / ".config" / "systemd" / "user"
    service = (units / "chronosd.service").read_text()
    assert line_of(service, "ExecStart").endswith(
        "-m chronosd run --config %h/.config/chronosd/chronosd.toml"
        " --jobs %h/.config/chronosd/jobs.json"
    )
    assert "StateDirectory" not in service  # the config's state_dir decides, as for the CLI
    assert line_of((units / "chronosd.path").read_text(), "PathChanged") == (
        "%h/.config/chronosd/jobs.json"
    )
    assert "WantedBy=default.target" in (units / "chronosd-nas.service").read_text()
    out = capsys.readouterr().out
    assert "systemctl --user daemon-reload" in out
    assert (
        "systemctl --user enable --now chronosd.socket chronosd.path "
        "chronosd-nas.socket chronosd-nas.service" in out
    )
    assert "loginctl enable-linger tester" in out


def test_install_creates_config_and_jobs_that_agree_with_the_units(main: Main, home: Path) -> None:
    assert main(["systemd", "install", "--user", "--listen", "127.0.0.1:9912"]) == 0
    config_path = home / ".config" / "chronosd" / "chronosd.toml"
    jobs = home / ".config" / "chronosd" / "jobs.json"
    assert json.loads(jobs.read_text()) == {"jobs": []}
    assert jobs.stat().st_mode & 0o777 == 0o600
    config = load_config(config_path=config_path, environ={})
    assert config.jobs == jobs
    assert config.state_dir == home / ".local" / "state" / "chronosd"
    assert config.listen == "127.0.0.1:9912"


def test_install_keeps_existing_config_and_takes_its_jobs_and_grace(
    main: Main, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mine.toml"
    jobs = tmp_path / "elsewhere" / "jobs.json"
    text = f'jobs = "{jobs}"\nshutdown_grace = "5m"\nlisten = "127.0.0.1:9913"\n'
    config.write_text(text)
    assert main(["systemd", "install", "--user", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    actions = {Path(f["path"]).name: f["action"] for f in report["files"]}
    assert actions["mine.toml"] == "kept" and actions["jobs.json"] == "created"
    assert config.read_text() == text
    units = Path(report["unit_dir"])
    service = (units / "chronosd.service").read_text()
    assert line_of(service, "TimeoutStopSec") == "330s"
    assert f"--jobs {jobs}" in line_of(service, "ExecStart")
    assert line_of((units / "chronosd.socket").read_text(), "ListenStream") == "127.0.0.1:9913"
    assert report["ran"] is False
    assert ["systemctl", "--user", "daemon-reload"] in report["commands"]


def test_stop_timeout_covers_shutdown_grace_and_the_stop_of_jobs() -> None:
    assert stop_timeout_for(30) == 60
    assert stop_timeout_for(3) == 60
    assert stop_timeout_for(600) == 630
    assert stop_timeout_for(0.5) == 60


def test_reinstall_reports_unchanged_then_updates_its_own_files(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    args = ["systemd", "install", "--unit-dir", str(units), "--json"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert {f["action"] for f in json.loads(capsys.readouterr().out)["files"]} == {"unchanged"}
    assert main([*args, "--listen", "127.0.0.1:9914"]) == 0
    actions = {
        Path(f["path"]).name: f["action"] for f in json.loads(capsys.readouterr().out)["files"]
    }
    assert actions == {
        "chronosd.socket": "updated",
        "chronosd.service": "unchanged",
        "chronosd.path": "unchanged",
    }


def test_install_refuses_to_overwrite_an_edited_unit_without_force(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    assert main(["systemd", "install", "--unit-dir", str(units)]) == 0
    service = units / "chronosd.service"
    edited = service.read_text().replace("RestartSec=5s", "RestartSec=1s")
    service.write_text(edited)
    socket_before = (units / "chronosd.socket").read_text()
    capsys.readouterr()
    code = main(["systemd", "install", "--unit-dir", str(units), "--listen", "127.0.0.1:9915"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "was edited since chronosd wrote it" in err
    assert "--force" in err and "systemctl edit chronosd.service" in err
    # All or nothing: the socket was not rewritten either.
    assert service.read_text() == edited
    assert (units / "chronosd.socket").read_text() == socket_before
    code = main(["systemd", "install", "--unit-dir", str(units), "--force", "--json"])
    assert code == 0
    actions = {
        Path(f["path"]).name: f["action"] for f in json.loads(capsys.readouterr().out)["files"]
    }
    assert actions["chronosd.service"] == "replaced"
    assert "RestartSec=5s" in service.read_text()


def test_install_refuses_a_unit_file_it_did_not_write(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "chronosd.socket").write_text("[Socket]\nListenStream=8787\n")
    assert main(["systemd", "install", "--unit-dir", str(units)]) == 1
    assert "was not written by chronosd systemd install" in capsys.readouterr().err
    assert not (units / "chronosd.service").exists()


def test_file_origin_tells_own_edited_and_foreign_files() -> None:
    text = render_units(CANONICAL["system"])["chronosd.path"]
    assert file_origin(text) == "ours"
    assert file_origin(text + "# more\n") == "edited"
    assert file_origin(text.replace("PathChanged=/etc", "PathChanged=/srv")) == "edited"
    assert file_origin("[Unit]\nDescription=x\n") == "foreign"


def test_uninstall_removes_units_and_their_install_symlinks(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    assert main(["systemd", "install", "--unit-dir", str(units), "--nas"]) == 0
    wants = units / "sockets.target.wants"
    wants.mkdir()
    (wants / "chronosd.socket").symlink_to(units / "chronosd.socket")
    (wants / "other.socket").symlink_to(units / "chronosd.socket")  # not ours by name: kept
    (units / "chronosd.service.d").mkdir()
    (units / "chronosd.service.d" / "local.conf").write_text("[Service]\n")
    capsys.readouterr()
    assert main(["systemd", "uninstall", "--unit-dir", str(units)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in units.iterdir()) == ["chronosd.service.d", "sockets.target.wants"]
    assert [p.name for p in wants.iterdir()] == ["other.socket"]
    assert out.count("removed") == 6


def test_uninstall_refuses_an_edited_unit_without_force(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    assert main(["systemd", "install", "--unit-dir", str(units)]) == 0
    with (units / "chronosd.path").open("a") as handle:
        handle.write("# mine\n")
    assert main(["systemd", "uninstall", "--unit-dir", str(units)]) == 1
    assert (units / "chronosd.path").exists() and (units / "chronosd.socket").exists()
    assert main(["systemd", "uninstall", "--unit-dir", str(units), "--force"]) == 0
    assert list(units.iterdir()) == []


def test_user_uninstall_prints_the_commands_that_finish_it(
    main: Main, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["systemd", "install", "--user"]) == 0
    capsys.readouterr()
    assert main(["systemd", "uninstall", "--user"]) == 0
    out = capsys.readouterr().out
    assert "systemctl --user stop chronosd.socket chronosd.service chronosd.path" in out
    assert "systemctl --user daemon-reload" in out
    assert (home / ".config" / "chronosd" / "jobs.json").exists()  # the jobs stay


def test_invalid_listen_address_is_one_line_error(
    main: Main, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units = tmp_path / "units"
    code = main(["systemd", "install", "--unit-dir", str(units), "--listen", "localhost"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "HOST:PORT" in err
    assert not units.exists()


def test_exec_start_quotes_blanks_and_keeps_percent_and_dollar_literal() -> None:
    spec = UnitSpec(
        scope="system",
        python=Path("/opt/my env/bin/py%d$HOME"),
        config=Path("/etc/chronosd/chronosd.toml"),
        jobs=Path("/srv/jobs 100%.json"),
    )
    units = render_units(spec)
    assert line_of(units["chronosd.service"], "ExecStart") == (
        '"/opt/my env/bin/py%%d$$HOME" -m chronosd run --config /etc/chronosd/chronosd.toml'
        ' --jobs "/srv/jobs 100%%.json"'
    )
    assert line_of(units["chronosd.path"], "PathChanged") == "/srv/jobs 100%%.json"


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_analyze
def test_systemd_accepts_a_quoted_interpreter_path(tmp_path: Path) -> None:
    python = tmp_path / "my env" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    spec = UnitSpec(
        scope="system", python=python, config=tmp_path / "c.toml", jobs=tmp_path / "j.json"
    )
    for name, text in render_units(spec).items():
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / n) for n in spec.unit_names())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "not executable" not in done.stderr


@needs_analyze
def test_hardening_exposure_is_within_the_limits(tmp_path: Path) -> None:
    limits = {"chronosd.service": 4.0, "chronosd-nas.service": 2.0}
    for name, text in render_units(CANONICAL["system"]).items():
        (tmp_path / name).write_text(text)
    for name, limit in limits.items():
        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(tmp_path / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found = re.search(r"Overall exposure level for [^:]*: ([0-9.]+)", done.stdout)
        assert found, done.stdout + done.stderr
        level = float(found.group(1))
        assert level <= limit, f"{name}: exposure {level} > {limit}"


def _regenerate() -> None:
    for scope, spec in CANONICAL.items():
        target = SHIPPED / scope
        target.mkdir(parents=True, exist_ok=True)
        for old in target.iterdir():
            if old.is_file():
                old.unlink()
        for name, text in render_units(spec).items():
            (target / name).write_text(text)
            print(f"wrote {target / name}")


if __name__ == "__main__":
    _regenerate()
