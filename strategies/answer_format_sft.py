"""Remedy ``answer_format_sft``: a LoRA adapter trained on short answers and option letters.

The data (``strategies.sft_data``) is aimed at the champion's error profile: one-word answers
to GQA-ru train questions weighted toward the weak question types, multiple choice built from
GQA-ru train in the MMBench-ru prompt (more of it the larger MMBench-ru's share of format
mismatches), answered the way the champion's right MMBench-ru answers name their option (the
bare letter, or the option's text), and LLaVA-Instruct-ru to keep general ability. The
run is sized by ``strategies.sizing`` to the champion's errors that it addresses, capped by a
share of the time left after the candidate's dev evaluation; it trains through
``ctx.train`` and proposes the new adapter with the champion's prompts and decoding. When the
champion has an adapter, the new one continues training it (``TrainConfig.init_from``), so a
later candidate builds on what the champion already learnt instead of starting from the base.
"""

from __future__ import annotations

import logging

from core.sft import write_sft_jsonl
from core.train import TrainConfig
from strategies.base import Candidate, Context, ProposalFailed, Strategy
from strategies.common import Clock, attempts, share, train_adapter
from strategies.sft_data import Mix, SFTDataBuilder
from strategies.sizing import Sizing, share_of_time_left, size_training, time_left_for_floor

log = logging.getLogger(__name__)

TIME_SHARE = 0.5
"""Share of the time left after the dev evaluation that data and training may use at most (the
sizing rule's time cap): the rest stays for later cycles (``ctx.time_left_s`` is what all
remaining cycles may spend)."""
INSTRUCT_SHARE = 0.15
RANK, DROPOUT = 16, 0.05


def profile_mix(ctx: Context) -> Mix:
    """More multiple choice the larger MMBench-ru's share of format mismatches is; none once
    multiple-choice data made MMBench-ru significantly worse for this champion."""
    gqa, mmb = (share(ctx, b, "format_mismatch") for b in ("gqa_ru", "mmbench_ru"))
    choice = 0.15 + 0.35 * (mmb / (gqa + mmb)) if gqa + mmb > 0 else 0.3
    if choice_hurt_mmbench(ctx) is not None:
        choice = 0.0
    return Mix(short=1.0 - choice - INSTRUCT_SHARE, choice=choice, instruct=INSTRUCT_SHARE)


def choice_hurt_mmbench(ctx: Context) -> int | None:
    """The cycle, since the champion was chosen, whose adapter was trained with multiple-choice
    records and made MMBench-ru significantly worse (p < 0.05) while GQA-ru was not, or None.

    Letters without the skill to match them to options teach a model to say one letter; then
    the short answers alone go on (their skills transfer to MMBench-ru through option texts).
    A candidate significantly worse on GQA-ru as well (a poor HPO trial, say) was worse as a
    whole: that is no evidence against the multiple choice in its data.
    """
    since = ctx.history[max((i for i, h in enumerate(ctx.history) if h["status"] == "accepted"),
                            default=-1) + 1:]
    for h in since:
        details = (h.get("candidate") or {}).get("details") or {}
        trained_choice = ((details.get("data") or {}).get("counts") or {}).get("choice", 0)
        paired = h.get("paired") or {}
        mmb, gqa = paired.get("mmbench_ru") or {}, paired.get("gqa_ru") or {}
        if not trained_choice or gqa.get("diff", 0) < 0 and gqa.get("p_value", 1) < 0.05:
            continue
        if mmb.get("diff", 0) < 0 and mmb.get("p_value", 1) < 0.05:
            return h.get("index")
    return None


