"""A consumer of lmms-eval 0.7.2's ``--output_path`` files, written against lmms-eval's own code.

``parse_output_directory`` is ``JobScheduler._parse_output_directory``
(lmms_eval/entrypoints/job_scheduler.py) and ``load_baseline`` is
``_load_baseline_from_local`` with ``_extract_score_from_sample`` (lmms_eval/baselines/loader.py),
both from EvolvingLMMs-Lab/lmms-eval at commit 75571cfe (v0.7.2), copied with only logging
removed; ``summary`` reads what a script reads from lmms-eval's results and samples files.
Not part of the project: the tests run it on our files.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path


def parse_output_directory(output_path: str) -> dict:
    output_dir = Path(output_path)
    if not output_dir.exists():
        return {}
    result = {}
    for model_dir in output_dir.iterdir():
        if not model_dir.is_dir():
            continue
        model_name = model_dir.name
        timestamps = defaultdict(lambda: {"results": None, "samples": []})
        for file in model_dir.glob("*_results.json"):
            timestamp = file.name.split("_results.json")[0]
            timestamps[timestamp]["results"] = str(file)
        for file in model_dir.glob("*_samples_*.jsonl"):
            timestamp = file.name.split("_samples_")[0]
            timestamps[timestamp]["samples"].append(str(file))
        if not timestamps:
            continue
        sorted_ts = sorted(timestamps.keys(), reverse=True)
        result[model_name] = timestamps[sorted_ts[0]]
    return result


def load_baseline(path: str, task_name: str):
    doc_id_to_scores = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            sample = json.loads(line)
            doc_id = sample.get("doc_id")
            if doc_id is None:
                continue
            score = _extract_score_from_sample(sample, task_name)
            if score is not None:
                doc_id_to_scores[doc_id] = score
    agg_results = None
    dir_path = os.path.dirname(path)
    base_name = os.path.basename(path)
    parts = base_name.split("_samples_")
    if len(parts) == 2:
        results_path = os.path.join(dir_path, parts[0] + "_results.json")
        if os.path.exists(results_path):
            with open(results_path) as f:
                agg_results = json.load(f)
    return doc_id_to_scores, agg_results


def _extract_score_from_sample(sample: dict, task_name: str) -> float | None:
    for key in sample:
        if "score" in key.lower():
            val = sample[key]
            if isinstance(val, (int, float)):
                return float(val)
            elif isinstance(val, dict):
                pred = val.get("pred_answer") or val.get("pred")
                ans = val.get("answer") or val.get("target")
                if pred and ans:
                    return 1.0 if str(pred).strip().upper() == str(ans).strip().upper() else 0.0
    target = sample.get("target")
    filtered_resps = sample.get("filtered_resps")
    if target and filtered_resps:
        pred = filtered_resps[0] if isinstance(filtered_resps, list) else filtered_resps
        if isinstance(pred, list):
            pred = pred[0] if pred else ""
        return 1.0 if str(pred).strip().upper() == str(target).strip().upper() else 0.0
    return None


HEADLINE = {"gqa-ru": "exact_match,none", "mmbench_ru_dev": "gpt_eval_score,none"}
"""The key lmms-eval 0.7.2 writes each task's score under (gqa_ru.yaml, mmbench_ru_dev.yaml)."""


def summary(output_path: str) -> dict:
    """What a script reads from every model's newest files: per task, the score and its
    standard error, the run's metadata, and per sample the input, the answer and the target."""
    out = {}
    for model, files in parse_output_directory(output_path).items():
        with open(files["results"], encoding="utf-8") as f:
            doc = json.load(f)
        tasks = {}
        for task, res in doc["results"].items():
            key = HEADLINE[task]
            se = res[key.replace(",", "_stderr,")]
            tasks[task] = {"score": res[key], "stderr": None if se == "N/A" else float(se),
                           "n": doc["n-samples"][task]["effective"], "samples": []}
        for path in files["samples"]:
            task = Path(path).name.split("_samples_")[1][: -len(".jsonl")]
            scores, agg = load_baseline(path, task)
            assert agg == doc
            with open(path, encoding="utf-8") as f:
                for line in f:
                    s = json.loads(line)
                    tasks[task]["samples"].append({
                        "doc_id": s["doc_id"], "input": s["input"], "target": s["target"],
                        "answer": s["filtered_resps"], "exact_match": s.get("exact_match"),
                        "baseline_score": scores.get(s["doc_id"])})
        out[model] = {"date": doc["date"], "lmms_eval_version": doc["lmms_eval_version"],
                      "git_hash": doc["git_hash"], "model_name": doc["model_name"],
                      "seconds": float(doc["total_evaluation_time_seconds"]),
                      "elapsed": doc["end_time"] - doc["start_time"], "tasks": tasks}
    return out


def mean_stderr(values: list[float]) -> float:
    """lmms-eval's ``mean_stderr`` (api/metrics.py): sample standard deviation / sqrt(n)."""
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))
