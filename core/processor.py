"""Turn conversations into LLaVA training inputs with the model's own chat template.

Labels are -100 everywhere except the assistant's tokens, each assistant turn's
``<|eot_id|>`` included, so the model learns to stop. Truncation never cuts image tokens:
whole trailing turns are dropped first, then the last answer is shortened, and both are counted;
a record whose prompt alone does not fit is skipped and counted.

:class:`LLaVADataProcessor` does this for SFT records (``core.sft``): it loads each image,
skips and counts records whose image is missing or unreadable, and collates batches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
EVAL_ADD_SPECIAL_TOKENS = True
"""Evaluation prompts are tokenized as lmms-eval's ``llava_hf`` tokenizes them: the chat
template's text through the processor with its default ``add_special_tokens=True``. A Llama-3
tokenizer's post-processor then adds ``<|begin_of_text|>`` before the template's own, so the
model sees two; training inputs (below) keep the template's single one."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image: Any
    """A PIL image, a path to one (opened again in ``collate``), or None for text only."""
    record_id: str = ""
    records: int = 1
    """SFT records this sequence holds (more than one when packed by image)."""
    turns: int = 0
    """Question-answer turns encoded (after any truncation)."""
    image_tokens: int = 0
    """Tokens of the image among ``input_ids`` (0 without an image)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        """Tokens that carry a label (the loss is averaged over these)."""
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class EncodeStats:
    """What encoding skipped or shortened, for the training report."""

    counts: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)


def user_message(text: str, with_image: bool) -> dict:
    """A user turn in the template's format; the image part comes first, as in LLaVA."""
    return {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}" if with_image else text}


def image_token_count(processor) -> int:
    """How many ``<image>`` tokens the processor expands one image into."""
    cached = getattr(processor, "_loop_image_tokens", None)
    if cached is None:
        from PIL import Image

        size = _image_size(processor)
        out = processor(text=IMAGE_PLACEHOLDER, images=Image.new("RGB", (size, size)),
                        return_tensors="pt")
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        cached = int((out["input_ids"] == image_id).sum())
        processor._loop_image_tokens = cached
    return cached


def _image_size(processor) -> int:
    ip = processor.image_processor
    crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
    if isinstance(crop, dict):
        return int(crop.get("height") or crop.get("shortest_edge") or 336)
    return int(getattr(crop, "height", None) or getattr(crop, "shortest_edge", None) or 336)


def encode_conversation(processor, image, turns: list[tuple[str, str]], *,
                        max_length: int = 2048, stats: EncodeStats | None = None) -> Encoded:
    """Encode ``turns`` [(user, assistant), ...] about one image.

    The image placeholder goes in front of the first user turn (none when ``image`` is None).
    Each template segment is tokenized on its own, which matches tokenizing the whole text
    because the template's segment boundaries are special tokens.

    Raises:
        ValueError: the first prompt alone (with its image tokens) is longer than max_length.
    """
    tok = processor.tokenizer
    n_img = image_token_count(processor)
    messages: list[dict] = []
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    done = 0
    for i, (user, assistant) in enumerate(turns):
        messages.append(user_message(user, with_image=i == 0 and image is not None))
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": assistant})
        full = tok.apply_chat_template(messages, tokenize=False)
        user_part = prompt[len(rendered):].replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * n_img)
        answer_part = full[len(prompt):]
        rendered = full
        u = tok(user_part, add_special_tokens=False)["input_ids"]
        a = tok(answer_part, add_special_tokens=False)["input_ids"]
        if len(ids) + len(u) + len(a) > max_length:
            if i > 0:
                _count(stats, "turns_dropped", len(turns) - i)
                break
            room = max_length - len(u)
            if room < 2:
                raise ValueError(f"the prompt alone has {len(u)} tokens, over max_length={max_length}")
            a = a[:room]
            _count(stats, "answers_shortened")
        ids += u + a
        labels += [IGNORE_INDEX] * len(u) + a
        done = i + 1
    return Encoded(input_ids=ids, labels=labels, image=image, turns=done,
                   image_tokens=n_img if image is not None else 0)


