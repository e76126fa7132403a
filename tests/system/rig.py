"""Run chronosd's system tests under a real systemd, in a systemd-rig container.

    sudo .venv/bin/python tests/system/rig.py [--keep] [--timeout SECONDS]

On the host (root): builds chronosd's wheel from this working tree, downloads the wheels of its
dependencies for the container's Python (Debian bookworm: CPython 3.11), stages them with the
scenario scripts in a tree, then runs ``../shared/tools/systemd-rig.sh`` (or
``$CHRONOSD_SYSTEMD_RIG``) with the units of ``systemd/system``. In the container,
chronosd-systest-setup.service pip-installs the wheel into /opt/chronosd at boot (offline,
the container has no network) and ``container/scenarios.py`` runs the scenarios.

Exit status: the rig's (0 = nothing failed); 3 with a ``SKIP: reason`` line when this machine
cannot run the rig (not root, no rig, no way to fetch wheels, or the container cannot boot).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONTAINER_FILES = HERE / "container"
UNIT_DIR = REPO / "systemd" / "system"
DROPIN_EXAMPLE = REPO / "systemd" / "examples" / "writable-paths.conf"
SKIP = 3
# The rig's rootfs is Debian bookworm, whose python3 is CPython 3.11 with glibc 2.36.
CONTAINER_PYTHON = "3.11"
CONTAINER_GLIBC_MINOR = 36
DEFAULT_ROOT = "/tmp/sdroot-chronosd"


class Skip(Exception):
    """This machine cannot run the system tests; the message says why."""


def find_rig() -> Path:
    explicit = os.environ.get("CHRONOSD_SYSTEMD_RIG")
    candidates = [Path(explicit)] if explicit else [REPO.parent / "shared/tools/systemd-rig.sh"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise Skip(f"systemd-rig.sh not found (looked at {', '.join(map(str, candidates))})")


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def build_wheels(dest: Path) -> None:
    """chronosd's wheel from the working tree, plus every dependency and pip, into *dest*."""
    # With hatchling at hand the build needs no index; otherwise pip fetches it.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    built = _pip("wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir", str(dest), str(REPO))
    wheels = sorted(dest.glob("chronosd-*.whl"))
    if built.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"building chronosd's wheel failed:\n{built.stderr[-3000:]}")
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(CONTAINER_GLIBC_MINOR, 16, -1)]
    platforms.append(f"manylinux2014_{arch}")
    got = _pip(
        "download",
        "--quiet",
        "--dest",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        CONTAINER_PYTHON,
        "--implementation",
        "cp",
        *(arg for abi in ("cp311", "abi3", "none") for arg in ("--abi", abi)),
        *(arg for tag in platforms for arg in ("--platform", tag)),
        str(wheels[0]),
        "pip",
    )
    if got.returncode != 0:
        lines = [line for line in got.stderr.splitlines() if "is ignored" not in line]
        raise Skip(
            "cannot download the dependency wheels for the container (no package index?): "
            + (lines[-1] if lines else f"pip exit status {got.returncode}")
        )


def stage_tree(tree: Path) -> None:
    """What the rig copies onto the container's / before boot."""
    build_wheels(tree / "opt" / "chronosd-wheels")
    lib = tree / "usr" / "local" / "lib" / "chronosd-systest"
    lib.mkdir(parents=True)
    for name in ("scenarios.py", "setup-venv", "run-scenarios", "chronosd.toml"):
        shutil.copy2(CONTAINER_FILES / name, lib / name)
    shutil.copy2(DROPIN_EXAMPLE, lib / DROPIN_EXAMPLE.name)
    units = tree / "etc" / "systemd" / "system"
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True)
    setup_unit = "chronosd-systest-setup.service"
    shutil.copy2(CONTAINER_FILES / setup_unit, units / setup_unit)
    (wants / setup_unit).symlink_to(f"/etc/systemd/system/{setup_unit}")
    etc = tree / "etc" / "chronosd"
    etc.mkdir(parents=True)
    shutil.copy2(CONTAINER_FILES / "chronosd.toml", etc / "chronosd.toml")
    jobs = etc / "jobs.json"
    jobs.write_text('{\n  "jobs": []\n}\n', encoding="utf-8")
    jobs.chmod(0o600)


def run_rig(rig: Path, tree: Path, *, timeout: int, keep: bool, only: str) -> int:
    # Our own rootfs cache: libpam-systemd (for the lingering user's manager) is not in the
    # rig's default package set, and a different set under the default root would make every
    # other user of the rig rebuild it.
    root = [] if os.environ.get("SDRIG_ROOT") else ["--root", DEFAULT_ROOT]
    command = [
        "bash",
        str(rig),
        *root,
        "--packages",
        "libpam-systemd",
        "--security-threshold",
        "40",  # chronosd.service <= 4.0; the NAS's <= 2.0 is checked by the scenarios
        "--timeout",
        str(timeout),
        *(["--keep"] if keep else []),
        "--tree",
        str(tree),
        str(UNIT_DIR),
        "--",
        f"CHRONOSD_SYSTEST_ONLY={only} /usr/local/lib/chronosd-systest/run-scenarios",
    ]
    print("systest: " + " ".join(command), flush=True)
    lines: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
    code = proc.returncode
    # Exit status 2 is the rig's own set-up failing (tools, debootstrap); "FAIL: boot" is the
    # container not booting. Anything else that fails is ours to fix.
    cannot_boot = [line.strip() for line in lines if line.startswith(("ERROR:", "FAIL: boot"))]
    if code == 2 or any(line.startswith("FAIL: boot") for line in cannot_boot):
        reason = cannot_boot[0] if cannot_boot else f"systemd-rig.sh exit status {code}"
        raise Skip(f"the systemd rig cannot boot a container here: {reason}")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the rig's run dir and staging")
    parser.add_argument("--timeout", type=int, default=480, help="seconds for the scenarios")
    parser.add_argument(
        "--only", default="", metavar="N,N", help="run only these scenarios (2-7; for debugging)"
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    stage = Path(tempfile.mkdtemp(prefix="chronosd-systest.", dir="/tmp"))
    try:
        if os.geteuid() != 0:
            raise Skip("needs root (systemd-nspawn, overlayfs, debootstrap)")
        rig = find_rig()
        tree = stage / "tree"
        stage_tree(tree)
        print(
            f"systest: staged wheels and scenarios in {time.monotonic() - began:.0f}s", flush=True
        )
        only = ",".join(n for n in args.only.split(",") if n.strip().isdigit())
        return run_rig(rig, tree, timeout=args.timeout, keep=args.keep, only=only)
    except Skip as exc:
        print(f"SKIP: {exc}", flush=True)
        return SKIP
    finally:
        if args.keep:
            print(f"systest: kept {stage}", flush=True)
        else:
            shutil.rmtree(stage, ignore_errors=True)
        print(f"systest: took {time.monotonic() - began:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
