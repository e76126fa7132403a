"""The methods `dataclasses` generates, compiled once and kept across starts (like .pyc files).

chronosd starts on every wake-up, and its start-up makes some fifty frozen dataclasses (its own
values and anyio's). For each, the standard library writes ``__init__``, ``__repr__``,
``__eq__``, ``__hash__``, ``__setattr__`` and ``__delattr__`` as source text and compiles it
with ``exec``: about 240 compilations, 40 ms of a 300 ms cold fire and a quarter of its
instructions, yielding the same code objects on every start.

`generated_methods_cached` keeps those code objects in a file (marshal, as .pyc files are) and,
for the length of the block, has `dataclasses` execute the cached code for a source text it has
compiled before. Nothing else changes: the text is the key, so an edited class, another field
or another Python produces new text and is compiled as before; a missing, foreign or damaged
file is ignored and rewritten; ``exec`` elsewhere (and the builtin itself) is untouched, and so
is `dataclasses` once the block ends. The file is written only when something was compiled, not
at all under ``PYTHONDONTWRITEBYTECODE``, and a failed write is ignored as a failed .pyc write
is. It is written after the work is done (the daemon: when it exits), never on the way to a
reply.

The file lives in the state directory, which only the daemon's user can write (the package's
own directory is read-only under the units' ``ProtectSystem=strict``). It holds code that the
daemon runs, so it is written with mode 0600 and read only when it belongs to the user reading
it and nobody else can write it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import marshal
import os
import stat
import sys
from collections.abc import Iterator
from importlib.util import MAGIC_NUMBER
from pathlib import Path
from types import CodeType
from typing import Any, Final

CACHE_NAME: Final = f"dataclass-methods.{sys.implementation.cache_tag}"
# Identifies the format and the interpreter's bytecode (its .pyc magic number).
HEADER: Final = b"chronosd dataclass methods 1\n" + MAGIC_NUMBER
# Sources kept in the file; past it, only those this process used are written.
MAX_ENTRIES: Final = 2048
MAX_BYTES: Final = 8 << 20


class MethodCache:
    """What one block found in the file and compiled anew; `save` keeps the new code.

    A plain class: a dataclass here would be compiled before the cache could serve it.
    """

    __slots__ = ("_cached", "_used", "compiled", "hits", "path", "written")

    def __init__(self, path: Path, cached: dict[str, CodeType]) -> None:
        self.path = path
        self.hits = 0
        self.compiled = 0
        self.written = False
        self._cached = cached
        self._used: dict[str, CodeType] = {}

    def code_for(self, source: str) -> CodeType:
        code = self._cached.get(source)
        if code is None:
            # What exec(source) compiles: file "<string>", no future flags (dataclasses has
            # none; dont_inherit keeps this module's annotations import out).
            code = compile(source, "<string>", "exec", dont_inherit=True)
            self.compiled += 1
        else:
            self.hits += 1
        self._used[source] = code
        return code

    def save(self) -> bool:
        """Write the file if anything was compiled (not under PYTHONDONTWRITEBYTECODE);
        whether it was written. Called when it costs nothing: the daemon saves at exit."""
        if not self.compiled or sys.dont_write_bytecode or self.written:
            return False
        entries = {**self._cached, **self._used}
        if len(entries) > MAX_ENTRIES:
            entries = self._used
        self.written = write_cache(self.path, entries)
        return self.written


def cache_path(directory: Path) -> Path:
    return directory / CACHE_NAME


def read_cache(path: Path) -> dict[str, CodeType]:
    """The cached code by source text; empty when the file is missing, foreign or unsafe.

    Safe: the file and its directory belong to us and nobody else can write them, and the
    file is no link (a hard link could dress up a file of ours that others fill, a run log
    say). It is read before the state directory's own checks, which refuse such a directory
    later anyway.
    """
    euid = os.geteuid()
    writable_by_others = stat.S_IWGRP | stat.S_IWOTH
    try:
        directory = os.stat(path.parent)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if (
            directory.st_uid != euid
            or directory.st_mode & writable_by_others
            or not stat.S_ISREG(info.st_mode)
            or info.st_uid != euid
            or info.st_mode & writable_by_others
            or info.st_nlink != 1
            or info.st_size > MAX_BYTES
        ):
            return {}
        data = os.read(fd, info.st_size + 1)
    except OSError:
        return {}
    finally:
        os.close(fd)
    if not data.startswith(HEADER):
        return {}
    try:
        loaded = marshal.loads(data[len(HEADER) :])
    except (EOFError, ValueError, TypeError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {
        source: code
        for source, code in loaded.items()
        if isinstance(source, str) and isinstance(code, CodeType)
    }


def write_cache(path: Path, entries: dict[str, CodeType]) -> bool:
    """Replace the file with *entries* in one rename; False when it could not be written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        data = HEADER + marshal.dumps(entries)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:  # a file object writes it whole (os.write may not)
            handle.write(data)
        os.replace(temporary, path)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return False
    return True


@contextlib.contextmanager
def generated_methods_cached(directory: Path) -> Iterator[MethodCache]:
    """Within the block, dataclasses made use the code cached in *directory* (see module doc).

    The file is not written here: call `MethodCache.save` on what the block yields.
    """
    if "exec" in vars(dataclasses):  # already inside such a block (or someone else's hook)
        yield MethodCache(cache_path(directory), {})
        return
    path = cache_path(directory)
    methods = MethodCache(path, read_cache(path))

    def exec_cached(source: Any, globals: Any = None, locals: Any = None, /, **kwargs: Any) -> None:
        if not isinstance(source, str) or kwargs:
            exec(source, globals, locals, **kwargs)
        else:
            exec(methods.code_for(source), globals, locals)

    # `dataclasses` calls exec by its global name, so this module attribute shadows the
    # builtin for dataclasses alone.
    setattr(dataclasses, "exec", exec_cached)  # noqa: B010
    try:
        yield methods
    finally:
        delattr(dataclasses, "exec")


__all__ = [
    "CACHE_NAME",
    "MethodCache",
    "cache_path",
    "generated_methods_cached",
    "read_cache",
    "write_cache",
]
