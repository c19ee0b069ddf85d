"""Evaluation outputs in lmms-eval 0.7.2's shape: a results JSON and samples JSONL.

Under ``OUTPUT_PATH/<model_name_sanitized>/`` (lmms-eval's folder: the last two parts of the
model's name, the adapter's path when there is one as lmms-eval's ``peft=`` does), with
lmms-eval's date format ``%Y%m%d_%H%M%S``:

- ``<date>_results.json``: lmms-eval's top-level keys (``results``, ``group_subtasks``,
  ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, ``config``,
  ``git_hash``, ``lmms_eval_version``, ``date``, ``task_hashes``, ``model_source``,
  ``model_name``, ``model_name_sanitized``, ``start_time``, ``end_time``,
  ``total_evaluation_time_seconds``, ...), keyed by lmms-eval's task names (``gqa-ru``,
  ``mmbench_ru_dev``). ``results[task]`` holds ``"<metric>,none"``, its i.i.d. standard error
  ``"<metric>_stderr,none"`` (and ``_stderr_clt``, the same number, as lmms-eval writes it),
  the cluster-robust one ``"<metric>_stderr_clustered,none"`` (GQA-ru images, MMBench-ru
  question groups), our 95% interval ``"<metric>_ci95,none"``, and ``samples``; MMBench-ru
  also ``"gpt_eval_score,none"``, lmms-eval's headline key, in percent. ``loop`` holds this
  project's own block: protocol, how the interval is made, the full metrics with per-category
  breakdowns, the model and adapter. Validated against ``core/schemas/eval_results.schema.json``.
- ``<date>_samples_<task>.jsonl``: one line per question (``core/schemas/eval_sample.schema.json``):
  lmms-eval's ``doc_id``, ``input`` (the user text), ``target`` (a string), ``filtered_resps``
  (the raw answer, a string), ``doc_hash`` and the per-sample metric values (GQA-ru
  ``exact_match`` 0.0/1.0; MMBench-ru lmms-eval's ``gpt_eval_score`` record), beside ours:
  ``task``, ``id``, ``image_id``, ``prompt``, ``output`` (raw), ``parsed``, ``correct``,
  ``labels`` (error classes), ``category``, ...
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from pathlib import Path

from core.metrics import ROTATION_BASE, clusters_of, group_outcomes
from core.output_samples import hash_string, sample_line

SCHEMA_DIR = Path(__file__).parent / "schemas"
LMMS_TASKS = {"gqa_ru": "gqa-ru", "mmbench_ru": "mmbench_ru_dev"}
"""The lmms-eval task each benchmark reproduces (its ``alias`` in ``results``)."""
FILTERS = {"gqa_ru": "none", "mmbench_ru": "none"}
"""lmms-eval's filter key: both tasks score the raw answer (no filter pipeline), so ``none``."""
LMMS_SCORE = {"mmbench_ru": "gpt_eval_score"}
"""lmms-eval's own headline metric where its name differs from ours (in percent)."""
DATE_FORMAT = "%Y%m%d_%H%M%S"
"""lmms-eval's ``get_datetime_str``: the ``date`` key and the files' date prefix."""
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
    """lmms-eval's folder name for a model: its last two path parts, runs of ``"<>:/|\\?*[]``
    turned into ``__`` (``lmms_eval.utils.sanitize_model_name``)."""
    parts = name.split("/")
    last_two = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", last_two)


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
        return [float(bool(s[key])) for s in samples], clusters_of(samples)
    if metric == "circular_accuracy":
        return [float(v) for v in group_outcomes(samples).values()], None
    return ([float(bool(s["correct"])) for s in samples],
            [int(s["index"]) % ROTATION_BASE for s in samples])


def _se(value: float | None):
    """A standard error as lmms-eval writes it: a number, or "N/A" where there is none."""
    return "N/A" if value is None else value


