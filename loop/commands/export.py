"""``python -m loop export``: the pinned adapter in PEFT format, its model card and report."""

from __future__ import annotations

import argparse
from pathlib import Path

from loop.commands._common import add_db_arg, add_json_arg, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="pinned adapter (PEFT format) + model card + report",
        description="Export the pinned adapter (see `python -m loop pin`) or the one given by "
        "--adapter: DIR/adapter holds the PEFT files (PeftModel.from_pretrained(base, "
        "'DIR/adapter') loads them), DIR/README.md is a model card with the final numbers and "
        "how they were measured, beside the run's report (Markdown and HTML), "
        "benchmark_results.json and error_analysis.json.")
    parser.add_argument("--out", metavar="DIR",
                        help="the export folder (default: export/adapter-<id> in the adapter's run "
                        "folder, <db stem>.runs/run-<id>/)")
    parser.add_argument("--adapter", type=int, metavar="ID",
                        help="export this adapter instead of the pinned one")
    add_db_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.export import export_adapter
    from loop.store import Store

    with Store.open_existing(args.db) as store:
        result = export_adapter(store, Path(args.out) if args.out else None, args.adapter)
    if args.json:
        print_json({"out": str(result.out), "adapter_id": result.adapter_id,
                    "run_id": result.run_id, "files": [str(f) for f in result.files]})
        return 0
    print(f"exported adapter {result.adapter_id} (run {result.run_id}) to {result.out}:")
    for path in result.files:
        print(f"  {path}")
    print(f"load it with PeftModel.from_pretrained(base, '{result.out / 'adapter'}')")
    return 0
