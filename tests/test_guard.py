"""The leakage guard: planted leaks are refused, clean data passes, refusals are shown."""

from __future__ import annotations

import io
import json
import logging
import random

import pytest
from PIL import Image

from core.demo import scenes as sc
from strategies.guard import LeakageError, check_records, prepare, protected_keys, screen


def _scene_image(seed: int) -> Image.Image:
    rng = random.Random(seed)
    return sc.render(sc.random_scene(rng), rng)


def _eval_world():
    """Four GQA-ru testdev images with two questions each and two MMBench-ru questions."""
    out = []
    for i in range(4):
        img = _scene_image(100 + i)
        for j, q in enumerate(("Какого цвета фигура слева?", f"Что лежит под столом номер {i}?")):
            out.append({"id": f"t{i}{j}", "imageId": f"t{i:04d}", "question": q, "answer": "да",
                        "benchmark": "gqa_ru", "_image": lambda im=img: im})
    for i in range(2):
        img = Image.new("RGB", (320, 240), (20 + 90 * i, 200, 60))
        img.paste((250, 250, 250), (40, 40, 200, 120))
        out.append({"id": str(i), "index": i, "question": f"Какой предмет на фото {i}?",
                    "benchmark": "mmbench_ru", "options": {"A": "a", "B": "b"}, "answer": "A",
                    "_image": lambda im=img: im})
    return out


@pytest.fixture(scope="module")
def evaluation():
    return _eval_world()


@pytest.fixture(scope="module")
def protected(evaluation):
    return protected_keys(evaluation, digests=True)


def _record(rid: str, question: str, image, **meta) -> dict:
    return {"id": rid, "image": image, "source": "test", "meta": meta,
            "conversations": [{"from": "human", "value": f"{question}\nОтветь одним словом."},
                              {"from": "gpt", "value": "да"}]}


