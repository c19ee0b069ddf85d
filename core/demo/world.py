"""Build (or reuse from cache) the demo world: data folders in the real layouts and a tiny LLaVA.

Layout written under the cache folder::

    data/GQA-ru/            README.md (configs) + <config>/<split>-00000-of-00001.parquet
    data/MMBench-ru/        README.md + data/dev-00000-of-00001.parquet
    data/LLaVA-Instruct-ru/ llava_instruct_ru_train.json, llava_instruct_ru_val.json
    coco/train2017/         JPEG images the LLaVA-Instruct-ru-like conversations point at
    model/                  tiny LlavaForConditionalGeneration + processor (save_pretrained)

Everything is a pure function of the seed and ``VERSION``; the folder name carries both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from core.demo import scenes as sc

log = logging.getLogger(__name__)

VERSION = 2
N_TRAIN_IMAGES = 1500
N_TESTDEV_IMAGES = 240
N_MMBENCH_QUESTIONS = 240
N_INSTRUCT = 300
GQA_INSTRUCTION = "Ответь одним словом."
MMB_INSTRUCTION = "Выбери правильный вариант ответа буквой."


@dataclass(frozen=True)
class DemoWorld:
    root: Path

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def coco_dir(self) -> Path:
        return self.root / "coco"


def default_cache_dir() -> Path:
    env = os.environ.get("LOOP_DEMO_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".demo"


def ensure_demo_world(seed: int = 0, cache_dir: Path | None = None) -> DemoWorld:
    """Return the demo world for ``seed``, building it first if it is not cached."""
    root = (cache_dir or default_cache_dir()) / f"v{VERSION}-seed{seed}"
    world = DemoWorld(root)
    if (root / "COMPLETE").exists():
        return world
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    log.info("building the demo world (seed %d) in %s; this happens once", seed, root)
    build_world(DemoWorld(tmp), seed)
    (tmp / "COMPLETE").write_text(json.dumps({"version": VERSION, "seed": seed,
                                              "seconds": round(time.time() - t0, 1)}))
    if root.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(root)
    log.info("demo world ready in %.0f s", time.time() - t0)
    return world


def build_world(world: DemoWorld, seed: int) -> None:
    import torch

    from core.demo.tiny_model import (
        build_tiny_llava,
        pretrain_verbose,
        pretrain_vision,
        train_tokenizer,
    )

    # Tiny weights and Adam states drift into subnormal floats, which x86 CPUs handle
    # 10-100x slower; flushing them to zero keeps every step at the same speed.
    torch.set_flush_denormal(True)
    rng = random.Random(seed)
    train = _write_gqa(world.data_dir / "GQA-ru", rng)
    mmb_train = _write_mmbench(world.data_dir / "MMBench-ru", rng)
    instruct = _write_instruct(world.data_dir / "LLaVA-Instruct-ru", world.coco_dir, rng)
    corpus = _corpus(train, mmb_train, instruct)
    tokenizer = train_tokenizer(corpus)
    model, processor = build_tiny_llava(tokenizer, seed)
    pretrain_vision(model, processor, [img for img, _ in train[::4]], seed)
    pretrain_verbose(model, processor, _pretrain_examples(train, mmb_train, instruct, rng), seed)
    model.save_pretrained(world.model_dir)
    processor.save_pretrained(world.model_dir)


# ---------------------------------------------------------------- GQA-ru

def _png(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _gqa_rows(prefix: str, n_images: int, rng: random.Random):
    images, questions, examples = [], [], []
    for i in range(n_images):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        image_id = f"{prefix}{i:05d}"
        images.append({"id": image_id, "image": _png(img)})
        for j, q in enumerate(sc.questions_for(scene, rng)):
            qid = f"{image_id}{j}"
            questions.append({
                "id": qid, "imageId": image_id, "question": q.question, "answer": q.answer,
                "fullAnswer": q.full_answer, "isBalanced": True,
                "groups": {"global": q.kind, "local": f"{q.types[2]}-{q.kind}"},
                "entailed": "", "equivalent": qid,
                "types": {"structural": q.types[0], "semantic": q.types[1], "detailed": q.types[2]},
                "annotations": {"answer": "", "fullAnswer": "", "question": ""},
                "semantic": [{"operation": op, "argument": arg,
                              "dependencies": [k - 1] if k else []}
                             for k, (op, arg) in enumerate(q.semantic)],
                "semanticStr": " ".join(f"{op}: {arg}" for op, arg in q.semantic),
            })
            examples.append((img, q))
    return images, questions, examples


def _write_gqa(root: Path, rng: random.Random):
    configs = []
    train_examples = None
    for split, prefix, n in (("testdev", "t", N_TESTDEV_IMAGES), ("train", "n", N_TRAIN_IMAGES)):
        images, questions, examples = _gqa_rows(prefix, n, rng)
        if split == "train":
            train_examples = examples
        configs += write_gqa_split(root, split, questions, images)
    write_readme(root, configs)
    return train_examples


def write_gqa_split(root: Path, split: str, questions: list[dict],
                    images: list[dict]) -> list[tuple[str, str]]:
    """Write one split's two GQA-ru configs as parquet; returns their (config, split) pairs."""
    import datasets

    configs = []
    for kind, rows in (("instructions", questions), ("images", images)):
        config = f"{split}_balanced_{kind}"
        ds = datasets.Dataset.from_list(rows)
        if kind == "images":
            ds = ds.cast_column("image", datasets.Image())
        (root / config).mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / config / f"{split}-00000-of-00001.parquet"))
        configs.append((config, split))
    return configs


