"""systemd socket activation and readiness notification, hand-written.

Implements the two halves of the protocol chronosd needs, as documented in
sd_listen_fds(3) and sd_notify(3), with the standard library only:
``systemd-python`` needs libsystemd headers to build and these are a dozen
lines each. Nothing here logs: callers decide what is worth an event.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
"""The first inherited descriptor; systemd passes sockets as 3, 4, 5, ..."""

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class InheritedSocket:
    """One descriptor passed by systemd, with its FileDescriptorName= if any."""

    fd: int
    name: str | None


def _parse_positive(value: str | None) -> int | None:
    # int() alone would accept " 3", "+3" and "3_0"; the protocol writes plain digits.
    if value is None or not value.isascii() or not value.isdigit():
        return None
    number = int(value)
    return number if number > 0 else None


def socket_activated(environ: Mapping[str, str] | None = None) -> bool:
    """Whether systemd passed sockets to this very process.

    Reads the same variables as `listen_fds`, so call it *before*
    `listen_fds` (which unsets them by default) — or just look at whether
    `listen_fds` returned anything.
    """
    env = os.environ if environ is None else environ
    pid = _parse_positive(env.get("LISTEN_PID"))
    count = _parse_positive(env.get("LISTEN_FDS"))
    return pid == os.getpid() and count is not None


def listen_fds(
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
) -> list[InheritedSocket]:
    """Adopt the sockets systemd passed to this process, per sd_listen_fds(3).

    Returns ``[]`` when nothing was passed, when the variables were meant for
    another process (``LISTEN_PID`` is not ours: a parent leaked them), or
    when they are malformed or name descriptors that are not open. The
    adopted descriptors are made non-inheritable so that job subprocesses do
    not keep the listening socket alive.

    As libsystemd does, the three variables are removed whatever the outcome
    when *unset_environment* is true, so no child mistakes them for its own.
    A ``LISTEN_FDNAMES`` whose count does not match ``LISTEN_FDS`` is ignored
    (every name becomes ``None``) rather than costing us the sockets.
    """
    env = os.environ if environ is None else environ
    try:
        return _adopt(env)
    finally:
        if unset_environment:
            for variable in _LISTEN_VARIABLES:
                env.pop(variable, None)


def _adopt(env: Mapping[str, str]) -> list[InheritedSocket]:
    if _parse_positive(env.get("LISTEN_PID")) != os.getpid():
        return []
    count = _parse_positive(env.get("LISTEN_FDS"))
    if count is None:
        return []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    try:
        for fd in fds:
            os.set_inheritable(fd, False)
    except OSError:
        # A count pointing past the open descriptors: the environment is not
        # describing this process's descriptor table, so trust none of it.
        return []
    names: list[str | None] = [None] * count
    raw_names = env.get("LISTEN_FDNAMES")
    if raw_names is not None:
        split = raw_names.split(":")
        if len(split) == count:
            names = [name or None for name in split]
    return [InheritedSocket(fd=fd, name=name) for fd, name in zip(fds, names, strict=True)]


def notify(message: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send *message* to the service manager, per sd_notify(3).

    Returns True when the datagram was sent, False when there is no
    ``NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) or the
    send failed; failures are swallowed because readiness notification must
    never take the daemon down.
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET")
    if not target:
        return False
    if target.startswith("@"):
        # Linux abstract namespace: the leading '@' stands for a NUL byte.
        address = "\0" + target[1:]
    elif target.startswith("/"):
        address = target
    else:
        # vsock: and relative addresses are not used by chronosd's units.
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except (OSError, UnicodeError, ValueError):
        return False
    return True


def _status_line(status: str) -> str:
    # A newline would start a new assignment and let the status forge one.
    return "STATUS=" + " ".join(status.splitlines())


def notify_ready(status: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd start-up is complete: ``READY=1`` with a status line."""
    return notify("READY=1\n" + _status_line(status), environ=environ)


def notify_stopping(status: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Tell systemd the daemon is shutting down: ``STOPPING=1`` with a status line."""
    return notify("STOPPING=1\n" + _status_line(status), environ=environ)


def notify_status(status: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Update the free-form status shown by ``systemctl status``."""
    return notify(_status_line(status), environ=environ)
