"""Evaluation outputs in lm-evaluation-harness / lmms-eval's shape: a results JSON and samples JSONL.

Under ``OUTPUT_PATH/<model_name_sanitized>/`` (the harness's layout; the adapter's path names the
model when there is one, as lm-eval's ``peft=`` does):

- ``results_<date>.json``: ``results`` per task with ``"<metric>,<filter>"`` keys, their
  ``"<metric>_stderr,<filter>"`` and our 95% interval ``"<metric>_ci95,<filter>"``; ``configs``
  (prompt, generation kwargs, protocol), ``versions`` (this package's version, which scored), ``n-shot``, ``higher_is_better``,
  ``n-samples`` (``original``: the split, ``effective``: rows answered), ``config`` (model,
  ``model_args``, batch size, limit, seed), ``task_hashes``, and ``loop`` (ours: protocol,
  how the interval is made, the full metrics with per-category breakdowns, the model and
  adapter). Validated against ``core/schemas/eval_results.schema.json`` before it is written.
- ``samples_<task>_<date>.jsonl``: one line per question (``core/schemas/eval_sample.schema.json``):
  the harness's ``doc_id``, ``target``, ``resps``, ``filtered_resps``, ``filter``, ``metrics``
  with each metric's value and the hashes, beside ours: ``id``, ``image_id``, ``prompt``,
  ``output`` (raw), ``parsed``, ``correct``, ``labels`` (error classes), ``category``, ...

``stderr`` is the cluster-robust standard error over the same units as the interval (GQA-ru
images, MMBench-ru question groups); with one question per unit it equals lm-eval's sample
standard error of the mean.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path

from core.metrics import ROTATION_BASE, group_outcomes

SCHEMA_DIR = Path(__file__).parent / "schemas"
LMMS_TASKS = {"gqa_ru": "gqa-ru", "mmbench_ru": "mmbench_ru_dev"}
"""The lmms-eval task each benchmark reproduces (its ``alias`` in ``results``)."""
FILTERS = {"gqa_ru": "none", "mmbench_ru": "letter"}
"""GQA-ru scores the raw answer; MMBench-ru the letter parsed from it by rules."""
METRICS = {"gqa_ru": {"exact_match": ("accuracy", "ci"),
                      "exact_match_normalized": ("accuracy_normalized", "ci_normalized")},
           "mmbench_ru": {"circular_accuracy": ("accuracy", "ci"),
                          "per_row_accuracy": ("per_row", "ci_per_row")}}
"""Harness metric name -> (key of the value, key of its interval) in ``core.evaluate.summarize``."""
INTERVALS = {"gqa_ru": "95% cluster bootstrap over images (2000 resamples)",
             "mmbench_ru": "95% Wilson interval (circular: over question groups; per row: over rows)"}


@dataclass
class TaskOutput:
    """One benchmark's evaluation: what was asked, how, and what came back."""

    benchmark: str
    split: str
    protocol: str
    config: dict
    """The ``EvalConfig`` as a dict (instruction, decoding, mode)."""
    metrics: dict
    """``core.evaluate.summarize`` output (plus speed figures)."""
    samples: list[dict]
    """Per-sample records as ``core.evaluate`` makes them."""
    examples: list[dict | None] = field(default_factory=list)
    """The dataset records, aligned with ``samples`` (for image ids and options), or empty."""
    n_original: int | None = None
    """Questions in the split before any subset."""
    seconds: float = 0.0


def sanitize_model_name(name: str) -> str:
    """lm-evaluation-harness's folder name for a model: runs of ``"<>:/|\\?*[]`` become ``__``."""
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", name)


