"""The ``saiga-tiny`` world: LLaVA-Saiga-8B's structure at tiny width, saved as transformers 4.42.

Not for accuracy; for the first-use bugs of the real checkpoint: CLIP at 336 px with 14-pixel
patches (576 image tokens + CLS), feature layer -2 with the "default" strategy, the 2-layer GELU
projector, a Llama text model with a 128,320-token vocabulary and Llama-3's special ids, and the
files the way transformers 4.42 wrote them: the legacy key layout (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``),
fp16 safetensors, the chat template in ``tokenizer_config.json``, the image processor in
``preprocessor_config.json`` and no processor fields (``patch_size`` ...) at all.

The data is the demo world's synthetic GQA-ru / MMBench-ru / LLaVA-Instruct-ru, written by the
demo's own writers and scaled to 336 px; its GQA-ru testdev adds yes/no and relation questions
(``scenes.verify_questions``) to reach real testdev's ~30 questions per image. A short
pretraining on fresh scenes of the same kind (not the benchmark files' own) makes the answers
depend on the question and on the image: first the vision tower and projector learn to carry the
scenes' colour, shape, count and occupied columns in their image tokens, then the whole model
learns GQA-ru-style questions, every question about one image packed into one row
(``core.demo.saiga_tiny_train``). Deterministic from the seed (on one machine); cached under
``.demo/saiga-tiny-v<VERSION>-seed<seed>``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from core.demo.world import DemoWorld

log = logging.getLogger(__name__)

VERSION = 4
VOCAB_SIZE = 128320
BPE_SIZE = 3000
SPECIAL_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
               "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eot_id|>": 128009,
               "<image>": 128256, "<pad>": 128257}
IMAGE_SIZE, PATCH = 336, 14
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
            rope_theta=500000.0, hidden_act="silu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32)
TRAIN = dict(scenes=1000, verify_per_scene=8, steps=250, images=4, lr=3e-3, warmup=15,
             max_length=680)
"""The language model's pretraining: ``steps`` batches of ``images`` scenes, each scene with all
of its questions in one packed row (``core.demo.saiga_tiny_train``)."""
VISION_TRAIN = dict(steps=150, batch_size=16, lr=1e-2)
"""Stage 0: the vision tower and projector, on the same scenes (linear probes, then dropped)."""
DEFAULT_SYSTEM = ("Ты — Сайга, русскоязычный автоматический ассистент. "
                  "Ты разговариваешь с людьми и помогаешь им.")
# Llama-3's template (string content), as in Saiga's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# The same with Saiga's default system prompt injected when the conversation has none.
SYSTEM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{% set messages = [{'role': 'system', 'content': '"
    + DEFAULT_SYSTEM + "'}] + messages %}{% endif %}" + CHAT_TEMPLATE)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


SaigaTinyWorld = DemoWorld
"""The same folder layout as the demo world: model/, data/, coco/ under its root."""


def ensure_saiga_tiny(seed: int = 0, cache_dir: Path | None = None) -> SaigaTinyWorld:
    """Return the saiga-tiny world for ``seed``, building it first if it is not cached."""
    from core.demo.world import build_cached, default_cache_dir

    root = (cache_dir or default_cache_dir()) / f"saiga-tiny-v{VERSION}-seed{seed}"
    return build_cached(root, lambda world: build(world, seed), what="saiga-tiny world",
                        version=VERSION, seed=seed)


def build(world: SaigaTinyWorld, seed: int, *, steps: int | None = None) -> None:
    import torch

    from core.demo import scenes
    from core.demo import world as demo
    from core.demo.saiga_tiny_files import save_like_4_42, upscale_images
    from core.demo.saiga_tiny_train import Encoder, pack, pretrain_vision, train_packed

    torch.set_flush_denormal(True)
    rng = random.Random(seed)
    # testdev asks GQA's ~30 questions per image (train keeps the demo's few), so that
    # shared-prefix evaluation is measured at the real benchmark's ratio.
    train = demo._write_gqa(world.data_dir / "GQA-ru", rng, testdev_extra=scenes.verify_questions)
    mmb_train = demo._write_mmbench(world.data_dir / "MMBench-ru", rng)
    instruct = demo._write_instruct(world.data_dir / "LLaVA-Instruct-ru", world.coco_dir, rng)
    upscale_images(world.root, IMAGE_SIZE)
    tokenizer = build_tokenizer(demo._corpus(train, mmb_train, instruct))
    model, processor = build_model(tokenizer, seed)
    cfg = {**TRAIN, **({"steps": steps} if steps else {})}
    scene_list, images, turns = pretraining_scenes(random.Random(seed + 1), cfg["scenes"])
    pretrain_vision(model, images, scene_list, to_pixels, VISION_TRAIN, seed)
    encoder = Encoder(processor, cfg["max_length"])
    rows = [pack(encoder, to_pixels([img])[0], t, extra_bos=i % 2 == 1)
            for i, (img, t) in enumerate(zip(images, turns))]
    train_packed(model, rows, tokenizer.pad_token_id, cfg, seed)
    save_like_4_42(model, tokenizer, processor.image_processor, world.model_dir, CHAT_TEMPLATE)


def pretraining_scenes(rng: random.Random, n: int):
    """Fresh scenes (not the GQA-ru files' own) and their pretraining questions: GQA-ru's
    colour, location, count and shape questions (some with the lead-in phrasing testdev has) and
    ``TRAIN['verify_per_scene']`` of testdev's yes/no and relation questions, and one
    MMBench-ru-style multiple-choice item answered with the right option's text, all truthfully.
    Returns (scenes, 48-pixel images, [(user, answer), ...] per scene)."""
    from dataclasses import replace

    from core.demo import flaws, scenes
    from core.demo.world import GQA_INSTRUCTION, LEAD_IN_SHARE, _option_texts, mmbench_prompt

    out_scenes, images, turns = [], [], []
    for _ in range(n):
        scene = scenes.random_scene(rng)
        images.append(scenes.render(scene, rng))
        asked = [replace(q, question=flaws.LEAD_IN + q.question)
                 if rng.random() < LEAD_IN_SHARE else q for q in scenes.questions_for(scene, rng)]
        asked += rng.sample(scenes.verify_questions(scene), TRAIN["verify_per_scene"])
        out_scenes.append(scene)
        turns.append([(f"{q.question}\n{GQA_INSTRUCTION}", q.answer) for q in asked])
        # one MMBench-ru-style item, answered with its option's text (which lmms-eval reads)
        _, q = rng.choice(scenes.choice_items(scene, rng))
        options = _option_texts(q, rng)
        rng.shuffle(options)
        turns[-1].append((mmbench_prompt(q.question, dict(zip("ABCD", options)), None), q.answer))
    return out_scenes, images, turns


def to_pixels(images):
    """CLIP pixel values of 48-pixel scenes at 336 px (what the image processor makes of them
    after the NEAREST upscaling the data files have)."""
    from core.demo.saiga_tiny_train import pixels

    return pixels(images, IMAGE_SIZE, CLIP_MEAN, CLIP_STD)


def build_tokenizer(corpus: list[str]):
    """A small byte-level BPE padded with reserved tokens, Llama-3's special tokens at their ids.

    Like Llama-3's ``tokenizer.json``, its post-processor (ByteLevel, then TemplateProcessing)
    puts ``<|begin_of_text|>`` in front of every text encoded with special tokens, so a chat
    template that writes its own BOS gets a second one unless ``add_special_tokens=False``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), 128000):  # never produced: no merge leads to them
        vocab[f"<|filler_{i}|>"] = i
    names = {v: k for k, v in SPECIAL_IDS.items() if v < 128256}
    added = [names.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)]
    added += ["<image>", "<pad>"]
    spec["added_tokens"] = [{"id": 128000 + k, "content": t, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False,
                             "special": True} for k, t in enumerate(added)]
    spec["post_processor"] = _llama3_post_processor()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>", pad_token="<pad>", model_max_length=8192, padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    for token, i in SPECIAL_IDS.items():
        assert fast.convert_tokens_to_ids(token) == i, token
    return fast


