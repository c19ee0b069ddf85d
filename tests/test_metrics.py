"""Table-driven tests for core.metrics: exact match, letter extraction, intervals, paired tests."""

import math
import string

import pytest

from core.metrics import (
    Accuracy,
    PairedResult,
    accuracy,
    bootstrap_interval,
    choice_style,
    circular_accuracy,
    extract_choice,
    gqa_match,
    is_better,
    mcnemar_exact,
    normalize_answer,
    paired_test,
    wilson_interval,
)

# ---------------------------------------------------------------------------
# gqa_match
# ---------------------------------------------------------------------------

# (prediction, answer, lmms, normalized)
GQA_CASES = [
    ("красный", "красный", True, True),
    ("Красный", "красный", True, True),
    ("Красный.", "красный", True, True),
    ("  да\n", "да", True, True),
    ("Да!", "да", True, True),
    ("ДА", "да", True, True),
    ("Ёлка.", "елка", False, True),
    ("ёлка", "ёлка", True, True),
    ("зелёный", "зеленый", False, True),
    ("«да»", "да", False, True),
    ("„нет“", "нет", False, True),
    ("да…", "да", False, True),
    ("нет — ", "нет", False, True),
    ("“кошка”", "кошка", False, True),
    ('"кошка"', "кошка", True, True),
    ("(слева)", "слева", True, True),
    # lmms-eval strips before deleting punctuation, never after.
    ("да .", "да", False, True),
    ("в  центре", "в центре", False, True),
    ("в центре", "в центре", True, True),
    ("красно-белый", "красно-белый", True, True),
    ("красно-белый", "краснобелый", True, True),
    ("синий", "красный", False, False),
    ("Машина красная.", "красный", False, False),
    ("", "да", False, False),
    ("2", "два", False, False),
]


@pytest.mark.parametrize(("prediction", "answer", "lmms", "normalized"), GQA_CASES)
def test_gqa_match_modes(prediction, answer, lmms, normalized):
    assert gqa_match(prediction, answer, mode="lmms") is lmms
    assert gqa_match(prediction, answer, mode="normalized") is normalized
    assert gqa_match(prediction, answer) is normalized


def test_gqa_match_lmms_reproduces_lmms_eval_exact_match():
    def lmms_eval(prediction: str, gold: str) -> bool:
        # lmms-eval: ConfigurableTask.process_results strips the generation, then
        # exact_match(ignore_case=True, ignore_punctuation=True) lowercases and deletes
        # string.punctuation on both sides and compares.
        table = string.punctuation.maketrans("", "", string.punctuation)
        return prediction.strip().lower().translate(table) == gold.lower().translate(table)

    samples = [p for p, *_ in GQA_CASES] + ["Нет,", " Слева. ", "на столе!", "«Да»."]
    for prediction in samples:
        for gold in ["да", "нет", "слева", "елка", "на столе", "красный"]:
            assert gqa_match(prediction, gold, mode="lmms") == lmms_eval(prediction, gold)


