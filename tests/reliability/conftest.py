"""Figures for the reliability tests: each test reports one summary line.

The line goes straight to the terminal as soon as the test has its figures (pytest's capture
switched off for the moment, as ``capsys.disabled()`` does), and again in a "reliability
figures" section at the end of the run; README's "What chronosd guarantees" quotes them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import pytest

_FIGURES: list[str] = []

Report = Callable[..., None]


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """``report(trials=200, doubled=0, ...)`` prints ``<test>: trials=200 doubled=0 ...``."""

    def emit(**figures: object) -> None:
        line = f"{request.node.name}: " + " ".join(
            f"{key}={_format(value)}" for key, value in figures.items()
        )
        _FIGURES.append(line)
        # pytest captures file descriptor 1 itself; writing past it needs capture switched off.
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            out = sys.__stdout__
            if out is not None:
                out.write(f"\n[reliability] {line}\n")
                out.flush()

    return emit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in _FIGURES:
        terminalreporter.write_line(line)
