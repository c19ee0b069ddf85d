"""``--config FILE.yaml``: a command's options from a YAML file, flags on the command line on top.

The file is a flat mapping whose keys are the command's own long option names, written
``dev-size`` or ``dev_size`` (or the option's destination, e.g. ``prefix-cache: false`` for
``--no-prefix-cache``). Nothing here knows the options: they come from the command's argparse
sub-parser, so a flag added to a command works in a file too. Every value goes through the
option's own ``type`` and ``choices``; every problem in a file is reported at once, in one line
that names the file and the key. The values become the sub-parser's defaults, so anything given
on the command line wins.

:func:`resolved_options` is what a command ended up with (flags, file, defaults), by
destination; :func:`to_yaml` writes it as a file that ``--config`` reads back to the same.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

from core.exceptions import UserError

DEST = "config_file"
_NOT_OPTIONS = {"command", "verbose", "quiet", "func", DEST}
"""Namespace entries that are not the command's own options (top-level flags, dispatch)."""


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", dest=DEST, metavar="FILE.yaml",
                        help="read the options from a YAML file (keys: the long option names, "
                        "e.g. `dev-size: 60`); flags given on the command line override it")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with the defaults of the chosen command taken from its
    ``--config`` file when one is given (a :class:`UserError` when the file is wrong)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = _command_parser(parser, argv)
    if sub is None or not any(a.dest == DEST for a in sub._actions) or {"-h", "--help"} & set(argv):
        return parser.parse_args(argv)
    given = _given_on_command_line(parser, sub, argv)
    path = given.get(DEST)
    if path is None:
        return parser.parse_args(argv)
    defaults = load(path, sub)
    for group in sub._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & given.keys():  # the command line chose one of them: the file's others go
            for dest in dests:
                defaults.pop(dest, None)
        elif sum(defaults.get(d) is not None for d in dests) > 1:
            names = ", ".join(sorted(_key(d) for d in dests if defaults.get(d) is not None))
            raise UserError(f"{path}: {names} exclude each other; keep one")
    sub.set_defaults(**defaults)
    for action in sub._actions:
        if action.dest in defaults:
            action.required = False
    return parser.parse_args(argv)


def load(path: str | Path, sub: argparse.ArgumentParser) -> dict[str, Any]:
    """The options a YAML file sets, by argparse destination, checked as argparse checks flags."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping of option names to values, such as "
                        f"`budget: 5m`, but it holds a {type(data).__name__}")
    keys = _keys(sub)
    out: dict[str, Any] = {}
    problems = []
    for key, value in data.items():
        norm = str(key).lstrip("-").replace("-", "_")
        if norm not in keys:
            allowed = sorted({_key(a.dest) for a, _ in keys.values()})
            close = difflib.get_close_matches(norm.replace("_", "-"), allowed, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(f"unknown key `{key}`{hint}; `loop {sub.prog.split()[-1]}` takes "
                            + ", ".join(allowed))
            continue
        action, how = keys[norm]
        try:
            out[action.dest] = _value(action, value, how)
        except ValueError as exc:
            problems.append(f"`{key}` {exc}")
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return out


def resolved_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options as it runs with them (flags over file over defaults)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and not callable(v)}


def to_yaml(options: dict[str, Any], header: str = "") -> str:
    """Options (by destination) as a ``--config`` file; ``header`` becomes leading comments."""
    import yaml

    body = yaml.safe_dump({_key(k): v for k, v in options.items()}, sort_keys=False,
                          allow_unicode=True, default_flow_style=False)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines + [body.rstrip("\n")]) + "\n"


# ------------------------------------------------------------------ helpers


def _key(dest: str) -> str:
    return dest.replace("_", "-")


def _command_parser(parser, argv):
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if subs is None:
        return None
    command = next((t for t in argv if not t.startswith("-")), None)
    return subs.choices.get(command)


def _given_on_command_line(parser, sub, argv) -> dict[str, Any]:
    """The command's options that ``argv`` itself sets (parsed with every default suppressed)."""
    saved = [(a, a.default, a.required) for a in sub._actions]
    saved_defaults = dict(sub._defaults)
    try:
        for action in sub._actions:
            action.default, action.required = argparse.SUPPRESS, False
        sub._defaults.clear()
        ns = parser.parse_args(argv)
    finally:
        for action, default, required in saved:
            action.default, action.required = default, required
        sub._defaults.update(saved_defaults)
    dests = {a.dest for a in sub._actions}
    return {k: v for k, v in vars(ns).items() if k in dests}


def _keys(sub) -> dict[str, tuple[argparse.Action, str]]:
    """Accepted key (normalised) -> (action, how): "dest" (the value itself), "flag" (true sets
    the flag) or "negated" (``--no-x`` of a ``BooleanOptionalAction``)."""
    keys: dict[str, tuple[argparse.Action, str]] = {}
    for action in sub._actions:
        if not action.option_strings or action.dest in (DEST, argparse.SUPPRESS) or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        keys.setdefault(action.dest, (action, "dest"))
        for opt in action.option_strings:
            if not opt.startswith("--"):
                continue
            how = "flag" if action.nargs == 0 else "dest"
            if isinstance(action, argparse.BooleanOptionalAction) and opt.startswith("--no-"):
                how = "negated"
            keys[opt[2:].replace("-", "_")] = (action, how)
    return keys


def _value(action: argparse.Action, value: Any, how: str) -> Any:
    """The value a key sets, as argparse would store it; ValueError says what is allowed."""
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"cannot be empty (null); its default is {action.default!r}")
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"must be a count (0, 1, 2, ...), but got {value!r}")
        return value
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, but got {value!r}")
        if how == "negated":
            return not value
        if how == "dest" or isinstance(action, argparse.BooleanOptionalAction):
            return value
        if value:
            return action.const
        return not action.const if isinstance(action.const, bool) else action.default
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+") or (
        isinstance(action.nargs, int))
    if many:
        items = value if isinstance(value, list) else [value]
        return [_convert(action, v) for v in items]
    return _convert(action, value)


def _convert(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (bool, list, dict)):
        kind = "true/false" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise ValueError(f"must be {_expects(action)}, but got {kind} ({value!r})")
    text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    result: Any = text
    if action.type is not None:
        try:
            result = action.type(text)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"must be {_expects(action)}, but got {value!r}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, "
                         f"but got {value!r}")
    return result


def _expects(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    names = {int: "an integer", float: "a number"}
    what = names.get(action.type, "a single value" if action.type else "a string")
    return what + (f" ({action.metavar})" if action.metavar else "")