def test_gqa_match_rejects_unknown_mode():
    with pytest.raises(ValueError, match="lmms, normalized"):
        gqa_match("да", "да", mode="strict")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Ёлка, «зелёная»! ", "елка зеленая"),
        ("да\u0301", "да"),
        ("е\u0308ж", "еж"),
        ("Нет — это… кот", "нет это кот"),
        ("ß", "ss"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# ---------------------------------------------------------------------------
# extract_choice(mode="lenient"): the labelled Russian-aware reading beside the headline
# (mode="lmms", lmms-eval's own rule, is tested against lmms-eval's code in test_choice_lmms.py)
# ---------------------------------------------------------------------------

COLOURS = {"A": "красный", "B": "зелёный", "C": "синий", "D": "жёлтый"}
TWO = {"A": "да", "B": "нет"}
SHADES = {"A": "красный", "B": "тёмно-красный", "C": "синий"}
PLACES = {"A": "слева", "B": "справа", "C": "в центре"}

EXTRACT_CASES = [
    # plain letters in many shapes
    ("B", COLOURS, "B"),
    ("B.", COLOURS, "B"),
    ("B)", COLOURS, "B"),
    ("(B)", COLOURS, "B"),
    ("**B**", COLOURS, "B"),
    ("[C]", COLOURS, "C"),
    (" D\n", COLOURS, "D"),
    ("Ответ: B", COLOURS, "B"),
    ("Ответ:B", COLOURS, "B"),
    ("ответ - B", COLOURS, "B"),
    ("Ответ — **D**", COLOURS, "D"),
    ("Правильный ответ: B. синий", COLOURS, "B"),
    ("Правильный вариант ответа: C", COLOURS, "C"),
    ("The answer is D", COLOURS, "D"),
    ("Я думаю, что правильный вариант A, потому что машина красная.", COLOURS, "A"),
    ("B. Зелёный цвет у травы.", COLOURS, "B"),
    ("C - синий", COLOURS, "C"),
    # Cyrillic look-alikes
    ("В", COLOURS, "B"),
    ("В. зелёный", COLOURS, "B"),
    ("В) зелёный", COLOURS, "B"),
    ("(В)", COLOURS, "B"),
    ("**В**", COLOURS, "B"),
    ("Ответ: С", COLOURS, "C"),
    ("Ответ: А.", COLOURS, "A"),
    ("Я думаю, это С.", COLOURS, "C"),
    ("В - зеленый", COLOURS, "B"),
    ("В\nзелёный", COLOURS, "B"),
    # Cyrillic words that only look like letters
    ("В центре изображения круг", COLOURS, None),
    ("В центре изображения красный круг", COLOURS, "A"),
    ("А также на картинке есть синий мяч", COLOURS, "C"),
    ("а также", COLOURS, None),
    ("в", COLOURS, None),
    ("С левой стороны стоит жёлтый дом", COLOURS, "D"),
    ("Ответ: В центре", PLACES, "C"),
    ("Кот сидит в центре", PLACES, "C"),
    # ambiguity and letters that are not options
    ("A или B", COLOURS, None),
    ("Либо A, либо C.", COLOURS, None),
    ("Ответ: С. Вариант A неверен", COLOURS, "C"),
    ("Я думаю, ответ B, но возможно C", COLOURS, None),
    ("Ответ: B. Хотя, может быть, и D.", COLOURS, None),
    ("Вариант A, но скорее C", COLOURS, None),
    ("Ответ: B. B - зелёный", COLOURS, "B"),
    # a standalone lowercase Latin letter names an option; Cyrillic а/в stay words
    ("b", COLOURS, "B"),
    ("c.", COLOURS, "C"),
    ("ответ: d", COLOURS, "D"),
    ("(a)", COLOURS, "A"),
    ("a cat on a mat", COLOURS, None),
    ("d", TWO, None),
    ("Мяч лежит в коробке, а кот на полу", COLOURS, None),
    ("Я вижу кота в шляпе", COLOURS, None),
    ("C", TWO, None),
    ("D. жёлтый", {"A": "красный", "B": "синий", "C": "зелёный"}, None),
    ("A cat sits on the mat", COLOURS, None),
    ("BMW", COLOURS, None),
    ("B2", COLOURS, None),
    # option texts when there is no letter
    ("Зеленый", COLOURS, "B"),
    ("«Синий»", COLOURS, "C"),
    ("Машина ЖЁЛТАЯ, а не жёлтый фургон", COLOURS, "D"),
    ("Тёмно-красный", SHADES, "B"),
    ("Красный, а рядом тёмно-красный", SHADES, None),
    ("красный и синий", COLOURS, None),
    ("Да, это так.", TWO, "A"),
    ("Нет", TWO, "B"),
    ("Данные неполные", TWO, None),
    ("Не знаю", COLOURS, None),
    ("", COLOURS, None),
]


@pytest.mark.parametrize(("output", "options", "expected"), EXTRACT_CASES)
def test_extract_choice_lenient(output, options, expected):
    assert extract_choice(output, options, mode="lenient") == expected


@pytest.mark.parametrize(("output", "style"), [
    ("B", "letter"), ("Ответ: C", "letter"), ("(A) красный", "letter"),
    ("синий", "text"), ("Это жёлтый цвет.", "text"),
    ("A или B", "none"), ("красный или синий", "none"), ("Не знаю", "none"), ("", "none"),
])
def test_choice_style_says_how_the_answer_named_its_option(output, style):
    assert choice_style(output, COLOURS, mode="lenient") == style
    assert (extract_choice(output, COLOURS, mode="lenient") is None) == (style == "none")


def test_extract_choice_never_reads_a_lowercase_preposition_as_b():
    sentences = [
        "Кошка сидит в коробке",
        "в центре стоит стол",
        "Он смотрит в окно и видит синий дом",
        "В комнате темно",
        "В углу стоит зеленый стул",
    ]
    assert all(extract_choice(s, COLOURS, mode="lenient") != "B" or "зелен" in s
               for s in sentences)
    assert extract_choice("В углу стоит зеленый стул", COLOURS, mode="lenient") == "B"  # by text


# ---------------------------------------------------------------------------
# circular accuracy
# ---------------------------------------------------------------------------


def _rows(spec):
    return [{"index": i, "correct": c, **extra} for i, c, extra in spec]


CIRCULAR_CASES = [
    ("empty", [], dict(circular=0.0, n_groups=0, per_row=0.0, n_rows=0, incomplete_groups=0)),
    (
        "all rotations right",
        [(7, True, {}), (1_000_007, True, {}), (2_000_007, True, {})],
        dict(circular=1.0, n_groups=1, per_row=1.0, n_rows=3, incomplete_groups=0),
    ),
    (
        "one rotation wrong fails the group",
        [(7, True, {}), (1_000_007, False, {}), (8, True, {}), (1_000_008, True, {})],
        dict(circular=0.5, n_groups=2, per_row=0.75, n_rows=4, incomplete_groups=0),
    ),
    (
        "incomplete groups counted from n_options",
        [
            (1, True, {"n_options": 4}),
            (1_000_001, True, {}),
            (2_000_001, True, {}),
            (2, True, {"n_options": 2}),
            (1_000_002, True, {}),
            (3, False, {"n_options": 3}),
        ],
        dict(circular=2 / 3, n_groups=3, per_row=5 / 6, n_rows=6, incomplete_groups=2),
    ),
    (
        "rows without n_options are never incomplete",
        [(4, True, {}), (5, False, {})],
        dict(circular=0.5, n_groups=2, per_row=0.5, n_rows=2, incomplete_groups=0),
    ),
    (
        "rotated copy without its original",
        [(3_000_009, True, {}), (1_000_009, True, {})],
        dict(circular=1.0, n_groups=1, per_row=1.0, n_rows=2, incomplete_groups=0),
    ),
]


@pytest.mark.parametrize(
    ("name", "spec", "expected"), CIRCULAR_CASES, ids=[c[0] for c in CIRCULAR_CASES]
)
def test_circular_accuracy(name, spec, expected):
    result = circular_accuracy(_rows(spec))
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


# ---------------------------------------------------------------------------
# intervals
# ---------------------------------------------------------------------------

# Newcombe (1998), Table I, method 3 (Wilson score without continuity correction).
WILSON_CASES = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (5, 10, 0.2366, 0.7634),
]


