"""Why a prediction is wrong: labels for one answer (``LABELS`` below).

A profile of many answers is ``core.error_profile``.

Lexicons and patterns live in `core/rules/error_rules.json`, checked against
`core/schemas/error_rules.schema.json` when loaded. Metadata (GQA semantic programs, MMBench
categories) decides the content label first; Russian text rules on the question and the gold
answer decide when the metadata says nothing.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator

from core.exceptions import DataError
from core.metrics import extract_choice, gqa_match, lmms_choices

LABELS = ("format_mismatch", "counting", "color", "location", "missing_image", "other")
CONTENT_LABELS = ("counting", "color", "location")
BENCHMARKS = ("gqa_ru", "mmbench_ru")
DEFAULT_RULES_PATH = Path(__file__).parent / "rules" / "error_rules.json"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "error_rules.schema.json"

_CYRILLIC = re.compile(r"[а-яА-ЯёЁ]")
_LATIN = re.compile(r"[A-Za-z]")
_LOGICAL_OPS = ("and", "or")


@dataclass(frozen=True)
class LabelRule:
    """Compiled rules for one content label (see the schema for each field)."""

    gqa_operations: tuple[re.Pattern, ...]
    gqa_types: tuple[re.Pattern, ...]
    mmbench_categories: tuple[re.Pattern, ...]
    question_patterns: tuple[re.Pattern, ...]
    answer_patterns: tuple[re.Pattern, ...]
    lexicon: re.Pattern | None
    lexicon_scope: frozenset[str]


@dataclass(frozen=True)
class ErrorRules:
    """A validated, compiled rules file."""

    source: str
    """Path of the file the rules came from."""
    format: dict
    """The `format` section: thresholds for a format mismatch (endings longest first)."""
    labels: dict[str, LabelRule]
    """Content label name to its compiled rule."""


def _fold(text: str) -> str:
    """Casefold, ё→е, punctuation to spaces, whitespace collapsed: the form rules match on."""
    text = unicodedata.normalize("NFC", text).casefold().replace("ё", "е")
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return " ".join(text.split())


def _compile(patterns: list[str], flags: int = 0) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(p, flags) for p in patterns)


def _lexicon(spec: dict) -> re.Pattern | None:
    forms = [_fold(w) for w in spec["words"]]
    endings = "|".join(re.escape(_fold(e)) for e in spec["endings"])
    forms += [re.escape(_fold(s)) + (f"(?:{endings})" if endings else "") for s in spec["stems"]]
    if not forms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(sorted(forms, key=len, reverse=True)) + r")(?!\w)")


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _read_rules(path: Path) -> ErrorRules:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"Error rules file {path} cannot be read: {exc.strerror}.") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"Error rules file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}. Fix the file and try again."
        ) from exc
    problems = sorted(
        _validator().iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if problems:
        lines = "\n".join(f"  {e.json_path}: {e.message}" for e in problems)
        raise DataError(
            f"Error rules file {path} has {len(problems)} invalid field(s):\n{lines}\n"
            f"Check it against {SCHEMA_PATH.name} and try again."
        )
    labels = {
        name: LabelRule(
            gqa_operations=_compile(spec["gqa_operations"], re.IGNORECASE),
            gqa_types=_compile(spec["gqa_types"], re.IGNORECASE),
            mmbench_categories=_compile(spec["mmbench_categories"], re.IGNORECASE),
            question_patterns=_compile(spec["question_patterns"]),
            answer_patterns=_compile(spec["answer_patterns"]),
            lexicon=_lexicon(spec["lexicon"]),
            lexicon_scope=frozenset(spec["lexicon"]["scope"]),
        )
        for name, spec in data["content_labels"].items()
    }
    fmt = dict(data["format"])
    fmt["inflection_endings"] = sorted(fmt["inflection_endings"], key=len, reverse=True)
    return ErrorRules(source=str(path), format=fmt, labels=labels)


@lru_cache(maxsize=1)
def _default_rules() -> ErrorRules:
    return _read_rules(DEFAULT_RULES_PATH)


def load_rules(path: str | Path | None = None) -> ErrorRules:
    """Load and validate a rules file; the default file is read once and cached.

    Raises:
        DataError: If the file is unreadable, not JSON, or breaks the schema; the message
            names the file and the JSON path of every bad field.
    """
    return _default_rules() if path is None else _read_rules(Path(path))


def _missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def mmbench_options(example: Mapping) -> dict[str, str]:
    """The present options of an MMBench record: its `options` dict, else columns A..D."""
    source = example.get("options") or {letter: example.get(letter) for letter in "ABCD"}
    return {k: str(v).strip() for k, v in source.items() if not _missing(v)}


def _answer_steps(steps: list) -> list[Mapping]:
    """The GQA program steps that produce the answer (the last one, through and/or)."""
    found: list[Mapping] = []
    todo = [len(steps) - 1] if steps else []
    while todo:
        i = todo.pop()
        step = steps[i]
        if step.get("operation") in _LOGICAL_OPS:
            todo.extend(d for d in step.get("dependencies") or [] if 0 <= d < i)
        else:
            found.append(step)
    return found


def _metadata_labels(benchmark: str, example: Mapping, rules: ErrorRules) -> set[str]:
    if benchmark == "gqa_ru":
        steps = [s for s in example.get("semantic") or [] if isinstance(s, Mapping)]
        op_texts = [
            f"{s.get('operation', '')} {s.get('argument', '')}" for s in _answer_steps(steps)
        ]
        types = example.get("types") or {}
        detailed = [str(types.get("detailed") or "")] if isinstance(types, Mapping) else []
        fields = ((op_texts, "gqa_operations"), (detailed, "gqa_types"))
    else:
        categories = [str(example.get(k) or "") for k in ("category", "l2-category")]
        fields = ((categories, "mmbench_categories"),)
    return {
        label
        for label, rule in rules.labels.items()
        for texts, attr in fields
        if any(p.search(t) for p in getattr(rule, attr) for t in texts)
    }


def _text_labels(question: str, answer: str, rules: ErrorRules) -> set[str]:
    texts = {"question": _fold(question), "answer": _fold(answer)}
    labels = set()
    for label, rule in rules.labels.items():
        hit = (
            any(p.search(texts["question"]) for p in rule.question_patterns)
            or any(p.search(texts["answer"]) for p in rule.answer_patterns)
            or (
                rule.lexicon is not None
                and any(rule.lexicon.search(texts[s]) for s in rule.lexicon_scope)
            )
        )
        if hit:
            labels.add(label)
    return labels


def _stems(text: str, fmt: Mapping) -> list[str]:
    stems = []
    for word in text.split():
        ending = next(
            (
                e
                for e in fmt["inflection_endings"]
                if word.endswith(e) and len(word) - len(e) >= fmt["min_stem_length"]
            ),
            "",
        )
        stems.append(word[: len(word) - len(ending)])
    return stems


def _contains_stems(pred: str, gold: str, fmt: Mapping) -> bool:
    """Whether the gold's words occur in order in the prediction, up to inflection."""
    pred_stems, gold_stems = _stems(pred, fmt), _stems(gold, fmt)
    width = len(gold_stems)
    return width > 0 and any(
        pred_stems[i : i + width] == gold_stems for i in range(len(pred_stems) - width + 1)
    )


