"""The flag reference of ``docs/cli.md``, made from the parser itself so it cannot drift.

``python -m loop.cli_reference`` (``make docs``) rewrites the part of ``docs/cli.md`` between
the two markers; ``tests/test_docs.py`` fails when the file is not what the parser says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- flags: made by `make docs` from the parser; do not edit by hand -->"
END = "<!-- end of flags -->"
DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    names = ", ".join(f"`{o}`" for o in action.option_strings)
    if action.nargs == 0:
        return names
    value = action.metavar or (("{" + ",".join(map(str, action.choices)) + "}")
                               if action.choices else action.dest.upper())
    return f"{names} `{value}`"


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
        return ""
    return f"`{action.default}`"


def command_table(name: str, parser: argparse.ArgumentParser) -> str:
    rows = [f"### `python -m loop {name}`", "", _cell(parser.description or ""), "",
            "| flag | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if "-h" in action.option_strings:
            continue
        rows.append(f"| {_flags(action)} | {_default(action)} | {_cell(action.help or '')} |")
    return "\n".join(rows)


def reference(parser: argparse.ArgumentParser) -> str:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = [START, ""]
    parts += [command_table(name, p) + "\n" for name, p in sub.choices.items()]
    parts.append(END)
    return "\n".join(parts)


def rewritten(text: str, parser: argparse.ArgumentParser) -> str:
    """``text`` (docs/cli.md) with its flag reference made anew from ``parser``."""
    if START not in text or END not in text:
        raise ValueError(f"{DOC} has no flag reference markers ({START!r} ... {END!r})")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    return head + reference(parser) + tail


def main() -> int:
    from loop.cli import build_parser

    text = DOC.read_text(encoding="utf-8")
    new = rewritten(text, build_parser())
    if new != text:
        DOC.write_text(new, encoding="utf-8")
        print(f"rewrote the flag reference in {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
