"""``python -m loop pin``: choose the adapter that ``export`` ships, with a kept history."""

from __future__ import annotations

import argparse
from typing import Any

from core.exceptions import UserError
from loop.commands._common import add_db_arg, add_json_arg, format_table, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pin", help="pin an adapter (or the best one), with history; unpin too",
        description="Pin the adapter that `python -m loop export` ships. Every pin and unpin "
        "is kept in the database's history. Without an action, print what is pinned now and "
        "the history.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("adapter_id", nargs="?", type=int, metavar="ADAPTER_ID",
                        help="the adapter id to pin (see `python -m loop log` and `show`)")
    action.add_argument("--best", action="store_true",
                        help="pin the champion: the adapter of the latest accepted cycle of the "
                        "latest finished run that accepted one")
    action.add_argument("--unpin", action="store_true", help="remove the current pin")
    parser.add_argument("--note", default="", metavar="TEXT", help="why, kept in the history")
    parser.add_argument("--history", action="store_true",
                        help="also print every pin and unpin (always included with --json)")
    add_db_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.store import Store

    with Store.open_existing(args.db) as store:
        action, message = None, None
        if args.best:
            best = store.best_adapter()
            if best is None:
                raise UserError("no champion adapter yet: no finished run has an accepted cycle "
                                "with an adapter. Pin one by id (`python -m loop pin ADAPTER_ID`,"
                                " ids in `python -m loop show CYCLE`) or finish a run first.")
            store.pin(best["id"], note=args.note or f"--best: champion of run {best['run_id']}")
            action = "pin"
        elif args.unpin:
            if store.unpin(note=args.note) is None:
                message = "nothing was pinned"
            action = "unpin"
        elif args.adapter_id is not None:
            store.pin(args.adapter_id, note=args.note)
            action = "pin"
        pinned, history = store.current_pin(), store.pin_history()
    if args.json:
        print_json({"action": action, "pinned": pinned, "history": history})
        return 0
    if message:
        print(message)
    print(describe(pinned))
    if (args.history or action is None) and history:
        print()
        print(format_table(["at", "action", "adapter", "note"],
                           [[h["at"], h["action"], h["adapter_id"], h["note"]] for h in history]))
    return 0


def describe(pinned: dict[str, Any] | None) -> str:
    """One line about the current pin."""
    if pinned is None:
        return ("nothing is pinned; pin an adapter with `python -m loop pin ADAPTER_ID` "
                "or `python -m loop pin --best`")
    adapter = pinned["adapter"]
    note = f"; note: {pinned['note']}" if pinned["note"] else ""
    return (f"pinned: adapter {adapter['id']} ({adapter['strategy']}, run {adapter['run_id']}, "
            f"{adapter['path']}) since {pinned['at']}{note}")
