"""LLaVADataProcessor and SFT records: labels, truncation, images, schema errors, converters."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from core.exceptions import DataError
from core.processor import IGNORE_INDEX, IMAGE_PLACEHOLDER, LLaVADataProcessor, image_token_count
from core.sft import (
    gqa_records,
    gqa_to_sft,
    llava_instruct_to_sft,
    load_sft_jsonl,
    validate_record,
    write_sft_jsonl,
)

EOT = "<|eot_id|>"


def _record(turns, image=None, rid="r1"):
    image = Image.new("RGB", (48, 48), (200, 30, 30)) if image is None else image
    conv = []
    for user, answer in turns:
        conv += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conv, "source": "test"}


def _label_runs(enc) -> list[list[int]]:
    runs, current = [], []
    for t in enc.labels:
        if t == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(t)
    return runs + ([current] if current else [])


def test_labels_single_turn_are_the_answer_and_eot(tiny_vlm):
    proc = LLaVADataProcessor(tiny_vlm.processor)
    enc = proc.encode(_record([("Сколько кругов?\nОтветь одним словом.", "Два круга.")]))
    tok = tiny_vlm.tokenizer
    labels = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(labels) == "Два круга." + EOT
    assert len(enc.labels) == len(enc.input_ids)


def test_labels_multi_turn_each_answer_with_its_eot(tiny_vlm):
    proc = LLaVADataProcessor(tiny_vlm.processor)
    turns = [("Опиши, что изображено на картинке.", "На картинке красный круг."),
             ("Какого цвета круг?", "красный"), ("Где он?", "Посередине.")]
    enc = proc.encode(_record(turns))
    decoded = [tiny_vlm.tokenizer.decode(run) for run in _label_runs(enc)]
    assert decoded == [a + EOT for _, a in turns]


def test_encoding_matches_the_processor_on_the_whole_template(tiny_vlm):
    """Segment-wise tokenization equals the processor on the full chat-template text."""
    proc = LLaVADataProcessor(tiny_vlm.processor)
    record = _record([("Какого цвета круг?", "красный"), ("А квадрат?", "синий")])
    enc = proc.encode(record)
    messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nКакого цвета круг?"},
                {"role": "assistant", "content": "красный"},
                {"role": "user", "content": "А квадрат?"},
                {"role": "assistant", "content": "синий"}]
    text = tiny_vlm.tokenizer.apply_chat_template(messages, tokenize=False)
    whole = tiny_vlm.processor(text=text, images=record["image"], add_special_tokens=False)
    assert enc.input_ids == list(whole["input_ids"][0])


def test_image_tokens_come_first_in_the_user_turn(tiny_vlm):
    proc = LLaVADataProcessor(tiny_vlm.processor)
    enc = proc.encode(_record([("Какого цвета круг?", "красный")]))
    image_id = tiny_vlm.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    positions = [i for i, t in enumerate(enc.input_ids) if t == image_id]
    n = image_token_count(tiny_vlm.processor)
    assert len(positions) == n and positions == list(range(positions[0], positions[0] + n))
    text_before = tiny_vlm.tokenizer.decode(enc.input_ids[:positions[0]])
    assert text_before.endswith("user<|end_header_id|>\n\n")


def test_truncation_never_cuts_image_tokens(tiny_vlm):
    image_id = tiny_vlm.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    n_img = image_token_count(tiny_vlm.processor)
    long_answer = "На картинке два красных круга и синий квадрат. " * 6
    record = _record([("Опиши, что изображено на картинке.", long_answer),
                      ("Какого цвета круг?", "красный")])
    full = len(LLaVADataProcessor(tiny_vlm.processor).encode(record))
    kept = Counter()
    for max_length in range(4, full + 2, 3):
        proc = LLaVADataProcessor(tiny_vlm.processor, max_length=max_length)
        enc = proc.encode(record)
        if enc is None:
            assert proc.stats.counts["too_long"] == 1
            kept["skipped"] += 1
            continue
        assert len(enc) <= max_length
        assert enc.input_ids.count(image_id) == n_img
        assert any(t != IGNORE_INDEX for t in enc.labels)
        kept.update(proc.stats.counts)
    assert kept["skipped"] and kept["answers_shortened"] and kept["turns_dropped"]


def test_missing_or_unreadable_image_is_skipped_and_counted(tiny_vlm, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    proc = LLaVADataProcessor(tiny_vlm.processor)
    records = [_record([("Что это?", "круг")], image=str(tmp_path / "absent.png"), rid="a"),
               _record([("Что это?", "круг")], image=str(bad), rid="b"),
               _record([("Что это?", "круг")], rid="c")]
    encoded = proc.encode_all(records)
    assert [e.record_id for e in encoded] == ["c"]
    assert proc.stats.to_dict() == {"image_missing": 2}


def test_collate_pads_right_and_mixes_text_only_records(tiny_vlm, tmp_path):
    import torch

    path = tmp_path / "img.png"
    Image.new("RGB", (60, 40), (10, 200, 10)).save(path)
    proc = LLaVADataProcessor(tiny_vlm.processor)
    text_only = {**_record([("Привет?", "да")]), "image": None, "id": "t"}
    batch = [proc.encode(_record([("Какого цвета?", "зелёный")], image=str(path))),
             proc.encode(text_only)]
    inputs = proc.collate(batch)
    assert inputs["pixel_values"].shape[0] == 1
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths == [len(e) for e in batch]
    assert inputs["attention_mask"][1, lengths[1]:].sum() == 0  # padding on the right
    with torch.no_grad():
        loss = tiny_vlm.model(**inputs).loss
    assert torch.isfinite(loss)


BAD_RECORDS = [
    ({"image": None, "conversations": [], "source": "x"}, "'id'"),
    ({"id": "a", "image": 3, "conversations": [{"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"}], "source": "x"},
     "field 'image'"),
    ({"id": "a", "image": None, "conversations": [{"from": "human", "value": "q"},
                                                  {"from": "bot", "value": "a"}], "source": "x"},
     "field 'conversations[1].from'"),
    ({"id": "a", "image": None, "conversations": [{"from": "gpt", "value": "q"},
                                                  {"from": "human", "value": "a"}], "source": "x"},
     "field 'conversations[0].from' must be 'human'"),
    ({"id": "a", "image": None, "conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": "a"},
                                                  {"from": "human", "value": "?"}], "source": "x"},
     "ends with a human turn"),
    ({"id": "a", "image": None, "conversations": [{"from": "human", "value": "q"},
                                                  {"from": "gpt", "value": ""}], "source": "x"},
     "field 'conversations[1].value'"),
]


@pytest.mark.parametrize(("record", "expected"), BAD_RECORDS)
def test_bad_record_error_names_row_and_field(record, expected):
    with pytest.raises(DataError) as info:
        validate_record(record, row=7)
    assert "<in-memory>, row 7" in str(info.value)
    assert expected in str(info.value)


def test_bad_jsonl_line_names_file_row_and_field(tmp_path):
    path = tmp_path / "sft.jsonl"
    good = {"id": "a", "image": None, "source": "x",
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {**good, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sft\.jsonl, row 1: field 'conversations\[1\]'.*value"):
        load_sft_jsonl(path)


def test_jsonl_round_trip_saves_in_memory_images(tmp_path):
    records = [_record([("Что это?", "круг")], rid=f"r{i}") for i in range(2)]
    path = write_sft_jsonl(records, tmp_path / "out" / "sft.jsonl")
    loaded = load_sft_jsonl(path)
    assert [r["conversations"] for r in loaded] == [r["conversations"] for r in records]
    assert all(Image.open(r["image"]).size == (48, 48) for r in loaded)


def test_gqa_converter_uses_the_eval_prompt_and_skips_missing_images():
    example = {"id": "q1", "imageId": "i1", "question": "Какого цвета круг?", "answer": "красный",
               "fullAnswer": "Круг красный.", "types": {"semantic": "attr", "detailed": "color"},
               "image": Image.new("RGB", (8, 8)), "image_ok": True}
    record = gqa_to_sft(example)
    validate_record(record)
    assert record["conversations"][0]["value"] == "Какого цвета круг?\nОтветь одним словом."
    assert record["conversations"][1]["value"] == "красный"
    assert gqa_to_sft(example, full_answer=True)["conversations"][1]["value"] == "Круг красный."
    stats = Counter()
    records = gqa_records([example, {**example, "image": None, "image_ok": False}], stats=stats)
    assert len(records) == 1 and stats == {"image_missing": 1}


def test_llava_instruct_converter_finds_coco_images_and_strips_the_tag(tmp_path):
    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train2017" / "000000000001.jpg")
    raw = {"id": "7", "type": "conv", "image": "000000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nОпиши картинку."}, {"from": "gpt", "value": "Круг."},
        {"from": "human", "value": "Какого цвета?"}, {"from": "gpt", "value": "Красного."}]}
    record = llava_instruct_to_sft(raw, tmp_path)
    validate_record(record)
    assert record["image"] == str(tmp_path / "train2017" / "000000000001.jpg")
    assert record["conversations"][0]["value"] == "Опиши картинку."
    missing = llava_instruct_to_sft({**raw, "image": "train2017/absent.jpg"}, tmp_path)
    assert missing["image"] == str(tmp_path / "train2017" / "absent.jpg")
