"""Formatters and small statistics shared by the commands and the pages (report, comparison,
export): one way to print a percentage with its interval, a p-value or a duration, and one
pairing of two evaluations' answers. Nothing here reads the database or prints."""

from __future__ import annotations

import math
from typing import Any

from strategies.base import BENCHMARKS


def format_pct(value: float | None, ci: list[float] | tuple[float, float] | None = None) -> str:
    """``51.4% [48.0, 54.9]`` from fractions; ``-`` when there is no value."""
    if value is None:
        return "-"
    text = f"{100 * value:.1f}%"
    if ci:
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return text


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``p`` measured on ``n`` questions."""
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def format_duration(seconds: float | None) -> str:
    """``42s``, ``12m03s`` or ``5h12m``."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_p(p: float | None) -> str:
    """A p-value with two significant digits, ``<0.001`` below that."""
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def benchmarks_of(dicts: list[dict[str, Any]]) -> list[str]:
    """The benchmark keys found in ``dicts``, the known ones first."""
    found = {key for d in dicts for key in d}
    return [b for b in BENCHMARKS if b in found] + sorted(found - set(BENCHMARKS))


def compare(before: list[dict] | None, after: list[dict], limit: int) -> dict[str, Any]:
    """Pair two evaluations' predictions by sample_id: fixed, broken and still-wrong answers.

    Without a previous evaluation every wrong answer counts as still wrong.
    """
    old = {p["sample_id"]: p for p in before or []}
    fixed, broken, still_wrong, paired = [], [], [], 0
    for new in after:
        prev = old.get(new["sample_id"])
        if before is not None and prev is None:
            continue
        paired += 1
        if prev is None:
            if not new["correct"]:
                still_wrong.append(_example(None, new))
        elif new["correct"] and not prev["correct"]:
            fixed.append(_example(prev, new))
        elif prev["correct"] and not new["correct"]:
            broken.append(_example(prev, new))
        elif not new["correct"]:
            still_wrong.append(_example(prev, new))
    return {"paired_n": paired, "fixed_n": len(fixed), "broken_n": len(broken),
            "still_wrong_n": len(still_wrong), "fixed": fixed[:limit],
            "still_wrong": still_wrong[:limit]}


def _example(prev: dict | None, new: dict) -> dict[str, Any]:
    return {"sample_id": new["sample_id"], "question": new["question"], "answer": new["answer"],
            "before": prev["output"] if prev else None, "after": new["output"],
            "after_parsed": new["parsed"], "labels": new["labels"] or (prev or {}).get("labels")}
