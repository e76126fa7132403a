"""``chronosd nas ...``: serve the reference NAS, manage its agents and keys, inspect its arms.

This module is imported for every ``chronosd`` command line (to register the sub-commands), so
it imports nothing heavy at module level: each handler imports what it uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chronosd.cli import Context
    from chronosd.nas.serve import NASOptions
    from chronosd.nas.store import NASStore

Handler = Callable[["Context"], int]


def register(sub: Any, command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``chronosd nas ...`` to the top-level sub-commands *sub*."""
    from chronosd.cli import add_global_options

    def nested(parent: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(
            name, help=help_text, description=help_text
        )
        add_global_options(parser, suppress=True)
        return parser

    nas = command("nas", "the reference NAS: serve it, manage its agents, inspect its arms")
    nas.set_defaults(handler=_usage(nas))
    nas_sub = nas.add_subparsers(dest="nas_command", metavar="COMMAND")

    p = nested(nas_sub, "serve", "run the reference NAS (adopts systemd sockets when present)")
    p.add_argument(
        "--listen", dest="nas_listen", metavar="HOST:PORT", help="default 127.0.0.1:8788"
    )
    p.add_argument(
        "--public-url",
        metavar="URL",
        help="base URL agents reach us at; the iss of fire tokens (default http://<listen>)",
    )
    p.add_argument(
        "--max-delivery-age",
        default="24h",
        metavar="DURATION",
        help="retry a fire this long after its instant, then dead-letter it (default 24h)",
    )
    p.add_argument(
        "--ready-file", type=Path, metavar="PATH", help='write "host:port" here once accepting'
    )
    p.set_defaults(handler=cmd_serve)

    agent = nested(nas_sub, "agent", "manage the agents allowed to provision")
    agent.set_defaults(handler=_usage(agent))
    agent_sub = agent.add_subparsers(dest="nas_agent_command", metavar="COMMAND")
    p = nested(agent_sub, "add", "register an agent; prints its bearer token once")
    p.add_argument("name")
    p.add_argument("--callback-url", required=True, metavar="URL")
    p.add_argument(
        "--rotate-token", action="store_true", help="re-issue the token of an existing agent"
    )
    p.set_defaults(handler=cmd_agent_add)
    p = nested(agent_sub, "list", "the registered agents")
    p.set_defaults(handler=cmd_agent_list)
    p = nested(agent_sub, "remove", "unregister an agent and drop its arms")
    p.add_argument("name")
    p.set_defaults(handler=cmd_agent_remove)

    p = nested(nas_sub, "armed", "the arms the NAS holds")
    p.add_argument("--agent", metavar="NAME")
    p.set_defaults(handler=cmd_armed)
    p = nested(nas_sub, "dead", "fires that were never delivered (dead letters)")
    p.add_argument("--agent", metavar="NAME")
    p.set_defaults(handler=cmd_dead)

    keys = nested(nas_sub, "keys", "the Ed25519 keys fire tokens are signed with")
    keys.set_defaults(handler=_usage(keys))
    keys_sub = keys.add_subparsers(dest="nas_keys_command", metavar="COMMAND")
    p = nested(keys_sub, "list", "the published keys")
    p.set_defaults(handler=cmd_keys_list)
    p = nested(keys_sub, "rotate", "sign with a new key; the old one stays published a while")
    p.set_defaults(handler=cmd_keys_rotate)


def _usage(parser: argparse.ArgumentParser) -> Handler:
    def show(ctx: Context) -> int:
        parser.print_help(sys.stderr)
        return 2

    return show


# -- helpers -----------------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> Exception:
    from chronosd.cli import CliError

    return CliError(message, code)


def _state_dir(ctx: Context) -> Path:
    from chronosd.nas.serve import resolve_state_dir

    return resolve_state_dir(ctx.args.state_dir)


def _open_store(ctx: Context, *, create: bool) -> NASStore | None:
    from chronosd.nas.serve import ensure_state_dir
    from chronosd.nas.store import DB_NAME, NASStore

    state_dir = _state_dir(ctx)
    if create:
        ensure_state_dir(state_dir)
    elif not (state_dir / DB_NAME).exists():
        return None
    return NASStore.open(state_dir)


def _emit(ctx: Context, data: object, table: Callable[[], str]) -> None:
    ctx.emit(data, table)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    from chronosd.cli import format_table

    return format_table(headers, rows)


def _local(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _wire(epoch: float | None) -> str | None:
    from datetime import UTC

    from chronosd.timefmt import to_wire

    return None if epoch is None else to_wire(datetime.fromtimestamp(epoch, UTC))


# -- serve -------------------------------------------------------------------------------------


def cmd_serve(ctx: Context) -> int:
    import anyio

    from chronosd.durations import parse_duration
    from chronosd.errors import DurationError
    from chronosd.log import setup_logging
    from chronosd.nas.serve import NASOptions

    args = ctx.args
    try:
        max_age = parse_duration(args.max_delivery_age)
    except DurationError as exc:
        raise _fail(f"--max-delivery-age: {exc}", 2) from None
    setup_logging(ctx.config.log_level)
    options = NASOptions(
        state_dir=_state_dir(ctx), public_url=args.public_url, max_delivery_age=max_age
    )
    try:
        return anyio.run(_serve, options, args.nas_listen, args.ready_file)
    except BaseExceptionGroup as group:
        # A start-up failure inside the task group arrives wrapped; show it as one line.
        raise _single(group) from None


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    from chronosd.errors import ChronosError

    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        current = pending.pop()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        else:
            leaves.append(current)
    chronos = [leaf for leaf in leaves if isinstance(leaf, ChronosError)]
    return chronos[0] if len(chronos) == 1 else group


async def _serve(options: NASOptions, listen: str | None, ready_file: Path | None) -> int:
    import signal

    import anyio
    import anyio.abc

    from chronosd.config import parse_listen
    from chronosd.daemon import systemd
    from chronosd.http.server import bind_listener, listener_from_fd
    from chronosd.log import get_logger
    from chronosd.nas.serve import DEFAULT_LISTEN, run_nas

    log = get_logger()
    listeners: list[anyio.abc.SocketListener] = []
    try:
        inherited = systemd.listen_fds()
        if inherited:
            for sock in inherited:
                listeners.append(await listener_from_fd(sock.fd))
        else:
            host, port = parse_listen(listen or DEFAULT_LISTEN)
            listeners.append(await bind_listener(host, port))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:
                running = await group.start(run_nas, options, listeners)
                if ready_file is not None:
                    _write_ready_file(ready_file, running.address)
                systemd.notify_ready(f"reference NAS listening on {running.address}")
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.info("nas.stopping", reason=name)
                    systemd.notify_stopping(f"stopping ({name})")
                    running.stop()
                    break
    finally:
        for listener in listeners:
            await listener.aclose()
    return 0


def _write_ready_file(path: Path, address: str) -> None:
    # Written whole and renamed, so a test polling for the file never reads half of it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(address + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -- agents ------------------------------------------------------------------------------------


def cmd_agent_add(ctx: Context) -> int:
    import time

    from chronosd.nas.app import AGENT_NAME, BadRequest, check_callback_url

    args = ctx.args
    if not AGENT_NAME.fullmatch(args.name):
        raise _fail(
            f"nas agent add: name {args.name!r} is not valid; "
            "use letters, digits, '.', '_' or '-' (at most 64)",
            2,
        )
    try:
        callback_url = check_callback_url(args.callback_url)
    except BadRequest as exc:
        raise _fail(f"nas agent add: --callback-url: {exc}", 2) from None
    store = _open_store(ctx, create=True)
    assert store is not None
    try:
        token = store.add_agent(
            args.name, callback_url, now=time.time(), rotate_token=args.rotate_token
        )
    finally:
        store.close()
    if ctx.json:
        print(json.dumps({"agent": args.name, "token": token, "callback_url": callback_url}))
    else:
        print(
            f"agent {args.name!r} registered; its bearer token follows and is not shown again",
            file=sys.stderr,
        )
        print(token)
    return 0


def cmd_agent_list(ctx: Context) -> int:
    store = _open_store(ctx, create=False)
    rows: list[dict[str, Any]] = []
    if store is not None:
        try:
            armed: dict[str, int] = {}
            for arm in store.armed():
                armed[arm.agent] = armed.get(arm.agent, 0) + 1
            rows = [
                {
                    "agent": agent.name,
                    "callback_url": agent.callback_url,
                    "created_at": _wire(agent.created_at),
                    "armed": armed.get(agent.name, 0),
                }
                for agent in store.agents()
            ]
        finally:
            store.close()
    _emit(
        ctx,
        rows,
        lambda: _table(
            ["agent", "callback url", "armed"],
            [[row["agent"], row["callback_url"], str(row["armed"])] for row in rows],
        ),
    )
    return 0


def cmd_agent_remove(ctx: Context) -> int:
    store = _open_store(ctx, create=False)
    removed = False
    if store is not None:
        try:
            removed = store.remove_agent(ctx.args.name)
        finally:
            store.close()
    if not removed:
        raise _fail(f"nas agent remove: no agent named {ctx.args.name!r}")
    if ctx.json:
        print(json.dumps({"agent": ctx.args.name, "removed": True}))
    return 0


# -- arms and dead letters ---------------------------------------------------------------------


def cmd_armed(ctx: Context) -> int:
    from chronosd.timefmt import parse_instant

    store = _open_store(ctx, create=False)
    rows: list[dict[str, Any]] = []
    if store is not None:
        try:
            rows = [
                {
                    "agent": arm.agent,
                    "job_id": arm.job_id,
                    "fire_at": arm.fire_at,
                    "schedule_id": arm.schedule_id,
                    "callback_url": arm.callback_url,
                    "attempts": arm.attempts,
                    "next_attempt_at": _wire(arm.next_attempt_at),
                    "last_status": arm.last_status,
                    "last_error": arm.last_error,
                }
                for arm in store.armed(ctx.args.agent)
            ]
        finally:
            store.close()

    def table() -> str:
        return _table(
            ["agent", "job", "fire at", "attempts", "last error", "schedule id"],
            [
                [
                    row["agent"],
                    row["job_id"],
                    _local(parse_instant(row["fire_at"]).timestamp()),
                    str(row["attempts"]),
                    row["last_error"] or "-",
                    row["schedule_id"],
                ]
                for row in rows
            ],
        )

    _emit(ctx, rows, table)
    return 0


def cmd_dead(ctx: Context) -> int:
    from chronosd.timefmt import parse_instant

    store = _open_store(ctx, create=False)
    rows: list[dict[str, Any]] = []
    if store is not None:
        try:
            rows = [
                {
                    "agent": dead.agent,
                    "job_id": dead.job_id,
                    "fire_at": dead.fire_at,
                    "schedule_id": dead.schedule_id,
                    "callback_url": dead.callback_url,
                    "attempts": dead.attempts,
                    "last_status": dead.last_status,
                    "last_error": dead.last_error,
                    "dead_at": _wire(dead.dead_at),
                }
                for dead in store.dead_letters(ctx.args.agent)
            ]
        finally:
            store.close()

    def table() -> str:
        return _table(
            ["agent", "job", "fire at", "attempts", "last error", "dead since"],
            [
                [
                    row["agent"],
                    row["job_id"],
                    _local(parse_instant(row["fire_at"]).timestamp()),
                    str(row["attempts"]),
                    row["last_error"] or "-",
                    _local(parse_instant(row["dead_at"]).timestamp()),
                ]
                for row in rows
            ],
        )

    _emit(ctx, rows, table)
    return 0


# -- keys --------------------------------------------------------------------------------------


def _key_rows(ctx: Context, *, rotate: bool) -> tuple[str, list[dict[str, Any]]]:
    import time

    from chronosd.nas.keys import KeyRing
    from chronosd.nas.serve import ensure_state_dir

    ring = KeyRing.load_or_create(ensure_state_dir(_state_dir(ctx)))
    active = ring.rotate() if rotate else ring.current()
    now = time.time()
    rows = [
        {
            "kid": key.kid,
            "active": key.retired_at is None,
            "created_at": _wire(key.created_at),
            "retired_at": _wire(key.retired_at),
            "published": key.published(now),
        }
        for key in ring.keys
    ]
    return active.kid, rows


def _keys_output(ctx: Context, kid: str, rows: list[dict[str, Any]]) -> None:
    _emit(
        ctx,
        {"kid": kid, "keys": rows},
        lambda: _table(
            ["kid", "active", "created", "published"],
            [
                [
                    row["kid"],
                    "yes" if row["active"] else "no",
                    _local(datetime.fromisoformat(row["created_at"]).timestamp()),
                    "yes" if row["published"] else "no",
                ]
                for row in rows
            ],
        ),
    )


def cmd_keys_list(ctx: Context) -> int:
    kid, rows = _key_rows(ctx, rotate=False)
    _keys_output(ctx, kid, rows)
    return 0


def cmd_keys_rotate(ctx: Context) -> int:
    kid, rows = _key_rows(ctx, rotate=True)
    _keys_output(ctx, kid, rows)
    return 0
