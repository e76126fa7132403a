"""Holding the cyclic garbage collector off during a burst of allocation (start-up, loads)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collection_paused(*, freeze: bool = False) -> Iterator[None]:
    """Disable the cycle collector for the block; restore it as it was, even on error.

    A start-up or a load of 10,000 jobs makes a few hundred thousand objects, none of them in
    cycles, and the collector would walk the growing heap again and again while they are made;
    reference counting still frees everything meanwhile. ``freeze`` moves what exists at the
    end into the permanent generation (objects that live as long as the process: modules,
    classes, functions), so later collections skip them too.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if enabled:
            gc.enable()