def hash_string(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stderr(values: list[float], clusters: list | None = None) -> float | None:
    """Cluster-robust standard error of the mean (None with fewer than two units)."""
    n = len(values)
    keys = clusters if clusters is not None else range(n)
    if n == 0:
        return None
    mean = sum(values) / n
    sums: dict = {}
    for v, k in zip(values, keys, strict=True):
        sums[k] = sums.get(k, 0.0) + v - mean
    c = len(sums)
    if c < 2:
        return None
    return math.sqrt(c / (c - 1) * sum(s * s for s in sums.values())) / n


def _per_unit(benchmark: str, samples: list[dict], metric: str) -> tuple[list[float], list | None]:
    """The outcomes a metric averages, and their clusters."""
    if benchmark == "gqa_ru":
        key = "correct" if metric == "exact_match" else "correct_normalized"
        clusters = [s.get("cluster") for s in samples]
        return [float(bool(s[key])) for s in samples], None if None in clusters else clusters
    if metric == "circular_accuracy":
        return [float(v) for v in group_outcomes(samples).values()], None
    return ([float(bool(s["correct"])) for s in samples],
            [int(s["index"]) % ROTATION_BASE for s in samples])


def task_results(benchmark: str, metrics: dict, samples: list[dict]) -> dict:
    """``results[task]``: each metric, its stderr and its 95% interval, harness-keyed."""
    filt = FILTERS[benchmark]
    out: dict = {"alias": LMMS_TASKS[benchmark]}
    for name, (value, ci) in METRICS[benchmark].items():
        values, clusters = _per_unit(benchmark, samples, name)
        out[f"{name},{filt}"] = metrics[value]
        out[f"{name}_stderr,{filt}"] = stderr(values, clusters)
        out[f"{name}_ci95,{filt}"] = list(metrics[ci])
    return out


def image_id(benchmark: str, sample: dict, example: dict | None) -> str:
    """GQA-ru: the imageId; MMBench-ru: the original question's index (rotations share it)."""
    if benchmark == "gqa_ru":
        return str((example or {}).get("imageId") or sample.get("cluster"))
    return str(int(sample.get("index", sample["sample_id"])) % ROTATION_BASE)


def sample_line(benchmark: str, doc_id: int, sample: dict, example: dict | None,
                output_type: str) -> dict:
    """One samples-JSONL line: the harness's keys beside the per-sample record's own."""
    filt = FILTERS[benchmark]
    names = list(METRICS[benchmark])
    line: dict = {"doc_id": doc_id, "task": benchmark, "id": str(sample["sample_id"]),
            "image_id": image_id(benchmark, sample, example), "question": sample["question"],
            "prompt": sample["prompt"], "target": str(sample["answer"]),
            "resps": [[sample["output"]]], "filtered_resps": [sample["parsed"]], "filter": filt,
            "output_type": output_type}
    if benchmark == "gqa_ru":
        line["metrics"] = names
        line["exact_match"] = float(bool(sample["correct"]))
        line["exact_match_normalized"] = float(bool(sample["correct_normalized"]))
    else:  # circular accuracy is a question group's outcome, not a row's
        line["metrics"] = ["per_row_accuracy"]
        line["per_row_accuracy"] = float(bool(sample["correct"]))
        line["index"] = int(sample["index"])
        line["n_options"] = sample.get("n_options")
        if example is not None:
            line["options"] = dict(example["options"])
    line.update({"output": sample["output"], "parsed": sample["parsed"],
                 "correct": bool(sample["correct"]), "labels": list(sample.get("labels") or []),
                 "image_ok": bool(sample.get("image_ok", True)), "category": sample.get("category"),
                 "cluster": sample.get("cluster"), "seconds": sample.get("seconds")})
    line["doc_hash"] = hash_string(json.dumps([line["id"], line["question"]], ensure_ascii=False))
    line["prompt_hash"] = hash_string(line["prompt"])
    line["target_hash"] = hash_string(line["target"])
    return line


def task_config(task: TaskOutput) -> dict:
    """``configs[task]``: the prompt, the generation kwargs, the protocol."""
    from core.evaluate import GQA_INSTRUCTION, LMMS_MAX_NEW_TOKENS, LMMS_STOP, MMB_INSTRUCTION

    c, b = task.config, task.benchmark
    likelihood = c.get("mode") == "likelihood"
    if b == "gqa_ru":
        template = "{question}\n" + (c.get("instruction") or GQA_INSTRUCTION)
    else:
        template = ("{hint} {question}" + c.get("option_header", "") + "\n{options}\n\n"
                    + (c.get("instruction") or MMB_INSTRUCTION))
    return {
        "task": b, "lmms_eval_task": LMMS_TASKS[b], "test_split": task.split,
        "output_type": "loglikelihood" if likelihood else "generate_until",
        "doc_to_text": template, "num_fewshot": 0,
        "generation_kwargs": None if likelihood else {
            "max_new_tokens": c.get("max_new_tokens") or LMMS_MAX_NEW_TOKENS[b],
            "until": LMMS_STOP[b] + [s for s in c.get("stop_strings", []) if s not in LMMS_STOP[b]],
            "do_sample": False, "num_beams": c.get("num_beams", 1),
            "repetition_penalty": c.get("repetition_penalty", 1.0)},
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in METRICS[b]],
        "filter_list": [{"name": FILTERS[b]}],
        "protocol": task.protocol, "eval_config": c,
    }