def _gqa_format_issue(prediction: str, answer: str, fmt: Mapping) -> bool:
    pred, gold = _fold(prediction), _fold(answer)
    n_pred, n_gold = len(pred.split()), len(gold.split())
    if n_pred == 0 or n_pred > n_gold + fmt["max_extra_words"]:
        return True
    if n_gold == 1 and n_pred > fmt["max_words_single_word_gold"]:
        return True
    if fmt["contains_gold_is_format"] and _contains_stems(pred, gold, fmt):
        return True
    if fmt["wrong_script_is_format"] and _CYRILLIC.search(answer) and not _LATIN.search(answer):
        return len(_LATIN.findall(prediction)) > len(_CYRILLIC.findall(prediction))
    return False


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(
            f"`benchmark` must be one of {', '.join(BENCHMARKS)}, but got {benchmark!r}."
        )


def classify(
    benchmark: str,
    example: Mapping,
    prediction: str,
    *,
    image_ok: bool = True,
    rules: ErrorRules | None = None,
) -> set[str]:
    """Label why a prediction is wrong.

    Args:
        benchmark: "gqa_ru" or "mmbench_ru".
        example: A record in the dataset's own columns.
        prediction: The model's generated text.
        image_ok: False when the example's image was absent or unreadable.
        rules: Rules to use; the default rules file when None.

    Returns:
        An empty set when the prediction is correct; {"missing_image"} when it is wrong and
        the image was not available; otherwise "format_mismatch" and/or content labels
        ("counting", "color", "location"), or {"other"} when none applies.
    """
    _check_benchmark(benchmark)
    rules = rules or load_rules()
    if benchmark == "gqa_ru":
        answer = str(example["answer"])
        if gqa_match(prediction, answer, mode="normalized"):
            return set()
        format_issue = _gqa_format_issue(prediction, answer, rules.format)
    else:
        options = mmbench_options(example)
        gold = str(example["answer"]).strip()
        # right and wrong as the headline scores them: lmms-eval's rule
        choice = extract_choice(prediction, lmms_choices(example), mode="lmms")
        if choice == gold:
            return set()
        answer = options.get(gold, "")
        format_issue = choice not in options  # no letter, or one the question does not offer
    if not image_ok:
        return {"missing_image"}
    labels = {"format_mismatch"} if format_issue else set()
    content = _metadata_labels(benchmark, example, rules) or _text_labels(
        str(example.get("question") or ""), answer, rules
    )
    return labels | content or {"other"}
