"""``extract_choice(mode="lmms")`` against lmms-eval's own functions (tests/lmms_reference).

The expected letters come from running lmms-eval's original code on the same answers and rows
(``mmbench_process_results`` -> the results table -> ``prefetch_answer``), never from a second
copy of our rule. ``mode="lenient"`` keeps today's reading and is tested in test_metrics.py.
"""

from __future__ import annotations

import random

import pytest

from core.metrics import choice_style, extract_choice, lmms_choices
from tests.lmms_reference.mmbench_ru import lmms_prefetch

COLOURS = {"A": "красный", "B": "зелёный", "C": "синий", "D": "жёлтый"}


def row(options: dict, **columns) -> dict:
    """A MMBench-ru row in the dataset's own columns (missing options None, as on the hub)."""
    doc = {"index": 7, "question": "Какого цвета круг?", "hint": None, "answer": "A",
           "category": "attribute_recognition", "l2-category": "FP-S", "source": "demo",
           "split": "dev", "comment": None, "A": None, "B": None, "C": None, "D": None}
    doc.update(options)
    doc.update(columns)
    return doc


def reference(doc: dict, answer: str) -> str | None:
    return lmms_prefetch(doc, answer) or None


def ours(doc: dict, answer: str) -> str | None:
    return extract_choice(answer, lmms_choices(doc), mode="lmms")


# (answer, options, the letter lmms-eval's can_infer reads; None: it would ask its judge)
GOLDEN = [
    ("B", COLOURS, "B"),
    ("  B\n", COLOURS, "B"),
    ("B.", COLOURS, "B"),
    ("B)", COLOURS, "B"),
    ("(B)", COLOURS, "B"),
    ("(B).", COLOURS, "B"),
    (":B", COLOURS, "B"),
    ("Ответ: B", COLOURS, "B"),  # "B" is a whole token
    ("Ответ:B", COLOURS, None),  # one token "Ответ:B": no letter, no option text
    ("**B**", COLOURS, None),  # markdown is not one of its wrappings
    ("[C]", COLOURS, None),
    ("b", COLOURS, None),  # lowercase letters are not letters to it
    ("В", COLOURS, None),  # Cyrillic В is not B
    ("В. зелёный", COLOURS, "B"),  # ... but the option text is a substring
    ("E", COLOURS, "E"),  # it looks for A-E whatever the options
    ("D", {"A": "да", "B": "нет"}, "D"),  # a letter the question does not offer
    ("A", COLOURS, "A"),
    ("A красный круг", COLOURS, "A"),  # three tokens: A is read
    ("A красный круг слева", COLOURS, "A"),  # the quantifier rule fires, then "красный" is the text
    ("A круг слева сверху", COLOURS, None),  # "A might be a quantifier": not read as a letter
    ("A. круг слева сверху", COLOURS, "A"),  # wrapped, so read
    ("A или B", COLOURS, None),  # two bare letters, no wrapping, no option text
    ("A. или B.", COLOURS, None),
    ("A или B.", COLOURS, "A"),  # one bare letter in three tokens
    ("A или B. C", COLOURS, "B"),  # two bare letters (A, C): the one wrapped letter decides
    ("Ответ B. Вариант C неверен", COLOURS, "C"),  # the bare C wins over the wrapped B
    ("зелёный", COLOURS, "B"),
    ("Зелёный.", COLOURS, "B"),  # lowercased substring
    ("зеленый", COLOURS, None),  # no ё folding
    ("красный и синий", COLOURS, None),  # two option texts
    ("тёмно-красный", {"A": "красный", "B": "тёмно-красный"}, None),  # both are substrings
    ("Нет", {"A": "да", "B": "нет"}, "B"),
    ("Данные неполные", {"A": "да", "B": "нет"}, "A"),  # "да" is a substring of "данные"
    ("", COLOURS, None),
    ("Failed to obtain answer via API B", COLOURS, None),
]


@pytest.mark.parametrize(("answer", "options", "expected"), GOLDEN)
def test_golden_answers_read_as_lmms_eval_reads_them(answer, options, expected):
    doc = row(options)
    assert reference(doc, answer) == expected  # the table itself is lmms-eval's behaviour
    assert ours(doc, answer) == expected


def test_a_nan_or_empty_option_is_a_choice_for_lmms_eval_but_not_in_the_prompt():
    # build_choices keeps every A-D value that is not None/NaN: the string "nan" is matched as
    # text, and an empty text is a substring of every answer.
    nan_doc = row({"A": "да", "B": "нет", "C": "nan"})
    assert lmms_choices(nan_doc) == {"A": "да", "B": "нет", "C": "nan"}
    assert ours(nan_doc, "banana") == reference(nan_doc, "banana") == "C"
    empty_doc = row({"A": "да", "B": "нет", "C": ""})
    assert ours(empty_doc, "не знаю") == reference(empty_doc, "не знаю") == "C"
    assert ours(empty_doc, "нет") == reference(empty_doc, "нет") is None
    assert lmms_choices(row({"A": "да", "B": "нет", "C": float("nan")})) == {"A": "да", "B": "нет"}


