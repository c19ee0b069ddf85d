"""``python -m loop show CYCLE``: one cycle's decision, why, errors and examples;
``python -m loop show --config [RUN]``: the YAML file that reproduces a run."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from core.exceptions import UserError
from loop import trials_view
from loop.commands._common import add_db_arg, add_json_arg, format_table, print_json
from loop.formatting import (
    benchmarks_of,
    compare,
    format_duration,
    format_p,
    format_pct,
    wilson_interval,
)

BASELINE_RATIONALE = ("the base model as it is, before any change: the first champion, which "
                      "every cycle is compared with")

if TYPE_CHECKING:
    from loop.store import Store


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "show", help="one cycle: errors, examples, decision, why",
        description="Show one cycle of a run: the strategy and why it was chosen, the candidate, "
        "its dev accuracy with 95% intervals and the paired test against the champion, the "
        "error profile, and answers it fixed or still gets wrong.")
    parser.add_argument("cycle", type=int, metavar="CYCLE", nargs="?",
                        help="cycle index as listed by `python -m loop log` (0 is the baseline "
                        "when the run recorded no cycle 0)")
    parser.add_argument("--config", dest="config_run", nargs="?", const=0, type=int,
                        metavar="RUN", help="print instead the run's resolved options as a YAML "
                        "file that `loop run --config FILE` reproduces it with (default: --run, "
                        "or the latest run)")
    parser.add_argument("--run", type=int, metavar="ID", help="run id (default: the latest run)")
    parser.add_argument("--examples", type=int, default=5, metavar="N",
                        help="examples of each kind per benchmark (default: 5)")
    add_db_arg(parser)
    add_json_arg(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.store import Store

    if args.cycle is None and args.config_run is None:
        raise UserError("say what to show: a CYCLE (listed by `python -m loop log`), or "
                        "--config [RUN] for the file that reproduces a run")
    run_id = args.run if not args.config_run else args.config_run  # 0: --config without RUN
    with Store.open_existing(args.db) as store:
        run_row = store.get_run(run_id) if run_id is not None else store.latest_run()
        if run_row is None:
            raise UserError(f"{args.db} has no runs yet; start one with "
                            "`python -m loop run --budget 6h --gpu t4`.")
        if args.config_run is not None:
            options = run_options(run_row)
            if args.json:
                print_json({"run_id": run_row["id"], "options": options})
            else:
                print(config_yaml(run_row, options, args.db), end="")
            return 0
        view = cycle_view(store, run_row["id"], args.cycle, args.examples)
    if args.json:
        print_json(view)
    else:
        print(render(view))
    return 0


def run_options(run_row: dict[str, Any]) -> dict[str, Any]:
    """The options ``loop run`` resolved for a run (read back from its RunConfig when the run
    was recorded before the options were)."""
    config = run_row.get("config") or {}
    if config.get("options"):
        return dict(config["options"])
    options = {k: v for k, v in config.items() if k not in ("alpha", "progress", "options")}
    options["budget"] = f"{options.pop('budget_s'):g}s"
    options["reserve"] = options.pop("reserve_fraction")
    options["strategies"] = ",".join(options.get("strategies") or [])
    return options


def config_yaml(run_row: dict[str, Any], options: dict[str, Any], db: str) -> str:
    from loop.config_file import to_yaml

    header = (f"Run {run_row['id']} of {db} ({run_row['status']}, started "
              f"{run_row['started_at']}): its resolved options.\n"
              "Reproduce it with `python -m loop run --config THIS.yaml`; flags given on the "
              "command line override the file.")
    return to_yaml({k: v for k, v in options.items() if k != "resume"}, header)


def cycle_view(store: Store, run_id: int, index: int, limit: int = 5) -> dict[str, Any]:
    """Everything ``show`` prints about one cycle, as one JSON-ready dict."""
    cycles = store.cycles(run_id)
    baseline_evals = {e["benchmark"]: e for e in store.evaluations(run_id, role="baseline")}
    cycle = next((c for c in cycles if c["index"] == index), None)
    if cycle is None and index == 0 and baseline_evals:
        cycle = baseline_cycle(store, run_id, baseline_evals)
    if cycle is None:
        valid = [c["index"] for c in cycles]
        if baseline_evals and 0 not in valid:
            valid.insert(0, 0)
        listed = ", ".join(map(str, valid)) if valid else "none yet"
        raise UserError(f"run {run_id} has no cycle {index}; valid cycles: {listed}. "
                        "See them with `python -m loop log`.")
    for key in ("candidate", "dev", "dev_ci", "paired", "error_profile", "eval_ids"):
        cycle[key] = cycle[key] or {}
    cycle["subsets"] = cycle.get("subsets") or {}
    champion = champion_eval_ids(cycles, baseline_evals, before=index)
    judged = cycle["subsets"].get("judged") or {}
    champion.update({b: j["champion_eval_id"] for b, j in judged.items()
                     if j.get("champion_eval_id") is not None})
    examples = {}
    for bench, eval_id in cycle["eval_ids"].items():
        previous = champion.get(bench) if cycle["status"] != "baseline" else None
        examples[bench] = compare(store.predictions(previous) if previous else None,
                                  store.predictions(eval_id), limit)
    proposals = store.proposals(run_id, index)
    return {"run_id": run_id, **cycle, "decision": decision(cycle),
            "champion_eval_ids": champion, "examples": examples,
            "run_dir": str(store.run_dir(run_id)), "trials": trials_view.trials_of(proposals),
            "proposals": [{"name": p["name"], "data_file": p["data_file"],
                           "data_sha256": p["data_sha256"], "payload": p["payload"]}
                          for p in proposals]}


def baseline_cycle(store: Store, run_id: int, evals: dict[str, dict]) -> dict[str, Any]:
    """Cycle 0 built from the baseline evaluations when the run did not record one; its error
    profile is the base model's on the analysis subset (what the first choice saw), or on dev
    for runs recorded before there was one."""
    analysis = {e["benchmark"]: e for e in store.evaluations(run_id, role="analysis")
                if e["cycle_index"] is None}
    profile, sides = {}, {}
    for bench, ev in (analysis or evals).items():
        preds = store.predictions(ev["id"])
        wrong = [p for p in preds if not p["correct"]]
        profile[bench] = dict(Counter(label for p in wrong for label in p["labels"]))
        sides[bench] = {"subset": "analysis", "eval_id": ev["id"], "n": len(preds),
                        "units": len({p["cluster"] for p in preds})}
    dev = {b: e["metrics"].get("accuracy") for b, e in evals.items()}
    dev_ci = {b: wilson_interval(dev[b], e["n"]) for b, e in evals.items()
              if dev[b] is not None and e["n"]}
    return {
        "index": 0, "strategy": "baseline", "status": "baseline", "rationale": BASELINE_RATIONALE,
        "candidate": {}, "dev": dev, "dev_ci": dev_ci, "paired": {}, "error_profile": profile,
        "duration_s": sum(e["seconds"] or 0 for e in evals.values()), "adapter_id": None,
        "eval_ids": {b: e["id"] for b, e in evals.items()}, "error": None,
        "subsets": {"profile": sides} if analysis else {},
    }


def champion_eval_ids(cycles: list[dict], baseline_evals: dict[str, dict],
                      before: int) -> dict[str, int]:
    """Per benchmark, the evaluation of the champion in force when cycle ``before`` ran."""
    ids = {bench: ev["id"] for bench, ev in baseline_evals.items()}
    for c in cycles:
        if c["index"] < before and c["status"] == "accepted":
            ids.update(c["eval_ids"] or {})
    return ids


def decision(cycle: dict[str, Any]) -> str:
    """The decision in words."""
    return {
        "accepted": "accepted: the candidate is the new champion",
        "rejected": "rejected: the champion stays",
        "failed": f"failed: {cycle.get('error') or 'no error recorded'}",
        "baseline": "baseline: the starting champion",
    }.get(cycle["status"], cycle["status"])


UNITS = {"gqa_ru": "images", "mmbench_ru": "question groups"}


def _sizes(sides: dict[str, dict]) -> str:
    return ", ".join(f"{b} n={x['n']} ({x['units']} {UNITS.get(b, 'units')})"
                     for b, x in sides.items())


def subset_lines(subsets: dict[str, Any]) -> list[str]:
    """Which subset played which role in the cycle, and where a dev evaluation stopped."""
    lines = []
    if subsets.get("profile"):
        lines.append("error profile from: the analysis subset, "
                     + _sizes(subsets["profile"]))
    judged = subsets.get("judged") or {}
    for name, verb in (("dev", "judged on: the dev subset, "),
                       ("analysis", "measured on: the analysis subset (no test), ")):
        mine = {b: x for b, x in judged.items() if x["subset"] == name}
        if mine:
            lines.append(verb + _sizes(mine))
    for b, x in judged.items():
        p = x.get("progress") or {}
        if p.get("stopped"):
            lines.append(f"{b}: stopped for futility after {p['units_done']}/"
                         f"{p['units_total']} {UNITS.get(b, 'units')} ({p['n_done']}/"
                         f"{p['n_total']} questions, {p['seconds']:.1f} s of an estimated "
                         f"{p['full_s_est']:.1f} s)")
    return lines


def profile_rows(profile: dict[str, Any]) -> list[list[Any]]:
    """Rows of (benchmark, label, count, share) from ``{bench: ErrorProfile.to_dict()}``,
    ``{bench: {label: n}}`` or ``{label: n}``."""
    nested = {k: v for k, v in profile.items() if isinstance(v, dict)}
    groups = nested or {"all": profile}
    rows = []
    for bench, counts in groups.items():
        counts = counts.get("counts", counts)  # an ErrorProfile.to_dict() or plain counts
        counts = {k: v for k, v in counts.items() if isinstance(v, (int, float))}
        total = sum(counts.values())
        for label, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            rows.append([bench, label, count, f"{100 * count / total:.0f}%" if total else "-"])
    return rows


def _short(text: Any, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(view: dict[str, Any]) -> str:
    """The cycle for people."""
    lines = [f"run {view['run_id']}, cycle {view['index']}: {view['strategy']}",
             f"decision: {view['decision']}", f"why: {view['rationale']}"]
    if view["candidate"]:
        lines.append("candidate: " + json.dumps(view["candidate"], ensure_ascii=False))
    if view["adapter_id"] is not None:
        lines.append(f"adapter: {view['adapter_id']}")
    lines.append(f"duration: {format_duration(view['duration_s'])}")
    sizing = ((view["candidate"] or {}).get("details") or {}).get("sizing")
    if sizing:
        from strategies.sizing import describe

        lines.append(describe(sizing))
    lines += subset_lines(view.get("subsets") or {})
    lines.append(f"files: {view['run_dir']}")
    for p in view.get("proposals", []):
        if p["data_file"]:
            lines.append(f"trained on: {p['data_file']} (sha256 {p['data_sha256'][:12]}…, "
                         f"{p['payload'].get('config', {}).get('steps')} steps)")
    decision = next((t.get("decision") for t in view["paired"].values()
                     if isinstance(t, dict) and t.get("decision")), None)
    if decision:
        lines.append(f"rule: {decision}")
    benches = benchmarks_of([view["dev"], view["paired"]])
    if benches:
        rows = []
        for bench in benches:
            test = dict(view["paired"].get(bench) or {})
            p_value = test.pop("p_value", None)
            # the cycle-level decision is printed above; the reason already has p, α_k, diff
            details = test.get("reason") or ", ".join(
                f"{k}={_short(v, 40)}" for k, v in test.items()
                if k not in ("decision", "setting_only"))
            accuracy = (format_pct(view["dev"].get(bench), view["dev_ci"].get(bench))
                        if view["dev"] else format_pct(test.get("candidate_acc")))
            rows.append([bench, accuracy, format_p(p_value), details])
        judged = (view.get("subsets") or {}).get("judged") or {}
        title = ("dev accuracy [95% interval] and the paired test against the champion:"
                 if view["dev"] or not judged else "measured on the analysis subset against the "
                 "champion there (no test, no α spent; its p is descriptive):")
        lines += ["", title, format_table(["benchmark", "accuracy", "p-value", "test"], rows)]
    if view.get("trials"):
        lines += ["", trials_view.summary_line(trials_view.summary(view["trials"]),
                                               format_duration) + ":",
                  format_table(trials_view.HEADERS, trials_view.rows(view["trials"]))]
    rows = profile_rows(view["error_profile"])
    if rows:
        lines += ["", "error profile (what the policy saw when it chose):",
                  format_table(["benchmark", "label", "count", "share"], rows)]
    noun = "questions" if view["status"] == "baseline" else "paired questions"
    for bench, ex in view["examples"].items():
        lines += ["", f"{bench}: {ex['fixed_n']} fixed, {ex['broken_n']} broken, "
                  f"{ex['still_wrong_n']} still wrong of {ex['paired_n']} {noun}"]
        for kind in ("fixed", "still_wrong"):
            if ex[kind]:
                lines.append(f"  {kind.replace('_', ' ')}:")
            for e in ex[kind]:
                labels = f"  [{', '.join(e['labels'])}]" if e["labels"] else ""
                lines.append(f"    {e['sample_id']}: {_short(e['question'])}{labels}")
                before = f"before {_short(e['before'], 60)!r} -> " if e["before"] is not None else ""
                lines.append(f"      gold {e['answer']!r}; {before}now {_short(e['after'], 60)!r}")
    return "\n".join(lines)
