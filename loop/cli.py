"""Entry point of ``python -m loop``: builds the parser from ``loop.commands`` and dispatches."""

from __future__ import annotations

import argparse
import importlib
import logging
import sqlite3
import sys

from core.exceptions import UserError
from loop.commands import COMMANDS
from loop.config_file import parse_args

log = logging.getLogger(__name__)

PARALLEL_COMMANDS = ("eval", "run")
"""The commands that run on N processes under ``torchrun`` / ``accelerate launch``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loop",
        description="Improve a Russian vision-language model on a budget: evaluate, diagnose, "
        "retrain a LoRA adapter, keep what a paired test says is better.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"loop.commands.{name}")
        module.add_parser(sub)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    import os

    # datasets' own bars ("Generating split", "Creating parquet") are noise next to ours.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # unreachable-hub retries end in one clear error line of ours
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # bitsandbytes logs a traceback at import when an optional CPU kernel package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:  # a --config file's problems are the user's, like a bad flag's
        args = parse_args(parser, argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from core.distributed import world

    try:
        w = world()
        # Only rank 0 speaks: the other processes log warnings and show no progress bars.
        configure_logging(args.verbose and w.is_main, args.quiet or not w.is_main)
        if w.parallel and args.command not in PARALLEL_COMMANDS:
            raise UserError(f"`loop {args.command}` runs in one process, but it was started as "
                            f"process {w.rank} of {w.world_size} (WORLD_SIZE={w.world_size}): "
                            f"only {' and '.join(f'`loop {c}`' for c in PARALLEL_COMMANDS)} run "
                            "on several processes; start it with plain `python -m loop`")
        if w.parallel:
            from loop.parallel import run_parallel

            return run_parallel(args)
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except sqlite3.DatabaseError as exc:
        log.debug("database error", exc_info=True)
        print(f"error: the experiments database {getattr(args, 'db', '')} failed: {exc}. "
              "Check the disk and the file (`sqlite3 FILE 'PRAGMA integrity_check'`); a run "
              "cut short continues with `loop run --resume`.", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder or file the user cannot write or read
        log.debug("OS error", exc_info=True)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot access{where}: {exc.strerror or exc}. Check the path and your "
              "permissions.", file=sys.stderr)
        return 1
