"""The tiny LLaVA of the demo world: a Saiga-like tokenizer, a small CLIP + Llama, and the
pretraining that teaches it to see the scenes and to answer verbosely, as the real model does."""

from __future__ import annotations

import logging
import random
import time

from core.demo.scenes import COLORS

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<image>", "<pad>"]

# The Llama-3 chat template, accepting string content or a list of typed parts (image first).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

VOCAB_SIZE = 1400
TEXT = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
            rope_theta=10000.0)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=48, patch_size=16, projection_dim=64)
PRETRAIN = dict(steps=1700, batch_size=32, lr=2e-3, warmup=60, max_length=160)
VISION_PRETRAIN = dict(steps=300, batch_size=64, lr=3e-3)


def train_tokenizer(corpus: list[str]):
    """A byte-level BPE trained on the demo corpus, wrapped like Saiga's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
        model_max_length=512, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llava(tokenizer, seed: int, text_overrides: dict | None = None):
    """A randomly initialised LlavaForConditionalGeneration and its LlavaProcessor.

    ``text_overrides`` changes fields of the language model's config (e.g. widths)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    text = LlamaConfig(vocab_size=vocab, bos_token_id=ids["<|begin_of_text|>"],
                       eos_token_id=ids["<|end_of_text|>"], pad_token_id=ids["<pad>"],
                       tie_word_embeddings=False, **{**TEXT, **(text_overrides or {})})
    vision = CLIPVisionConfig(**VISION)
    n_img = (VISION["image_size"] // VISION["patch_size"]) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=ids["<image>"], image_seq_length=n_img,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    # Like the real checkpoint: the config's text eos is <|end_of_text|>, not <|eot_id|>.
    model.generation_config.eos_token_id = ids["<|end_of_text|>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    size = VISION["image_size"]
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=VISION["patch_size"],
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model, processor


def pretrain_verbose(model, processor, examples, seed: int, **overrides) -> list[float]:
    """Full training of the tiny model on (image, turns) pairs; returns the loss curve."""
    import torch

    from core.processor import collate, encode_conversation, length_grouped

    cfg = {**PRETRAIN, **overrides}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = [encode_conversation(processor, img, turns, max_length=cfg["max_length"])
               for img, turns in examples]
    # As in LLaVA, the vision tower (pretrained in stage 0) stays frozen.
    tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    tower.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.05, 1 - s / cfg["steps"]))
    model.train()
    losses, step, t0 = [], 0, time.time()
    while step < cfg["steps"]:
        for batch_idx in length_grouped(encoded, cfg["batch_size"], rng):
            batch = collate([encoded[i] for i in batch_idx], processor)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if step % 100 == 0:
                log.info("demo pretraining step %d/%d loss %.3f (%.0f s)", step, cfg["steps"],
                         sum(losses[-100:]) / 100, time.time() - t0)
            if step >= cfg["steps"]:
                break
    model.eval()
    tower.requires_grad_(True)
    return losses


def taught_accuracy(model, processor, probes, batch_size: int = 32) -> dict[str, float]:
    """Share of ``probes`` (image, user, taught answer, kind) whose whole taught answer is the
    model's greedy choice at every answer token (teacher-forced), per kind."""
    import torch

    from core.processor import collate, encode_conversation

    hits: dict[str, list[bool]] = {}
    model.eval()
    for start in range(0, len(probes), batch_size):
        part = probes[start:start + batch_size]
        batch = collate([encode_conversation(processor, img, [(user, answer)])
                         for img, user, answer, _ in part], processor)
        labels = batch.pop("labels")
        with torch.no_grad():
            guess = model(**batch).logits.argmax(-1)
        right = (guess[:, :-1] == labels[:, 1:]) | (labels[:, 1:] == -100)
        for (_, _, _, kind), ok in zip(part, right.all(-1).tolist()):
            hits.setdefault(kind, []).append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def pretrain_vision(model, processor, images, seed: int, **overrides) -> float:
    """Stage 0, standing in for CLIP pretraining: the vision tower learns what is in each cell.

    A linear probe on the feature layer LLaVA uses (``vision_feature_layer``) predicts each
    patch's colour class; afterwards the probe is thrown away. Returns the final probe accuracy.
    """
    import torch

    cfg = {**VISION_PRETRAIN, **overrides}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    layer = model.config.vision_feature_layer
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    labels = torch.tensor([patch_labels(img) for img in images])
    probe = torch.nn.Linear(tower.config.hidden_size, 1 + len(COLORS))
    # A second probe asks for the cell's column, so that "слева/справа" is easy to read off,
    # and a third for the shape in the cell (none, square, circle).
    where = torch.nn.Linear(tower.config.hidden_size, 3)
    columns = torch.arange(9).remainder(3)
    form = torch.nn.Linear(tower.config.hidden_size, 3)
    shapes = torch.tensor([patch_shapes(img) for img in images])
    params = [*tower.parameters(), *probe.parameters(), *where.parameters(), *form.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"])
    tower.train()
    acc = 0.0
    for _ in range(cfg["steps"]):
        idx = torch.tensor(rng.sample(range(len(images)), min(cfg["batch_size"], len(images))))
        hidden = tower(pixels[idx], output_hidden_states=True).hidden_states[layer][:, 1:]
        logits = probe(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[idx].reshape(-1))
        col_logits = where(hidden).reshape(-1, 3)
        loss = loss + torch.nn.functional.cross_entropy(
            col_logits, columns.repeat(len(idx)))
        loss = loss + torch.nn.functional.cross_entropy(
            form(hidden).reshape(-1, 3), shapes[idx].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = float((logits.argmax(-1) == labels[idx]).float().mean())
    log.info("demo vision pretraining: %d steps, cell accuracy %.3f", cfg["steps"], acc)
    return acc


def patch_labels(img) -> list[int]:
    """Per-cell class of a demo image: 0 for background, 1.. for the palette colours."""
    from core.demo.scenes import CELL, COLORS
    palette = [rgb for rgb, _, _ in COLORS.values()]
    labels = []
    for row in range(3):
        for col in range(3):
            px = img.getpixel((col * CELL + CELL // 2, row * CELL + CELL // 2))
            dists = [sum((a - b) ** 2 for a, b in zip(px, rgb)) for rgb in palette]
            best = min(range(len(palette)), key=dists.__getitem__)
            labels.append(best + 1 if dists[best] < 60 ** 2 else 0)
    return labels


def patch_shapes(img) -> list[int]:
    """Per-cell shape of a demo image: 0 none, 1 square, 2 circle (how much of its box it fills)."""
    from core.demo.scenes import CELL

    out = []
    for row in range(3):
        for col in range(3):
            ink = [(x, y) for y in range(row * CELL, (row + 1) * CELL)
                   for x in range(col * CELL, (col + 1) * CELL)
                   if max(img.getpixel((x, y))) - min(img.getpixel((x, y))) > 60]
            if not ink:
                out.append(0)
                continue
            xs, ys = [x for x, _ in ink], [y for _, y in ink]
            box = (max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1)
            out.append(1 if len(ink) / box > 0.9 else 2)
    return out
