"""``python -m loop compare``: two runs side by side, possibly from two databases."""

from __future__ import annotations

import argparse
from pathlib import Path

from loop.commands._common import add_db_arg, add_json_arg, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="two runs side by side (Markdown or HTML)",
        description="Compare two runs: their final scores with 95%% intervals, a cluster-aware "
        "paired test of the two champions on the final questions both answered, the questions "
        "one run fixed and the other did not, and their decision paths cycle by cycle. RUN_B "
        "is read from --db-b when given (another database), else from --db.")
    parser.add_argument("run_a", type=int, metavar="RUN_A", help="id of the first run (A)")
    parser.add_argument("run_b", type=int, metavar="RUN_B", help="id of the second run (B)")
    add_db_arg(parser)
    parser.add_argument("--db-b", metavar="PATH",
                        help="the database of RUN_B (default: the same as --db)")
    parser.add_argument("--out", metavar="FILE",
                        help="write the page to FILE.md (Markdown) or FILE.html (self-contained "
                        "HTML) instead of printing the Markdown")
    parser.add_argument("--examples", type=int, default=10, metavar="N",
                        help="fixed questions listed per run and benchmark (default 10)")
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.exceptions import UserError
    from loop.compare import compare_runs
    from loop.compare_page import render_markdown, write_page
    from loop.store import Store

    if args.out and Path(args.out).suffix not in (".md", ".html"):
        raise UserError(f"--out must name a .md or .html file, but got '{args.out}'")
    if args.examples < 0:
        raise UserError(f"--examples must be >= 0, but got {args.examples}")
    db_b = args.db_b or args.db
    same_db = Path(db_b).resolve() == Path(args.db).resolve()
    if same_db and args.run_a == args.run_b:
        raise UserError(f"RUN_A and RUN_B are both run {args.run_a} of {args.db}: name two "
                        "different runs, or give the second one's database with --db-b.")
    with Store.open_existing(args.db) as store_a:
        if same_db:
            comparison = compare_runs(store_a, args.run_a, store_a, args.run_b,
                                      limit=args.examples)
        else:
            with Store.open_existing(db_b) as store_b:
                comparison = compare_runs(store_a, args.run_a, store_b, args.run_b,
                                          limit=args.examples)
    if args.out:
        path = write_page(comparison, Path(args.out))
    if args.json:
        print_json({**comparison.to_dict(), **({"out": str(path)} if args.out else {})})
    elif args.out:
        print(f"comparison of run {args.run_a} (A) and run {args.run_b} (B) written to {path}")
    else:
        print(render_markdown(comparison), end="")
    return 0
