"""One line of a samples JSONL (``core.outputs``): lmms-eval 0.7.2's per-sample keys beside
this project's per-sample record."""

from __future__ import annotations

import hashlib
import json

from core.metrics import ROTATION_BASE


def hash_string(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_id(benchmark: str, sample: dict, example: dict | None) -> str:
    """GQA-ru: the imageId; MMBench-ru: the original question's index (rotations share it)."""
    if benchmark == "gqa_ru":
        return str((example or {}).get("imageId") or sample.get("cluster"))
    return str(int(sample.get("index", sample["sample_id"])) % ROTATION_BASE)


def mmbench_record(sample: dict, example: dict | None, options: dict | None) -> dict:
    """lmms-eval's per-sample ``gpt_eval_score`` record (``ru_utils.mmbench_process_results``)."""
    ex = example or {}

    def text(key):  # a missing field reads "nan", as pandas gives it to lmms-eval
        v = ex.get(key)
        return v if isinstance(v, str) or v is None else "nan" if v != v else str(v)

    rec = {"index": int(sample["index"]), "question": sample["question"],
           "answer": str(sample["answer"]), "prediction": sample["output"].strip(),
           "hint": text("hint"), "source": text("source"), "split": text("split"),
           "category": sample.get("category"), "L2-category": text("l2-category")}
    for c in "ABCDE":
        rec[c] = ex[c] if isinstance(ex.get(c), str) else (options or {}).get(c, "nan")
    return rec


def sample_line(benchmark: str, doc_id: int, sample: dict, example: dict | None,
                output_type: str) -> dict:
    """One samples-JSONL line: lmms-eval's keys beside the per-sample record's own."""
    options = dict(example["options"]) if example is not None and "options" in example else \
        sample.get("options")
    line: dict = {"doc_id": doc_id, "input": sample["prompt"], "target": str(sample["answer"]),
                  "filtered_resps": sample["output"]}
    if benchmark == "gqa_ru":
        line["exact_match"] = float(bool(sample["correct"]))
        line["exact_match_normalized"] = float(bool(sample["correct_normalized"]))
    else:  # circular accuracy is a question group's outcome, not a row's
        line["gpt_eval_score"] = mmbench_record(sample, example, options)
        line["per_row_accuracy"] = float(bool(sample["correct"]))
    line.update({"task": benchmark, "id": str(sample["sample_id"]),
                 "image_id": image_id(benchmark, sample, example), "question": sample["question"],
                 "prompt": sample["prompt"], "output_type": output_type,
                 "output": sample["output"], "parsed": sample["parsed"],
                 "correct": bool(sample["correct"]), "labels": list(sample.get("labels") or []),
                 "image_ok": bool(sample.get("image_ok", True)), "category": sample.get("category"),
                 "cluster": sample.get("cluster"), "seconds": sample.get("seconds")})
    if benchmark == "mmbench_ru":
        line["index"] = int(sample["index"])
        line["n_options"] = sample.get("n_options")
        if options is not None:
            line["options"] = options
    line["doc_hash"] = hash_string(json.dumps([line["id"], line["question"]], ensure_ascii=False))
    return line