def _answers(rng: random.Random, options: dict) -> list[str]:
    """Answers of every shape a model writes: letters bare and wrapped (lmms-eval's wrappings
    and others), Cyrillic look-alikes, lowercase, markdown, "A" as a quantifier, option texts
    whole and inside words, several letters, empty, long sentences."""
    letters = list("ABCDE") + ["А", "В", "С", "a", "b", "c", "d"]
    wraps = [("", ""), ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
             ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."), ("**", "**"),
             ("[", "]"), ("«", "»"), ("", ";"), ("'", "'"), ("*", ""), ("", "\n")]
    words = ["Ответ:", "Ответ", "Правильный", "вариант", "это", "A", "круг", "слева", "на",
             "картинке", "The", "answer", "is", "option", "**Ответ:**", "-", "—", "и", "или",
             "в", "с", "а", "нет", "да"]
    texts = list(options.values())
    out = []
    for _ in range(50):
        kind = rng.randrange(7)
        letter = rng.choice(letters)
        pre, post = rng.choice(wraps)
        if kind == 0:
            out.append(f"{pre}{letter}{post}")
        elif kind == 1:
            n = rng.randrange(0, 5)
            body = [rng.choice(words) for _ in range(n)]
            body.insert(rng.randrange(n + 1), f"{pre}{letter}{post}")
            out.append(" ".join(body))
        elif kind == 2:
            pre2, post2 = rng.choice(wraps)
            out.append(f"{pre}{letter}{post} {rng.choice(words)} {pre2}{rng.choice(letters)}{post2}")
        elif kind == 3:
            text = rng.choice(texts)
            case = rng.choice([str, str.upper, str.capitalize, lambda t: t.replace("ё", "е")])
            out.append(f"{rng.choice(['', 'Это ', 'На картинке '])}{case(text)}"
                       f"{rng.choice(['', '.', ' цвет', 'ватый'])}")
        elif kind == 4:
            out.append(f"{pre}{letter}{post} {rng.choice(texts)}")
        elif kind == 5:
            out.append(rng.choice(["", " ", "\n", "Не знаю", "A", "A A", "a", "**B**",
                                   "Ответ:**C**", "Failed to obtain answer via API"]))
        else:
            out.append(f"A {rng.choice(words)} {rng.choice(words)} {rng.choice(words)} "
                       f"{rng.choice(['', pre + letter + post])}".strip())
    return out


def _docs() -> list[dict]:
    return [
        row(COLOURS),
        row({"A": "красный", "B": "тёмно-красный", "C": "синий"}),
        row({"A": "да", "B": "нет"}),
        row({"A": "да", "B": "нет", "C": "nan", "D": "nan"}),
        row({"A": "слева", "B": "справа", "C": float("nan"), "D": None}),
        row({"A": "в центре", "B": " справа ", "C": "A", "D": "B"}),  # options that are letters
        row({"A": "1", "B": "2", "C": "3", "D": "12"}),
    ]


def test_a_few_hundred_generated_answers_agree_with_lmms_eval():
    rng = random.Random(0)
    checked, disagreements, letters_read = 0, [], set()
    for doc in _docs():
        options = {k: v for k, v in doc.items() if k in "ABCD" and isinstance(v, str)}
        for answer in _answers(rng, options):
            expected = reference(doc, answer)
            got = ours(doc, answer)
            checked += 1
            letters_read.add(expected)
            if got != expected:
                disagreements.append((answer, options, expected, got))
    assert checked >= 300
    assert not disagreements, disagreements[:10]
    assert {None, "A", "B", "C", "D", "E"} <= letters_read  # the set exercises every outcome


def test_choice_style_follows_the_lmms_rule():
    assert choice_style("B.", COLOURS) == "letter"
    assert choice_style("Это синий", COLOURS) == "text"
    assert choice_style("**B**", COLOURS) == "none"
    assert choice_style("**B**", COLOURS, mode="lenient") == "letter"


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="lmms, lenient"):
        extract_choice("B", COLOURS, mode="gpt")


def _line(i: int, output: str) -> dict:
    return {"id": str(i), "question": "Какого цвета круг?", "target": "B", "prompt": "…",
            "output": output, "image_ok": True, "labels": [], "category": "color",
            "cluster": i, "output_type": "generate_until", "options": dict(COLOURS),
            "parsed": None, "index": i, "n_options": 4, "correct": False}


def test_rescoring_reads_by_lmms_evals_rule_and_gives_the_lenient_reading_beside():
    from core.evaluate import summarize
    from core.rescore import rescore

    samples = rescore("mmbench_ru", [_line(0, "B"), _line(1, "**B**"), _line(2, "Ответ:B")])
    assert [s["parsed"] for s in samples] == ["B", None, None]
    assert [s["parsed_lenient"] for s in samples] == ["B", "B", "B"]
    metrics = summarize("mmbench_ru", samples)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["unparseable"] == 2
    assert metrics["accuracy_lenient"] == 1.0 and metrics["unparseable_lenient"] == 0
