"""Training records for the engine's tests: yes/no questions about one coloured square."""

from __future__ import annotations

from PIL import Image

COLORS = {"красный": (220, 30, 30), "синий": (30, 30, 220), "зелёный": (30, 200, 30)}


def square_records(n: int, answer: str | None = None) -> list[dict]:
    """``n`` records "Есть ли на картинке <colour> квадрат?" answered with one word (``answer``
    for every record when given)."""
    out = []
    names = list(COLORS)
    for i in range(n):
        shown, asked = names[i % 3], names[(i // 3) % 3]
        image = Image.new("RGB", (48, 48), COLORS[shown])
        reply = answer or ("да" if shown == asked else "нет")
        out.append({"id": f"r{i}", "image": image, "source": "test", "conversations": [
            {"from": "human", "value": f"Есть ли на картинке {asked} квадрат?\nОтветь одним словом."},
            {"from": "gpt", "value": reply}]})
    return out


def logits(vlm, records: list[dict]):
    """The model's logits over ``records`` (labels dropped), without gradients."""
    import torch

    from core.processor import LLaVADataProcessor

    proc = LLaVADataProcessor(vlm.processor)
    batch = proc.collate(proc.encode_all(records))
    batch.pop("labels")
    with torch.no_grad():
        return vlm.model(**batch).logits
