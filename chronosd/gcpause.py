"""Holding the cyclic garbage collector off during a burst of allocation (start-up, loads)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# Whether `pause_for_startup` turned the collector off and it is still off on its account.
_startup_paused = False


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


def pause_for_startup() -> None:
    """Turn the collector off from the process's first import until `end_startup_pause`.

    ``python -m chronosd`` calls this before importing the rest of chronosd. A socket-activated
    start imports some 250 modules and answers the fire that woke it before anything it made
    can be garbage; the collector ran about 18 times on the way (5-7 ms measured), walking
    objects that live as long as the process.
    """
    global _startup_paused
    if gc.isenabled():
        gc.disable()
        _startup_paused = True


def end_startup_pause() -> None:
    """Freeze what start-up made and turn the collector back on, if `pause_for_startup` turned
    it off; otherwise nothing. Called once a command has started (the daemon: once the request
    that woke it was answered)."""
    global _startup_paused
    if _startup_paused:
        _startup_paused = False
        gc.freeze()
        gc.enable()
