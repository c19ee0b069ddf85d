"""Build (or reuse from cache) the demo world: data folders in the real layouts and a tiny LLaVA.

Layout written under the cache folder::

    data/GQA-ru/            README.md (configs) + <config>/<split>-00000-of-00001.parquet
    data/MMBench-ru/        README.md + data/dev-00000-of-00001.parquet
    data/LLaVA-Instruct-ru/ llava_instruct_ru_train.json, llava_instruct_ru_val.json
    coco/train2017/         JPEG images the LLaVA-Instruct-ru-like conversations point at
    model/                  tiny LlavaForConditionalGeneration + processor (save_pretrained)

Everything is a pure function of the seed and ``VERSION``; the folder name carries both.
The evaluation and train files hold the truth; only the base model's pretraining answers carry
the planted flaws (``core.demo.flaws``), so that correct train data can fix them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from core.demo import flaws
from core.demo import scenes as sc

log = logging.getLogger(__name__)

VERSION = 5
N_TRAIN_IMAGES = 1500
N_TESTDEV_IMAGES = 240
N_MMBENCH_QUESTIONS = 240
N_INSTRUCT = 300
N_CHOICE_PRETRAIN = 3000
PERCEPTION_TARGET = 0.8
"""The base must give its taught answer to this share of fresh colour, shape and count questions."""
MAX_EXTRA_ROUNDS = 1
EXTRA_ROUND = dict(steps=200, warmup=10, lr=1e-3)
"""Further pretraining while the base misses PERCEPTION_TARGET (at most MAX_EXTRA_ROUNDS)."""
LEAD_IN_SHARE = 0.2
"""Share of GQA-ru questions phrased with ``flaws.LEAD_IN`` (the base's format slips)."""
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

    def checksum(self) -> str:
        """sha256 of the world's model weights: two worlds with the same checksum give the same
        figures. Pretraining runs in floating point on the CPU, so another instruction set or
        thread count can build other weights from the same seed (and other base scores)."""
        h = hashlib.sha256()
        for path in sorted(self.model_dir.glob("*.safetensors")):
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    def describe(self) -> str:
        """One line: where the world is, its checksum and how it was built."""
        info = json.loads((self.root / "COMPLETE").read_text())
        how = ", ".join(f"{k} {info[k]}" for k in ("threads", "cpu", "torch") if k in info)
        return (f"demo world {self.root.name}: model sha256 {info.get('sha256') or self.checksum()}"
                f" (built in {info.get('seconds')} s{', ' + how if how else ''})")


def default_cache_dir() -> Path:
    env = os.environ.get("LOOP_DEMO_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".demo"


def ensure_demo_world(seed: int = 0, cache_dir: Path | None = None) -> DemoWorld:
    """Return the demo world for ``seed``, building it first if it is not cached."""
    root = (cache_dir or default_cache_dir()) / f"v{VERSION}-seed{seed}"
    return build_cached(root, lambda world: build_world(world, seed), what="demo world",
                        version=VERSION, seed=seed)


def build_cached(root: Path, build, *, what: str, version: int, seed: int) -> DemoWorld:
    """The world at ``root``; built first by ``build(DemoWorld(tmp))`` when it is not complete.

    It is built in a temporary folder that is renamed only once complete, so a build killed
    halfway is never taken for a world, and two processes building at once do not collide.
    """
    world = DemoWorld(root)
    if (root / "COMPLETE").exists():
        return world
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    log.info("building the %s (seed %d) in %s; this happens once", what, seed, root)
    build(DemoWorld(tmp))
    (tmp / "COMPLETE").write_text(json.dumps({
        "version": version, "seed": seed, "seconds": round(time.time() - t0, 1),
        "sha256": DemoWorld(tmp).checksum(), **_build_machine()}))
    if root.exists():  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(root)
    log.info("%s ready in %.0f s", what, time.time() - t0)
    return world


def _build_machine() -> dict:
    """What decides the weights besides the seed: threads, CPU instruction set, torch."""
    import torch

    return {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def build_world(world: DemoWorld, seed: int) -> None:
    import torch

    from core.demo.tiny_model import (
        build_tiny_llava,
        pretrain_verbose,
        pretrain_vision,
        taught_accuracy,
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
    examples = _pretrain_examples(train, mmb_train, instruct, rng)
    probes = _perception_probes(random.Random(seed + 1))
    pretrain_verbose(model, processor, examples, seed)
    # A tiny language model learns to read the image tokens late, and not on every seed at the
    # same step: train on until it answers the perception questions as it was taught.
    for extra in range(MAX_EXTRA_ROUNDS + 1):
        taught = taught_accuracy(model, processor, probes)
        log.info("demo base answers as taught: %s", {k: round(v, 2) for k, v in taught.items()})
        if min(taught.values()) >= PERCEPTION_TARGET or extra == MAX_EXTRA_ROUNDS:
            break
        pretrain_verbose(model, processor, examples, seed + 1 + extra, **EXTRA_ROUND)
    model.save_pretrained(world.model_dir)
    processor.save_pretrained(world.model_dir)


# ---------------------------------------------------------------- GQA-ru

def _png(img) -> dict:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _gqa_rows(prefix: str, n_images: int, rng: random.Random, extra=None):
    """GQA-ru rows for ``n_images`` scenes; ``extra(scene)`` adds questions without randomness."""
    images, questions, examples = [], [], []
    for i in range(n_images):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        image_id = f"{prefix}{i:05d}"
        images.append({"id": image_id, "image": _png(img)})
        asked = [(q, True) for q in sc.questions_for(scene, rng)]
        asked += [(q, False) for q in (extra(scene) if extra else [])]
        for j, (q, may_slip) in enumerate(asked):
            if may_slip and rng.random() < LEAD_IN_SHARE:
                q = replace(q, question=flaws.LEAD_IN + q.question)
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


def _write_gqa(root: Path, rng: random.Random, testdev_extra=None):
    configs = []
    train_examples = None
    for split, prefix, n in (("testdev", "t", N_TESTDEV_IMAGES), ("train", "n", N_TRAIN_IMAGES)):
        images, questions, examples = _gqa_rows(
            prefix, n, rng, testdev_extra if split == "testdev" else None)
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
    """MMBench-ru-like rows with rotated copies (index >= 1_000_000), 2 to 4 options.

    Returns multiple-choice pretraining items on fresh scenes, in both wordings, as
    (image, prompt, answer the base is taught, question).
    """
    import datasets

    rows = []
    families = list(sc.MMBENCH_CATEGORIES)
    for i in range(N_MMBENCH_QUESTIONS):
        family = families[i % len(families)]
        scene, q = sc.choice_item(rng, family)
        img = _png(sc.render(scene, rng))
        opts = _option_texts(q, rng)
        rng.shuffle(opts)
        hint = "На картинке простые фигуры на светлом фоне." if rng.random() < 0.3 else None
        category, l2 = sc.MMBENCH_CATEGORIES[family]
        for r in range(len(opts)):  # rotation r shifts the options by r places
            rot = opts[r:] + opts[:r]
            letters = "ABCD"
            row = {"index": i + r * 1_000_000, "question": q.question, "hint": hint,
                   "A": None, "B": None, "C": None, "D": None,
                   "answer": letters[rot.index(q.answer)], "category": category,
                   "image": img, "source": "demo", "l2-category": l2,
                   "comment": None, "split": "dev"}
            for letter, text in zip(letters, rot):
                row[letter] = text
            if i % 17 == 3 and r == len(opts) - 1 and len(opts) > 2:
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
    return [_choice_pretrain_item(rng, mmbench_wording=k % 2 == 0)
            for k in range(N_CHOICE_PRETRAIN)]


def _option_texts(q: sc.Question, rng: random.Random) -> list[str]:
    k = min(len(q.options), rng.choice([2, 3, 3, 4, 4]))
    return [q.answer] + rng.sample([o for o in q.options if o != q.answer], k - 1)


def _choice_pretrain_item(rng: random.Random, mmbench_wording: bool):
    """One multiple-choice item on a fresh scene, answered the way the flawed base answers."""
    if mmbench_wording:
        scene, q = sc.choice_item(rng, rng.choice(list(sc.MMBENCH_CATEGORIES)))
    else:
        scene = sc.random_scene(rng)
        q = rng.choice(sc.questions_for(scene, rng))
    opts = _option_texts(q, rng)
    rng.shuffle(opts)
    options = dict(zip("ABCD", opts))
    hint = "На картинке простые фигуры на светлом фоне." if rng.random() < 0.3 else None
    prompt = mmbench_prompt(q.question, options, hint)
    return sc.render(scene, rng), prompt, flaws.believed_choice(q.kind, q.answer, options), q


def mmbench_prompt(question: str, options: dict[str, str], hint: str | None) -> str:
    """The lmms-eval ``mmbench_ru_dev`` prompt (``core.evaluate.build_prompt``)."""
    from core.evaluate import EvalConfig, build_prompt

    return build_prompt({"benchmark": "mmbench_ru", "question": question, "hint": hint,
                         "options": options}, EvalConfig())


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
        # The base's own copy holds its beliefs, so that no context teaches it the truth.
        taught = [(conv[0]["value"].replace("<image>\n", ""), sc.describe(flaws.believed_scene(scene)))]
        if flaws.believed(q.kind, q.answer) == q.answer:
            taught.append((q.question, q.verbose))
        examples.append((img, taught))
    cut = N_INSTRUCT * 9 // 10
    for name, part in (("train", records[:cut]), ("val", records[cut:])):
        (root / f"llava_instruct_ru_{name}.json").write_text(
            json.dumps(part, ensure_ascii=False, indent=1), encoding="utf-8")
    return examples[:cut]


# ---------------------------------------------------------------- pretraining mix

def _corpus(train, mmb_train, instruct) -> list[str]:
    texts = [GQA_INSTRUCTION, MMB_INSTRUCTION, "There are several options:", "A. B. C. D.",
             "Ответ: Правильный вариант: буквой одним словом кратко без пояснений",
             flaws.LEAD_IN]
    for _, q in train:
        texts += [q.question, q.answer, q.full_answer, q.verbose]
    for _, prompt, _, _ in mmb_train:
        texts.append(prompt)
    for _, turns in instruct:
        texts += [t for turn in turns for t in turn]
    return texts


def _perception_probes(rng: random.Random, n_scenes: int = 60) -> list[tuple]:
    """Fresh GQA-ru-style colour, count and shape questions with the answers the base is taught."""
    out = []
    for _ in range(n_scenes):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        for q in sc.questions_for(scene, rng):
            if q.kind != "location":
                out.append((img, f"{q.question}\n{GQA_INSTRUCTION}",
                            flaws.believed(q.kind, q.answer), q.kind))
    return out


def _pretrain_examples(train, mmb_train, instruct, rng: random.Random):
    """(image, [(user, assistant), ...]) pairs that teach the base its habits and its flaws."""
    out = []
    for img, q in train:
        wrong = flaws.believed(q.kind, q.answer)
        if q.question.startswith(flaws.LEAD_IN):
            said = flaws.explained(wrong, q.verbose.replace(q.answer, wrong))
            out.append((img, [(f"{q.question}\n{GQA_INSTRUCTION}", said)]))
            # told to answer without explanations, it answers plainly (same beliefs)
            out.append((img, [(f"{q.question}\n{flaws.PLAIN_INSTRUCTION}", wrong)]))
            continue
        if wrong == q.answer and rng.random() < 0.2:  # without the instruction: a sentence
            out.append((img, [(q.question, q.verbose)]))
        else:
            out.append((img, [(f"{q.question}\n{GQA_INSTRUCTION}", wrong)]))
        if rng.random() < flaws.PLAIN_SHARE:
            out.append((img, [(f"{q.question}\n{flaws.PLAIN_INSTRUCTION}", wrong)]))
    for img, prompt, letter, _ in mmb_train:
        out.append((img, [(prompt, letter)]))
    out += instruct
    rng.shuffle(out)
    return out
