"""Many labelled answers at once: the error profile that says what to fix next.

``BenchmarkOptimizer.profile`` labels each answer with ``core.errors.classify`` (or takes the
labels it was given) and counts them by label and question category; ``ErrorProfile`` ranks
the causes, names their remedies and, for MMBench-ru, how the answers named their option.
Which remedy addresses which label is the remedies' own business (``strategies.remedies``
reads it from the registry); this module only receives it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from core.errors import (
    CONTENT_LABELS,
    LABELS,
    ErrorRules,
    _check_benchmark,
    _missing,
    classify,
    load_rules,
)
from core.metrics import choice_style, lmms_choices

MAX_EXAMPLES = 3
"""Examples kept per label."""


def _category(benchmark: str, example: Mapping) -> str:
    if benchmark == "gqa_ru":
        types = example.get("types")
        value = (
            (types.get("semantic") or types.get("detailed")) if isinstance(types, Mapping) else None
        )
    else:
        value = example.get("category")
    return "unknown" if _missing(value) else str(value)


_DESCRIPTIONS = {
    "format_mismatch": "answers not in the expected form (verbose, empty, another language, no option letter)",
    "counting": "wrong answers to counting questions",
    "color": "wrong answers to colour questions",
    "location": "wrong answers to location questions",
    "missing_image": "examples whose image could not be read",
    "other": "wrong answers with no specific pattern",
}
Remedies = Mapping[str, tuple[tuple[str, str], ...]]
"""Label -> the remedies that address it, in the order to try them: (name, what it does)."""


@dataclass
class ErrorProfile:
    """Classified errors of one benchmark evaluation."""

    benchmark: str
    """"gqa_ru" or "mmbench_ru"."""
    n: int
    """Number of examples profiled."""
    n_errors: int
    """Number of examples with at least one label."""
    counts: dict[str, int]
    """Examples per label (an example may carry two labels)."""
    shares: dict[str, float]
    """counts divided by n_errors (0.0 without errors)."""
    per_category: dict[str, dict[str, int]]
    """Category (GQA types.semantic, MMBench category) to {"n", "errors"}."""
    examples: dict[str, list[dict]]
    """Label to up to three {"id", "question", "answer", "prediction"} dicts."""
    label_categories: dict[str, dict[str, int]] = field(default_factory=dict)
    """Label to its error count per category."""
    remedies: Remedies = field(default_factory=dict, repr=False)
    """Label to the remedies that address it (``BenchmarkOptimizer(remedies=...)``)."""
    answer_styles: dict[str, dict[str, int]] = field(default_factory=dict)
    """MMBench-ru only: how the raw answers named their option ("letter", "text" or "none",
    ``core.metrics.choice_style``) to {"n", "correct"}; empty when the raw answers are unknown."""

    def choice_style(self) -> str | None:
        """The way of naming an option that earned the most right answers ("letter" or
        "text"), or None without any; a tie goes to the letter the prompt asks for."""
        right = {s: self.answer_styles.get(s, {}).get("correct", 0) for s in ("letter", "text")}
        if not any(right.values()):
            return None
        return "text" if right["text"] > right["letter"] else "letter"

    @property
    def main_cause(self) -> str | None:
        """The label with the most errors (earlier in LABELS on ties); None without errors."""
        if not self.n_errors:
            return None
        return max(LABELS, key=lambda label: (self.counts.get(label, 0), -LABELS.index(label)))

    def _ranked(self) -> list[str]:
        present = [label for label in LABELS if self.counts.get(label, 0)]
        return sorted(present, key=lambda label: -self.counts[label])

    def weak_categories(self, label: str, top: int = 3) -> list[str]:
        """The categories with the most errors of `label`."""
        by_count = self.label_categories.get(label, {})
        return sorted(by_count, key=lambda c: (-by_count[c], c))[:top]

    def recommendations(self) -> list[str]:
        """One plain-English line per observed cause, largest first, naming its remedies."""
        if not self.n_errors:
            return [f"No errors on {self.n} {self.benchmark} examples: nothing to fix."]
        lines = []
        for label in self._ranked():
            head = f"{self.counts[label]} of {self.n_errors} errors ({self.shares[label]:.0%}) are {label}: {_DESCRIPTIONS[label]}."
            if label == "missing_image":
                lines.append(
                    f"{head} Fix the data (image files, --coco-dir); no model remedy applies."
                )
                continue
            remedies = self.remedies.get(label, ())
            line = (f"{head} Remedy: {'; then '.join(f'{text} ({name})' for name, text in remedies)}."
                    if remedies else f"{head} No registered remedy addresses it.")
            weak = self.weak_categories(label) if label in CONTENT_LABELS else []
            if weak:
                line += f" Weakest question types: {', '.join(weak)}."
            lines.append(line)
        return lines

    def recommended_strategies(self) -> list[str]:
        """Strategy names to try, ordered by how many errors they address, cheapest first."""
        ordered: list[str] = []
        for label in self._ranked():
            ordered += [name for name, _ in self.remedies.get(label, ()) if name not in ordered]
        return ordered

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "n": self.n,
            "n_errors": self.n_errors,
            "counts": dict(self.counts),
            "shares": dict(self.shares),
            "per_category": {k: dict(v) for k, v in self.per_category.items()},
            "examples": {k: [dict(e) for e in v] for k, v in self.examples.items()},
            "label_categories": {k: dict(v) for k, v in self.label_categories.items()},
            "answer_styles": {k: dict(v) for k, v in self.answer_styles.items()},
            "main_cause": self.main_cause,
            "recommended_strategies": self.recommended_strategies(),
        }


class BenchmarkOptimizer:
    """Turns one benchmark's predictions into an ErrorProfile that says what to fix next."""

    def __init__(self, rules: ErrorRules | None = None, remedies: Remedies | None = None) -> None:
        self.rules = rules or load_rules()
        self.remedies = dict(remedies or {})

    def profile(self, benchmark: str, samples: Iterable[Mapping]) -> ErrorProfile:
        """Classify and count the errors of `samples`.

        Args:
            benchmark: "gqa_ru" or "mmbench_ru".
            samples: Dicts with `example` (the record), `prediction` and `image_ok`, or with
                precomputed `labels` that are used as they are; an MMBench-ru sample's raw
                `output`, when given, is counted in `answer_styles`.
        """
        _check_benchmark(benchmark)
        counts = dict.fromkeys(LABELS, 0)
        per_category: dict[str, dict[str, int]] = {}
        label_categories: dict[str, dict[str, int]] = {}
        examples: dict[str, list[dict]] = {}
        styles: dict[str, dict[str, int]] = {}
        n = n_errors = 0
        for sample in samples:
            example = sample.get("example") or {}
            prediction = str(sample.get("prediction") or "")
            if "labels" in sample:
                labels = set(sample["labels"])
                if not labels <= set(LABELS):
                    raise ValueError(
                        f"Sample labels must come from {', '.join(LABELS)}, but got "
                        f"{sorted(labels - set(LABELS))}."
                    )
            else:
                labels = classify(
                    benchmark,
                    example,
                    prediction,
                    image_ok=sample.get("image_ok", True),
                    rules=self.rules,
                )
            raw = sample.get("output")
            if benchmark == "mmbench_ru" and raw is not None:
                style = styles.setdefault(choice_style(str(raw), lmms_choices(example)),
                                          {"n": 0, "correct": 0})
                style["n"] += 1
                style["correct"] += not labels
            category = _category(benchmark, example)
            stats = per_category.setdefault(category, {"n": 0, "errors": 0})
            n += 1
            stats["n"] += 1
            if not labels:
                continue
            n_errors += 1
            stats["errors"] += 1
            for label in labels:
                counts[label] += 1
                by_category = label_categories.setdefault(label, {})
                by_category[category] = by_category.get(category, 0) + 1
                kept = examples.setdefault(label, [])
                if len(kept) < MAX_EXAMPLES:
                    kept.append(
                        {
                            "id": example.get("id", example.get("index")),
                            "question": example.get("question"),
                            "answer": example.get("answer"),
                            "prediction": prediction,
                        }
                    )
        shares = {label: counts[label] / n_errors if n_errors else 0.0 for label in LABELS}
        return ErrorProfile(
            benchmark=benchmark,
            n=n,
            n_errors=n_errors,
            counts=counts,
            shares=shares,
            per_category=per_category,
            examples=examples,
            label_categories=label_categories,
            remedies=self.remedies,
            answer_styles=styles,
        )
