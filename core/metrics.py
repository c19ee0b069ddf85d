"""Scoring: GQA-ru exact match, circular accuracy, intervals, paired tests.

`gqa_match(..., mode="lmms")` is the number comparable to published lmms-eval results;
`mode="normalized"` is a Russian-aware exact match reported next to it (docs/measurement.md).
MMBench-ru's letter extraction lives in ``core.choice`` and is re-exported here.
Everything here is pure Python plus numpy, deterministic for a given seed.
"""

from __future__ import annotations

import math
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from core.choice import (  # noqa: F401  (re-exported: one place to import scoring from)
    CHOICE_MODES,
    choice_style,
    extract_choice,
    lmms_choices,
)
from core.exceptions import DataError
from core.stats import (  # noqa: F401  (re-exported: one place to import scoring from)
    PairedResult,
    cluster_bootstrap,
    comparison_alpha,
    is_better,
    mcnemar_exact,
    paired_test,
)

GQA_MODES = ("lmms", "normalized")
ROTATION_BASE = 1_000_000
"""MMBench rows with `index >= ROTATION_BASE` are rotated copies of `index % ROTATION_BASE`."""

_ASCII_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_COMBINING_ACUTE = "\u0301"


def _is_punct(char: str) -> bool:
    return unicodedata.category(char).startswith("P") or char in string.punctuation


def normalize_answer(text: str) -> str:
    """Russian-aware normal form used by `gqa_match(mode="normalized")`.

    Applies NFC, drops stress marks, casefolds, maps ё to е, deletes every Unicode
    punctuation character (category P*, which covers « » — – … “ ” „) and every ASCII
    punctuation character, collapses whitespace and strips.
    """
    text = unicodedata.normalize("NFC", text).replace(_COMBINING_ACUTE, "")
    text = text.casefold().replace("ё", "е")
    text = "".join(char for char in text if not _is_punct(char))
    return " ".join(text.split())


def _lmms_normalize(text: str) -> str:
    # lmms-eval's exact_match with ignore_case and ignore_punctuation: lower, then delete
    # string.punctuation; nothing is stripped after the deletion.
    return text.lower().translate(_ASCII_PUNCT_TABLE)


def gqa_match(prediction: str, answer: str, mode: str = "normalized") -> bool:
    """Exact match of a GQA-ru prediction against the gold answer.

    Args:
        prediction: The model's raw generated text.
        answer: The gold answer from the dataset.
        mode: "lmms" reproduces lmms-eval's `gqa-ru` scoring: the prediction is stripped
            (the gold is not), both sides are lowercased and lose ASCII punctuation, then
            compared. "normalized" compares `normalize_answer` of both sides.

    Returns:
        Whether the prediction counts as correct.

    Raises:
        ValueError: If `mode` is not one of `GQA_MODES`.
    """
    if mode == "lmms":
        return _lmms_normalize(prediction.strip()) == _lmms_normalize(answer)
    if mode == "normalized":
        return normalize_answer(prediction) == normalize_answer(answer)
    raise ValueError(f"`mode` must be one of {', '.join(GQA_MODES)}, but got {mode!r}.")


def clusters_of(samples: Sequence[Mapping], what: str = "GQA-ru predictions") -> list:
    """Every sample's cluster (the GQA-ru image it asks about).

    A sample without one is an error, never a silent fallback: a test or an interval over
    questions instead of images would count ~31 questions about one picture as independent
    evidence.

    Raises:
        DataError: naming the first sample without a cluster and how many lack one.
    """
    missing = [s.get("sample_id", s.get("id")) for s in samples if s.get("cluster") is None]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(samples)} {what} name no image (`cluster`), e.g. sample "
            f"{missing[0]!r}; intervals and paired tests treat the image as the unit, so they "
            "cannot be computed. Evaluate them again with this version (it records the image).")
    return [s["cluster"] for s in samples]


def _group_key(row: Mapping) -> int:
    return int(row["index"]) % ROTATION_BASE


def _groups(rows: Iterable[Mapping]) -> dict[int, list[Mapping]]:
    groups: dict[int, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(_group_key(row), []).append(row)
    return groups


def circular_accuracy(rows: Sequence[Mapping]) -> dict:
    """MMBench circular accuracy: a question counts only if all its rotations are right.

    Args:
        rows: Dicts with `index` (int) and `correct` (bool); an optional `n_options` on the
            original row (index below 1,000,000) lets incomplete groups be counted.

    Returns:
        {"circular", "n_groups", "per_row", "n_rows", "incomplete_groups"}.
    """
    groups = _groups(rows)
    incomplete = 0
    for members in groups.values():
        originals = [r for r in members if int(r["index"]) < ROTATION_BASE and "n_options" in r]
        if originals and len(members) < int(originals[0]["n_options"]):
            incomplete += 1
    n_rows = len(rows)
    right = sum(all(r["correct"] for r in members) for members in groups.values())
    return {
        "circular": right / len(groups) if groups else 0.0,
        "n_groups": len(groups),
        "per_row": sum(bool(r["correct"]) for r in rows) / n_rows if n_rows else 0.0,
        "n_rows": n_rows,
        "incomplete_groups": incomplete,
    }


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes out of n; (0.0, 1.0) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`.

    Resamples are drawn as multinomial counts over the distinct values, which has the same
    distribution as resampling indices and stays fast for 0/1 and -1/0/1 data at any n.
    """
    if len(values) == 0:
        return 0.0, 0.0
    uniq, counts = np.unique(np.asarray(values, dtype=float), return_counts=True)
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(uniq))
    means = np.concatenate(
        [
            rng.multinomial(n, counts / n, size=min(chunk, n_boot - start)) @ uniq / n
            for start in range(0, n_boot, chunk)
        ]
    )
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its n and 95% Wilson interval."""

    value: float
    """Fraction correct, in [0, 1]."""
    n: int
    """Number of scored items."""
    low: float
    """Lower end of the 95% interval."""
    high: float
    """Upper end of the 95% interval."""

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low * 100:.1f}, {self.high * 100:.1f}] (n={self.n})"

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(correct: Sequence[bool], clusters: Sequence | None = None, *,
             seed: int = 0) -> Accuracy:
    """Accuracy of per-item outcomes with a 95% interval.

    Without ``clusters`` the interval is Wilson's; with them (one key per item, e.g. the
    GQA-ru imageId) it is a cluster bootstrap over those units, which is wider when questions
    about one image succeed or fail together.
    """
    n = len(correct)
    k = sum(bool(c) for c in correct)
    if clusters is not None and n:
        low, high = cluster_bootstrap([float(bool(c)) for c in correct], clusters, seed=seed)
    else:
        low, high = wilson_interval(k, n)
    return Accuracy(value=k / n if n else 0.0, n=n, low=low, high=high)


def group_outcomes(rows: Iterable[Mapping]) -> dict[int, bool]:
    """MMBench circular outcome per question group: right only if all its rotations are."""
    return {key: all(r["correct"] for r in members) for key, members in _groups(rows).items()}