def _count(stats: EncodeStats | None, key: str, n: int = 1) -> None:
    if stats is not None:
        stats.counts[key] += n


def collate(batch: list[Encoded], processor, pad_side: str = "right") -> dict:
    """Pad a batch into tensors; pixel values through the processor's image processor."""
    import torch

    pad_id = processor.tokenizer.pad_token_id
    width = max(len(e) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e)
        sl = slice(0, n) if pad_side == "right" else slice(width - n, width)
        input_ids[row, sl] = torch.tensor(e.input_ids)
        labels[row, sl] = torch.tensor(e.labels)
        attention[row, sl] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    images = [_open(e.image) for e in batch if e.image is not None]
    if images:
        out["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return out


def _open(image):
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        from PIL import Image

        with Image.open(image) as img:
            return img.convert("RGB")
    return image


def length_grouped(encoded: list[Encoded], batch_size: int, rng) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding), in a shuffled order.

    A batch holds about ``batch_size`` records: a sequence packed by image counts the records it
    holds, so a step learns from as many records packed or not (a pack is never split). There
    are always ``n_batches(encoded, batch_size)`` batches; with one record per sequence they are
    ``batch_size`` long, the last one shorter.
    """
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), rng.random()))
    n = n_batches(encoded, batch_size)
    batches: list[list[int]] = []
    seen = 0
    for pos, i in enumerate(order):
        if not batches or len(batches) < n and (seen >= batch_size * len(batches)
                                               or len(order) - pos <= n - len(batches)):
            batches.append([])
        batches[-1].append(i)
        seen += encoded[i].records
    rng.shuffle(batches)
    return batches


def n_batches(encoded: list[Encoded], batch_size: int) -> int:
    """Optimizer steps in one pass over ``encoded`` with ``batch_size`` records per step."""
    return min(len(encoded), -(-sum(e.records for e in encoded) // batch_size))


class LLaVADataProcessor:
    """SFT records to model inputs: template, labels, truncation, images, collation.

    Args:
        processor: the model's LlavaProcessor.
        max_length: longest sequence in tokens, image tokens included.

    ``stats`` counts what was skipped or shortened: ``image_missing`` (absent or unreadable
    image), ``too_long`` (the prompt with its image tokens does not fit), ``turns_dropped``,
    ``answers_shortened``.
    """

    def __init__(self, processor, *, max_length: int = 1024):
        self.processor = processor
        self.max_length = max_length
        self.stats = EncodeStats()

    def encode(self, record: dict) -> Encoded | None:
        """One record, or None when it is skipped (and counted in ``stats``)."""
        from core.sft import load_image, record_turns

        image = record["image"]
        if image is not None:
            loaded = load_image(image)
            if loaded is None:
                self.stats.counts["image_missing"] += 1
                return None
            if not isinstance(image, str):
                image = loaded  # in-memory: keep the RGB copy; a path is opened again in collate
        try:
            enc = encode_conversation(self.processor, image, record_turns(record),
                                      max_length=self.max_length, stats=self.stats)
        except ValueError:
            self.stats.counts["too_long"] += 1
            return None
        enc.record_id = record["id"]
        enc.records = len((record.get("meta") or {}).get("packed") or ()) or 1
        return enc

    def encode_all(self, records: list[dict], *, progress: bool = False) -> list[Encoded]:
        from tqdm.auto import tqdm

        out = []
        quiet = {} if progress else {"disable": True}  # TQDM_DISABLE still applies
        for record in tqdm(records, desc="encoding", unit="rec", leave=False, **quiet):
            enc = self.encode(record)
            if enc is not None:
                out.append(enc)
        return out

    def collate(self, batch: list[Encoded]) -> dict:
        return collate(batch, self.processor)

    @staticmethod
    def batches(encoded: list[Encoded], batch_size: int, rng) -> list[list[int]]:
        return length_grouped(encoded, batch_size, rng)
