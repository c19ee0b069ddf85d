"""``python -m loop log``: every run and its cycles at a glance."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from loop.commands._common import add_db_arg, add_json_arg, format_table, print_json
from loop.formatting import (
    benchmarks_of,
    format_duration,
    format_p,
    format_pct,
    wilson_interval,
)

if TYPE_CHECKING:
    from loop.store import Store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "log", help="runs and cycles at a glance",
        description="List every run (status, budget, time spent) and each cycle's strategy, "
        "decision, dev accuracy with its 95% interval, paired-test p-value and duration.")
    add_db_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.store import Store

    with Store.open_existing(args.db) as store:
        runs = [summarize_run(store, r) for r in store.runs()]
    if args.json:
        print_json({"runs": runs})
    elif not runs:
        print(f"{args.db} has no runs yet; start one with `python -m loop run --budget 6h --gpu t4`.")
    else:
        print("\n\n".join(render_run(r) for r in runs))
    return 0


def summarize_run(store: Store, run: dict[str, Any]) -> dict[str, Any]:
    """One run in the ``log --json`` shape: the keys the mission asks for, plus a few."""
    summary = {key: run[key] for key in ("id", "status", "budget_s", "spent_s", "preset", "gpu",
                                         "started_at", "finished_at")}
    proposals = store.proposals(run["id"])
    summary["cycles"] = [{
        "index": c["index"], "strategy": c["strategy"], "status": c["status"],
        "dev": c["dev"] or {}, "duration_s": c["duration_s"], "dev_ci": c["dev_ci"] or {},
        "p_value": {b: (t or {}).get("p_value") for b, t in (c["paired"] or {}).items()},
        "alpha": {b: (t or {}).get("alpha") for b, t in (c["paired"] or {}).items()},
        "decision": next((t.get("decision") for t in (c["paired"] or {}).values()
                          if t and t.get("decision")), None),
        "adapter_id": c["adapter_id"],
        **_trials(proposals, c["index"]),
    } for c in store.cycles(run["id"])]
    summary["run_dir"] = str(store.run_dir(run["id"]))
    summary["resumes"] = [{"at": r["at"], "spent_s": r["spent_s"], "redone": r["redone"]}
                          for r in store.resumes(run["id"])]
    summary["objective"] = (run.get("config") or {}).get("objective", "benchmark")
    ended = [p for p in proposals if p["name"] == "cycles-end"]
    if ended:  # why the cycles stopped before the budget's reserve
        summary["cycles_ended"] = ended[-1]["payload"]["reason"]
    if run["status"] == "finished" or run["final"] is not None:
        summary.update(baseline=run["baseline"], final=run["final"], final_n=run["final_n"],
                       final_p=run.get("final_p"))
        if run.get("final_deployed"):
            summary["final_deployed"] = run["final_deployed"]
    return summary


def _trials(proposals: list[dict[str, Any]], index: int) -> dict[str, Any]:
    """``{"trials": {n, complete, pruned, failed, saved_s}}`` for a cycle that ran HPO trials."""
    from loop import trials_view

    trials = trials_view.trials_of([p for p in proposals if p["cycle_index"] == index])
    return {"trials": trials_view.summary(trials)} if trials else {}


def render_run(run: dict[str, Any]) -> str:
    """A run's header, its final numbers (when finished) and its cycle table, for people."""
    lines = [f"run {run['id']}  {run['status']}  preset {run['preset']}  gpu {run['gpu']}  "
             f"budget {format_duration(run['budget_s'])}  spent {format_duration(run['spent_s'])}"
             f"  started {run['started_at']}  objective {run.get('objective', 'benchmark')}"]
    resumes = run.get("resumes") or []
    if resumes:
        lines.append(f"  resumed {len(resumes)} time{'s' if len(resumes) > 1 else ''}: " + ", ".join(
            f"{r['at']} (after {format_duration(r['spent_s'])})" for r in resumes))
    if run.get("run_dir"):
        lines.append(f"  files: {run['run_dir']}")
    final_n = run.get("final_n") or {}
    for label, key in (("base model (lmms-eval protocol)", "baseline"),
                       ("champion's adapter (lmms-eval protocol)", "final"),
                       ("champion with its settings (deployment)", "final_deployed")):
        values = run.get(key) or {}
        if values:
            parts = []
            for bench, value in values.items():
                n = final_n.get(bench)
                ci = wilson_interval(value, n) if n else None
                parts.append(f"{bench} {format_pct(value, ci)}" + (f" n={n}" if n else ""))
            lines.append(f"  {label} on the final split: " + ", ".join(parts))
    if run.get("final_p"):
        lines.append("  champion vs base on the final split (cluster-aware paired test): "
                     + ", ".join(f"{b} p={format_p(p)}" for b, p in run["final_p"].items()))
    cycles = run["cycles"]
    if not cycles:
        lines.append("  no cycles yet")
        return "\n".join(lines)
    benches = benchmarks_of([c["dev"] for c in cycles])
    headers = ["cycle", "strategy", "status"] + [f"{b} dev" for b in benches]
    headers += [f"p {b}" for b in benches] + ["duration"]
    rows = []
    for c in cycles:
        row = [c["index"], c["strategy"], c["status"]]
        row += [format_pct(c["dev"].get(b), c["dev_ci"].get(b)) for b in benches]
        row += [format_p(c["p_value"].get(b)) for b in benches]
        rows.append(row + [format_duration(c["duration_s"])])
    lines.append("  " + format_table(headers, rows).replace("\n", "\n  "))
    for c in cycles:
        if c.get("trials"):
            from loop.trials_view import summary_line

            lines.append(f"  cycle {c['index']}: {summary_line(c['trials'], format_duration)}")
    if run.get("cycles_ended"):
        lines.append(f"  cycles ended: {run['cycles_ended']}")
    return "\n".join(lines)
