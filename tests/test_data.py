"""Data loading: the real layouts from local folders, schema errors, images, splits."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from core.data import (
    DataSources,
    is_missing,
    load_benchmark,
    load_gqa,
    load_image,
    load_llava_instruct,
    load_mmbench,
)
from core.exceptions import DataError, UserError
from core.splits import make_splits, stratified_subset, unit_of


def _png(img: Image.Image, fmt: str = "PNG") -> dict:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return {"bytes": buf.getvalue(), "path": None}


def _question(qid: str, image_id: str, **overrides) -> dict:
    row = {"id": qid, "imageId": image_id, "question": "Какого цвета круг?", "answer": "красный",
           "fullAnswer": "Круг красный.", "isBalanced": True,
           "groups": {"global": "color", "local": "c"}, "entailed": "", "equivalent": qid,
           "types": {"structural": "query", "semantic": "attr", "detailed": "queryAttr"},
           "annotations": {"answer": "", "fullAnswer": "", "question": ""},
           "semantic": [{"operation": "select", "argument": "круг", "dependencies": []},
                        {"operation": "query", "argument": "color", "dependencies": [0]}],
           "semanticStr": "select: круг"}
    row.update(overrides)
    return row


def write_gqa(root, questions: list[dict], images: list[dict], split: str = "testdev") -> str:
    from core.demo.world import write_gqa_split, write_readme

    write_readme(root, write_gqa_split(root, split, questions, images))
    return str(root)


def _mmb_row(index: int, **overrides) -> dict:
    row = {"index": index, "question": "Какого цвета круг?", "hint": None, "A": "красный",
           "B": "синий", "C": None, "D": None, "answer": "A", "category": "attribute",
           "image": _png(Image.new("RGB", (8, 8), "red")), "source": "t", "l2-category": "x",
           "comment": None, "split": "dev"}
    row.update(overrides)
    return row


def write_mmbench(root, rows: list[dict]) -> str:
    import datasets

    from core.demo.world import write_readme

    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / "dev-00000-of-00001.parquet"))
    write_readme(root, [("default", "dev")])
    return str(root)


@pytest.fixture
def gqa_dir(tmp_path):
    red = Image.new("RGB", (20, 10), "red")
    gray = Image.new("L", (10, 10), 128)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 255, 0))
    huge = Image.new("RGB", (4000, 3000), "green")
    images = [{"id": "i1", "image": _png(red)}, {"id": "i2", "image": _png(gray)},
              {"id": "i3", "image": _png(rgba)}, {"id": "i4", "image": _png(huge, "JPEG")},
              {"id": "i5", "image": {"bytes": b"not an image at all", "path": None}}]
    questions = [_question(f"q{i}", f"i{i}") for i in range(1, 6)]
    questions.append(_question("q6", "absent-image"))
    return write_gqa(tmp_path / "GQA-ru", questions, images)


def test_gqa_joins_images_and_counts_bad_ones(gqa_dir):
    records = load_gqa(gqa_dir, "testdev")
    assert [r["id"] for r in records] == [f"q{i}" for i in range(1, 7)]
    loaded = {r["id"]: load_image(r) for r in records}
    assert loaded["q1"][1] and loaded["q1"][0].mode == "RGB" and loaded["q1"][0].size == (20, 10)
    assert loaded["q2"][0].mode == "RGB"  # grayscale converted
    rgba = loaded["q3"][0]
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert loaded["q4"][0].size == (4000, 3000)
    assert loaded["q5"] == (None, False)  # corrupt bytes: marked, not a crash
    assert loaded["q6"] == (None, False)  # image id absent from the images config


def test_gqa_schema_error_names_config_row_and_field(tmp_path):
    questions = [_question("q1", "i1"), _question("q2", "i1", question=None)]
    path = write_gqa(tmp_path / "GQA-ru", questions,
                     [{"id": "i1", "image": _png(Image.new("RGB", (4, 4)))}])
    with pytest.raises(DataError) as err:
        load_gqa(path, "testdev")
    msg = str(err.value)
    assert "testdev_balanced_instructions" in msg and "row 1" in msg and "'question'" in msg


def test_gqa_missing_required_field_is_named(tmp_path):
    q = _question("q1", "i1")
    q["imageId"] = None
    path = write_gqa(tmp_path / "GQA-ru", [q], [{"id": "i1", "image": _png(Image.new("RGB", (4, 4)))}])
    with pytest.raises(DataError, match=r"row 0, field 'imageId'"):
        load_gqa(path, "testdev")


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (30, 10), "blue")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    upright, ok = load_image({"_image": lambda: {"bytes": buf.getvalue()}})
    assert ok and upright.size == (10, 30)


def test_mmbench_options_drop_none_nan_and_string_nan(tmp_path):
    rows = [_mmb_row(0, C="nan"), _mmb_row(1, C=None, D=None),
            _mmb_row(2, C="зелёный", D="жёлтый", answer="D", hint="Подсказка.")]
    records = load_mmbench(write_mmbench(tmp_path / "MMBench-ru", rows))
    assert [sorted(r["options"]) for r in records] == [["A", "B"], ["A", "B"], list("ABCD")]
    assert records[2]["hint"] == "Подсказка." and records[0]["hint"] is None
    assert all(load_image(r)[1] for r in records)
    assert is_missing(float("nan")) and is_missing("NaN ") and not is_missing("0")


def test_mmbench_answer_outside_options_is_an_error(tmp_path):
    path = write_mmbench(tmp_path / "MMBench-ru", [_mmb_row(0), _mmb_row(1, answer="C")])
    with pytest.raises(DataError, match=r"row 1, field 'answer'"):
        load_mmbench(path)


def test_llava_instruct_without_coco_marks_images_missing(tmp_path):
    root = tmp_path / "LLaVA-Instruct-ru"
    root.mkdir()
    rec = {"id": "1", "image": "train2017/000000000001.jpg", "type": "conv",
           "conversations": [{"from": "human", "value": "<image>\nЧто это?"},
                             {"from": "gpt", "value": "Кошка."}]}
    (root / "llava_instruct_ru_train.json").write_text(json.dumps([rec]), encoding="utf-8")
    (coco := tmp_path / "coco" / "train2017").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(coco / "000000000001.jpg")
    assert load_image(load_llava_instruct(str(root), None)[0]) == (None, False)
    img, ok = load_image(load_llava_instruct(str(root), str(tmp_path / "coco"))[0])
    assert ok and img.size == (5, 5)
    bad = dict(rec, conversations=[{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}])
    (root / "llava_instruct_ru_train.json").write_text(json.dumps([rec, bad]), encoding="utf-8")
    with pytest.raises(DataError, match=r"llava_instruct_ru_train.json, row 1, field 'conversations.0.from'"):
        load_llava_instruct(str(root), None)


def test_hub_id_without_network_fails_fast_with_a_hint():
    with pytest.raises(UserError) as err:
        load_benchmark("gqa_ru", DataSources())
    msg = str(err.value)
    assert "deepvk/GQA-ru" in msg and "--data-dir" in msg


def _gqa_like(n_images: int, per_image: int = 3) -> list[dict]:
    kinds = [("query", "attr"), ("verify", "obj"), ("query", "rel")]
    return [{"benchmark": "gqa_ru", "id": f"{i}-{j}", "imageId": f"img{i}",
             "types": {"structural": kinds[j % 3][0], "semantic": kinds[j % 3][1]}}
            for i in range(n_images) for j in range(per_image)]


def _mmb_like(n_groups: int) -> list[dict]:
    return [{"benchmark": "mmbench_ru", "id": str(g + r * 1_000_000), "index": g + r * 1_000_000,
             "category": ["color", "count"][g % 2]} for g in range(n_groups) for r in range(3)]


@pytest.mark.parametrize("examples", [_gqa_like(300), _mmb_like(300)], ids=["gqa", "mmbench"])
def test_splits_are_disjoint_by_unit_stable_and_seeded(examples):
    splits = make_splits(examples, seed=0)
    dev_units = {unit_of(e) for e in splits["dev"]}
    assert dev_units.isdisjoint(unit_of(e) for e in splits["final"])
    assert len(splits["dev"]) + len(splits["final"]) == len(examples)
    assert 0.25 < len(splits["dev"]) / len(examples) < 0.42
    shuffled = make_splits(list(reversed(examples[: len(examples) // 2])), seed=0)
    assert {e["id"] for e in shuffled["dev"]} <= {e["id"] for e in splits["dev"]}
    other = make_splits(examples, seed=1)
    assert {e["id"] for e in other["dev"]} != {e["id"] for e in splits["dev"]}


def test_stratified_subsets_are_nested_whole_units_and_proportional():
    examples = _mmb_like(200)
    small, large = stratified_subset(examples, 60, seed=3), stratified_subset(examples, 150, seed=3)
    assert {e["id"] for e in small} <= {e["id"] for e in large}
    groups = {}
    for e in small:
        groups.setdefault(unit_of(e), []).append(e)
    assert all(len(g) == 3 for g in groups.values())  # rotations never split
    colors = sum(e["category"] == "color" for e in large)
    assert abs(colors / len(large) - 0.5) < 0.1
