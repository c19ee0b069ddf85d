"""Read a samples JSONL back and score it again, under any metric mode, without generating.

Scoring starts again from each line's raw answer (``output``) and ``target``: GQA-ru is
matched under both exact-match modes, MMBench-ru's letter is parsed again from the answer and
its options by lmms-eval's rule, and by the lenient reading beside it (likelihood answers keep
the letter the likelihood chose), and everything is
aggregated by ``core.evaluate.summarize``. The same mode as the evaluation gives the same
numbers; ``mode`` says which metric is the headline. Error labels are kept from the
evaluation: a line that becomes correct loses them, and one that becomes wrong has none
(classifying an error needs the dataset record, which a samples file does not hold).
"""

from __future__ import annotations

from pathlib import Path

from core.exceptions import DataError
from core.jsonl import jsonl_values
from core.metrics import extract_choice, gqa_match, lmms_choices

MODES = {"gqa_ru": {"lmms": "exact_match", "normalized": "exact_match_normalized"},
         "mmbench_ru": {"circular": "circular_accuracy", "per_row": "per_row_accuracy"}}
"""Per benchmark: mode -> the harness metric it makes the headline; the first is the default."""


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_samples(path: str | Path) -> tuple[str, list[dict]]:
    """The benchmark and the lines of a samples JSONL, each checked against its schema.

    Raises:
        DataError: naming the file, the line and the field of the first bad line.
    """
    from core.outputs import validator

    path = Path(path)
    if not path.is_file():
        raise DataError(f"samples file '{path}' does not exist")
    check = validator("eval_sample.schema.json")
    lines: list[dict] = []
    for number, line in jsonl_values(path):
        if not isinstance(line, dict):
            raise DataError(f"{path}, line {number}: a sample must be a JSON object, but "
                            f"got {type(line).__name__}")
        errors = sorted(check.iter_errors(line), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            name = _field(e.absolute_path) or (
                e.message.split("'")[1] if e.validator == "required" else "(line)")
            raise DataError(f"{path}, line {number}, field '{name}': {e.message}. "
                            "See core/schemas/eval_sample.schema.json.")
        if lines and line["task"] != lines[0]["task"]:
            raise DataError(f"{path}, line {number}, field 'task': '{line['task']}', but "
                            f"the file began with '{lines[0]['task']}' (one task per file)")
        lines.append(line)
    if not lines:
        raise DataError(f"samples file '{path}' has no samples")
    return lines[0]["task"], lines


def check_mode(benchmark: str, mode: str | None) -> str:
    """The mode to use: ``mode`` if it fits the benchmark, else its default."""
    from core.exceptions import UserError

    modes = MODES[benchmark]
    if mode is None:
        return next(iter(modes))
    if mode not in modes:
        raise UserError(f"--mode must be one of {', '.join(modes)} for {benchmark}, but got "
                        f"'{mode}'")
    return mode


def rescore(benchmark: str, lines: list[dict]) -> list[dict]:
    """Per-sample records (``core.evaluate`` shape) scored again from the raw answers."""
    samples = []
    for line in lines:
        s = {"sample_id": line["id"], "question": line["question"], "answer": line["target"],
             "prompt": line["prompt"], "output": line["output"], "image_ok": line["image_ok"],
             "seconds": line.get("seconds"), "labels": line["labels"],
             "category": line.get("category"), "cluster": line.get("cluster")}
        if benchmark == "gqa_ru":
            s["parsed"] = line["output"]
            s["correct"] = gqa_match(line["output"], line["target"], mode="lmms")
            s["correct_normalized"] = gqa_match(line["output"], line["target"], mode="normalized")
            s["cluster"] = s["cluster"] if s["cluster"] is not None else line["image_id"]
        else:
            if line["output_type"] == "generate_until" and line.get("options"):
                # the line keeps the prompt's options: the same choices lmms-eval reads unless
                # a row stores a missing option as the string "nan" or ""
                s["parsed"] = extract_choice(line["output"], lmms_choices(line), mode="lmms")
                s["parsed_lenient"] = extract_choice(line["output"], line["options"],
                                                     mode="lenient")
            else:
                s["parsed"] = s["parsed_lenient"] = line["parsed"]
            s["correct"] = s["parsed"] == line["target"]
            s["correct_lenient"] = s["parsed_lenient"] == line["target"]
            s["index"] = line["index"]
            if line.get("n_options") is not None:
                s["n_options"] = line["n_options"]
        if s["correct"] and not line["correct"]:
            s["labels"] = []
        samples.append(s)
    return samples