@pytest.mark.parametrize(("k", "n", "low", "high"), WILSON_CASES)
def test_wilson_interval_known_values(k, n, low, high):
    got_low, got_high = wilson_interval(k, n)
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


def test_wilson_interval_empty_and_z():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    wide = wilson_interval(50, 100, z=2.576)
    narrow = wilson_interval(50, 100)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_accuracy_string_and_dict():
    acc = accuracy([True] * 447 + [False] * 423)
    assert isinstance(acc, Accuracy)
    assert str(acc) == "51.4% [48.1, 54.7] (n=870)"
    assert acc.to_dict() == {"value": acc.value, "n": 870, "low": acc.low, "high": acc.high}
    assert accuracy([]).n == 0 and accuracy([]).value == 0.0
    with pytest.raises(AttributeError):
        acc.value = 1.0  # frozen


def test_bootstrap_interval_covers_mean_and_is_deterministic():
    values = [1.0] * 60 + [0.0] * 40
    low, high = bootstrap_interval(values, seed=3)
    assert low < 0.6 < high
    assert (low, high) == bootstrap_interval(values, seed=3)
    assert 0.45 < low and high < 0.75
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_interval([]) == (0.0, 0.0)
    spread = bootstrap_interval([float(i) for i in range(200)], n_boot=500, seed=1)
    assert spread[0] < 99.5 < spread[1]


