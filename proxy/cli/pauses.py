"""``sendguard pauses list|lift --config FILE``: the pauses in force, as the shared state
store (``stores.state``, Redis) holds them, and lifting them by hand.

A pause is set by a backoff rule, a bounce rate, a bounce burst or a blocklist listing; it
ends by itself at its time. Lifting one early is for when the cause is fixed (a provider
lifted its throttle, a list delisted the IP). A blocklist listing still in place pauses
again at its next round. With ``stores.state.backend: memory`` the pauses live inside the
running process: the command says so instead of showing an empty list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any, TextIO

from proxy.config.settings import Settings
from proxy.stores.pauses import Pause, open_pause_store

__all__ = ("add_pauses_parser", "lift_pauses", "list_pauses", "run_pauses")

EXIT_OK, EXIT_NONE, EXIT_BAD_INPUT, EXIT_STORE_DOWN = 0, 1, 2, 3


def add_pauses_parser(commands: Any) -> None:
    pauses = commands.add_parser("pauses", help="pauses in force (shared state store): list, lift")
    sub = pauses.add_subparsers(dest="pauses_command", required=True, metavar="SUBCOMMAND")
    show = sub.add_parser("list", help="every pause in force: scope, what, class, until, reason, source")
    show.add_argument("--config", required=True, help="YAML config file (its stores.state)")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lift = sub.add_parser("lift", help="end pauses now: SCOPE:VALUE (e.g. class:commercial, sender:shop.example)")
    lift.add_argument("--config", required=True, help="YAML config file (its stores.state)")
    lift.add_argument("what", nargs="*", help="SCOPE:VALUE of the pauses to lift (every source)")
    lift.add_argument("--all", action="store_true", help="lift every pause")


def _memory_note(err: TextIO) -> None:
    print(
        "sendguard: pauses are kept in memory (stores.state.backend: memory): they live inside the running "
        "sendguard process and end with it or at their time. Set stores.state.backend: redis to share them "
        "between processes and to manage them from here.",
        file=err,
    )


def _row(pause: Pause) -> dict[str, Any]:
    return asdict(pause) | {"until_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(pause.until))}


async def list_pauses(settings: Settings, *, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    config = settings.stores.state
    if config.backend == "memory":
        _memory_note(err)
        return EXIT_BAD_INPUT
    store = open_pause_store(config)
    try:
        pauses = sorted(await store.active(), key=lambda p: p.until)
    except Exception as exc:  # the store's client raises its own errors; any means: not readable
        print(f"sendguard: cannot read the state store: {exc}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()
    if as_json:
        print(json.dumps([_row(p) for p in pauses], indent=2), file=out)
    elif not pauses:
        print("no pause in force: all mail flows", file=out)
    else:
        print(f"{'scope':7} {'what':28} {'class':13} {'until (UTC)':20} {'source':20} reason", file=out)
        for pause in pauses:
            row = _row(pause)
            print(
                f"{pause.scope:7} {pause.value[:28]:28} {pause.message_class or 'every':13} {row['until_utc']:20} "
                f"{pause.source:20} {pause.reason}",
                file=out,
            )
    return EXIT_OK


async def lift_pauses(
    settings: Settings, what: list[str], *, every: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    config = settings.stores.state
    if config.backend == "memory":
        _memory_note(err)
        return EXIT_BAD_INPUT
    wanted: set[tuple[str, str]] = set()
    for item in what:
        scope, _, value = item.partition(":")
        if scope not in ("class", "sender", "all") or not value:
            print(f"sendguard: {item!r}: write SCOPE:VALUE, SCOPE one of class, sender, all", file=err)
            return EXIT_BAD_INPUT
        wanted.add((scope, value.lower()))
    if not wanted and not every:
        print("sendguard: name the pauses to lift (SCOPE:VALUE ...) or give --all", file=err)
        return EXIT_BAD_INPUT
    store = open_pause_store(config)
    try:
        pauses = await store.active()
        chosen = [p for p in pauses if every or (p.scope, p.value.lower()) in wanted]
        for pause in chosen:
            await store.lift(pause.scope, pause.value, pause.source)
    except Exception as exc:
        print(f"sendguard: cannot change the state store: {exc}", file=err)
        return EXIT_STORE_DOWN
    finally:
        await store.close()
    for pause in chosen:
        print(f"lifted: {pause.scope} {pause.value} ({pause.source}: {pause.reason})", file=out)
    if not chosen:
        print("no pause in force matches", file=out)
        return EXIT_NONE
    return EXIT_OK


def run_pauses(args: argparse.Namespace, settings: Settings) -> int:
    if args.pauses_command == "list":
        return asyncio.run(list_pauses(settings, as_json=args.json))
    return asyncio.run(lift_pauses(settings, args.what, every=args.all))
