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

from core.processor import EVAL_ADD_SPECIAL_TOKENS, IMAGE_PLACEHOLDER

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


def image_keys(images: list) -> list[str]:
    """Each row's image key (rows of one question group usually share the PIL object)."""
    key_of: dict[int, str] = {}
    for img in images:
        if id(img) not in key_of:
            key_of[id(img)] = image_key(img)
    return [key_of[id(img)] for img in images]


def encode_rows(vlm, prompts: list[str], images: list):
    """Token ids per row, each row's image index, the first row of each image, and pixels.

    The image processor runs once per *distinct* image (the processor would run it once per
    row); the ``<image>`` placeholder is expanded to the image's tokens as the processor does.
    """
    keys = image_keys(images)
    distinct = list(dict.fromkeys(keys))
    index = {k: j for j, k in enumerate(distinct)}
    owners = [index[k] for k in keys]
    first_row = [keys.index(k) for k in distinct]
    expanded = [p.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * vlm.n_image_tokens) for p in prompts]
    rows = vlm.tokenizer(expanded, add_special_tokens=EVAL_ADD_SPECIAL_TOKENS)["input_ids"]
    pixels = vlm.processor.image_processor([images[i] for i in first_row],
                                           return_tensors="pt")["pixel_values"]
    return rows, owners, first_row, pixels


def _cache_kwarg(model) -> str:
    """transformers 5 names the cache argument ``cache``; earlier releases ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps it
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefix_cache(vlm, rows: list[list[int]], owners: list[int], first_row: list[int], pixels,
                 p: int):
    """The key/value cache of each distinct image's first ``p`` tokens, run once with its
    pixels, then copied to every row of that image (call under ``torch.inference_mode``)."""
    import torch

    device = vlm.device
    prefix_ids = torch.tensor([rows[i][:p] for i in first_row], device=device)
    out = vlm._base().model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                            pixel_values=pixels.to(device), use_cache=True)
    cache = out[_cache_kwarg(vlm.model)]
    cache.batch_select_indices(torch.tensor(owners, device=device))
    return cache


def generate_shared(vlm, texts: list[str], images: list, *, max_new_tokens: int,
                    repetition_penalty: float = 1.0) -> tuple[list[str], int] | None:
    """Greedy answers for a batch, each image's prefix computed once.

    Returns:
        ``(answers, positions)``: the raw decoded answers (not stripped, not cut) and the number
        of token positions the prefill ran, or None when the batch has no usable shared prefix
        (the caller then generates without the cache). A batch in which no two rows show the
        same image (batch size 1, or one question per image) has nothing to share: the cache
        would only add a second pass and the middle padding, so it is not used.
    """
    import torch

    if len(images) < 2 or len(set(image_keys(images))) == len(images):
        return None

    tok = vlm.tokenizer
    prompts = [vlm.chat_prompt(t) for t in texts]
    rows, owners, first_row, pixels = encode_rows(vlm, prompts, images)
    p = split_point(rows, owners, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    if p is None:
        return None
    device = vlm.device
    width = max(len(r) for r in rows) - p
    pad = tok.pad_token_id
    ids = torch.tensor([r[:p] + [pad] * (width - (len(r) - p)) + r[p:] for r in rows],
                       device=device)
    mask = torch.tensor([[1] * p + [0] * (width - (len(r) - p)) + [1] * (len(r) - p) for r in rows],
                        device=device)
    with torch.inference_mode():
        cache = prefix_cache(vlm, rows, owners, first_row, pixels, p)
        gen = vlm.model.generate(
            input_ids=ids, attention_mask=mask, **{_cache_kwarg(vlm.model): cache},
            max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, repetition_penalty=repetition_penalty,
            eos_token_id=vlm.stop_ids, pad_token_id=pad)
    answers = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    return answers, len(first_row) * p + len(rows) * width


def option_logprobs_shared(vlm, texts: list[str], images: list,
                           options: list[list[str]]) -> tuple[list[list[float]], int] | None:
    """``VLM.option_logprobs`` with each image's prompt prefix computed once.

    Every (prompt, option) pair of an image shares the chat header, the image, the hint and the
    question; only the option lines and the option text differ. The prefix runs once per
    distinct image; the pairs' suffixes run as one right-padded batch on copies of its cache,
    with explicit positions. The prefix stops before the token that predicts each pair's first
    option token, so every scored logit comes from the suffix pass.

    Returns:
        ``(scores, positions)`` as ``VLM.option_logprobs`` would score them, and the prefill
        token positions, or None when the batch has no usable shared prefix.
    """
    import torch

    from core.model import mean_logprob, option_pairs

    tok = vlm.tokenizer
    full, pair_images, owners_of_pair, cont_lens = option_pairs(vlm, texts, images, options)
    rows, owners, first_row, pixels = encode_rows(vlm, full, pair_images)
    p = split_point(rows, owners, tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    if p is None:
        return None
    p = min([p] + [len(r) - n - 1 for r, n in zip(rows, cont_lens)])
    if p <= 0:
        return None
    device = vlm.device
    base = vlm._base()
    width = max(len(r) for r in rows) - p
    pad = tok.pad_token_id
    suffix = torch.tensor([r[p:] + [pad] * (width - len(r) + p) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r) + p) for r in rows], device=device)
    positions = torch.arange(p, p + width, device=device).expand(len(rows), -1)
    scores: list[list[float]] = [[] for _ in texts]
    with torch.inference_mode():
        cache = prefix_cache(vlm, rows, owners, first_row, pixels, p)
        hidden = base.model(input_ids=suffix, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{_cache_kwarg(vlm.model): cache}).last_hidden_state
        for row, (owner, n) in enumerate(zip(owners_of_pair, cont_lens)):
            end = len(rows[row]) - p  # suffix length of this row; the option is its last n tokens
            scores[owner].append(mean_logprob(base.lm_head, hidden[row, end - 1 - n:end - 1],
                                              suffix[row, end - n:end]))
    return scores, len(first_row) * p + len(rows) * width