class AnswerFormatSFT(Strategy):
    """Build profile-aimed SFT data, train one LoRA adapter, propose it."""

    name = "answer_format_sft"
    addresses = {"format_mismatch": 0.9, "color": 0.5, "location": 0.5, "counting": 0.5,
                 "other": 0.3}
    family = "sft"
    trains = True
    summary = "LoRA SFT on short GQA-ru answers and GQA-built multiple choice (+ LLaVA-Instruct)"

    def budget(self, ctx: Context) -> float:
        """Seconds for building the data and training at most (the sizing's time cap)."""
        return share_of_time_left(ctx, self.eval_cost(ctx), TIME_SHARE)

    def sizing(self, ctx: Context) -> Sizing:
        """Records and steps for the champion's addressed errors; a continuation of the
        champion's adapter trains the delta."""
        return size_training(ctx, self.addresses, continuation=ctx.champion.adapter_path is not None,
                             time_cap_s=self.budget(ctx))

    def propose(self, ctx: Context) -> Candidate:
        clock = Clock(ctx)
        sizing = self.sizing(ctx)
        if sizing.declined:
            raise ProposalFailed(f"answer_format_sft declines: {sizing.declined} (the dev "
                                 f"evaluation needs {self.eval_cost(ctx):.0f} s of the "
                                 f"{ctx.time_left_s:.0f} s left)")
        k = attempts(ctx, self.name)
        seed = ctx.seed * 1000 + k
        mix = profile_mix(ctx)
        records, data_info = SFTDataBuilder(ctx).build(sizing.records, mix, seed)
        if (hurt := choice_hurt_mmbench(ctx)) is not None:
            data_info["no_choice_because"] = (f"cycle {hurt}'s multiple-choice records made "
                                              "MMBench-ru significantly worse")
            log.info("answer_format_sft: no multiple choice: %s", data_info["no_choice_because"])
        data_file = write_sft_jsonl(records, ctx.workdir / "answer_format_sft.jsonl")
        init_from = ctx.champion.adapter_path
        config = TrainConfig(steps=sizing.steps, batch_size=sizing.batch_size, lr=ctx.train_lr, rank=RANK,
                             alpha=2 * RANK, dropout=DROPOUT, seed=seed, init_from=init_from)
        # the budget bounds training even when the measured rates were too optimistic
        deadline_s = min(clock.left(reserve=self.eval_cost(ctx)),
                         self.budget(ctx) - clock.elapsed())
        if deadline_s <= 0:
            raise ProposalFailed(f"building the data took {clock.elapsed():.0f} s; no time "
                                 "is left to train")
        log.info("answer_format_sft: %d records (%s), %d steps x %d, deadline %.0f s",
                 len(records), data_info["counts"], sizing.steps, sizing.batch_size, deadline_s)
        adapter_path, result_dict, status = train_adapter(
            ctx, records, config, name=f"c{ctx.cycle}-answer-format", deadline_s=deadline_s,
            what="answer-format")
        return ctx.champion.derive(
            self.name,
            f"LoRA r{RANK} on {len(records)} answer-format records "
            f"({', '.join(f'{n} {kind}' for kind, n in data_info['counts'].items())}), "
            f"{sizing.steps} steps, {'from the champion' if init_from else 'from the base'}",
            adapter_path=str(adapter_path), adapter_id=None,
            train={"config": config.to_dict(), "result": result_dict},
            details={"data": data_info, "data_file": str(data_file), "attempt": k,
                     "planned_steps": sizing.steps, "deadline_s": round(deadline_s, 1),
                     "sizing": sizing.to_dict(),
                     "train_status": status, "parent_adapter": ctx.champion.adapter_path,
                     "init_from": "champion" if init_from else "base",
                     "weak_types": _weak_types(ctx)})

    def estimate_cost(self, ctx: Context) -> float:
        """Data, training and the candidate's dev evaluation, as sized; when the floor does not
        fit in the time cap, the time left that it would need."""
        sizing = self.sizing(ctx)
        if sizing.declined:
            return time_left_for_floor(ctx, self.eval_cost(ctx), sizing, TIME_SHARE)
        return self.eval_cost(ctx) + ctx.rates.load_s + sizing.seconds


def _weak_types(ctx: Context) -> dict[str, list[str]]:
    profile = ctx.profiles.get("gqa_ru")
    if profile is None:
        return {}
    return {label: profile.weak_categories(label) for label in ("counting", "color", "location")
            if profile.counts.get(label)}