def results_document(tasks: list[TaskOutput], *, model: dict, config: dict, lines: dict,
                     extra: dict | None = None, version: str | None = None) -> dict:
    """The results JSON for one model over ``tasks`` (``lines``: task -> its samples lines)."""
    names = [t.benchmark for t in tasks]
    name = model.get("adapter") or model["source"]
    return {
        "results": {t.benchmark: task_results(t.benchmark, t.metrics, t.samples) for t in tasks},
        "group_subtasks": {b: [] for b in names},
        "configs": {t.benchmark: task_config(t) for t in tasks},
        "versions": {b: version for b in names},
        "n-shot": {b: 0 for b in names},
        "higher_is_better": {b: {m: True for m in METRICS[b]} for b in names},
        "n-samples": {t.benchmark: {"original": t.n_original if t.n_original is not None
                                    else len(t.samples), "effective": len(t.samples)}
                      for t in tasks},
        "config": config,
        "date": time.time(),
        "model_name": name, "model_name_sanitized": sanitize_model_name(name),
        "total_evaluation_time_seconds": str(sum(t.seconds for t in tasks)),
        "task_hashes": {b: hash_string("".join(ln["doc_hash"] + ln["prompt_hash"] + ln["target_hash"]
                                               for ln in lines[b])) for b in names},
        "loop": {"version": version, "model": model, "adapter": model.get("adapter"),
                 "protocol": {t.benchmark: t.protocol for t in tasks},
                 "interval": {b: INTERVALS[b] for b in names},
                 "stderr": "cluster-robust standard error over the interval's units",
                 "split": {t.benchmark: t.split for t in tasks},
                 "metrics": {t.benchmark: t.metrics for t in tasks}, **(extra or {})},
    }


@cache
def validator(name: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8")))


def check_results(doc: dict) -> None:
    """Raise ValueError naming the field if ``doc`` does not fit the results schema."""
    errors = sorted(validator("eval_results.schema.json").iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        where = ".".join(str(p) for p in errors[0].path) or "(document)"
        raise ValueError(f"results JSON, field '{where}': {errors[0].message}")


def write_outputs(output_path: str | Path, tasks: list[TaskOutput], *, model: dict, config: dict,
                  extra: dict | None = None, version: str | None = None,
                  date: str | None = None) -> dict[str, Path]:
    """Write the results JSON and one samples JSONL per task; returns their paths by name."""
    date = date or datetime.now().isoformat().replace(":", "-")
    lines = {t.benchmark: [sample_line(t.benchmark, i, s,
                                       t.examples[i] if t.examples else None,
                                       task_config(t)["output_type"])
                           for i, s in enumerate(t.samples)] for t in tasks}
    doc = results_document(tasks, model=model, config=config, lines=lines, extra=extra,
                           version=version)
    folder = Path(output_path) / doc["model_name_sanitized"]
    files = {b: folder / f"samples_{b}_{date}.jsonl" for b in lines}
    doc["loop"]["samples_files"] = {b: p.name for b, p in files.items()}
    check_results(json.loads(json.dumps(doc, default=str)))
    folder.mkdir(parents=True, exist_ok=True)
    for b, path in files.items():
        with path.open("w", encoding="utf-8") as f:
            for line in lines[b]:
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    results = folder / f"results_{date}.json"
    results.write_text(json.dumps(doc, ensure_ascii=False, indent=2, default=str) + "\n",
                       encoding="utf-8")
    return {"results": results, **files}
