"""Scoring: GQA-ru exact match, MMBench-ru letter extraction, circular accuracy, intervals, paired tests.

`gqa_match(..., mode="lmms")` is the number comparable to published lmms-eval results;
`mode="normalized"` is a Russian-aware exact match reported next to it (DESIGN section 5).
Everything here is pure Python plus numpy, deterministic for a given seed.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

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
_LOOKALIKES = {"А": "A", "В": "B", "С": "C"}
_LETTER_RE = re.compile(r"[A-Da-dАВС]")
_ANY_LETTER_RE = re.compile(r"[^\W\d_]")
_LATIN_LOWER_RE = re.compile(r"[a-z]")
_MARKER_TAIL = r"(?:\s+is|\s+это|\s*[:\-–—=])?)\s*[*(\[«\"']*\s*$"
_STRONG_MARKER_RE = re.compile(
    r"(?i:(?:ответ|answer|правильн\w*\s+(?:ответ|вариант)|вариант\s+ответа)" + _MARKER_TAIL
)
_WEAK_MARKER_RE = re.compile(r"(?i:(?:вариант|option)" + _MARKER_TAIL)


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


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).casefold().replace("ё", "е").split())


def _standalone_letter(text: str, pos: int) -> bool:
    """Whether the capital at `pos` reads as an option letter rather than part of a word."""
    char = text[pos]
    if pos > 0 and (text[pos - 1].isalnum() or text[pos - 1] == "_"):
        return False
    rest = text[pos + 1 :]
    if rest and (rest[0].isalnum() or rest[0] == "_"):
        return False
    after_space = rest.lstrip()
    gap = rest[: len(rest) - len(after_space)]
    # A word after a space on the same line continues the sentence; a line break does not.
    next_word_starts = bool(gap) and "\n" not in gap and bool(_ANY_LETTER_RE.match(after_space))
    if char in _LOOKALIKES or char.islower():
        # Cyrillic А/В/С are also words ("В центре", "А также", "С краю"), and a lowercase
        # Latin "a" is an article: count them only when nothing word-like follows on the
        # same footing.
        if not rest:
            return True
        if rest[0] in ".):":
            return len(rest) == 1 or rest[1].isspace() or rest[1] in "*»\"'"
        return not next_word_starts
    # Latin "A" followed by an English word is the article ("A cat sits ...").
    return not (char == "A" and next_word_starts and _LATIN_LOWER_RE.match(after_space))


def _letters(output: str, valid: set[str]) -> tuple[set[str], set[str], set[str]]:
    """Option letters in `output`: after "Ответ:", after "Вариант", and without a marker."""
    strong: set[str] = set()
    weak: set[str] = set()
    bare: set[str] = set()
    for match in _LETTER_RE.finditer(output):
        letter = _LOOKALIKES.get(match.group(), match.group()).upper()
        if letter not in valid or not _standalone_letter(output, match.start()):
            continue
        before = output[: match.start()]
        if _STRONG_MARKER_RE.search(before):
            strong.add(letter)
        elif _WEAK_MARKER_RE.search(before):
            weak.add(letter)
        else:
            bare.add(letter)
    return strong, weak, bare


def _option_by_text(output: str, options: Mapping[str, str]) -> str | None:
    text = _fold(output)
    spans: dict[str, list[tuple[int, int]]] = {}
    for letter, option in options.items():
        needle = _fold(option).strip(string.punctuation + "«»“”„…")
        if not needle:
            continue
        pattern = re.compile(rf"(?<!\w){re.escape(needle)}(?!\w)")
        found = [m.span() for m in pattern.finditer(text)]
        if found:
            spans[letter] = found

    def covered(letter: str) -> bool:
        # "красный" inside "темно-красный" is not a mention of the shorter option.
        return all(
            any(
                o != letter and s <= a and b <= e and (e - s) > (b - a)
                for o in spans
                for s, e in spans[o]
            )
            for a, b in spans[letter]
        )

    hits = [letter for letter in spans if not covered(letter)]
    return hits[0] if len(hits) == 1 else None


def extract_choice(output: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-form answer picks, by rules only.

    Letters count when they stand alone (`B`, `b`, `B.`, `B)`, `(B)`, `**B**`, `Ответ: B`);
    Cyrillic А/В/С count as A/B/C unless they read as a word (`В центре ...`); lowercase
    Cyrillic а/в are always words. A letter after "Ответ:" / "Правильный вариант" wins over
    one after "Вариант", which wins over a bare letter; a bare letter different from the
    marked one ("ответ B, но возможно C") makes the answer ambiguous.
    Without a letter, the unique option text found as a whole phrase decides.

    Args:
        output: The model's generated text.
        options: Option letters ("A".."D") mapped to their texts.

    Returns:
        The chosen letter, or None when there is none or the answer is ambiguous.
    """
    return _choose(output, options)[0]


def choice_style(output: str, options: Mapping[str, str]) -> str:
    """How a free-form answer names its option: ``"letter"`` (a letter decides, as in
    ``extract_choice``), ``"text"`` (no letter; the unique option text decides) or ``"none"``."""
    return _choose(output, options)[1]


def _choose(output: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    strong, weak, bare = _letters(output, set(options))
    for letters in (strong, weak, bare):
        if letters:
            chosen = letters | bare
            return (next(iter(letters)), "letter") if len(chosen) == 1 else (None, "none")
    letter = _option_by_text(output, options)
    return letter, "text" if letter else "none"


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
