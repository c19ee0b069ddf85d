"""Remedy ``context_distill``: turn a winning prompt or decoding setting into an adapter.

Under ``--objective benchmark`` a candidate is judged by the exact lmms-eval protocol, so a
prompt or decoding setting that wins on dev cannot become champion by itself. Context
distillation (Askell et al. 2021, "A General Language Assistant as a Laboratory for
Alignment"; Snell et al. 2022, "Learning by Distilling Context") moves what the setting does
into the weights: the model answers TRAINING questions under the winning setting, and a LoRA
adapter learns to give those answers to the standard lmms-eval prompt.

- The setting: the history's setting-only candidate (``setting_only``) on the current champion
  whose paired gain on dev was positive, the best one when there are several. The benchmarks
  whose settings it changed, with a positive paired difference, are distilled.
- The questions: GQA-ru ``train_balanced`` only: one-word questions for GQA-ru, multiple
  choice built from them (as ``strategies.sft_data`` builds it) for MMBench-ru. Nothing from
  an evaluation split: the builder's leakage guard checks every record.
- The answers: the model's own (``ctx.evaluate`` with the winning ``EvalConfig`` on those
  training examples); for MMBench-ru the parsed letter, so the adapter answers as lmms-eval
  parses.
- The adapter continues the champion's (``TrainConfig.init_from``): the setting was measured
  on the champion, so what it adds is learnt on top of what the champion already knows.
- The size (``strategies.sizing``): the points the setting gained (its paired differences on the
  benchmarks it won), times the run's records per point, within the floor and ceiling and the
  time cap.
- The candidate: the new adapter with the default (lmms-eval) settings on both benchmarks.
"""

from __future__ import annotations

import logging
import random
from collections import Counter

from core.evaluate import EvalConfig
from core.sft import write_sft_jsonl
from core.train import TrainConfig
from strategies.base import BENCHMARKS, Candidate, Context, ProposalFailed, Strategy
from strategies.common import DATA_S_PER_RECORD, MIN_STEPS, Clock, attempts, train_adapter
from strategies.generation_params import GenerationParams
from strategies.prompt_constraints import PromptConstraints
from strategies.sft_data import SFTDataBuilder
from strategies.sizing import Sizing, share_of_time_left, size_training, time_left_for_floor

log = logging.getLogger(__name__)

TIME_SHARE = 0.5
"""Share of the time left after the candidate's dev evaluation that generation and training may
use at most (the sizing rule's time cap)."""
RANK, DROPOUT = 16, 0.05


def winning_setting(ctx: Context) -> tuple[dict, list[str]] | None:
    """The best setting-only history entry on the champion with a positive paired gain, and
    the benchmarks it improved; None when there is none."""
    best = None
    for entry in ctx.history:
        cand = entry.get("candidate") or {}
        if not entry.get("setting_only") or (entry.get("gain") or 0.0) <= 0:
            continue
        if cand.get("adapter_path") != ctx.champion.adapter_path:
            continue
        champion = {b: c.to_dict() for b, c in ctx.champion.eval_configs.items()}
        won = [b for b in BENCHMARKS
               if (cand.get("eval_configs") or {}).get(b, champion[b]) != champion[b]
               and ((entry.get("paired") or {}).get(b) or {}).get("diff", 0.0) > 0]
        if won and (best is None or entry["gain"] > best[0]["gain"]):
            best = (entry, won)
    return best


