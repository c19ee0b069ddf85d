"""The README is a user's first five minutes: every command and every flag must be in it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loop.cli import build_parser
from loop.commands import COMMANDS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_documented():
    assert set(_subparsers()) == set(COMMANDS)
    for name in COMMANDS:
        assert f"python -m loop {name}" in README, f"`loop {name}` is not in README.md"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_documented(command):
    sub = _subparsers()[command]
    flags = [opt for a in sub._actions for opt in a.option_strings
             if opt.startswith("--") and opt != "--help"]
    missing = [f for f in flags if f not in README]
    assert not missing, f"`loop {command}` flags missing from README.md: {missing}"


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
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr
