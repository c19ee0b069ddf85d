"""Training data aimed at an error profile, shared by ``answer_format_sft`` and ``optuna_hpo``.

Three kinds of SFT records (``core/schemas/sft_record.schema.json``), mixed in given shares:

- ``short``: GQA-ru ``train_balanced`` questions with the one-word gold answer, asked with the
  champion's GQA-ru prompt; drawn with weights toward the question types the profile says are
  weak (colour, location, counting: the labels' shares of the errors and their categories);
- ``choice``: multiple choice built from GQA-ru train questions: the gold answer and 1-3
  distractors of the same answer type (``types.detailed``), letters shuffled, phrased exactly
  like the MMBench-ru prompt (``core.evaluate.build_prompt``). The answer names the option the
  way the champion's right MMBench-ru answers do (``ErrorProfile.choice_style``): the bare
  letter, as the prompt asks, unless the champion gets its answers right by saying the
  option's text (which lmms-eval's rule-based extraction reads as that option); then the
  option's text. Data aimed at content then teaches content, not a new answer format;
- ``instruct``: LLaVA-Instruct-ru conversations (COCO images), to keep general ability.

The GQA-ru kinds are drawn by image: the weighted draw picks an image through one of its
questions and takes several of its questions with it, shared out between short answers and
multiple choice, so training packs them into one conversation (``core.packing``) and reads the
image once for all of them.

Nothing comes from an evaluation split: candidates whose image or question is protected are
skipped and counted, and the finished list goes through ``strategies.guard.check_records``.
GQA-ru images are written once as PNG files under the builder's image folder.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from core import data as core_data
from core.errors import CONTENT_LABELS, classify
from core.evaluate import EvalConfig, build_prompt
from core.exceptions import DataError, UserError
from core.sft import llava_instruct_to_sft, validate_records
from strategies.base import Context, ProposalFailed
from strategies.guard import (
    check_records,
    image_digest,
    leak_reason,
    prepare,
    template_questions,
)
from strategies.image_signature import remember_digest

log = logging.getLogger(__name__)

YES_NO = {"да", "нет"}
CANDIDATES_PER_RECORD = 6
"""GQA-ru records are drawn from the images of this many times as many shuffled candidates."""
MAX_PER_IMAGE = 8
"""Most questions drawn about one image: about one pack's worth on the real model (576 image
tokens of a 1,024-token sequence leave room for 8-10 short turns)."""


@dataclass(frozen=True)
class Mix:
    """Shares of the three kinds of records; normalised to sum to one."""

    short: float = 0.5
    choice: float = 0.3
    instruct: float = 0.2

    def normalized(self) -> Mix:
        total = self.short + self.choice + self.instruct
        if total <= 0:
            raise ValueError(f"a data mix needs a positive share, but got {self}")
        return Mix(self.short / total, self.choice / total, self.instruct / total)

    def counts(self, n: int) -> dict[str, int]:
        mix = self.normalized()
        n_choice, n_instruct = round(n * mix.choice), round(n * mix.instruct)
        return {"short": n - n_choice - n_instruct, "choice": n_choice, "instruct": n_instruct}

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self.normalized()).items()}


def profile_weights(ctx: Context) -> tuple[dict[str, float], set[str]]:
    """Content label -> sampling weight bonus, and the weak GQA-ru question categories."""
    profile = ctx.profiles.get("gqa_ru")
    if profile is None or not profile.n_errors:
        return {}, set()
    bonus = {label: 4.0 * profile.shares.get(label, 0.0) for label in CONTENT_LABELS}
    weak = {c for label in CONTENT_LABELS for c in profile.weak_categories(label)}
    return bonus, weak


def choice_answer_style(ctx: Context) -> str:
    """"text" when the champion's right MMBench-ru answers mostly name the option's text,
    else "letter" (also without a profile)."""
    profile = ctx.profiles.get("mmbench_ru")
    style = profile.choice_style() if profile is not None else None
    return style or "letter"


def _category(ex: dict) -> str:
    types = ex.get("types") or {}
    return str(types.get("semantic") or types.get("detailed") or "unknown")


def _public(ex: dict) -> dict:
    return {k: v for k, v in ex.items() if not k.startswith("_")}


class SFTDataBuilder:
    """Builds guarded SFT records from GQA-ru train and LLaVA-Instruct-ru for one context."""

    def __init__(self, ctx: Context, image_dir: Path | None = None):
        self.ctx = ctx
        self.pool = core_data.load_gqa(ctx.data.gqa, "train")
        self.image_dir = Path(image_dir or ctx.workdir / "sft_images")
        self.templates = template_questions(self.pool)
        self.protected = prepare(ctx.protected)
        self.vocab: dict[str, set[str]] = defaultdict(set)
        self.by_image: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(self.pool):
            self.by_image[str(ex["imageId"])].append(i)
        for ex in self.pool:
            self.vocab[str((ex.get("types") or {}).get("detailed"))].add(str(ex["answer"]).strip())
        self._instruct: list[dict] | None = None
        self._digests: dict[str, str | None] = {}
        self._guard_cache: dict = {}

    # ------------------------------------------------------------ filters and images

    def _keep(self, record: dict, stats: Counter) -> bool:
        """False (and counted) when the record shows a protected image or question."""
        if leak_reason(record, self.protected, allowed_questions=self.templates,
                       _cache=self._guard_cache):
            stats["protected_skipped"] += 1
            return False
        return True

    def _protected(self, ex: dict, stats: Counter) -> bool:
        """The cheap check before an image is decoded: the imageId and the question."""
        return not self._keep({"image": None, "conversations": [],
                               "meta": {"imageId": ex.get("imageId"), "question": ex["question"],
                                        "question_id": str(ex["id"])}},
                              stats)

    def _image(self, ex: dict, stats: Counter) -> str | None:
        """The example's image as a PNG path (written once), or None when it is missing."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(ex["imageId"])) + ".png"
        path = self.image_dir / name
        if str(path) not in self._digests:
            img, ok = core_data.load_image(ex)
            if not ok:
                stats["image_missing"] += 1
                return None
            self.image_dir.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: HPO workers may build the same image at once.
            part = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
            img.save(part, format="PNG")
            os.replace(part, path)
            self._digests[str(path)] = image_digest(img)
            remember_digest(path, self._digests[str(path)])
        return str(path)

    def _record(self, ex: dict, kind: str, prompt: str, answer: str, path: str, **meta) -> dict:
        types = ex.get("types") or {}
        return {"id": f"gqa-{kind}-{ex['id']}", "image": path,
                "conversations": [{"from": "human", "value": prompt},
                                  {"from": "gpt", "value": answer}],
                "source": f"gqa_train_{kind}",
                "meta": {"question": ex["question"], "question_id": str(ex["id"]),
                         "imageId": str(ex["imageId"]), "detailed_type": types.get("detailed"),
                         "image_digest": self._digests.get(path), **meta}}

    # ------------------------------------------------------------ the three kinds

    def _groups(self, n: int, rng: random.Random) -> list[list[tuple[int, list[str]]]]:
        """GQA-ru train images to draw from, best first, as lists of (pool index, content labels).

        ``CANDIDATES_PER_RECORD * n`` shuffled questions are keyed by their profile weight
        (weighted sampling without replacement: ``rng.random() ** (1 / weight)``, weights toward
        the weak question types); an image comes where its best question does, followed by its
        other questions, each kept with probability ``weight / largest weight`` (so the draw stays
        weighted as the profile asks: without weak types every question of the image comes), at
        most ``MAX_PER_IMAGE`` in all. Drawn by image, the questions about one image train in one
        pack (``core.packing``); an image with one question (most of real GQA-ru train's) is
        simply a pack of one.
        """
        bonus, weak = profile_weights(self.ctx)

        def weighed(i: int) -> tuple[float, list[str]]:
            ex = self.pool[i]
            labels = sorted(classify("gqa_ru", _public(ex), "") & set(CONTENT_LABELS))
            return 1.0 + sum(bonus.get(lb, 0.0) for lb in labels) + (_category(ex) in weak), labels

        order = list(range(len(self.pool)))
        rng.shuffle(order)
        firsts = []
        for i in order[: CANDIDATES_PER_RECORD * n]:
            weight, labels = weighed(i)
            firsts.append((rng.random() ** (1.0 / weight), weight, i, labels))
        firsts.sort(reverse=True)
        top = max((w for _, w, _, _ in firsts), default=1.0)
        groups, seen = [], set()
        for _, _, i, labels in firsts:
            image = str(self.pool[i]["imageId"])
            if image in seen:
                continue
            seen.add(image)
            group = [(i, labels)]
            for j in self.by_image[image]:
                if j != i and len(group) < MAX_PER_IMAGE:
                    weight, lbs = weighed(j)
                    if rng.random() * top < weight:
                        group.append((j, lbs))
            groups.append(group)
        return groups

    def gqa_records(self, n_short: int, n_choice: int, rng: random.Random, stats: Counter, *,
                    short_config: EvalConfig | None = None,
                    choice_config: EvalConfig | None = None, style: str = "letter",
                    refill: bool = False) -> tuple[list[dict], list[dict]]:
        """``n_short`` one-word answers and ``n_choice`` multiple-choice records, drawn by image
        (``_groups``). Each image's questions are shared out between the two kinds, the kind
        further behind its count first, so an image's short answers and multiple choice train
        in one pack, and no question is asked twice. With ``refill``, short answers make up
        for multiple choice that could not be built."""
        groups = self._groups(n_short + n_choice, rng)
        short: list[dict] = []
        choice: list[dict] = []
        tried: set[int] = set()
        for again in (False, True):
            if again:
                if not refill or len(choice) >= n_choice:
                    break
                n_short, n_choice = n_short + n_choice - len(choice), len(choice)
            for i, labels in (q for group in groups for q in group):
                if len(short) >= n_short and len(choice) >= n_choice:
                    break
                if i in tried:
                    continue
                ex = self.pool[i]
                record = None
                others = self._distractors(ex) if len(choice) < n_choice else None
                if others and (len(short) >= n_short
                               or len(choice) * n_short <= len(short) * n_choice):
                    tried.add(i)
                    record = self._choice(ex, others, rng, choice_config, stats, style)
                    if record is not None:
                        choice.append(record)
                elif len(short) < n_short:
                    tried.add(i)
                    record = self._short(ex, labels, short_config, stats)
                    if record is not None:
                        short.append(record)
        return short, choice

    def short_answers(self, n: int, rng: random.Random, config: EvalConfig,
                      stats: Counter) -> list[dict]:
        """``n`` one-word answers, weighted toward the weak question types, drawn by image."""
        return self.gqa_records(n, 0, rng, stats, short_config=config)[0]

    def choices(self, n: int, rng: random.Random, config: EvalConfig,
                stats: Counter, style: str = "letter") -> list[dict]:
        """``n`` multiple-choice questions with same-type distractors, answered by the bare
        letter (``style="letter"``) or by the option's text (``style="text"``), drawn by image."""
        return self.gqa_records(0, n, rng, stats, choice_config=config, style=style)[1]

    def _short(self, ex: dict, labels: list[str], config: EvalConfig,
               stats: Counter) -> dict | None:
        if self._protected(ex, stats):
            return None
        path = self._image(ex, stats)
        if path is None:
            return None
        prompt = build_prompt({**_public(ex), "benchmark": "gqa_ru"}, config)
        record = self._record(ex, "short", prompt, str(ex["answer"]).strip(), path, labels=labels)
        if not self._keep(record, stats):
            return None
        stats.update(f"short_{lb}" for lb in labels)
        return record

    def _distractors(self, ex: dict) -> list[str] | None:
        """Same-type answers other than the gold one; None for yes/no questions or none."""
        answer = str(ex["answer"]).strip()
        others = sorted(self.vocab[str((ex.get("types") or {}).get("detailed"))] - {answer})
        return None if answer.casefold() in YES_NO or not others else others

    def _choice(self, ex: dict, others: list[str], rng: random.Random, config: EvalConfig,
                stats: Counter, style: str) -> dict | None:
        if self._protected(ex, stats):
            return None
        answer = str(ex["answer"]).strip()
        k = min(len(others) + 1, rng.choice([2, 3, 4, 4]))
        texts = [answer, *rng.sample(others, k - 1)]
        rng.shuffle(texts)
        options = dict(zip("ABCD", texts))
        letter = "ABCD"[texts.index(answer)]
        path = self._image(ex, stats)
        if path is None:
            return None
        prompt = build_prompt({"benchmark": "mmbench_ru", "question": ex["question"],
                               "hint": None, "options": options}, config)
        record = self._record(ex, "choice", prompt, letter if style == "letter" else answer,
                              path, options=options, answer_style=style)
        if not self._keep(record, stats):
            return None
        stats[f"choice_{k}_options"] += 1
        return record

    def instruct(self, n: int, rng: random.Random, stats: Counter) -> list[dict]:
        """``n`` LLaVA-Instruct-ru conversations whose COCO image exists."""
        if n <= 0:
            return []
        if self.ctx.data.coco_dir is None:
            stats["instruct_no_coco_dir"] += n
            log.warning("no COCO folder: the data mix gets no LLaVA-Instruct-ru conversations")
            return []
        if self._instruct is None:
            try:
                self._instruct = core_data.load_llava_instruct(self.ctx.data.instruct,
                                                               self.ctx.data.coco_dir)
            except (UserError, DataError) as exc:
                log.warning("LLaVA-Instruct-ru unavailable, the mix gets none: %s", exc)
                self._instruct = []
        order = list(range(len(self._instruct)))
        rng.shuffle(order)
        out = []
        for i in order:
            if len(out) == n:
                break
            record = llava_instruct_to_sft(self._instruct[i], self.ctx.data.coco_dir)
            if not record["image"] or not Path(record["image"]).exists():
                stats["image_missing"] += 1
                continue
            if self._keep(record, stats):
                out.append(record)
        return out

    # ------------------------------------------------------------ all together

    def build(self, n: int, mix: Mix, seed: int) -> tuple[list[dict], dict]:
        """About ``n`` validated, guarded records in ``mix``, and counts for the record."""
        rng = random.Random(seed)
        champion = self.ctx.champion.eval_configs
        gqa_config = champion["gqa_ru"]
        mmb_config = champion["mmbench_ru"]
        if mmb_config.mode == "likelihood":
            mmb_config = EvalConfig()  # likelihood prompts have no letters; teach lmms-eval's
        want = mix.counts(n)
        stats: Counter = Counter()
        style = choice_answer_style(self.ctx)
        parts = {"instruct": self.instruct(want["instruct"], rng, stats)}
        # the short kind refills what the other two could not build
        parts["short"], parts["choice"] = self.gqa_records(
            n - want["choice"] - len(parts["instruct"]), want["choice"], rng, stats,
            short_config=gqa_config, choice_config=mmb_config, style=style, refill=True)
        records = [r for kind in ("short", "choice", "instruct") for r in parts[kind]]
        rng.shuffle(records)
        if not records:
            raise ProposalFailed(f"no training records could be built from "
                                 f"{self.ctx.data.gqa}: {dict(stats)}")
        validate_records(records)
        check_records(records, self.protected, allowed_questions=self.templates)
        info = {"n_records": len(records), "wanted": want, "mix": mix.to_dict(),
                "counts": {k: len(v) for k, v in parts.items()}, "stats": dict(sorted(stats.items())),
                "choice_answer": style,
                "template_questions": len(self.templates), "seed": seed}
        log.info("SFT data: %s", info["counts"])
        return records, info
