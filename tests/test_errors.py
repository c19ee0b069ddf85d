"""Table-driven tests for core.errors: labels, rules file validation, error profiles."""

import json

import pytest

from core.error_profile import BenchmarkOptimizer, ErrorProfile
from core.errors import (
    DEFAULT_RULES_PATH,
    LABELS,
    classify,
    load_rules,
    mmbench_options,
)
from core.exceptions import DataError, UserError
from strategies import remedies

REMEDIES = remedies()


def step(operation, argument="", dependencies=()):
    return {"operation": operation, "argument": argument, "dependencies": list(dependencies)}


def gqa(question, answer, semantic=(), detailed="", semantic_type="", structural="query"):
    """A record in GQA-ru's own columns."""
    return {
        "id": f"q{abs(hash(question)) % 10_000}",
        "imageId": "n1",
        "question": question,
        "answer": answer,
        "fullAnswer": answer,
        "isBalanced": True,
        "types": {"structural": structural, "semantic": semantic_type, "detailed": detailed},
        "semantic": list(semantic),
    }


QUERY_COLOR = [step("select", "car (1)"), step("query", "color", [0])]
VERIFY_COLOR = [step("select", "car (1)"), step("verify color", "red", [0])]
CHOOSE_SIDE = [step("select", "cat (2)"), step("choose hposition", "left|right", [0])]
LEFT_CAR_COLOR = [
    step("select", "car (1)"),
    step("filter hposition", "left", [0]),
    step("query", "color", [1]),
]
COLOR_AND_SIDE = [
    step("select", "car (1)"),
    step("verify color", "red", [0]),
    step("select", "car (1)"),
    step("verify hposition", "left", [2]),
    step("and", "", [1, 3]),
]
COUNT = [step("select", "cat (3)"), step("count", "", [0])]
QUERY_NAME = [
    step("select", "table (4)"),
    step("relate", "_,on,s (5)", [0]),
    step("query", "name", [1]),
]

CAR_COLOR = gqa("Какого цвета машина?", "красный", QUERY_COLOR, "queryAttr", "attr")
CAR_RED = gqa("Машина красная?", "да", VERIFY_COLOR, "verifyAttr", "attr", "verify")
CAT_SIDE = gqa("Кошка слева или справа?", "слева", CHOOSE_SIDE, "positionChoose", "rel", "choose")
ON_TABLE = gqa("Что лежит на столе?", "книга", QUERY_NAME, "relS", "rel")

