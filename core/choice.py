"""Which option a free-form MMBench-ru answer picks, by rules only: two readings.

``mode="lmms"`` is lmms-eval's own rule, the one behind every headline MMBench-ru number: a port
of ``MMBench_Evaluator.can_infer`` (``can_infer_option``, then ``can_infer_text``) from
EvolvingLMMs-Lab/lmms-eval ``lmms_eval/tasks/mmbench/mmbench_evals.py``, read at commit
75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 (the rule is unchanged since the ``mmbench_ru`` task was
added, 27ea9c00, June 2024). lmms-eval applies it to ``prediction.strip()`` with the choices of
``build_choices`` (columns A-D whose value is not None/NaN, as ``lmms_choices`` builds them).
Where it reads nothing, lmms-eval asks a GPT judge (and, when the judge fails, draws a random
letter); here that answer is None: counted wrong and counted as "unparseable".
``tests/lmms_reference/`` holds the original functions, and the tests compare the two.

``mode="lenient"`` is a Russian-aware reading reported beside it, labelled, never as the
headline: Cyrillic look-alikes, ``**B**``, ``Ответ: B``, lowercase letters and whole-word option
texts with ё folded to е.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Mapping

CHOICE_MODES = ("lmms", "lenient")
LMMS_LETTERS = "ABCDE"
"""``can_infer_option(answer, num_choice=5)``: the letters it looks for, whatever the options."""
LMMS_CHOICE_COLUMNS = ("A", "B", "C", "D")
"""``build_choices`` and ``can_infer_text`` read these columns only."""
_LMMS_WRAPPINGS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
                   ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))
"""The (prefix, suffix) wrappings ``can_infer_option`` tries, in its order."""
_JUDGE_FAILURE = "Failed to obtain answer via API"
_LOOKALIKES = {"А": "A", "В": "B", "С": "C"}
_LETTER_RE = re.compile(r"[A-Da-dАВС]")
_ANY_LETTER_RE = re.compile(r"[^\W\d_]")
_LATIN_LOWER_RE = re.compile(r"[a-z]")
_MARKER_TAIL = r"(?:\s+is|\s+это|\s*[:\-–—=])?)\s*[*(\[«\"']*\s*$"
_STRONG_MARKER_RE = re.compile(
    r"(?i:(?:ответ|answer|правильн\w*\s+(?:ответ|вариант)|вариант\s+ответа)" + _MARKER_TAIL
)
_WEAK_MARKER_RE = re.compile(r"(?i:(?:вариант|option)" + _MARKER_TAIL)


def extract_choice(output: str, options: Mapping[str, str], *, mode: str = "lmms") -> str | None:
    """The option letter a free-form answer picks.

    Args:
        output: The model's generated text.
        options: Option letters mapped to their texts. For ``mode="lmms"`` pass
            ``lmms_choices(row)``, the choices lmms-eval's scorer reads.
        mode: ``"lmms"``: lmms-eval's ``can_infer`` on the stripped answer. A letter A-E
            standing as a whole whitespace-separated token, when exactly one letter does (unless
            it is "A" in an answer of more than three tokens: "A might be a quantifier"); else,
            for each wrapping ``B.`` ``B,`` ``B:`` ``B)`` ``B).`` ``(B)`` ``(B).`` ``:B`` ``:B,``
            ``:B.`` ``:B)`` ``:B).`` in turn, the letter when exactly one letter is so wrapped;
            else the one option (A-D) whose lowercased text is a substring of the lowercased
            answer. The letter may be one the question does not offer.
            ``"lenient"``: letters count when they stand alone (``B``, ``b``, ``B.``, ``(B)``,
            ``**B**``, ``Ответ: B``); Cyrillic А/В/С count as A/B/C unless they read as a word;
            a letter after "Ответ:" wins over one after "Вариант", which wins over a bare
            letter, and a different bare letter makes the answer ambiguous; without a letter,
            the unique option text found as a whole phrase decides.

    Returns:
        The letter, or None when the rule reads none (lmms-eval would ask its judge there).

    Raises:
        ValueError: If ``mode`` is not one of ``CHOICE_MODES``.
    """
    return _read(output, options, mode)[0]


def choice_style(output: str, options: Mapping[str, str], *, mode: str = "lmms") -> str:
    """How a free-form answer names its option under ``mode``: ``"letter"`` (a letter decides),
    ``"text"`` (no letter; the option text decides) or ``"none"``."""
    return _read(output, options, mode)[1]


def lmms_choices(row: Mapping) -> dict[str, str]:
    """The choices lmms-eval's scorer reads for a MMBench row (``build_choices``).

    ``mmbench_process_results`` copies each column as ``doc.get(c, "nan")`` and
    ``build_choices`` keeps A-D unless the value is None or NaN: unlike the prompt, a "nan"
    string or an empty text stays a choice (and "" is a substring of every answer). A record
    without the columns (only an ``options`` dict) gives its options A-D.
    """
    if not any(k in row for k in LMMS_CHOICE_COLUMNS):
        return {k: str(v) for k, v in row["options"].items() if k in LMMS_CHOICE_COLUMNS}
    values = {k: row.get(k, "nan") for k in LMMS_CHOICE_COLUMNS}
    return {k: str(v) for k, v in values.items() if not _isna(v)}


def _isna(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _read(output: str, options: Mapping[str, str], mode: str) -> tuple[str | None, str]:
    if mode == "lmms":
        return _lmms(output.strip(), options)
    if mode == "lenient":
        return _lenient(output, options)
    raise ValueError(f"`mode` must be one of {', '.join(CHOICE_MODES)}, but got {mode!r}.")


# ---------------------------------------------------------------- lmms-eval's can_infer

def _lmms(answer: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    letter = _lmms_option(answer)
    if letter:
        return letter, "letter"
    letter = _lmms_text(answer, options)
    return letter, "text" if letter else "none"


def _lmms_option(answer: str) -> str | None:
    """``can_infer_option``: a letter as a whole token, bare or in one of its wrappings."""
    if _JUDGE_FAILURE in answer:
        return None
    tokens = answer.split()
    present = set(tokens)
    bare = [c for c in LMMS_LETTERS if c in present]
    # "A might be a quantifier": a lone bare "A" in more than three tokens is not read as bare.
    if len(bare) == 1 and not ("A" in present and len(tokens) > 3):
        return bare[0]
    for prefix, suffix in _LMMS_WRAPPINGS:
        wrapped = [c for c in LMMS_LETTERS if prefix + c + suffix in present]
        if len(wrapped) == 1:
            return wrapped[0]
    return None


def _lmms_text(answer: str, options: Mapping[str, str]) -> str | None:
    """``can_infer_text``: the one option whose lowercased text occurs in the lowercased answer."""
    low = answer.lower()
    hits = [k for k, text in options.items()
            if k in LMMS_CHOICE_COLUMNS and str(text).lower() in low]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------- the lenient reading

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


def _lenient(output: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    strong, weak, bare = _letters(output, set(options))
    for letters in (strong, weak, bare):
        if letters:
            chosen = letters | bare
            return (next(iter(letters)), "letter") if len(chosen) == 1 else (None, "none")
    letter = _option_by_text(output, options)
    return letter, "text" if letter else "none"