def write_readme(root: Path, configs: list[tuple[str, str]]) -> None:
    lines = ["---", "configs:"]
    for config, split in configs:
        path = f"{config}/{split}-*.parquet" if config != "default" else f"data/{split}-*.parquet"
        lines += [f"- config_name: {config}", "  data_files:",
                  f"  - split: {split}", f"    path: {path}"]
    lines += ["---", "", "Synthetic demo data in the layout of the real dataset.", ""]
    (root / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ---------------------------------------------------------------- MMBench-ru

def _write_mmbench(root: Path, rng: random.Random):
    """MMBench-ru-like rows with rotated copies (index >= 1_000_000), 2 to 4 options."""
    import datasets

    rows, train_mc = [], []
    categories = {"color": ("attribute_recognition", "Attribute Reasoning"),
                  "count": ("object_localization", "Fine-grained Perception (instance)"),
                  "location": ("spatial_relationship", "Relation Reasoning"),
                  "exist": ("image_scene", "Coarse Perception")}
    for i in range(N_MMBENCH_QUESTIONS):
        scene = sc.random_scene(rng)
        img = _png(sc.render(scene, rng))
        q = rng.choice(sc.questions_for(scene, rng)[:3])  # yes/no makes a poor 2-option item
        k = rng.choice([2, 3, 3, 4, 4]) if len(q.options) >= 4 else min(len(q.options), rng.choice([2, 3]))
        distractors = rng.sample([o for o in q.options if o != q.answer], k - 1)
        opts = [q.answer] + distractors
        rng.shuffle(opts)
        hint = "На картинке простые фигуры на светлом фоне." if rng.random() < 0.3 else None
        category, l2 = categories[q.kind]
        for r in range(k):  # rotation r shifts the options by r places
            rot = opts[r:] + opts[:r]
            letters = "ABCD"
            row = {"index": i + r * 1_000_000, "question": q.question, "hint": hint,
                   "A": None, "B": None, "C": None, "D": None,
                   "answer": letters[rot.index(q.answer)], "category": category,
                   "image": img, "source": "demo", "l2-category": l2,
                   "comment": None, "split": "dev"}
            for letter, text in zip(letters, rot):
                row[letter] = text
            if i % 17 == 3 and r == k - 1 and k > 2:
                continue  # an incomplete group, as in the real data
            rows.append(row)
    # The real files store missing options as NaN or "nan" too.
    for row in rows[::29]:
        for letter in "CD":
            if row[letter] is None:
                row[letter] = "nan"
    ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / "dev-00000-of-00001.parquet"))
    write_readme(root, [("default", "dev")])
    # Multiple-choice prompts on fresh scenes for the verbose pretraining only.
    for _ in range(600):
        scene = sc.random_scene(rng)
        q = rng.choice(sc.questions_for(scene, rng)[:3])
        k = min(len(q.options), rng.choice([2, 3, 4]))
        opts = [q.answer] + rng.sample([o for o in q.options if o != q.answer], k - 1)
        rng.shuffle(opts)
        train_mc.append((sc.render(scene, rng), q, opts, scene))
    return train_mc


