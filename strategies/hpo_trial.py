"""One Optuna trial of ``optuna_hpo``: sample, build the data, train, score on the tune subset.

The loop's own trials and ``loop worker``'s trials run this one function, with a ``Context``
each: the loop's comes from the controller, a worker's is rebuilt from the study's user
attributes (``loop.worker``). Either way ``ctx.train`` passes the one leakage guard and trains
under a deadline, and ``ctx.evaluate`` scores on ``ctx.tune_examples`` (dev questions outside
the decision subset), in two halves: the first half's accuracy is an intermediate value, and
the median pruner may stop the trial there.

Search space: ``init`` (once the champion has an adapter: train a new one from the base, or
continue the champion's, ``TrainConfig.init_from``), ``lr`` (log), ``rank`` and ``alpha_mult``
(alpha = rank x mult; a continued adapter keeps the champion's), ``dropout``, ``steps_frac``
(share of the steps that fit the trial's time) and the mix shares ``choice_share`` and
``instruct_share`` (the rest is short answers).
"""

from __future__ import annotations

import logging
import socket
import time

from core.splits import unit_of
from core.train import TrainConfig
from strategies.base import Context
from strategies.sft_data import Mix, SFTDataBuilder
from strategies.sizing import trial_plan

log = logging.getLogger(__name__)

MAX_TUNE_PER_BENCHMARK = 200
DEFAULT_PARAMS = {"rank": 16, "alpha_mult": 2, "dropout": 0.05, "steps_frac": 1.0,
                  "choice_share": 0.3, "instruct_share": 0.15}


def tune_sets(ctx: Context) -> dict[str, list[dict]]:
    return {b: tune_slice(ex) for b, ex in ctx.tune_examples.items() if ex}


def tune_slice(examples, limit: int = MAX_TUNE_PER_BENCHMARK) -> list[dict]:
    """At most ``limit`` examples (at least one unit), whole units only (``core.splits.unit_of``:
    a GQA-ru image, an MMBench-ru rotation group), units in their order of first appearance;
    a plain ``[:limit]`` could keep part of a rotation group and score it circularly."""
    members: dict[str, list[dict]] = {}
    for ex in examples:
        members.setdefault(unit_of(ex), []).append(ex)
    out: list[dict] = []
    for group in members.values():
        if out and len(out) + len(group) > limit:
            break
        out += group
    return out


def tune_cost(ctx: Context) -> float:
    return sum(ctx.rates.eval_s_per_sample[b] * len(ex) for b, ex in tune_sets(ctx).items())


def suggest(trial, base_lr: float, champion_adapter: str | None = None) -> tuple[dict, Mix]:
    """The trial's hyper-parameters (TrainConfig fields) and data mix; the learning rate is
    searched from a quarter to five times the model's usual LoRA rate. With a champion's
    adapter, whether to continue it or start from the base is searched too."""
    start = (trial.suggest_categorical("init", ["base", "champion"]) if champion_adapter
             else "base")
    params = {"lr": trial.suggest_float("lr", base_lr / 4, base_lr * 5, log=True),
              "dropout": trial.suggest_float("dropout", 0.0, 0.2),
              "steps_frac": trial.suggest_float("steps_frac", 0.3, 1.0)}
    if start == "champion":
        params["init_from"] = champion_adapter  # its rank and alpha come with it
    else:
        rank = trial.suggest_categorical("rank", [4, 8, 16, 32])
        params.update(rank=rank, alpha=rank * trial.suggest_categorical("alpha_mult", [1, 2, 4]))
    choice = trial.suggest_float("choice_share", 0.0, 0.6)
    instruct = trial.suggest_float("instruct_share", 0.0, 0.3)
    return params, Mix(short=max(0.1, 1.0 - choice - instruct), choice=choice, instruct=instruct)