# fmt: off
GQA_CASES = [
    # correct answers
    ("exact", CAR_COLOR, "красный", True, set()),
    ("case and full stop", CAR_COLOR, "Красный.", True, set()),
    ("yo and quotes", gqa("Что это?", "ёлка"), "«Елка»", True, set()),
    ("correct but image unreadable", CAR_COLOR, "красный", False, set()),
    # missing image outranks everything
    ("missing image", CAR_COLOR, "синий", False, {"missing_image"}),
    ("missing image verbose", CAR_COLOR, "На картинке я вижу синюю машину.", False, {"missing_image"}),
    # metadata decides the content label
    ("wrong colour", CAR_COLOR, "синий", True, {"color"}),
    ("verbose colour", CAR_COLOR, "Машина на картинке синего цвета.", True, {"format_mismatch", "color"}),
    ("gold inflected", CAR_COLOR, "красная", True, {"format_mismatch", "color"}),
    ("gold inside a phrase", CAR_COLOR, "Машина красного цвета", True, {"format_mismatch", "color"}),
    ("english answer", CAR_COLOR, "red", True, {"format_mismatch", "color"}),
    ("empty", CAR_COLOR, "", True, {"format_mismatch", "color"}),
    ("whitespace only", CAR_COLOR, "  \n", True, {"format_mismatch", "color"}),
    ("verify colour", CAR_RED, "нет", True, {"color"}),
    ("verify colour verbose", CAR_RED, "Нет, машина не красная, а синяя.", True, {"format_mismatch", "color"}),
    ("choose side", CAT_SIDE, "справа", True, {"location"}),
    ("filter by side, ask colour", gqa("Какого цвета машина слева?", "белый", LEFT_CAR_COLOR), "черный", True, {"color"}),
    ("and of colour and side", gqa("Машина красная и слева?", "нет", COLOR_AND_SIDE), "да", True, {"color", "location"}),
    ("count operation", gqa("Сколько кошек?", "две", COUNT), "три", True, {"counting"}),
    ("count verbose", gqa("Сколько кошек?", "две", COUNT), "На картинке три кошки", True, {"format_mismatch", "counting"}),
    ("position type only", gqa("Где кошка?", "слева", (), "positionQuery"), "справа", True, {"location"}),
    ("object question", ON_TABLE, "ручка", True, {"other"}),
    ("object question verbose", ON_TABLE, "На столе лежит ручка и ещё что-то", True, {"format_mismatch"}),
    ("object answer contains gold", ON_TABLE, "Это книга", True, {"format_mismatch"}),
    ("object answer latin", ON_TABLE, "book", True, {"format_mismatch"}),
    ("mixed script but mostly russian", ON_TABLE, "шариковая ручка Parker", True, {"other"}),
    # no metadata: Russian text rules
    ("text: какого цвета", gqa("Какого цвета мяч?", "синий"), "зелёный", True, {"color"}),
    ("text: colour word in question", gqa("Машина зелёная?", "да"), "нет", True, {"color"}),
    ("text: colour genitive", gqa("Мяч синего цвета?", "нет"), "да", True, {"color"}),
    ("text: colour answer", gqa("Что за фрукт?", "желтый"), "круглый", True, {"color"}),
    ("text: сколько", gqa("Сколько людей на фото?", "три"), "два", True, {"counting"}),
    ("text: numeral answer", gqa("Какое число на табличке?", "5"), "6", True, {"counting"}),
    ("text: где", gqa("Где лежит книга?", "на столе"), "на полу", True, {"location"}),
    ("text: слева или справа", gqa("Собака слева или справа от кота?", "справа"), "слева", True, {"location"}),
    ("text: side answer", gqa("На какой стороне дом?", "левой"), "правой", True, {"location"}),
    ("text: center answer", gqa("В какой части картинки мяч?", "в центре"), "сверху", True, {"location"}),
    ("text: nothing specific", gqa("Что это за животное?", "собака"), "кошка", True, {"other"}),
    ("text: цветок is not a colour", gqa("Какой это цветок?", "роза"), "тюльпан", True, {"other"}),
    ("text: verbose colour", gqa("Какого цвета небо?", "голубой"), "Небо на этой картинке ярко-синее.", True, {"format_mismatch", "color"}),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "example", "prediction", "image_ok", "expected"),
    GQA_CASES,
    ids=[case[0] for case in GQA_CASES],
)
def test_classify_gqa(name, example, prediction, image_ok, expected):
    assert classify("gqa_ru", example, prediction, image_ok=image_ok) == expected


def mmb(question, answer, options, category="image_topic", l2="coarse_perception", **extra):
    """A record in MMBench-ru's own columns: missing options are NaN or "nan"."""
    columns = {letter: options.get(letter, float("nan")) for letter in "ABCD"}
    if "D" not in options:
        columns["D"] = "nan"
    return {
        "index": 17,
        "question": question,
        "hint": None,
        **columns,
        "answer": answer,
        "category": category,
        "l2-category": l2,
        "source": "ru",
        "split": "dev",
        **extra,
    }


ANIMALS = {"A": "кошка", "B": "собака", "C": "лошадь"}
PET = mmb("Какое животное на картинке?", "B", ANIMALS)
SPATIAL = mmb(
    "Где находится мяч относительно стола?",
    "A",
    {"A": "слева", "B": "справа"},
    "spatial_relationship",
    "relation_reasoning",
)
LOCALIZE = mmb(
    "Какой объект ближе к камере?",
    "C",
    ANIMALS,
    "object_localization",
    "finegrained_perception (instance-level)",
)
COLOUR_Q = mmb(
    "Какого цвета зонт?",
    "D",
    {"A": "красный", "B": "синий", "C": "зелёный", "D": "жёлтый"},
    "attribute_recognition",
)
HOW_MANY = mmb("Сколько птиц на ветке?", "A", {"A": "три", "B": "две"}, "attribute_recognition")