def mmbench_prompt(question: str, options: dict[str, str], hint: str | None) -> str:
    """The lmms-eval ``mmbench_ru_dev`` prompt."""
    body = "\n".join(f"{k}. {v}" for k, v in options.items())
    head = f"{hint} {question}" if hint else question
    return f"{head} There are several options:\n{body}\n{MMB_INSTRUCTION}"


# ---------------------------------------------------------------- LLaVA-Instruct-ru

def _write_instruct(root: Path, coco: Path, rng: random.Random):
    root.mkdir(parents=True, exist_ok=True)
    (coco / "train2017").mkdir(parents=True, exist_ok=True)
    records, examples = [], []
    for i in range(N_INSTRUCT):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        name = f"{900000000000 + i:012d}.jpg"
        img.save(coco / "train2017" / name, quality=95)
        qs = sc.questions_for(scene, rng)
        q = rng.choice(qs)
        conv = [
            {"from": "human", "value": "<image>\nОпиши, что изображено на картинке."},
            {"from": "gpt", "value": sc.describe(scene)},
            {"from": "human", "value": q.question},
            {"from": "gpt", "value": q.verbose},
        ]
        records.append({"type": "conv", "conversations": conv, "id": f"{i:06d}",
                        "image": f"train2017/{name}"})
        examples.append((img, conv))
    cut = N_INSTRUCT * 9 // 10
    for name, part in (("train", records[:cut]), ("val", records[cut:])):
        (root / f"llava_instruct_ru_{name}.json").write_text(
            json.dumps(part, ensure_ascii=False, indent=1), encoding="utf-8")
    return examples[:cut]


# ---------------------------------------------------------------- pretraining mix

def _corpus(train, mmb_train, instruct) -> list[str]:
    texts = [GQA_INSTRUCTION, MMB_INSTRUCTION, "There are several options:", "A. B. C. D.",
             "Ответ: Правильный вариант: буквой одним словом кратко без пояснений"]
    for _, q in train:
        texts += [q.question, q.answer, q.full_answer, q.verbose]
    for _, q, opts, scene in mmb_train:
        texts += [q.question, " ".join(opts), sc.describe(scene)]
    for _, conv in instruct:
        texts += [t["value"] for t in conv]
    return texts


def _pretrain_examples(train, mmb_train, instruct, rng: random.Random):
    """(image, [(user, assistant), ...]) pairs that teach the verbose seed behaviour."""
    out = []
    for img, q in train:
        user = f"{q.question}\n{GQA_INSTRUCTION}" if rng.random() < 0.6 else q.question
        out.append((img, [(user, q.verbose)]))
    for img, q, opts, scene in mmb_train:
        options = dict(zip("ABCD", opts))
        out.append((img, [(mmbench_prompt(q.question, options, None), sc.describe(scene))]))
    for img, conv in instruct:
        turns = [(conv[k]["value"].replace("<image>\n", ""), conv[k + 1]["value"])
                 for k in range(0, len(conv), 2)]
        out.append((img, turns))
    rng.shuffle(out)
    return out
