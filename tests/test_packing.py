"""Per-image packed SFT: one conversation per image, labels on every answer, nothing mixed."""

from __future__ import annotations

import pytest
from PIL import Image

from core.packing import image_tokens_per_question, pack_by_image
from core.processor import IGNORE_INDEX, LLaVADataProcessor
from core.sft import validate_records


def _gqa(i: int, image_id: str, img) -> dict:
    return {"id": f"gqa-{i}", "image": img,
            "conversations": [{"from": "human", "value": f"<image>\nВопрос номер {i}?\nОтветь одним словом."},
                              {"from": "gpt", "value": ["да", "нет", "красный", "два"][i % 4]}],
            "source": "gqa_train", "meta": {"imageId": image_id, "question_id": str(i)}}


@pytest.fixture()
def records():
    imgs = {k: Image.new("RGB", (48, 48), c) for k, c in (("a", "red"), ("b", "blue"))}
    out = [_gqa(i, "a" if i % 3 else "b", imgs["a" if i % 3 else "b"]) for i in range(9)]
    out.append({"id": "text-only", "image": None, "source": "x",
                "conversations": [{"from": "human", "value": "Привет"},
                                  {"from": "gpt", "value": "Здравствуй"}]})
    return out


def test_one_pack_per_image_and_every_question_kept_once(records):
    packed = pack_by_image(records)
    validate_records(packed)
    assert len(packed) == 3  # image a, image b, the text-only record
    held = [m["id"] for p in packed for m in (p.get("meta") or {}).get("packed", [p])]
    assert sorted(held) == sorted(r["id"] for r in records)
    for p in packed:
        images = {m["imageId"] for m in (p.get("meta") or {}).get("packed", [])}
        assert len(images) <= 1  # never two images in one conversation
        humans = [t["value"] for t in p["conversations"] if t["from"] == "human"]
        assert all("<image>" not in h for h in humans[1:])


def test_max_turns_and_max_tokens_are_respected(records):
    assert all(len(p["conversations"]) <= 4 for p in pack_by_image(records, max_turns=2))
    by_char = pack_by_image(records, max_tokens=60, count_tokens=len)
    for p in by_char:
        if len(p["conversations"]) > 2:
            assert sum(len(t["value"]) for t in p["conversations"]) <= 60
    with pytest.raises(ValueError, match="count_tokens"):
        pack_by_image(records, max_tokens=10)


def test_image_tokens_per_question_drop_by_the_pack_size(records):
    before = image_tokens_per_question(records, 576)
    after = image_tokens_per_question(pack_by_image(records), 576)
    # nine questions on two images, and one text-only question
    assert before == pytest.approx(9 * 576 / 10) and after == pytest.approx(2 * 576 / 10)


def test_labels_cover_exactly_every_assistant_turn(tiny_vlm, records):
    packed = next(p for p in pack_by_image(records) if len(p["conversations"]) > 2)
    enc = LLaVADataProcessor(tiny_vlm.processor, max_length=512).encode(packed)
    tok = tiny_vlm.tokenizer
    spans, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    answers = [t["value"] for t in packed["conversations"] if t["from"] == "gpt"]
    assert [tok.decode(s) for s in spans] == [a + "<|eot_id|>" for a in answers]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert enc.input_ids.count(image_id) == tiny_vlm.n_image_tokens  # one image, read once


def test_training_reads_each_image_once_per_pack(tiny_vlm_factory, records, tmp_path):
    from core.train import TrainConfig, train_lora

    vlm = tiny_vlm_factory()
    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, pack_by_image=True)
    result = train_lora(vlm, records, config, tmp_path / "packed")
    assert result.ok and result.n_examples == 3  # 10 records: two images and one text-only