# fmt: off
MMBENCH_CASES = [
    ("letter", PET, "B", True, set()),
    ("answer marker", PET, "Ответ: B", True, set()),
    ("parenthesised", PET, "(B) собака", True, set()),
    ("cyrillic look-alike", PET, "В. собака", True, set()),
    ("option text", PET, "На картинке собака.", True, set()),
    ("correct but image unreadable", PET, "B", False, set()),
    ("wrong letter", PET, "A", True, {"other"}),
    ("wrong option text", PET, "Это лошадь", True, {"other"}),
    ("no letter", PET, "Не могу определить", True, {"format_mismatch"}),
    ("two letters", PET, "A или B", True, {"format_mismatch"}),
    ("preposition is not B", PET, "В центре изображения что-то лежит", True, {"format_mismatch"}),
    ("letter not an option", PET, "D", True, {"format_mismatch"}),
    ("missing image", PET, "A", False, {"missing_image"}),
    ("spatial category", SPATIAL, "B", True, {"location"}),
    ("spatial category, no letter", SPATIAL, "Мяч где-то рядом", True, {"format_mismatch", "location"}),
    ("localization category", LOCALIZE, "A", True, {"location"}),
    ("colour by question text", COLOUR_Q, "A", True, {"color"}),
    ("counting by question text", HOW_MANY, "Ответ: B", True, {"counting"}),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "example", "prediction", "image_ok", "expected"),
    MMBENCH_CASES,
    ids=[case[0] for case in MMBENCH_CASES],
)
def test_classify_mmbench(name, example, prediction, image_ok, expected):
    assert classify("mmbench_ru", example, prediction, image_ok=image_ok) == expected


def test_mmbench_options_drop_missing_and_prefer_options_dict():
    assert mmbench_options(PET) == ANIMALS
    record = dict(PET, options={"A": "да", "B": "нет", "C": None})
    assert mmbench_options(record) == {"A": "да", "B": "нет"}
    # right and wrong follow lmms-eval's reading of the raw columns, as the headline does
    assert classify("mmbench_ru", dict(record, A="да", B="нет", C=None, answer="A"), "да") == set()
    assert mmbench_options({"A": " один ", "B": None, "C": "", "D": "NaN"}) == {"A": "один"}


def test_classify_labels_come_from_the_contract():
    for _, example, prediction, image_ok, _ in GQA_CASES:
        assert classify("gqa_ru", example, prediction, image_ok=image_ok) <= set(LABELS)


def test_classify_rejects_unknown_benchmark():
    with pytest.raises(ValueError, match="gqa_ru, mmbench_ru"):
        classify("vqa_en", CAR_COLOR, "красный")


# ---------------------------------------------------------------------------
# rules file
# ---------------------------------------------------------------------------


def test_default_rules_load_once():
    rules = load_rules()
    assert rules is load_rules()
    assert set(rules.labels) == {"counting", "color", "location"}


def _write_rules(tmp_path, change):
    data = json.loads(DEFAULT_RULES_PATH.read_text(encoding="utf-8"))
    change(data)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# fmt: off
BAD_RULES = [
    ("bad regex", lambda d: d["content_labels"]["color"]["question_patterns"].insert(1, "(["), "$.content_labels.color.question_patterns[1]"),
    ("wrong type", lambda d: d["format"].update(max_extra_words="two"), "$.format.max_extra_words"),
    ("remedies are the strategies' own", lambda d: d.update(remedies={"other": ["magic"]}), "$"),
    ("missing label", lambda d: d["content_labels"].pop("location"), "$.content_labels"),
    ("unknown field", lambda d: d["content_labels"]["color"].update(colour=[]), "$.content_labels.color"),
    ("word with a space", lambda d: d["content_labels"]["counting"]["lexicon"]["words"].insert(0, "два три"), "$.content_labels.counting.lexicon.words[0]"),
]
# fmt: on


