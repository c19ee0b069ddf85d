"""The MMBench-ru prompt, byte for byte lmms-eval's ``mmbench_doc_to_text`` on the raw row.

One golden test per row shape: the row is written as a dataset file, loaded by
``core.data.load_mmbench`` and turned into text by ``core.evaluate.build_prompt``; the expected
text comes from lmms-eval's own functions (tests/lmms_reference) on the same row.
"""

from __future__ import annotations

import pytest
from PIL import Image

from core.data import load_mmbench, mmbench_prompt_options
from core.evaluate import EvalConfig, build_prompt
from tests.lmms_reference.mmbench_ru import lmms_prompt
from tests.test_data import _png, write_mmbench


def _row(**overrides) -> dict:
    row = {"index": 0, "question": "Какого цвета круг?", "hint": None, "A": "красный",
           "B": "синий", "C": None, "D": None, "answer": "A", "category": "attribute",
           "source": "t", "l2-category": "x", "comment": None, "split": "dev"}
    row.update(overrides)
    return row


SHAPES = {
    "hint None": {},
    "hint empty": {"hint": ""},
    "hint 'nan'": {"hint": "nan"},
    "hint with surrounding whitespace": {"hint": "  Подсказка: фигура одна. \n"},
    "option E": {"C": "зелёный", "D": "жёлтый", "E": "белый"},
    "options with surrounding whitespace": {"A": " красный ", "B": "синий\n", "C": "\tзелёный  "},
    "last option ends with newlines": {"C": "зелёный\n\n"},
    "only two options": {"hint": "Подсказка."},
    "options 'nan' and empty": {"C": "nan", "D": ""},
    "option of spaces": {"C": "   "},
    "four options and a hint": {"C": "зелёный", "D": "жёлтый", "hint": "На картинке круг."},
    "question with trailing whitespace": {"question": "Какого цвета круг? \n"},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prompt_from_the_loaded_row_is_lmms_evals_byte_for_byte(tmp_path, shape):
    row = _row(**SHAPES[shape])
    path = write_mmbench(tmp_path / "MMBench-ru",
                         [{**row, "image": _png(Image.new("RGB", (8, 8), "red"))}])
    [record] = load_mmbench(path)
    assert build_prompt(record, EvalConfig()) == lmms_prompt(row)


def test_the_shapes_differ_where_lmms_eval_differs():
    # an empty hint keeps its separating space; "nan" and None drop the hint
    assert lmms_prompt(_row(hint="")).startswith(" Какого цвета круг?")
    assert lmms_prompt(_row(hint="nan")).startswith("Какого цвета круг?")
    # option E is shown; "nan", "" and None options are not; a text of spaces is
    assert "\nE. белый" in lmms_prompt(_row(E="белый"))
    assert mmbench_prompt_options(_row(C="nan", D="")) == {"A": "красный", "B": "синий"}
    assert mmbench_prompt_options(_row(C="   ")) == {"A": "красный", "B": "синий", "C": "   "}


def test_nan_values_in_memory_read_as_missing():
    # A parquet file stores NaN as null; a row built in memory (pandas) may still hold NaN.
    row = _row(hint=float("nan"), C=float("nan"))
    record = {**row, "benchmark": "mmbench_ru", "options": mmbench_prompt_options(row)}
    assert build_prompt(record, EvalConfig()) == lmms_prompt(row)
