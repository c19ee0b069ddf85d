"""Shared-prefix generation: each image's prompt prefix is computed once, not once per question.

An evaluation prompt is the chat header, the image's tokens (576 on the real model) and then
the question. Every question about one image shares that prefix, and the rotated copies of an
MMBench-ru question share the image, the hint and the question too. :func:`generate_shared`
answers a batch as follows:

1. tokenize every prompt the usual way (the processor expands ``<image>``);
2. find the longest token prefix ``P`` that every row shares with the other rows of its image
   (at least the image tokens, at most one token short of the shortest prompt) and that has the
   same length in every row, so that the rows can be stacked;
3. run the model once per *distinct image* over those ``P`` tokens, with the pixels;
4. give each row a copy of its image's key/value cache and generate from the suffixes.

The suffixes are padded in the *middle*: ``prefix | pad | suffix``, with the attention mask
zero on the pad. Positions come from the mask (``cumsum - 1``), so the first suffix token sits at
position ``P`` in every row, exactly where it sits without the cache. The attention mask given
to ``generate`` covers the cached prefix as well: a mask sized only to the new tokens is the
known way to get silently wrong positions from a cache built outside ``generate()``.

Greedy answers match plain batched generation; ``loop eval --no-prefix-cache`` turns it off.
"""

from __future__ import annotations

import hashlib
import inspect
import logging

from core.processor import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)


def image_key(image) -> str:
    """A content key for an image: rows share a prefix only when their pixels are identical."""
    return hashlib.sha1(image.tobytes()).hexdigest() + f":{image.mode}:{image.size}"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def split_point(rows: list[list[int]], owners: list[int], image_token_id: int) -> int | None:
    """The prefix length ``P`` shared by every row with its image's other rows, or None.

    None when some row's prefix would not cover all of its image tokens (the pixels are only
    consumed by the prefix pass, so the suffix must hold no image token).
    """
    first: dict[int, list[int]] = {}
    p = min(len(r) for r in rows) - 1  # every row keeps one token to compute its next token
    for row, owner in zip(rows, owners):
        ref = first.setdefault(owner, row)
        p = min(p, _common_prefix(ref, row))
    last_image = max((max((i for i, t in enumerate(r) if t == image_token_id), default=-1)
                      for r in rows), default=-1)
    return p if p > last_image else None


def _cache_kwarg(model) -> str:
    """transformers 5 names the cache argument ``cache``; earlier releases ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps it
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_shared(vlm, texts: list[str], images: list, *, max_new_tokens: int,
                    repetition_penalty: float = 1.0) -> tuple[list[str], int] | None:
    """Greedy answers for a batch, each image's prefix computed once.

    Returns:
        ``(answers, positions)``: the raw decoded answers (not stripped, not cut) and the number
        of token positions the prefill ran, or None when the batch has no usable shared prefix
        (the caller then generates without the cache).
    """
    import torch

    tok = vlm.tokenizer
    prompts = [vlm.chat_prompt(t) for t in texts]
    keys = [image_key(img) for img in images]
    distinct = list(dict.fromkeys(keys))
    owners = [distinct.index(k) for k in keys]
    first_row = [keys.index(k) for k in distinct]
    enc = vlm.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                        add_special_tokens=False)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    p = split_point(rows, owners, image_id)
    if p is None:
        return None
    device = vlm.device
    name = _cache_kwarg(vlm.model)
    prefix_ids = torch.tensor([rows[i][:p] for i in first_row], device=device)
    pixels = enc["pixel_values"][first_row].to(device)
    width = max(len(r) for r in rows) - p
    pad = tok.pad_token_id
    ids = torch.tensor([r[:p] + [pad] * (width - (len(r) - p)) + r[p:] for r in rows],
                       device=device)
    mask = torch.tensor([[1] * p + [0] * (width - (len(r) - p)) + [1] * (len(r) - p) for r in rows],
                        device=device)
    with torch.inference_mode():
        out = vlm.model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                        pixel_values=pixels, use_cache=True, logits_to_keep=1)
        cache = out[name]
        cache.batch_select_indices(torch.tensor(owners, device=device))
        gen = vlm.model.generate(
            input_ids=ids, attention_mask=mask, **{name: cache}, max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, repetition_penalty=repetition_penalty,
            eos_token_id=vlm.stop_ids, pad_token_id=pad)
    answers = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    return answers, len(distinct) * p + len(rows) * width

