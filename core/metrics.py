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

GQA_MODES = ("lmms", "normalized")
ROTATION_BASE = 1_000_000
"""MMBench rows with `index >= ROTATION_BASE` are rotated copies of `index % ROTATION_BASE`."""

_ASCII_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_COMBINING_ACUTE = "\u0301"
_LOOKALIKES = {"А": "A", "В": "B", "С": "C"}
_LETTER_RE = re.compile(r"[A-DАВС]")
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
    if char in _LOOKALIKES:
        # Cyrillic А/В/С are also words ("В центре", "А также", "С краю"): count them only
        # when nothing word-like follows on the same footing.
        if not rest:
            return True
        if rest[0] in ".):":
            return len(rest) == 1 or rest[1].isspace() or rest[1] in "*»\"'"
        return not next_word_starts
    # Latin "A" followed by an English word is the article ("A cat sits ...").
    return not (char == "A" and next_word_starts and _LATIN_LOWER_RE.match(after_space))


def _letters(output: str, valid: set[str]) -> tuple[set[str], set[str], set[str]]:
    """Option letters in `output`: after "Ответ:", after "Вариант", and anywhere."""
    strong: set[str] = set()
    weak: set[str] = set()
    found: set[str] = set()
    for match in _LETTER_RE.finditer(output):
        letter = _LOOKALIKES.get(match.group(), match.group())
        if letter not in valid or not _standalone_letter(output, match.start()):
            continue
        found.add(letter)
        before = output[: match.start()]
        if _STRONG_MARKER_RE.search(before):
            strong.add(letter)
        elif _WEAK_MARKER_RE.search(before):
            weak.add(letter)
    return strong, weak, found


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

    Letters count when they stand alone (`B`, `B.`, `B)`, `(B)`, `**B**`, `Ответ: B`);
    Cyrillic А/В/С count as A/B/C unless they read as a word (`В центре ...`). A letter
    after "Ответ:" / "Правильный вариант" wins over one after "Вариант", which wins over
    a bare letter.
    Without a letter, the unique option text found as a whole phrase decides.

    Args:
        output: The model's generated text.
        options: Option letters ("A".."D") mapped to their texts.

    Returns:
        The chosen letter, or None when there is none or the answer is ambiguous.
    """
    for letters in _letters(output, set(options)):
        if letters:
            return next(iter(letters)) if len(letters) == 1 else None
    return _option_by_text(output, options)


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


def accuracy(correct: Sequence[bool]) -> Accuracy:
    """Accuracy of a list of per-item outcomes with a Wilson 95% interval."""
    n = len(correct)
    k = sum(bool(c) for c in correct)
    low, high = wilson_interval(k, n)
    return Accuracy(value=k / n if n else 0.0, n=n, low=low, high=high)


@dataclass(frozen=True)
class PairedResult:
    """Baseline against candidate on the same items."""

    n: int
    """Number of paired items."""
    baseline_acc: float
    candidate_acc: float
    diff: float
    """candidate_acc - baseline_acc."""
    diff_low: float
    """Lower end of the paired bootstrap 95% interval of `diff`."""
    diff_high: float
    """Upper end of the paired bootstrap 95% interval of `diff`."""
    b_only: int
    """Items the baseline got right and the candidate wrong."""
    c_only: int
    """Items the candidate got right and the baseline wrong."""
    p_value: float
    """Exact two-sided McNemar p-value; 1.0 without discordant pairs."""

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(b_only: int, c_only: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test on the discordant pairs."""
    m = b_only + c_only
    if m == 0:
        return 1.0
    term = tail = 1  # math.comb(m, i), built up term by term
    for i in range(1, min(b_only, c_only) + 1):
        term = term * (m - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / 2**m)


def paired_test(
    baseline: Sequence[bool], candidate: Sequence[bool], *, n_boot: int = 2000, seed: int = 0
) -> PairedResult:
    """Paired comparison of two systems scored on the same items, in the same order.

    Raises:
        ValueError: If the two lists differ in length.
    """
    if len(baseline) != len(candidate):
        raise ValueError(
            f"`baseline` and `candidate` must score the same items, but got {len(baseline)} "
            f"and {len(candidate)} outcomes. Evaluate both on the same questions."
        )
    n = len(baseline)
    b = np.asarray(baseline, dtype=bool)
    c = np.asarray(candidate, dtype=bool)
    b_only = int(np.sum(b & ~c))
    c_only = int(np.sum(c & ~b))
    low, high = bootstrap_interval(c.astype(float) - b.astype(float), n_boot=n_boot, seed=seed)
    base_acc = float(b.mean()) if n else 0.0
    cand_acc = float(c.mean()) if n else 0.0
    return PairedResult(
        n=n,
        baseline_acc=base_acc,
        candidate_acc=cand_acc,
        diff=cand_acc - base_acc,
        diff_low=low,
        diff_high=high,
        b_only=b_only,
        c_only=c_only,
        p_value=mcnemar_exact(b_only, c_only),
    )


def _group_correct(rows: Iterable[Mapping]) -> dict[int, bool]:
    return {key: all(r["correct"] for r in members) for key, members in _groups(rows).items()}


def paired_test_grouped(
    baseline_rows: Sequence[Mapping],
    candidate_rows: Sequence[Mapping],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> PairedResult:
    """`paired_test` on circular groups: a group is right only if all its rows are.

    Raises:
        ValueError: If the two sides do not cover the same groups.
    """
    base = _group_correct(baseline_rows)
    cand = _group_correct(candidate_rows)
    if base.keys() != cand.keys():
        only = sorted(base.keys() ^ cand.keys())
        raise ValueError(
            f"`baseline_rows` and `candidate_rows` must cover the same question groups, but "
            f"{len(only)} differ (e.g. {only[:5]}). Evaluate both on the same questions."
        )
    keys = sorted(base)
    return paired_test([base[k] for k in keys], [cand[k] for k in keys], n_boot=n_boot, seed=seed)


def is_better(result: PairedResult, alpha: float = 0.05) -> bool:
    """Whether the candidate beats the baseline: a positive difference with p < alpha."""
    return result.diff > 0 and result.p_value < alpha
