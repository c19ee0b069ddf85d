"""Per-image packing of SFT records: one multi-turn conversation per training image.

GQA-ru asks about 30 questions per image. As separate records, each question pays for the
image's tokens (576 on the real model) again; LLaVA-1.5 instead merges the QA pairs of one
image into one conversation, and so does :func:`pack_by_image`. Labels stay on the assistant
turns only (``core.processor`` labels every assistant turn), the ``<image>`` tag stays with the
first human turn, and a pack never holds two images, so no image is split or mixed.

Packing runs after the leakage guard, on records that already passed it; each pack keeps the ids
and metadata of the records it holds in ``meta["packed"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

IMAGE_TAG = "<image>"


def image_identity(record: dict) -> str | None:
    """Which picture a record shows: GQA-ru's imageId, the image file, or the pixels."""
    image = record.get("image")
    if image is None:
        return None
    image_id = (record.get("meta") or {}).get("imageId")
    if image_id:
        return f"gqa:{image_id}"
    if isinstance(image, str | Path):
        return f"file:{Path(image).resolve()}"
    from core.prefix import image_key

    return f"pixels:{image_key(image)}"


def _pairs(record: dict) -> list[tuple[str, str]]:
    conv = record["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


def pack_by_image(records: list[dict], *, max_turns: int = 16, max_tokens: int | None = None,
                  count_tokens: Callable[[str], int] | None = None) -> list[dict]:
    """Merge records about the same image into multi-turn records.

    Args:
        records: SFT records (``core.sft``), in the order they should be learnt.
        max_turns: most question-answer pairs in one pack.
        max_tokens: most text tokens in one pack (the image's tokens not counted), measured
            with ``count_tokens``; a record longer than that on its own stays alone.
        count_tokens: text -> number of tokens; required with ``max_tokens``.

    Returns:
        Packed records, in the order of each image's first record; a record without an image
        is kept as it is.
    """
    if max_turns < 1:
        raise ValueError(f"`max_turns` must be >= 1, but got {max_turns}")
    if max_tokens is not None and count_tokens is None:
        raise ValueError("`max_tokens` needs `count_tokens` to measure the turns")
    groups: dict[str, list[dict]] = {}
    out: list[dict | list[dict]] = []
    for record in records:
        key = image_identity(record)
        if key is None:
            out.append(record)
            continue
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(record)
    packed: list[dict] = []
    for item in out:
        if isinstance(item, dict):
            packed.append(item)
            continue
        for chunk in _chunks(item, max_turns, max_tokens, count_tokens):
            packed.append(chunk[0] if len(chunk) == 1 else _merge(chunk))
    return packed


def _chunks(records: list[dict], max_turns: int, max_tokens: int | None,
            count_tokens: Callable[[str], int] | None) -> list[list[dict]]:
    chunks: list[list[dict]] = []
    turns = tokens = 0
    for record in records:
        pairs = _pairs(record)
        size = (sum(count_tokens(q) + count_tokens(a) for q, a in pairs)
                if max_tokens is not None else 0)
        full = turns + len(pairs) > max_turns or (max_tokens is not None
                                                  and tokens + size > max_tokens)
        if not chunks or full:
            chunks.append([])
            turns = tokens = 0
        chunks[-1].append(record)
        turns += len(pairs)
        tokens += size
    return chunks


def _merge(records: list[dict]) -> dict:
    conversations = []
    for n, record in enumerate(records):
        for i, turn in enumerate(record["conversations"]):
            value = turn["value"]
            if turn["from"] == "human" and (n > 0 or i > 0):
                value = value.replace(IMAGE_TAG, "").strip()
            conversations.append({"from": turn["from"], "value": value})
    sources = sorted({r["source"] for r in records})
    return {"id": f"pack:{records[0]['id']}+{len(records) - 1}", "image": records[0]["image"],
            "conversations": conversations,
            "source": sources[0] if len(sources) == 1 else "+".join(sources),
            "meta": {"imageId": (records[0].get("meta") or {}).get("imageId"),
                     "packed": [{"id": r["id"], **(r.get("meta") or {})} for r in records]}}


def image_tokens_per_question(records: list[dict], image_tokens: int) -> float:
    """Image tokens the model reads per trained question (the cost packing removes)."""
    questions = sum(len(_pairs(r)) for r in records)
    with_image = sum(1 for r in records if r.get("image") is not None)
    return with_image * image_tokens / questions if questions else 0.0