# ---------------------------------------------------------------------------
# paired tests
# ---------------------------------------------------------------------------

# (b_only, c_only, p-value by hand)
MCNEMAR_CASES = [
    (0, 0, 1.0),
    (0, 10, 2 * 0.5**10),
    (10, 0, 2 * 0.5**10),
    (3, 5, 2 * (1 + 8 + 28 + 56) / 2**8),
    (1, 1, 1.0),
    (2, 8, 2 * (1 + 10 + 45) / 2**10),
    (0, 1, 1.0),
]


@pytest.mark.parametrize(("b_only", "c_only", "p"), MCNEMAR_CASES)
def test_mcnemar_exact(b_only, c_only, p):
    assert mcnemar_exact(b_only, c_only) == pytest.approx(p)


def test_mcnemar_exact_large_counts_are_finite():
    p = mcnemar_exact(2000, 2200)
    assert 0.0 < p < 0.01 and math.isfinite(p)


def test_paired_test_counts_and_p_value():
    baseline = [True] * 20 + [False] * 10 + [True] * 5 + [False] * 5
    candidate = [True] * 20 + [True] * 10 + [True] * 5 + [False] * 5
    result = paired_test(baseline, candidate)
    assert isinstance(result, PairedResult)
    assert (result.n, result.b_only, result.c_only) == (40, 0, 10)
    assert result.p_value == pytest.approx(2 * 0.5**10)
    assert result.diff == pytest.approx(0.25)
    assert result.diff_low <= result.diff <= result.diff_high
    assert is_better(result)
    assert set(result.to_dict()) == {
        "n", "baseline_acc", "candidate_acc", "diff", "diff_low", "diff_high", "b_only", "c_only", "p_value",
        "n_clusters", "method",
    }  # fmt: skip


def _flip(values, every):
    return [(not v) if i % every in (0, 1) else v for i, v in enumerate(values)]


def test_paired_test_accepts_a_clearly_better_candidate():
    baseline = [i % 2 == 0 for i in range(400)]
    candidate = [v or i % 3 == 0 for i, v in enumerate(baseline)]
    result = paired_test(baseline, candidate)
    assert result.c_only > 50 and result.b_only == 0
    assert result.diff_low > 0
    assert is_better(result)


def test_paired_test_rejects_noise():
    baseline = [i % 2 == 0 for i in range(400)]
    candidate = _flip(baseline, 40)  # 10 flips each way: no real change
    result = paired_test(baseline, candidate)
    assert result.b_only == result.c_only == 10
    assert result.p_value == 1.0
    assert result.diff_low < 0 < result.diff_high
    assert not is_better(result)


def test_is_better_needs_a_positive_difference():
    worse = paired_test([True] * 30, [False] * 30)
    assert worse.p_value < 0.05 and not is_better(worse)
    assert not is_better(paired_test([True, False], [True, False]))


def test_paired_test_rejects_different_lengths():
    with pytest.raises(ValueError, match="same items"):
        paired_test([True, False], [True])


def test_paired_test_empty():
    result = paired_test([], [])
    assert (result.n, result.diff, result.p_value) == (0, 0.0, 1.0)