def _llama3_post_processor() -> dict:
    """Llama-3's post-processor: BOS before a text (and before each of a pair), offsets kept."""
    bos = "<|begin_of_text|>"

    def piece(kind: str, name: str, type_id: int) -> dict:
        return {kind: {"id": name, "type_id": type_id}}

    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0)],
         "pair": [piece("SpecialToken", bos, 0), piece("Sequence", "A", 0),
                  piece("SpecialToken", bos, 1), piece("Sequence", "B", 1)],
         "special_tokens": {bos: {"id": bos, "ids": [SPECIAL_IDS[bos]], "tokens": [bos]}}}]}


def build_model(tokenizer, seed: int):
    """A random LlavaForConditionalGeneration of the real structure and a LlavaProcessor."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=128000, eos_token_id=128001,
                       tie_word_embeddings=False, **TEXT)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text,
                         image_token_index=SPECIAL_IDS["<image>"],
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    return model, processor


def save_random(out: Path, corpus: list[str], seed: int = 0, *,
                chat_template: str = CHAT_TEMPLATE) -> Path:
    """An untrained saiga-tiny model folder in the 4.42 layout (for tests: seconds, no data)."""
    from core.demo.saiga_tiny_files import save_like_4_42

    tokenizer = build_tokenizer(corpus)
    model, processor = build_model(tokenizer, seed)
    save_like_4_42(model, tokenizer, processor.image_processor, Path(out), chat_template)
    return Path(out)
