"""The one contract every remedy follows.

The controller calls ``Strategy.propose(ctx)`` once per cycle, after it has diagnosed the
champion's errors on the analysis subset (never on dev, which judges) and the policy has
chosen this strategy. The strategy returns a
``Candidate``: the evaluation settings per benchmark and the adapter to evaluate them with. A
strategy that trains does so through ``ctx.train`` (which time-boxes and records the run), so
the candidate it returns is always ready to evaluate; the controller then evaluates it on dev,
runs the paired test against the champion and accepts or rejects it.
"""

from __future__ import annotations

import copy
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.evaluate import EvalConfig

BENCHMARKS = ("gqa_ru", "mmbench_ru")


@dataclass
class Candidate:
    """A complete setting to evaluate: prompts and decoding per benchmark, and an adapter."""

    strategy: str
    description: str
    eval_configs: dict[str, EvalConfig]
    """benchmark -> prompt and decoding settings."""
    adapter_path: str | None = None
    """The LoRA adapter to evaluate with (PEFT folder); None is the bare base model."""
    adapter_id: int | None = None
    """The adapter's id in the store, when it is registered there."""
    train: dict[str, Any] | None = None
    """What training produced this adapter (config, result), for the record."""
    details: dict[str, Any] = field(default_factory=dict)
    """Strategy-specific facts for the record (trials, data mix, ...)."""

    def derive(self, strategy: str, description: str, **changes) -> Candidate:
        """A copy of this candidate (usually the champion) with some fields changed."""
        new = copy.deepcopy(self)
        new.strategy, new.description, new.details, new.train = strategy, description, {}, None
        for key, value in changes.items():
            setattr(new, key, value)
        return new

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "description": self.description,
                "eval_configs": {b: c.to_dict() for b, c in self.eval_configs.items()},
                "adapter_path": self.adapter_path, "adapter_id": self.adapter_id,
                "train": self.train, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(strategy=data["strategy"], description=data["description"],
                   eval_configs={b: EvalConfig(**c) for b, c in data["eval_configs"].items()},
                   adapter_path=data.get("adapter_path"), adapter_id=data.get("adapter_id"),
                   train=data.get("train"), details=data.get("details") or {})


def base_candidate() -> Candidate:
    """The seed setting: the base model with the lmms-eval prompts and decoding."""
    return Candidate(strategy="baseline", description="base model, lmms-eval prompts",
                     eval_configs={b: EvalConfig() for b in BENCHMARKS})


@dataclass
class CostRates:
    """Seconds per unit of work on this machine: priors first, then what the run measured."""

    eval_s_per_sample: dict[str, float]
    """benchmark -> seconds per evaluated question (generation; likelihood is cheaper)."""
    train_s_per_sample: float
    """seconds per training example seen (one micro-batch row, forward + backward)."""
    load_s: float = 0.0
    train_tokens_per_record: float = 0.0
    """Tokens one trained record costs (a prior, for the plan); 0 when not estimated."""


@dataclass
class Context:
    """Everything a strategy may look at when it proposes a candidate."""

    cycle: int
    seed: int
    champion: Candidate
    profiles: dict[str, Any]
    """benchmark -> core.error_profile.ErrorProfile of the champion on the analysis subset
    (``tune_examples``), disjoint from the dev questions that judge the candidate."""
    history: list[dict]
    """Past cycles of this run: {"index", "strategy", "status", "gain", "candidate"}."""
    time_left_s: float
    """Seconds this cycle may spend, evaluation of the candidate included."""
    rates: CostRates
    dev_sizes: dict[str, int]
    """benchmark -> number of dev questions the candidate will be evaluated on."""
    data: Any
    """core.data.DataSources: where training data comes from."""
    protected: dict[str, set[str]]
    """Leakage guard: {"images": ..., "questions": ...} of every evaluation split."""
    workdir: Path
    """A folder of this cycle's own for data files and adapters."""
    train: Callable[..., Any]
    """train(records, train_config, *, name, deadline_s, hooks=None) -> (adapter_path,
    TrainResult).

    ``deadline_s`` is a duration: seconds from the call by which training has stopped and the
    adapter is saved. ``adapter_path`` is None when training produced no usable adapter.
    ``hooks`` (``core.train.TrainHooks``): callbacks during training, e.g. ``evaluate_live``
    at fixed points."""
    evaluate: Callable[..., Any]
    """evaluate(benchmark, eval_config, *, adapter_path, examples=None) -> EvalResult."""
    evaluate_live: Callable[..., Any] | None = None
    """evaluate_live(benchmark, eval_config, examples) -> EvalResult with the adapter being
    trained as it is (only from a ``TrainHooks.evaluate`` callback of ``train``); None where
    the trainer cannot (HPO trials then report only after training)."""
    tune_examples: dict[str, list[dict]] = field(default_factory=dict)
    """benchmark -> the analysis subset: dev-split questions outside the dev subset that judges,
    for the champion's error profile and for strategies that search."""
    analysis_sizes: dict[str, int] = field(default_factory=dict)
    """benchmark -> questions of the analysis subset, where a setting-only candidate is measured
    under ``--objective benchmark``."""
    optuna_storage: str | None = None
    """Optuna storage URL: experiments.db's ``sqlite:///...`` (Optuna owns its own tables
    there), or the shared storage given with ``loop run --storage``."""
    shared_storage: bool = False
    """The study is shared with ``loop worker`` processes (``strategies.hpo_study``)."""
    study_name: str | None = None
    """The HPO study's name (``loop run --study``); None: ``loop-hpo-run<id>``."""
    world: dict[str, Any] = field(default_factory=dict)
    """What a worker needs to rebuild this run's world: ``owner`` (the run's token, id and
    database), sources, seed, data fingerprint, ``adapter_dir``, ``heartbeat_s``."""
    record_trial: Callable[[dict], None] = lambda record: None
    """record_trial(record): keep one finished HPO trial (whoever ran it) in experiments.db."""
    train_lr: float = 2e-4
    """The LoRA learning rate that suits this base model: 2e-4 for an 8B model (the usual
    LoRA SFT value), higher for the tiny demo model, whose weights are far fewer."""
    run_id: int | None = None
    """The run's id in the store; names per-run state such as the Optuna study."""
    clock: Callable[[], float] = time.monotonic
    """Seconds on a monotonic clock; strategies measure the time they spend with it."""
    profile_name: str = "cpu"
    preset: str = "demo"


class Strategy(ABC):
    """A remedy. Subclasses set ``name`` (lower case, unique: it is stored in SQLite),
    ``family`` (the policy credits gains per family), ``trains`` and ``summary``."""

    name: ClassVar[str]
    family: ClassVar[str]
    trains: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    addresses: ClassVar[dict[str, float]] = {}
    """Error label -> the share of such errors this remedy can plausibly fix: the policy's
    prior for its expected gain."""
    requires: ClassVar[str | None] = None
    """A strategy that must have run in this run before this one is worth trying."""

    @classmethod
    def waiting(cls, history: list[dict]) -> str | None:
        """Why this strategy is not worth trying yet given the run's history, or None.

        By default it waits for ``requires``; a strategy may wait for other facts."""
        if cls.requires and cls.requires not in {h["strategy"] for h in history}:
            return f"waits until {cls.requires} has run"
        return None

    @abstractmethod
    def propose(self, ctx: Context) -> Candidate:
        """Return a candidate derived from ``ctx.champion``, ready to evaluate.

        Called once per cycle in which the policy chose this strategy. Must finish within
        ``ctx.time_left_s`` (minus the candidate's own evaluation, which the controller does)
        and be deterministic for a given ``ctx.seed`` and history. A strategy that has nothing
        left to try raises ``Exhausted``.
        """

    @abstractmethod
    def estimate_cost(self, ctx: Context) -> float:
        """Seconds ``propose`` plus the candidate's dev evaluation will take, from ``ctx.rates``."""

    def eval_cost(self, ctx: Context, mode_factor: float = 1.0) -> float:
        """Seconds to evaluate one candidate on the dev subsets of both benchmarks."""
        return mode_factor * sum(ctx.rates.eval_s_per_sample[b] * n for b, n in ctx.dev_sizes.items())


class Exhausted(Exception):
    """The strategy has no untried proposal left; the policy will not choose it again."""


class ProposalFailed(Exception):
    """This cycle's proposal could not be made (too little time, training failed, no data).

    Unlike ``Exhausted`` the strategy may be chosen again in a later cycle."""
