"""One Optuna trial of ``optuna_hpo``: sample, build the data, train, score on the tune subset.

The loop's own trials and ``loop worker``'s trials run this one function, with a ``Context``
each: the loop's comes from the controller, a worker's is rebuilt from the study's user
attributes (``loop.worker``). Either way ``ctx.train`` passes the one leakage guard and trains
under a deadline, and ``ctx.evaluate`` scores on ``ctx.tune_examples`` (dev questions outside
the decision subset). While it trains (``ctx.evaluate_live``) and once after, the trial reports
its accuracy on a fixed slice of them, and the median pruner may stop it early
(``strategies.hpo_reports``).

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
from strategies.hpo_reports import END_STEP, PRUNER_SETTINGS, REPORT_AT, Reports, slice_cost
from strategies.hpo_study import REFUND_ATTR
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


def report_sets(ctx: Context) -> dict[str, list[dict]]:
    """The report slice: the first whole units of each tune set, at most
    ``REPORT_PER_BENCHMARK`` questions and half of it (the same for every trial)."""
    from strategies.hpo_reports import REPORT_PER_BENCHMARK

    return {b: tune_slice(ex, min(REPORT_PER_BENCHMARK, len(ex) // 2))
            for b, ex in tune_sets(ctx).items()}


def final_cost(ctx: Context) -> float:
    """Seconds of scoring a trained adapter on the tune set."""
    return slice_cost(ctx, tune_sets(ctx))


def tune_cost(ctx: Context) -> float:
    """Seconds of all of a trial's scoring: its reports during training (when the context
    can score the adapter being trained) and the tune set after."""
    live = len(REPORT_AT) * slice_cost(ctx, report_sets(ctx)) if ctx.evaluate_live else 0.0
    return final_cost(ctx) + live


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
    for stale in ("adapter_path", "train", "data", "seconds", "failed", "pruned"):
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
        deadline_s = seconds - (ctx.clock() - started) - final_cost(ctx)  # reports inside
        if deadline_s <= 0:
            trial.set_user_attr("failed", "building the data used the trial's time")
            study.tell(trial, state=TrialState.FAIL)
            return trial.number
        reports = Reports(ctx, trial, report_sets(ctx))
        live = {"hooks": reports.hooks()} if ctx.evaluate_live else {}
        path, result = ctx.train(records, config, name=f"{study.study_name}-t{trial.number}",
                                 deadline_s=deadline_s, **live)
        trial.set_user_attr("train", {"config": config.to_dict(),
                                      "status": getattr(result, "status", None),
                                      "samples": getattr(result, "samples", None),
                                      "seconds": getattr(result, "seconds", None)})
        trial.set_user_attr("data", info)
        trial.set_user_attr("sizing", plan.sizing.to_dict())
        if reports.pruned is not None:  # stopped mid-training: no adapter, no tune evaluation
            left = len(REPORT_AT) - len(reports.done)
            return _pruned(ctx, study, trial, reports, started, getattr(
                result, "step_seconds", 0.0), final_cost(ctx) + left * slice_cost(
                ctx, reports.sets))
        if path is None:
            study.tell(trial, state=TrialState.FAIL)
            return trial.number
        trial.set_user_attr("adapter_path", str(path))
        reports.trained = (getattr(result, "steps", config.steps), config.steps)
        value = score_trial(ctx, trial, str(path), reports)
        if value is None:
            rest = final_cost(ctx) - slice_cost(ctx, reports.sets)
            return _pruned(ctx, study, trial, reports, started, 0.0, rest)
        trial.set_user_attr("seconds", round(ctx.clock() - started, 2))
        trial.set_user_attr("reports", reports.done)
        study.tell(trial, value)
        return trial.number
    except BaseException:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def _pruned(ctx: Context, study, trial, reports: Reports, started: float, step_seconds: float,
            skipped_eval_s: float) -> int:
    from optuna.trial import TrialState

    record = reports.record(step_seconds, skipped_eval_s)
    trial.set_user_attr("pruned", record)
    trial.set_user_attr("reports", reports.done)
    trial.set_user_attr("seconds", round(ctx.clock() - started, 2))
    log.info("trial %d: %s", trial.number, record["reason"])
    study.tell(trial, state=TrialState.PRUNED)
    return trial.number


def score_trial(ctx: Context, trial, adapter_path: str, reports: Reports | None = None
                ) -> float | None:
    """Mean tune accuracy over benchmarks. The report slice is scored first and reported at
    step 100, where the pruner may stop the trial (None); then the rest of the tune set."""
    reports = reports or Reports(ctx, trial, report_sets(ctx))
    parts = {b: _split(ex, reports.sets.get(b, [])) for b, ex in tune_sets(ctx).items()}
    totals: dict[str, list[float]] = {b: [0.0, 0.0] for b in parts}  # correct-weighted, n
    for k in (0, 1):
        t0 = ctx.clock()
        for b, two in parts.items():
            if not two[k]:
                continue
            res = ctx.evaluate(b, ctx.champion.eval_configs[b], adapter_path=adapter_path,
                               examples=two[k])
            totals[b][0] += res.accuracy * res.n
            totals[b][1] += res.n
        value = sum(c / n for c, n in totals.values() if n) / len(totals)
        if k == 0 and reports.report(value, END_STEP, *reports.trained, ctx.clock() - t0):
            return None
    return value


def _split(examples: list[dict], first: list[dict]) -> tuple[list[dict], list[dict]]:
    """The report slice and the rest of a tune set."""
    ids = {id(ex) for ex in first}
    return first, [ex for ex in examples if id(ex) not in ids]


def study_options(seed: int) -> dict:
    """The sampler and pruner every process that runs trials of the study uses."""
    import optuna

    return {"sampler": optuna.samplers.TPESampler(seed=seed),
            "pruner": optuna.pruners.MedianPruner(**PRUNER_SETTINGS)}


def trial_record(study_name: str, t) -> dict:
    """What experiments.db keeps of one finished trial, whoever ran it."""
    attrs = t.user_attrs
    return {"study": study_name, "number": t.number, "cycle": attrs.get("cycle"),
            "state": t.state.name, "value": t.value, "params": dict(t.params),
            "worker": attrs.get("worker"), "adapter_path": attrs.get("adapter_path"),
            "train": attrs.get("train"), "data": attrs.get("data"),
            "seconds": attrs.get("seconds"), "retry_of": t.system_attrs.get("failed_trial"),
            "reports": attrs.get("reports") or [
                {"at": k, "value": v} for k, v in sorted(t.intermediate_values.items())],
            "pruned": attrs.get("pruned"), "refund_s": attrs.get(REFUND_ATTR),
            "note": (attrs.get("pruned") or {}).get("reason") or attrs.get("failed")
            or attrs.get("cancelled")}
