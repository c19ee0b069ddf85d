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
"""Short answers are drawn from this many times as many shuffled candidates."""


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

    def short_answers(self, n: int, rng: random.Random, config: EvalConfig,
                      stats: Counter) -> list[dict]:
        """``n`` one-word answers, weighted toward the weak question types."""
        bonus, weak = profile_weights(self.ctx)
        order = list(range(len(self.pool)))
        rng.shuffle(order)
        keyed = []
        for i in order[: CANDIDATES_PER_RECORD * n]:
            ex = self.pool[i]
            labels = classify("gqa_ru", _public(ex), "") & set(CONTENT_LABELS)
            weight = 1.0 + sum(bonus.get(lb, 0.0) for lb in labels) + (_category(ex) in weak)
            keyed.append((rng.random() ** (1.0 / weight), i, sorted(labels)))
        keyed.sort(reverse=True)
        out = []
        for _, i, labels in keyed:
            if len(out) == n:
                break
            ex = self.pool[i]
            if self._protected(ex, stats):
                continue
            path = self._image(ex, stats)
            if path is None:
                continue
            prompt = build_prompt({**_public(ex), "benchmark": "gqa_ru"}, config)
            record = self._record(ex, "short", prompt, str(ex["answer"]).strip(), path,
                                  labels=labels)
            if self._keep(record, stats):
                out.append(record)
                stats.update(f"short_{lb}" for lb in labels)
        return out

    def choices(self, n: int, rng: random.Random, config: EvalConfig,
                stats: Counter, style: str = "letter") -> list[dict]:
        """``n`` multiple-choice questions with same-type distractors, answered by the bare
        letter (``style="letter"``) or by the option's text (``style="text"``)."""
        order = list(range(len(self.pool)))
        rng.shuffle(order)
        out = []
        for i in order:
            if len(out) == n:
                break
            ex = self.pool[i]
            answer = str(ex["answer"]).strip()
            others = sorted(self.vocab[str((ex.get("types") or {}).get("detailed"))] - {answer})
            if answer.casefold() in YES_NO or not others:
                continue
            if self._protected(ex, stats):
                continue
            k = min(len(others) + 1, rng.choice([2, 3, 4, 4]))
            texts = [answer, *rng.sample(others, k - 1)]
            rng.shuffle(texts)
            options = dict(zip("ABCD", texts))
            letter = "ABCD"[texts.index(answer)]
            path = self._image(ex, stats)
            if path is None:
                continue
            prompt = build_prompt({"benchmark": "mmbench_ru", "question": ex["question"],
                                   "hint": None, "options": options}, config)
            record = self._record(ex, "choice", prompt, letter if style == "letter" else answer,
                                  path, options=options, answer_style=style)
            if self._keep(record, stats):
                out.append(record)
                stats[f"choice_{k}_options"] += 1
        return out

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
        parts = {"choice": self.choices(want["choice"], rng, mmb_config, stats, style),
                 "instruct": self.instruct(want["instruct"], rng, stats)}
        short_n = n - len(parts["choice"]) - len(parts["instruct"])  # the short kind refills
        parts["short"] = self.short_answers(short_n, rng, gqa_config, stats)
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