def _jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _resized(img: Image.Image) -> Image.Image:
    return img.resize((img.width * 3 // 2, img.height * 3 // 2), Image.BICUBIC)


COPIES = {
    "exact": lambda img: img.copy(),
    "resized 1.5x": _resized,
    "jpeg re-encoded": _jpeg,
    "resized and jpeg": lambda img: _jpeg(_resized(img)),
}


@pytest.mark.parametrize("which", [0, 2, 7, 8])  # GQA-ru images and an MMBench-ru photo
@pytest.mark.parametrize("copy", list(COPIES))
def test_copies_of_an_evaluation_image_are_refused(copy, which, evaluation, protected, tmp_path):
    img = COPIES[copy](evaluation[which]["_image"]())
    saved = tmp_path / "copy.png"
    img.save(saved)
    for image in (img, str(saved)):  # in memory and as a file of a JSONL source
        record = _record("leak", "Есть ли тут круг?", image)
        with pytest.raises(LeakageError, match=r"leak.*refused.*its image matches "
                           r"(GQA-ru image t|MMBench-ru question)"):
            check_records([record], protected)


@pytest.mark.parametrize("question", ["ЧТО ЛЕЖИТ ПОД СТОЛОМ НОМЕР 2", "что лежит, под столом номер 2?!",
                                      "  Что  лежит под столом номер 2 ?"])
def test_an_evaluation_question_differing_in_case_or_punctuation_is_refused(question, protected):
    record = _record("leak", question, _scene_image(7))
    with pytest.raises(LeakageError, match="Что лежит под столом номер 2"):
        check_records([record], protected)


def test_an_evaluation_question_id_is_refused(protected):
    record = _record("leak", "Совсем другой вопрос про фигуры?", _scene_image(7), question_id="t21")
    with pytest.raises(LeakageError, match="question id 't21'"):
        check_records([record], protected)


def test_clean_records_pass(protected):
    records = [_record(f"ok{i}", f"Какая фигура справа на картинке {i}?", _scene_image(500 + i))
               for i in range(20)]
    kept, report = screen(records, protected, source="clean.jsonl")
    assert kept == records and report["refused"] == 0


def test_a_scene_with_one_shape_of_another_colour_is_not_a_copy(evaluation, protected):
    rng = random.Random(3)
    scene = sc.Scene(shapes=(sc.Shape("красный", 0, 0, "square"), sc.Shape("синий", 2, 2, "circle")),
                     background=(240, 240, 240))
    other = sc.Scene(shapes=(sc.Shape("красный", 0, 0, "square"), sc.Shape("жёлтый", 2, 2, "circle")),
                     background=(240, 240, 240))
    evaluation_img, train_img = sc.render(scene, rng), sc.render(other, rng)
    prot = protected_keys([{"id": "x0", "imageId": "x", "question": "q?", "benchmark": "gqa_ru",
                            "_image": lambda: evaluation_img}], digests=True)
    check_records([_record("ok", "Есть ли тут круг?", train_img)], prot)
    with pytest.raises(LeakageError):
        check_records([_record("leak", "Есть ли тут круг?", _jpeg(evaluation_img))], prot)


def test_template_questions_on_three_training_images_stay_allowed(protected):
    asked = [_record(f"t{i}", "Какого цвета фигура слева?", _scene_image(600 + i))
             for i in range(3)]
    kept, report = screen(asked, protected, source="templates.jsonl")
    assert len(kept) == 3 and report["refused"] == 0
    with pytest.raises(LeakageError, match="Какого цвета фигура слева"):
        screen(asked[:2], protected, source="two.jsonl")


def test_refusals_are_counted_logged_and_an_all_leaked_file_is_named(evaluation, protected, caplog):
    leak = _record("leak-1", "Есть ли тут круг?", _resized(evaluation[2]["_image"]()))
    clean = _record("ok-1", "Какая фигура справа?", _scene_image(900))
    with caplog.at_level(logging.WARNING, logger="strategies.guard"):
        kept, report = screen([clean, leak], protected, source="mixed.jsonl")
    assert kept == [clean]
    assert report["refused"] == 1 and report["by_kind"] == {"image": 1}
    assert report["first"][0]["record"] == "leak-1"
    assert "refused 1 of 2 records of mixed.jsonl" in caplog.text
    with pytest.raises(LeakageError) as err:
        screen([leak], protected, source="/data/all_leaked.jsonl")
    message = str(err.value)
    assert "/data/all_leaked.jsonl" in message and "'leak-1'" in message
    assert "GQA-ru image t0001" in message


def test_the_protected_keys_survive_a_json_round_trip_as_lists(protected):
    """The controller may store ``ctx.protected``; sets come back as lists."""
    data = json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v
                                  for k, v in protected.items()}))
    assert len(prepare(data).index) == len(prepare(protected).index) == 6


def test_demo_world_false_positive_rate_is_low():
    """Different demo scenes are not taken for copies (the report quotes this measurement)."""
    evaluation = [_scene_image(10_000 + i) for i in range(120)]
    prot = protected_keys([{"id": f"e{i}0", "imageId": f"e{i}", "question": "?",
                            "benchmark": "gqa_ru", "_image": lambda im=im: im}
                           for i, im in enumerate(evaluation)], digests=True)
    train = [_record(f"n{i}", "Есть ли тут круг?", _scene_image(20_000 + i)) for i in range(300)]
    _, report = screen(train, prot, source="train")
    assert report["refused"] <= 0.03 * len(train)


# ---------------------------------------------------------------- `loop train` uses the guard

def _demo_leaks(world) -> list[dict]:
    from core.data import load_gqa, load_image

    testdev = load_gqa(str(world.data_dir / "GQA-ru"), "testdev")
    img, _ = load_image(testdev[0])
    return [_record("leak-exact", "Есть ли тут круг?", img),
            _record("leak-resized", "Есть ли тут круг?", _resized(img)),
            _record("leak-jpeg", "Есть ли тут круг?", _jpeg(img)),
            _record("leak-question", testdev[0]["question"].upper().rstrip("?"), _scene_image(5))]


def _train_args(path, world, tiny_vlm_dir, tmp_path) -> list[str]:
    return ["-q", "train", "--source", str(path), "--model", str(tiny_vlm_dir),
            "--data-dir", str(world.data_dir), "--steps", "1", "--batch-size", "2", "--limit", "50",
            "--gpu", "cpu", "--eval-limit", "0", "--out", str(tmp_path / "cli"), "--json"]


