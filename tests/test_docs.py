"""The README is a user's first five minutes; docs/cli.md is the reference: every command and
every flag is in it, and every page the README points to exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from loop.cli import build_parser
from loop.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CLI_DOC = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_documented():
    assert set(_subparsers()) == set(COMMANDS)
    for name in COMMANDS:
        assert f"python -m loop {name}" in CLI_DOC, f"`loop {name}` is not in docs/cli.md"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_documented(command):
    sub = _subparsers()[command]
    flags = [opt for a in sub._actions for opt in a.option_strings
             if opt.startswith("--") and opt != "--help"]
    missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", CLI_DOC)]
    assert not missing, f"`loop {command}` flags missing from docs/cli.md: {missing}"


def test_the_flag_reference_is_what_the_parser_says():
    from loop.cli_reference import rewritten

    assert rewritten(CLI_DOC, build_parser()) == CLI_DOC, (
        "docs/cli.md's flag reference is out of date: run `make docs`")


def test_every_flag_has_help():
    for name, sub in _subparsers().items():
        bare = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
        assert not bare, f"`loop {name}` flags without help: {bare}"


def test_the_readme_stays_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 150
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", README)
    assert "docs/cli.md" in links
    for page in links:
        assert (ROOT / page).is_file(), f"README.md links to {page}, which does not exist"
    for page in (ROOT / "docs").glob("*.md"):
        for target in re.findall(r"\]\(([\w.-]+\.md)", page.read_text(encoding="utf-8")):
            assert (ROOT / "docs" / target).is_file(), f"{page.name} links to missing {target}"


def test_quickstart_has_the_two_setup_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make demo" in quickstart and "make test" in quickstart


def test_help_loads_no_model():
    import subprocess
    import sys

    code = ("import sys, loop.cli\n"
            "try:\n    loop.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr
