"""Helpers the strategies share: reading the error profile, what history has tried, time.

The no-training strategies (prompt constraints, generation parameters) walk an ordered list of
``Variant``s and propose the first one whose resulting setting no cycle of this run has
evaluated yet. A setting is the benchmark, its full ``EvalConfig`` and the adapter, so a variant
tried on one champion is untried again once a different adapter (or prompt) becomes champion.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from core.evaluate import EvalConfig
from strategies.base import BENCHMARKS, Candidate, Context, Exhausted, ProposalFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One change to the champion's settings of one benchmark."""

    benchmark: str
    name: str
    """Short stable name, stored in the candidate's details."""
    changes: dict[str, Any]
    """EvalConfig fields to replace."""
    description: str


def share(ctx: Context, benchmark: str, label: str) -> float:
    """The share of ``label`` among the champion's errors on ``benchmark``'s analysis subset
    (0 when unknown)."""
    profile = ctx.profiles.get(benchmark)
    if profile is None or not profile.n_errors:
        return 0.0
    return float(profile.shares.get(label, 0.0))


def by_format_share(ctx: Context) -> list[str]:
    """Benchmarks, the one whose errors are most often format mismatches first (GQA-ru on ties)."""
    return sorted(BENCHMARKS, key=lambda b: (-share(ctx, b, "format_mismatch"), BENCHMARKS.index(b)))


def setting_key(benchmark: str, config: EvalConfig | dict, adapter_path: str | None) -> str:
    """A stable text key of one evaluated setting."""
    data = config.to_dict() if isinstance(config, EvalConfig) else dict(config)
    return json.dumps([benchmark, data, adapter_path], sort_keys=True, ensure_ascii=False)


def tried_settings(ctx: Context) -> set[str]:
    """Every (benchmark, config, adapter) the champion or a past cycle of this run evaluated."""
    keys = {setting_key(b, c, ctx.champion.adapter_path)
            for b, c in ctx.champion.eval_configs.items()}
    for entry in ctx.history:
        cand = entry.get("candidate") or {}
        for b, c in (cand.get("eval_configs") or {}).items():
            keys.add(setting_key(b, c, cand.get("adapter_path")))
    return keys


def apply(config: EvalConfig, changes: dict[str, Any]) -> EvalConfig:
    """A copy of ``config`` with ``changes`` (lists copied, so the champion is never shared)."""
    return dataclasses.replace(config, **{k: list(v) if isinstance(v, list) else v
                                          for k, v in changes.items()})


def first_untried(ctx: Context, variants: list[Variant]) -> tuple[Variant, EvalConfig] | None:
    """The first variant whose resulting setting has not been evaluated in this run."""
    tried = tried_settings(ctx)
    for variant in variants:
        config = apply(ctx.champion.eval_configs[variant.benchmark], variant.changes)
        if setting_key(variant.benchmark, config, ctx.champion.adapter_path) not in tried:
            return variant, config
    return None


def variant_candidate(ctx: Context, strategy: str, variant: Variant,
                      config: EvalConfig, why: str) -> Candidate:
    """The champion with one benchmark's settings replaced by ``config``."""
    configs = dict(ctx.champion.eval_configs)
    configs[variant.benchmark] = config
    return ctx.champion.derive(
        strategy, f"{variant.benchmark}: {variant.description}", eval_configs=configs,
        details={"benchmark": variant.benchmark, "variant": variant.name,
                 "changes": dict(variant.changes), "why": why,
                 "format_mismatch_share": {b: round(share(ctx, b, "format_mismatch"), 4)
                                           for b in BENCHMARKS},
                 "base_adapter": ctx.champion.adapter_path})


def propose_next_variant(ctx: Context, strategy: str, variants: list[Variant],
                         what: str) -> Candidate:
    """The champion with the first untried variant applied; ``Exhausted`` when none is left.

    ``what`` names a variant in the messages ("instruction", "decoding variant").
    """
    found = first_untried(ctx, variants)
    if found is None:
        raise Exhausted(f"every {what} has been evaluated with this champion")
    variant, config = found
    fmt = share(ctx, variant.benchmark, "format_mismatch")
    why = (f"{fmt:.0%} of the champion's {variant.benchmark} errors (analysis subset) are format "
           f"mismatches; next untried {what} '{variant.name}'")
    log.info("%s: %s", strategy, why)
    return variant_candidate(ctx, strategy, variant, config, why)


def attempts(ctx: Context, strategy: str) -> int:
    """How many cycles of this run chose ``strategy`` so far."""
    return sum(entry.get("strategy") == strategy for entry in ctx.history)


class Clock:
    """Time spent since ``propose`` started, on ``ctx.clock``."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.start = ctx.clock()

    def elapsed(self) -> float:
        return self.ctx.clock() - self.start

    def left(self, reserve: float = 0.0) -> float:
        """Seconds of ``ctx.time_left_s`` not yet spent, minus ``reserve``."""
        return self.ctx.time_left_s - self.elapsed() - reserve


# ---------------------------------------------------------------- training (sizes: strategies.sizing)

BATCH_SIZE = 16
MIN_STEPS = 5
DATA_S_PER_RECORD = 0.01
"""Seconds to build one record (decode and write its image), added to each record's cost."""
MIN_TRAIN_S = 5.0
"""Seconds below which no training is started: encoding the records, creating the adapter and
its first steps take about this long on a CPU, whatever the per-sample rate says."""


def smallest_training_s(ctx: Context) -> float:
    """Seconds of the smallest training worth starting: ``MIN_STEPS`` samples, at least
    ``MIN_TRAIN_S``."""
    return max(MIN_STEPS * (ctx.rates.train_s_per_sample + DATA_S_PER_RECORD), MIN_TRAIN_S)


def train_adapter(ctx: Context, records: list[dict], config, *, name: str, deadline_s: float,
                  what: str) -> tuple[str, dict, str]:
    """Train through ``ctx.train``; ``(adapter_path, result dict, status)``.

    Raises:
        ProposalFailed: the training produced no adapter (``what`` names it in the message).
    """
    adapter_path, result = ctx.train(records, config, name=name, deadline_s=deadline_s)
    status = getattr(result, "status", "unknown")
    if adapter_path is None:
        why = getattr(result, "error", None)
        if why is None and status == "deadline":
            why = ("its time box ended before the first optimizer step could finish; nothing "
                   "was trained")
        raise ProposalFailed(f"training the {what} adapter failed ({status}): {why}")
    result_dict = result.to_dict() if hasattr(result, "to_dict") else dict(result or {})
    return str(adapter_path), result_dict, status