@pytest.mark.parametrize(("name", "change", "json_path"), BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_bad_rules_file_names_file_and_field(tmp_path, name, change, json_path):
    path = _write_rules(tmp_path, change)
    with pytest.raises(DataError) as info:
        load_rules(path)
    message = str(info.value)
    assert str(path) in message
    assert json_path in message
    assert isinstance(info.value, UserError)


def test_rules_file_not_json_or_absent(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1,', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON.*line 1"):
        load_rules(broken)
    with pytest.raises(DataError, match="absent.json cannot be read"):
        load_rules(tmp_path / "absent.json")


def test_custom_rules_change_the_labels(tmp_path):
    strict = load_rules(_write_rules(tmp_path, lambda d: d["format"].update(max_extra_words=0)))
    example = gqa("Что это?", "кошка")
    assert classify("gqa_ru", example, "большая собака") == {"other"}
    assert classify("gqa_ru", example, "большая собака", rules=strict) == {"format_mismatch"}


# ---------------------------------------------------------------------------
# BenchmarkOptimizer
# ---------------------------------------------------------------------------


def _verbose_baseline():
    """A seed model that answers in sentences: mostly format errors, a few content ones."""
    samples = []
    for i in range(6):
        samples.append(
            {
                "example": dict(CAR_COLOR, id=f"v{i}"),
                "prediction": "Машина на картинке красного цвета.",
                "image_ok": True,
            }
        )
    samples.append({"example": ON_TABLE, "prediction": "На столе лежит книга.", "image_ok": True})
    samples.append({"example": CAT_SIDE, "prediction": "справа", "image_ok": True})
    samples.append({"example": CAR_COLOR, "prediction": "синий", "image_ok": True})
    samples.append({"example": CAR_COLOR, "prediction": "красный", "image_ok": True})
    samples.append({"example": ON_TABLE, "prediction": "книга", "image_ok": True})
    samples.append({"example": ON_TABLE, "prediction": "", "image_ok": False})
    return samples


def test_profile_of_a_verbose_baseline_names_format_mismatch():
    profile = BenchmarkOptimizer(remedies=REMEDIES).profile("gqa_ru", _verbose_baseline())
    assert isinstance(profile, ErrorProfile)
    assert (profile.n, profile.n_errors) == (12, 10)
    assert profile.main_cause == "format_mismatch"
    assert profile.counts == {
        "format_mismatch": 7, "counting": 0, "color": 7, "location": 1, "missing_image": 1, "other": 0,
    }  # fmt: skip
    assert profile.shares["format_mismatch"] == pytest.approx(0.7)
    assert profile.per_category == {"attr": {"n": 8, "errors": 7}, "rel": {"n": 4, "errors": 3}}
    assert len(profile.examples["format_mismatch"]) == 3
    assert profile.examples["missing_image"][0]["question"] == "Что лежит на столе?"
    # the cheap settings first, then what trains, the larger share of format errors first
    assert profile.recommended_strategies() == [
        "prompt_constraints",
        "generation_params",
        "answer_format_sft",
        "context_distill",
        "optuna_hpo",
    ]
    lines = profile.recommendations()
    assert "format_mismatch" in lines[0] and "prompt_constraints" in lines[0]
    assert any("color" in line and "attr" in line for line in lines)
    assert any("no model remedy" in line for line in lines)
    as_dict = json.loads(json.dumps(profile.to_dict(), ensure_ascii=False))
    assert as_dict["main_cause"] == "format_mismatch"
    assert as_dict["recommended_strategies"][0] == "prompt_constraints"


def test_profile_uses_precomputed_labels_as_they_are():
    samples = [
        {"example": CAR_COLOR, "prediction": "красный", "labels": ["counting"]},
        {"example": CAR_COLOR, "prediction": "красный", "labels": []},
        {"example": ON_TABLE, "prediction": "x", "labels": ["other"]},
    ]
    profile = BenchmarkOptimizer(remedies=REMEDIES).profile("gqa_ru", samples)
    assert profile.counts["counting"] == 1 and profile.counts["other"] == 1
    assert profile.main_cause == "counting"  # ties go to the earlier label
    assert profile.recommended_strategies() == ["answer_format_sft", "optuna_hpo"]
    with pytest.raises(ValueError, match="format_mismatch"):
        BenchmarkOptimizer().profile("gqa_ru", [{"example": CAR_COLOR, "labels": ["blurry"]}])


def test_profile_without_errors_or_with_only_missing_images():
    clean = BenchmarkOptimizer().profile(
        "gqa_ru", [{"example": CAR_COLOR, "prediction": "красный"}]
    )
    assert clean.main_cause is None and clean.recommended_strategies() == []
    assert clean.recommendations() == ["No errors on 1 gqa_ru examples: nothing to fix."]
    broken = BenchmarkOptimizer().profile(
        "gqa_ru", [{"example": CAR_COLOR, "prediction": "", "image_ok": False}]
    )
    assert broken.main_cause == "missing_image"
    assert broken.recommended_strategies() == []
    assert "Fix the data" in broken.recommendations()[0]


def test_profile_mmbench_categories_and_weak_types():
    samples = [
        {"example": SPATIAL, "prediction": "B"},
        {"example": SPATIAL, "prediction": "A"},
        {"example": LOCALIZE, "prediction": "A"},
        {"example": PET, "prediction": "B"},
    ]
    profile = BenchmarkOptimizer(remedies=REMEDIES).profile("mmbench_ru", samples)
    assert profile.main_cause == "location"
    assert profile.per_category["spatial_relationship"] == {"n": 2, "errors": 1}
    assert profile.weak_categories("location") == ["object_localization", "spatial_relationship"]
    assert profile.recommended_strategies() == ["answer_format_sft", "optuna_hpo"]
    assert "object_localization" in profile.recommendations()[0]


def test_profile_counts_how_mmbench_answers_named_their_option():
    # Right by the option's text twice, right by a letter once, wrong by a letter twice.
    samples = [
        {"example": SPATIAL, "prediction": "A", "output": "слева"},
        {"example": SPATIAL, "prediction": "A", "output": "Фигура слева."},
        {"example": PET, "prediction": "B", "output": "B"},
        {"example": PET, "prediction": "A", "output": "A"},
        {"example": LOCALIZE, "prediction": "A", "output": "A"},
        {"example": LOCALIZE, "prediction": "", "output": "не знаю"},
    ]
    profile = BenchmarkOptimizer().profile("mmbench_ru", samples)
    assert profile.answer_styles == {"text": {"n": 2, "correct": 2},
                                     "letter": {"n": 3, "correct": 1},
                                     "none": {"n": 1, "correct": 0}}
    assert profile.choice_style() == "text"
    assert profile.to_dict()["answer_styles"] == profile.answer_styles
    letters = BenchmarkOptimizer().profile("mmbench_ru", samples[2:])
    assert letters.choice_style() == "letter"
    # Without raw answers (a profile rebuilt from labels alone) nothing is claimed.
    bare = BenchmarkOptimizer().profile("mmbench_ru", [{"example": PET, "prediction": "B"}])
    assert bare.answer_styles == {} and bare.choice_style() is None


def test_profile_rejects_unknown_benchmark():
    with pytest.raises(ValueError, match="gqa_ru"):
        BenchmarkOptimizer().profile("gqa", [])


def test_remedies_come_from_the_registry_not_from_core():
    """Every registered strategy that says it addresses a label is recommended for it, the ones
    that train nothing first; no strategy name is written in core's rules."""
    import strategies

    for name in strategies.names():
        for label, share in strategies.get(name).addresses.items():
            assert (share > 0) == (name in dict(REMEDIES.get(label, ()))), (name, label)
    assert [n for n, _ in REMEDIES["format_mismatch"]][:2] == ["prompt_constraints",
                                                               "generation_params"]
    assert "context_distill" in dict(REMEDIES["format_mismatch"])
    assert not any(name in DEFAULT_RULES_PATH.read_text(encoding="utf-8")
                   for name in strategies.names())
    profile = BenchmarkOptimizer().profile("gqa_ru", [{"example": CAR_COLOR, "prediction": "x",
                                                       "labels": ["color"]}])
    assert profile.recommended_strategies() == []
    assert "No registered remedy" in profile.recommendations()[0]
