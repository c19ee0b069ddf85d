"""The short pretraining of the saiga-tiny world: every question about one image in one row.

With 576 image tokens and a question of ~20, nearly all of a single-question row is the image.
A GQA-ru-like scene is asked ~30 questions, so each training row packs one image's prompt prefix
(header and image tokens) once and then every question about it, each with its own positions
(continuing from the prefix, as in a one-question prompt) and an attention mask that lets it
see the prefix and itself only. Each question is computed exactly as in its own row, at a tenth
of the cost, so a minute on two CPU cores sees tens of thousands of questions.

Half of the rows also start with a second ``<|begin_of_text|>``: lmms-eval's ``llava_hf``
prompt has two (the chat template's and the tokenizer's), training encodes one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

BOS = 128000


@dataclass
class Packed:
    """One image and its questions: token ids, labels, positions and a segment per token."""

    input_ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared prefix; k: the k-th question and its answer
    pixels: object  # [3, H, W] tensor


class Encoder:
    """Token ids of one-question conversations, memoised (GQA-ru-like questions repeat)."""

    def __init__(self, processor, max_length: int):
        from PIL import Image

        self.processor, self.max_length = processor, max_length
        self.blank = Image.new("RGB", (8, 8))
        self.memo: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def __call__(self, user: str, answer: str) -> tuple[list[int], list[int]]:
        from core.processor import encode_conversation

        key = (user, answer)
        if key not in self.memo:  # the ids do not depend on the pixels, only on there being some
            enc = encode_conversation(self.processor, self.blank, [(user, answer)],
                                      max_length=self.max_length)
            self.memo[key] = (enc.input_ids, enc.labels)
        return self.memo[key]


def pack(encoder: Encoder, pixels, turns: list[tuple[str, str]], *, extra_bos: bool) -> Packed:
    """The shared prefix once, then each (user, answer) turn as if it were its own prompt."""
    from core.processor import IGNORE_INDEX

    rows = [encoder(user, answer) for user, answer in turns]
    p = min(len(ids) for ids, _ in rows) - 1
    first = rows[0][0]
    for ids, _ in rows[1:]:
        p = min(p, next((k for k in range(p) if ids[k] != first[k]), p))
    image_id = encoder.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id not in first[p:], "every question must share the image tokens"
    prefix = ([BOS] if extra_bos else []) + first[:p]
    p0 = len(prefix)
    ids, labels = list(prefix), [IGNORE_INDEX] * p0
    positions, segments = list(range(p0)), [0] * p0
    for k, (row_ids, row_labels) in enumerate(rows, start=1):
        assert row_labels[p] == IGNORE_INDEX  # no answer token is predicted across rows
        ids += row_ids[p:]
        labels += row_labels[p:]
        positions += range(p0, p0 + len(row_ids) - p)
        segments += [k] * (len(row_ids) - p)
    return Packed(ids, labels, positions, segments, pixels)


def collate_packed(batch: list[Packed], pad_id: int) -> dict:
    """Right-padded tensors and the [B, 1, L, L] boolean mask (True: may attend)."""
    import torch

    from core.processor import IGNORE_INDEX

    width = max(len(b.input_ids) for b in batch)
    n = len(batch)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    for row, b in enumerate(batch):
        k = len(b.input_ids)
        ids[row, :k] = torch.tensor(b.input_ids)
        labels[row, :k] = torch.tensor(b.labels)
        positions[row, :k] = torch.tensor(b.positions)
        segments[row, :k] = torch.tensor(b.segments)
    q, kv = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (kv >= 0) & ((kv == 0) | (kv == q))
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty row
    return {"input_ids": ids, "labels": labels, "position_ids": positions,
            "attention_mask": mask[:, None], "pixel_values": torch.stack([b.pixels for b in batch])}


def pixels(images, size: int, mean, std):
    """CLIP pixel values of small scenes scaled up ``size // side`` times by pixel repetition:
    what the image processor makes of the NEAREST-upscaled image, without the PIL round trip."""
    import numpy as np
    import torch

    arr = torch.from_numpy(np.stack([np.asarray(img.convert("RGB")) for img in images]))
    k = size // arr.shape[1]
    x = arr.permute(0, 3, 1, 2).float().div(255.0)
    x = x.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def pretrain_vision(model, images, scenes_, to_pixels, cfg: dict, seed: int) -> dict[str, float]:
    """Stage 0, standing in for CLIP pretraining: the tower and projector learn to put what the
    questions ask about (colour, shape, count, occupied columns) into every image token the
    language model receives, read by linear probes that are thrown away after.

    Returns each probe's accuracy (its mean vote over the image tokens) on the last batch.
    """
    import torch

    from core.demo import scenes as sc

    torch.manual_seed(seed)
    rng = random.Random(seed)
    llava = model.model
    layer = model.config.vision_feature_layer
    colors = sorted(sc.COLORS)
    targets = {
        "color": torch.tensor([colors.index(s.shapes[0].color) for s in scenes_]),
        "count": torch.tensor([len(s.shapes) - 1 for s in scenes_]),
        "shape": torch.tensor([sc.SHAPES.index(s.shapes[0].kind) for s in scenes_]),
        "columns": torch.tensor([[float(c in {x.column for x in s.shapes}) for c in range(3)]
                                 for s in scenes_])}
    width = model.config.text_config.hidden_size
    probes = torch.nn.ModuleDict({"color": torch.nn.Linear(width, len(colors)),
                                  "count": torch.nn.Linear(width, 3),
                                  "shape": torch.nn.Linear(width, len(sc.SHAPES)),
                                  "columns": torch.nn.Linear(width, 3)})
    params = [*llava.vision_tower.parameters(), *llava.multi_modal_projector.parameters(),
              *probes.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    llava.vision_tower.train()
    acc: dict[str, float] = {}
    for _ in range(cfg["steps"]):
        idx = rng.sample(range(len(images)), cfg["batch_size"])
        hidden = llava.vision_tower(to_pixels([images[i] for i in idx]), output_hidden_states=True)
        feats = llava.multi_modal_projector(hidden.hidden_states[layer][:, 1:])  # "default": no CLS
        # every image token, not only their mean: whatever the language model attends to, it reads
        out = {k: probe(feats) for k, probe in probes.items()}
        want = {k: v[idx].repeat_interleave(feats.shape[1], dim=0) for k, v in targets.items()}
        loss = sum(torch.nn.functional.cross_entropy(out[k].flatten(0, 1), want[k])
                   for k in ("color", "count", "shape"))
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
            out["columns"].flatten(0, 1), want["columns"])
        out = {k: v.mean(1) for k, v in out.items()}
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = {k: float((out[k].argmax(-1) == targets[k][idx]).float().mean())
               for k in ("color", "count", "shape")}
        acc["columns"] = float(((out["columns"] > 0).float() == targets["columns"][idx])
                               .float().mean())
    log.info("saiga-tiny vision pretraining: %d steps, probe accuracy %s", cfg["steps"],
             {k: round(v, 2) for k, v in acc.items()})
    return acc


def train_packed(model, rows: list[Packed], pad_id: int, cfg: dict, seed: int) -> list[float]:
    """AdamW with warmup and cosine decay over ``cfg['steps']`` batches of ``cfg['images']``
    rows; the LM head sees only the answer positions (a 128k vocabulary)."""
    import torch

    from core.processor import IGNORE_INDEX

    torch.manual_seed(seed)
    rng = random.Random(seed)
    # As in LLaVA, the vision tower (pretrained in stage 0) stays frozen.
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    warmup, steps = cfg["warmup"], cfg["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    losses, t0, order = [], time.time(), []
    for step in range(steps):
        if len(order) < cfg["images"]:
            order += rng.sample(range(len(rows)), len(rows))
        batch = collate_packed([rows[i] for i in order[:cfg["images"]]], pad_id)
        del order[:cfg["images"]]
        labels = batch.pop("labels")
        hidden = model.model(**batch).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]).float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            log.info("saiga-tiny training step %d/%d loss %.3f (%.0f s)", step + 1, steps,
                     sum(losses[-25:]) / 25, time.time() - t0)
    model.eval()
    tower.requires_grad_(True)
    return losses
