"""``python -m loop rescore``: score a samples JSONL again, under another metric mode."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loop.commands._common import add_json_arg, add_output_path_arg, format_table, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("rescore", help="score stored samples again under another metric mode",
                       description="Read a <date>_samples_<task>.jsonl written by --output_path "
                       "and score it again from the raw answers, without generating: GQA-ru "
                       "exact match (lmms, the published protocol) or normalized (Russian-aware); "
                       "MMBench-ru circular (the published protocol) or per_row.")
    p.add_argument("samples", metavar="SAMPLES.jsonl", help="a samples file from --output_path")
    p.add_argument("--mode", choices=("lmms", "normalized", "circular", "per_row"),
                   help="the headline metric: lmms|normalized (gqa_ru), circular|per_row "
                   "(mmbench_ru); default: the published protocol's")
    add_output_path_arg(p, "the rescored results and samples")
    add_json_arg(p)
    p.set_defaults(func=run)


def sibling_results(samples: Path, task: str) -> dict | None:
    """The results JSON written with ``samples`` (same folder and date), if it is there."""
    suffix = f"_samples_{task}.jsonl"
    if not samples.name.endswith(suffix):
        return None
    path = samples.with_name(f"{samples.name[:-len(suffix)]}_results.json")
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def run(args: argparse.Namespace) -> int:
    from core.evaluate import summarize
    from core.outputs import FILTERS, LMMS_TASKS, TaskOutput, task_results, write_outputs
    from core.rescore import MODES, check_mode, read_samples, rescore
    from loop.outputs import harness_config, version

    path = Path(args.samples)
    task, lines = read_samples(path)
    mode = check_mode(task, args.mode)
    samples = rescore(task, lines)
    metrics = summarize(task, samples)
    results = task_results(task, metrics, samples)
    headline = f"{MODES[task][mode]},{FILTERS[task]}"
    before = sibling_results(path, LMMS_TASKS[task])
    recorded = (before or {}).get("results", {}).get(LMMS_TASKS[task], {})
    out = {"task": task, "mode": mode, "samples": str(path), "headline": headline,
           "value": results[headline],
           "stderr": results[headline.replace(",", "_stderr_clustered,")],
           "ci95": results[headline.replace(",", "_ci95,")], "n": len(samples),
           "recorded": recorded.get(headline), "results": results, "metrics": metrics}
    if args.output_path:
        cfg = (before or {}).get("configs", {}).get(LMMS_TASKS[task], {})
        model = (before or {}).get("loop", {}).get("model") or {"source": path.parent.name}
        config = (before or {}).get("config") or harness_config(
            model, batch_size=None, device=None, limit=None, seed=0)
        likelihood = lines[0]["output_type"] == "loglikelihood"
        t = TaskOutput(benchmark=task, split=cfg.get("test_split", "all"),
                       protocol=cfg.get("protocol") or f"rescored from {path.name}",
                       config=cfg.get("eval_config") or {"mode": "likelihood" if likelihood
                                                         else "generate"},
                       metrics=metrics, samples=samples,
                       n_original=(before or {}).get("n-samples", {}).get(LMMS_TASKS[task],
                                                                          {}).get("original"))
        files = write_outputs(args.output_path, [t], model=model, config=config, version=version(),
                              extra={"rescored_from": str(path), "mode": mode,
                                     "headline": headline})
        out["output_files"] = {k: str(v) for k, v in files.items()}
    if args.json:
        print_json(out)
        return 0
    rows = []
    for name in MODES[task].values():
        key = f"{name},{FILTERS[task]}"
        low, high = results[key.replace(",", "_ci95,")]
        se = results[key.replace(",", "_stderr_clustered,")]
        rows.append([name + (" *" if key == headline else ""), f"{100 * results[key]:.1f}",
                     f"[{100 * low:.1f}, {100 * high:.1f}]", "-" if se == "N/A" else f"{100 * se:.2f}",
                     "-" if key not in recorded else f"{100 * recorded[key]:.1f}"])
    n = metrics["n"] if task == "gqa_ru" else f"{metrics['n']} groups, {metrics['n_rows']} rows"
    print(f"{task} rescored from {path} ({len(samples)} samples, n = {n}); mode {mode}, "
          "headline marked *")
    print(format_table(["metric", "%", "95% CI", "stderr", "recorded %"], rows))
    for path_ in out.get("output_files", {}).values():
        print(f"wrote {path_}")
    return 0
