"""Fixtures of the end-to-end tests (the parts themselves are in tests/e2e/lab.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.lab import Lab, NasServer


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """The reference NAS, running; agents are added by the test (`Lab.agent`)."""
    nas = NasServer(tmp_path / "nas", tmp_path, tmp_path / "nas.log")
    nas.start()
    lab = Lab(tmp_path, nas)
    try:
        yield lab
    finally:
        lab.close()