def test_train_command_refuses_and_counts_planted_leaks(demo_world, tiny_vlm_dir, tmp_path,
                                                         capsys):
    from core.sft import write_sft_jsonl
    from loop.cli import main

    clean = [_record(f"ok{i}", f"Какая фигура справа на картинке {i}?",
                     Image.new("RGB", (48, 48), (30 * i, 90, 200))) for i in range(4)]
    path = write_sft_jsonl(clean + _demo_leaks(demo_world), tmp_path / "data" / "mixed.jsonl")
    rc = main(_train_args(path, demo_world, tiny_vlm_dir, tmp_path))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["records"] == 4
    assert report["guard"][str(path)]["refused"] == 4
    assert report["guard"][str(path)]["by_kind"] == {"image": 3, "question": 1}
    assert report["train"]["skipped"]["leakage_refused"] == 4


def test_train_command_on_an_all_leaked_file_fails_with_a_clear_message(
        demo_world, tiny_vlm_dir, tmp_path, capsys):
    from core.sft import write_sft_jsonl
    from loop.cli import main

    path = write_sft_jsonl(_demo_leaks(demo_world)[1:], tmp_path / "leaked.jsonl")
    assert main(_train_args(path, demo_world, tiny_vlm_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'leak-resized'" in err and "GQA-ru image t00000" in err
    assert "Traceback" not in err and not (tmp_path / "cli").exists()


@pytest.fixture(scope="module")
def demo_world():
    from core.demo.world import ensure_demo_world

    return ensure_demo_world()


def test_a_forged_image_digest_in_a_record_is_not_believed(evaluation, protected, tmp_path):
    """A record from outside the run names its own ``meta.image_digest``: the guard computes
    the signature of the image itself, so a resized evaluation image with the digest of some
    other scene is still refused."""
    from strategies.image_signature import image_digest

    saved = tmp_path / "innocent.png"
    _resized(evaluation[0]["_image"]()).save(saved)
    forged = image_digest(_scene_image(999))
    record = _record("forged", "Есть ли тут круг?", str(saved), image_digest=forged)
    with pytest.raises(LeakageError, match=r"forged.*its image matches GQA-ru image t0000"):
        check_records([record], protected)


def test_a_digest_the_loop_computed_is_reused_only_while_the_file_is_unchanged(tmp_path):
    """The loop remembers the signatures it computed (by path, size and modification time);
    a file replaced behind its back is signed again."""
    import os

    from strategies.image_signature import image_digest, remember_digest

    path = tmp_path / "img.png"
    _scene_image(1).save(path)
    remember_digest(path, image_digest(_scene_image(1)))
    assert image_digest(str(path)) == image_digest(_scene_image(1))
    _scene_image(2).save(path)
    os.utime(path, ns=(1, 1))
    assert image_digest(str(path)) == image_digest(_scene_image(2))


def test_train_command_refuses_a_resized_evaluation_image_with_a_forged_digest(
        demo_world, tiny_vlm_dir, tmp_path, capsys):
    from core.data import load_gqa, load_image
    from core.sft import write_sft_jsonl
    from loop.cli import main
    from strategies.image_signature import image_digest

    testdev = load_gqa(str(demo_world.data_dir / "GQA-ru"), "testdev")
    img, _ = load_image(testdev[0])
    forged = image_digest(_scene_image(4242))
    clean = [_record(f"ok{i}", f"Какая фигура справа на картинке {i}?",
                     Image.new("RGB", (48, 48), (30 * i, 90, 200))) for i in range(2)]
    leak = _record("leak-forged", "Есть ли тут круг?", _resized(img), image_digest=forged)
    path = write_sft_jsonl(clean + [leak], tmp_path / "data" / "forged.jsonl")
    assert json.loads(path.read_text().splitlines()[-1])["meta"]["image_digest"] == forged
    rc = main(_train_args(path, demo_world, tiny_vlm_dir, tmp_path))
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["records"] == 2
    assert report["guard"][str(path)]["by_kind"] == {"image": 1}