def task_results(benchmark: str, metrics: dict, samples: list[dict]) -> dict:
    """``results[task]``: each metric, its i.i.d. and cluster-robust standard errors and its
    95% interval, lmms-eval-keyed."""
    filt = FILTERS[benchmark]
    out: dict = {"alias": LMMS_TASKS[benchmark]}
    for name, (value, ci) in METRICS[benchmark].items():
        values, clusters = _per_unit(benchmark, samples, name)
        iid = _se(stderr(values))
        out[f"{name},{filt}"] = metrics[value]
        out[f"{name}_stderr,{filt}"] = iid
        out[f"{name}_stderr_clt,{filt}"] = iid
        # circular accuracy: one outcome per question group, so its units are the clusters
        out[f"{name}_stderr_clustered,{filt}"] = (
            iid if name == "circular_accuracy" else
            "N/A" if clusters is None else _se(stderr(values, clusters)))
        out[f"{name}_ci95,{filt}"] = list(metrics[ci])
    if benchmark in LMMS_SCORE:  # lmms-eval's key for the headline, in its unit (percent)
        out[f"{LMMS_SCORE[benchmark]},{filt}"] = 100 * metrics["accuracy"]
        out[f"{LMMS_SCORE[benchmark]}_stderr,{filt}"] = "N/A"
    out["samples"] = len(samples)
    return out


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
        "task": LMMS_TASKS[b], "benchmark": b, "lmms_eval_task": LMMS_TASKS[b],
        "test_split": task.split,
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
                     date: str, extra: dict | None = None, version: str | None = None,
                     git_hash: str | None = None) -> dict:
    """The results JSON for one model over ``tasks`` (``lines``: benchmark -> its samples lines)."""
    names = {t.benchmark: LMMS_TASKS[t.benchmark] for t in tasks}
    name = model.get("adapter") or model["source"]
    seconds = sum(t.seconds for t in tasks)
    end = time.time()
    return {
        "results": {names[t.benchmark]: task_results(t.benchmark, t.metrics, t.samples)
                    for t in tasks},
        "group_subtasks": {n: [] for n in names.values()},
        "configs": {names[t.benchmark]: task_config(t) for t in tasks},
        "versions": {n: version for n in names.values()},
        "n-shot": {n: 0 for n in names.values()},
        "higher_is_better": {names[b]: {m: True for m in METRICS[b]} for b in names},
        "n-samples": {names[t.benchmark]: {"original": t.n_original if t.n_original is not None
                                           else len(t.samples), "effective": len(t.samples)}
                      for t in tasks},
        "config": config,
        "git_hash": git_hash,
        "lmms_eval_version": f"llava-ru-loop@{version}",
        "date": date,
        # lmms-eval: sha256 of "sample_<i>" + doc_hash over the samples, in order
        "task_hashes": {names[b]: hash_string("".join(f"sample_{i}" + ln["doc_hash"]
                                                      for i, ln in enumerate(lines[b])))
                        for b in names},
        "model_source": config.get("model", "loop"), "model_name": name,
        "model_name_sanitized": sanitize_model_name(name),
        "system_instruction": None, "system_instruction_sha": None,
        "fewshot_as_multiturn": False, "chat_template": None, "chat_template_sha": None,
        "start_time": end - seconds, "end_time": end,
        "total_evaluation_time_seconds": str(seconds),
        "loop": {"version": version, "model": model, "adapter": model.get("adapter"),
                 "tasks": names,
                 "protocol": {t.benchmark: t.protocol for t in tasks},
                 "interval": {b: INTERVALS[b] for b in names},
                 "stderr": "_stderr: i.i.d. over questions (MMBench-ru circular: over question "
                           "groups); _stderr_clustered: cluster-robust over the interval's units",
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


def free_date(folder: Path, date: str | None = None) -> str:
    """lmms-eval's date string for the files, a second later while ``folder`` has that one."""
    from datetime import timedelta

    if date is not None:
        return date
    now = datetime.now()
    while (folder / f"{now.strftime(DATE_FORMAT)}_results.json").exists():
        now += timedelta(seconds=1)
    return now.strftime(DATE_FORMAT)


def write_outputs(output_path: str | Path, tasks: list[TaskOutput], *, model: dict, config: dict,
                  extra: dict | None = None, version: str | None = None,
                  git_hash: str | None = None, date: str | None = None) -> dict[str, Path]:
    """Write the results JSON and one samples JSONL per task; returns their paths by benchmark."""
    lines = {t.benchmark: [sample_line(t.benchmark, i, s,
                                       t.examples[i] if t.examples else None,
                                       task_config(t)["output_type"])
                           for i, s in enumerate(t.samples)] for t in tasks}
    name = model.get("adapter") or model["source"]
    folder = Path(output_path) / sanitize_model_name(name)
    date = free_date(folder, date)
    doc = results_document(tasks, model=model, config=config, lines=lines, date=date, extra=extra,
                           version=version, git_hash=git_hash)
    files = {b: folder / f"{date}_samples_{LMMS_TASKS[b]}.jsonl" for b in lines}
    doc["loop"]["samples_files"] = {b: p.name for b, p in files.items()}
    check_results(json.loads(json.dumps(doc, default=str)))
    folder.mkdir(parents=True, exist_ok=True)
    for b, path in files.items():
        with path.open("w", encoding="utf-8") as f:
            for line in lines[b]:
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    results = folder / f"{date}_results.json"
    results.write_text(json.dumps(doc, ensure_ascii=False, indent=2, default=str) + "\n",
                       encoding="utf-8")
    return {"results": results, **files}