def run_trial(ctx: Context, study, trial, builder: SFTDataBuilder, seconds: float,
              worker: str = "loop") -> int:
    """Train and score a claimed trial within ``seconds``, then tell the study; returns its
    number. Never leaves the trial RUNNING: any exception fails it and is raised again."""
    from optuna.trial import TrialState

    started = ctx.clock()
    for stale in ("adapter_path", "train", "data", "seconds", "failed"):
        if trial.user_attrs.get(stale) is not None:  # a retried trial carries its last attempt's
            trial.set_user_attr(stale, None)
    trial.set_user_attr("worker", {"name": worker, "host": socket.gethostname(),
                                   "started": time.time()})
    try:
        params, mix = suggest(trial, ctx.train_lr, ctx.champion.adapter_path)
        plan = trial_plan(ctx, seconds - tune_cost(ctx), params.pop("steps_frac"),
                          continuation="init_from" in params)
        if plan is None:
            trial.set_user_attr("failed", f"no training fits in {seconds:.0f} s")
            study.tell(trial, state=TrialState.FAIL)
            return trial.number
        seed = ctx.seed * 1000 + trial.number
        records, info = builder.build(plan.n_records, mix, seed)
        config = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, seed=seed, **params)
        deadline_s = seconds - (ctx.clock() - started) - tune_cost(ctx)
        if deadline_s <= 0:
            trial.set_user_attr("failed", "building the data used the trial's time")
            study.tell(trial, state=TrialState.FAIL)
            return trial.number
        path, result = ctx.train(records, config, name=f"{study.study_name}-t{trial.number}",
                                 deadline_s=deadline_s)
        trial.set_user_attr("train", {"config": config.to_dict(),
                                      "status": getattr(result, "status", None),
                                      "samples": getattr(result, "samples", None),
                                      "seconds": getattr(result, "seconds", None)})
        trial.set_user_attr("data", info)
        if path is None:
            study.tell(trial, state=TrialState.FAIL)
            return trial.number
        trial.set_user_attr("adapter_path", str(path))
        value = score_trial(ctx, trial, str(path))
        trial.set_user_attr("seconds", round(ctx.clock() - started, 2))
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
        return trial.number
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def score_trial(ctx: Context, trial, adapter_path: str) -> float | None:
    """Mean tune accuracy over benchmarks, reported after each half; None when pruned."""
    halves = {b: _halves(ex) for b, ex in tune_sets(ctx).items()}
    totals: dict[str, list[float]] = {b: [0.0, 0.0] for b in halves}  # correct-weighted, n
    for step in (0, 1):
        for b, parts in halves.items():
            if not parts[step]:
                continue
            res = ctx.evaluate(b, ctx.champion.eval_configs[b], adapter_path=adapter_path,
                               examples=parts[step])
            totals[b][0] += res.accuracy * res.n
            totals[b][1] += res.n
        value = sum(c / n for c, n in totals.values() if n) / len(totals)
        trial.report(value, step)
        if step == 0 and trial.should_prune():
            return None
    return value


def _halves(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Two halves of whole units (GQA-ru images, MMBench-ru rotation groups)."""
    units = sorted({unit_of(ex) for ex in examples})
    first = set(units[: (len(units) + 1) // 2])
    return ([ex for ex in examples if unit_of(ex) in first],
            [ex for ex in examples if unit_of(ex) not in first])


def study_options(seed: int) -> dict:
    """The sampler and pruner every process that runs trials of the study uses."""
    import optuna

    return {"sampler": optuna.samplers.TPESampler(seed=seed),
            "pruner": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)}


def trial_record(study_name: str, t) -> dict:
    """What experiments.db keeps of one finished trial, whoever ran it."""
    attrs = t.user_attrs
    return {"study": study_name, "number": t.number, "cycle": attrs.get("cycle"),
            "state": t.state.name, "value": t.value, "params": dict(t.params),
            "worker": attrs.get("worker"), "adapter_path": attrs.get("adapter_path"),
            "train": attrs.get("train"), "data": attrs.get("data"),
            "seconds": attrs.get("seconds"), "retry_of": t.system_attrs.get("failed_trial"),
            "note": attrs.get("failed") or attrs.get("cancelled")}