class ContextDistill(Strategy):
    """Generate answers under the winning setting on training questions, train one adapter."""

    name = "context_distill"
    family = "sft"
    trains = True
    summary = "LoRA on the model's own answers under a winning prompt/decoding setting"
    addresses = {label: max(PromptConstraints.addresses.get(label, 0.0),
                            GenerationParams.addresses.get(label, 0.0))
                 for label in {**PromptConstraints.addresses, **GenerationParams.addresses}}

    @classmethod
    def waiting(cls, history: list[dict]) -> str | None:
        """Until a setting wins on dev with the current champion (the cycles since the last
        accepted one): a setting that won with an earlier champion is nothing to distill."""
        last = max((i for i, h in enumerate(history) if h.get("status") == "accepted"), default=-1)
        if any(h.get("setting_only") and (h.get("gain") or 0.0) > 0 for h in history[last + 1:]):
            return None
        return "waits for a prompt or decoding setting that wins on dev with this champion"

    def budget(self, ctx: Context) -> float:
        return share_of_time_left(ctx, self.eval_cost(ctx), TIME_SHARE)

    def sizing(self, ctx: Context, found: tuple[dict, list[str]] | None = None) -> Sizing:
        """Records to distil: what the winning setting gained (``found``: its history entry
        and benchmarks; without one, the errors a setting could address)."""
        benchmarks = found[1] if found else list(BENCHMARKS)
        targeted = None
        if found:
            paired = found[0].get("paired") or {}
            targeted = {b: {"errors": round(paired[b]["diff"] * paired[b].get("n", 0), 1),
                            "n": paired[b].get("n", 0),
                            "points": round(100 * paired[b]["diff"], 2)} for b in benchmarks}
        return size_training(ctx, self.addresses, targeted=targeted, time_cap_s=self.budget(ctx),
                             continuation=ctx.champion.adapter_path is not None,
                             s_per_record=self.per_record(ctx, benchmarks))

    def propose(self, ctx: Context) -> Candidate:
        clock = Clock(ctx)
        found = winning_setting(ctx)
        if found is None:
            raise ProposalFailed("no prompt or decoding setting has won on dev with this "
                                 "champion: nothing to distill")
        entry, benchmarks = found
        sizing = self.sizing(ctx, found)
        if sizing.declined:
            raise ProposalFailed(f"context_distill declines: {sizing.declined}")
        n = sizing.records
        k = attempts(ctx, self.name)
        seed = ctx.seed * 1000 + k
        rng = random.Random(seed)
        builder, stats = SFTDataBuilder(ctx), Counter()
        winning = {b: EvalConfig(**entry["candidate"]["eval_configs"][b]) for b in benchmarks}
        records, agreement = [], {}
        for i, b in enumerate(benchmarks):
            want = n // len(benchmarks) + (i < n % len(benchmarks))
            base = (builder.short_answers(want, rng, EvalConfig(), stats) if b == "gqa_ru"
                    else builder.choices(want, rng, EvalConfig(), stats))
            if not base:
                continue
            result = ctx.evaluate(b, winning[b], adapter_path=ctx.champion.adapter_path,
                                  examples=[_example(r, b, j) for j, r in enumerate(base)])
            kept = _distilled(base, result.samples, b)
            agreement[b] = {"records": len(kept), "gold_agreement": round(
                sum(s.get("correct", False) for s in result.samples) / len(base), 4)}
            records += kept
        if not records:
            raise ProposalFailed(f"no distillation records could be built: {dict(stats)}")
        steps = max(MIN_STEPS, -(-len(records) // sizing.batch_size))
        deadline_s = min(clock.left(reserve=self.eval_cost(ctx)), self.budget(ctx) - clock.elapsed())
        if deadline_s <= 0:
            raise ProposalFailed(f"generating the answers took {clock.elapsed():.0f} s; no time "
                                 "is left to train")
        rng.shuffle(records)
        data_file = write_sft_jsonl(records, ctx.workdir / "context_distill.jsonl")
        init_from = ctx.champion.adapter_path  # the setting was measured on the champion
        config = TrainConfig(steps=steps, batch_size=sizing.batch_size, lr=ctx.train_lr,
                             rank=RANK, alpha=2 * RANK, dropout=DROPOUT, seed=seed,
                             init_from=init_from)
        log.info("context_distill: %d records distilled from cycle %s (%s), %d steps",
                 len(records), entry.get("index"), ", ".join(benchmarks), steps)
        adapter_path, result_dict, status = train_adapter(
            ctx, records, config, name=f"c{ctx.cycle}-context-distill", deadline_s=deadline_s,
            what="distilled")
        return ctx.champion.derive(
            self.name, f"LoRA r{RANK} distilling cycle {entry.get('index')}'s "
            f"{', '.join(benchmarks)} setting into {len(records)} records, {steps} steps, "
            f"{'from the champion' if init_from else 'from the base'}",
            eval_configs={b: EvalConfig() for b in BENCHMARKS},
            adapter_path=str(adapter_path), adapter_id=None,
            train={"config": config.to_dict(), "result": result_dict},
            details={"source_cycle": entry.get("index"), "benchmarks": benchmarks,
                     "winning_configs": {b: c.to_dict() for b, c in winning.items()},
                     "paired": entry.get("paired"), "data": agreement,
                     "data_file": str(data_file),
                     "stats": dict(sorted(stats.items())), "attempt": k,
                     "sizing": sizing.to_dict(),
                     "train_status": status, "parent_adapter": ctx.champion.adapter_path,
                     "init_from": "champion" if init_from else "base"})

    def per_record(self, ctx: Context, benchmarks: list[str] = BENCHMARKS) -> float:
        """Seconds to generate one record's answer, build it and train on it once."""
        gen = max(ctx.rates.eval_s_per_sample[b] for b in benchmarks)
        return gen + ctx.rates.train_s_per_sample + DATA_S_PER_RECORD

    def least_seconds(self, ctx: Context) -> float:
        """The least time left with which a distillation can be proposed: its time cap (a share
        of what the dev evaluation leaves) must hold the floor's records."""
        return time_left_for_floor(ctx, self.eval_cost(ctx), self.sizing(ctx), TIME_SHARE)

    def estimate_cost(self, ctx: Context) -> float:
        """The dev evaluation and the sized generation and training (for the winning setting,
        once there is one); when the floor does not fit, the time left it would need."""
        sizing = self.sizing(ctx, winning_setting(ctx))
        if sizing.declined:
            return self.least_seconds(ctx)
        return self.eval_cost(ctx) + ctx.rates.load_s + sizing.seconds


def _example(record: dict, benchmark: str, j: int) -> dict:
    """The builder record as a question of ``benchmark`` in its loader's columns (its image is
    the written file), so it evaluates like a benchmark record: GQA-ru's carries its
    ``imageId`` and question type, MMBench-ru's its own ``index`` (one question group each)."""
    meta = record["meta"]
    ex = {"benchmark": benchmark, "id": record["id"], "question": meta["question"],
          "answer": record["conversations"][1]["value"], "_image": lambda p=record["image"]: p}
    if benchmark == "gqa_ru":
        ex.update(imageId=meta["imageId"], types={"detailed": meta.get("detailed_type")})
    else:
        ex.update(index=j, hint=None, options=meta["options"], category="distill")
    return ex


def _distilled(records: list[dict], samples: list[dict], benchmark: str) -> list[dict]:
    """The records with the model's own answer (MMBench-ru: the parsed letter) as the target."""
    out = []
    for record, sample in zip(records, samples):
        answer = sample.get("parsed") if benchmark == "mmbench_ru" else sample.get("output")
        answer = str(answer or "").strip()
        if not answer:
            continue
        conv = [dict(record["conversations"][0]), {"from": "gpt", "value": answer}]
        out.append({**record, "id": record["id"].replace("gqa-", "distill-", 1),
                    "conversations": conv, "source": f"context_distill_{benchmark}",
                    "meta": {**record["meta"], "gold": record["conversations"][1]["value"]}})
    return out
