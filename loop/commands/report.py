"""``python -m loop report``: write a run's report as Markdown and self-contained HTML."""

from __future__ import annotations

import argparse
from pathlib import Path

from loop.commands._common import add_db_arg, add_json_arg, print_json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="Markdown + HTML report with plots",
        description="Write a run's report: base model vs champion on the held-out final split "
        "(n, 95% intervals, protocol, the published scores for context), plots of dev "
        "accuracy and error causes per cycle, the decisions and why, and examples of fixed "
        "and still-wrong answers. The HTML page is self-contained (no script, nothing "
        "fetched). The report's path is recorded with the run.")
    parser.add_argument("--run", type=int, metavar="ID", help="run id (default: the latest run)")
    parser.add_argument("--out", metavar="PATH",
                        help="the Markdown file (the HTML goes beside it) or a folder "
                        "(default: report/report.md and report.html in the run's folder, "
                        "<db stem>.runs/run-<id>/)")
    add_db_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.report import build_report, write_report
    from loop.store import Store

    with Store.open_existing(args.db) as store:
        report = build_report(store, args.run)
        run_id = report.run["id"]
        out = (Path(args.out) if args.out
               else store.run_dir(run_id) / "report" / "report.md")
        md_path, html_path = write_report(report, out)
        store.update_run(run_id, report_path=str(md_path))
    if args.json:
        print_json({"run_id": run_id, "markdown": str(md_path), "html": str(html_path)})
    else:
        print(f"report of run {run_id}:")
        print(f"  {md_path}")
        print(f"  {html_path}")
    return 0
