"""Remedy ``optuna_hpo``: an Optuna search over LoRA hyper-parameters and the data mix.

The study lives in ``ctx.optuna_storage`` (the same ``experiments.db``; Optuna owns its own
tables there), one study per run, resumed across cycles and after a crash. Trials that a killed
process left RUNNING are marked FAIL before anything else, never left running. Each cycle runs
as many trials as fit in the time left after the candidate's dev evaluation; every trial trains
through ``ctx.train`` with its own deadline and is scored on ``ctx.tune_examples`` (dev
questions outside the decision subset, so the paired test never judges data it was selected
on), in two halves: the first half's accuracy is reported as an intermediate value, and the
median pruner may stop the trial there. The best completed trial not yet proposed in this run
becomes the candidate.

Search space: ``lr`` (log), ``rank``, ``alpha_mult`` (alpha = rank x mult), ``dropout``,
``steps_frac`` (share of the steps that fit the trial's time) and the mix shares
``choice_share`` and ``instruct_share`` (the rest is short answers).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from core.train import TrainConfig
from strategies.base import Candidate, Context, ProposalFailed, Strategy
from strategies.common import Clock, plan_training
from strategies.sft_data import Mix, SFTDataBuilder

log = logging.getLogger(__name__)

MAX_TRIALS_PER_CYCLE = 4
MIN_TRIAL_SAMPLES = 10 * 16
"""Training samples of the smallest trial worth running (ten steps of 16)."""
MAX_TRIAL_SAMPLES = 100 * 16
"""Training samples of the largest trial (a hundred steps of 16)."""
TIME_SHARE = 0.6
"""Share of the time left after the dev evaluation that one cycle's trials may use."""
MAX_TUNE_PER_BENCHMARK = 200
DEFAULT_PARAMS = {"rank": 16, "alpha_mult": 2, "dropout": 0.05, "steps_frac": 1.0,
                  "choice_share": 0.3, "instruct_share": 0.15}


def study_name(ctx: Context) -> str:
    return f"loop-hpo-run{ctx.run_id}" if ctx.run_id is not None else f"loop-hpo-{ctx.seed}"


def fail_stale_trials(study) -> list[int]:
    """Mark every RUNNING trial FAIL (only one run uses a study, and it is starting now)."""
    from optuna.trial import TrialState

    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=TrialState.FAIL)
    if stale:
        log.warning("optuna_hpo: trials %s were left running by a killed process; marked failed",
                    stale)
    return stale


def suggest(trial, base_lr: float) -> tuple[dict, Mix]:
    """The trial's hyper-parameters (TrainConfig fields) and data mix; the learning rate is
    searched from a quarter to five times the model's usual LoRA rate."""
    rank = trial.suggest_categorical("rank", [4, 8, 16, 32])
    params = {"lr": trial.suggest_float("lr", base_lr / 4, base_lr * 5, log=True), "rank": rank,
              "alpha": rank * trial.suggest_categorical("alpha_mult", [1, 2, 4]),
              "dropout": trial.suggest_float("dropout", 0.0, 0.2),
              "steps_frac": trial.suggest_float("steps_frac", 0.3, 1.0)}
    choice = trial.suggest_float("choice_share", 0.0, 0.6)
    instruct = trial.suggest_float("instruct_share", 0.0, 0.3)
    return params, Mix(short=max(0.1, 1.0 - choice - instruct), choice=choice, instruct=instruct)


class OptunaHPO(Strategy):
    """Time-boxed Optuna trials; proposes the best trial's adapter."""

    name = "optuna_hpo"
    addresses = {"format_mismatch": 0.3, "color": 0.4, "location": 0.4, "counting": 0.4,
                 "other": 0.3}
    requires = "answer_format_sft"
    family = "hpo"
    trains = True
    summary = "Optuna search over lr, rank, alpha, dropout, steps and the data mix"

    def tune_sets(self, ctx: Context) -> dict[str, list[dict]]:
        return {b: list(ex)[:MAX_TUNE_PER_BENCHMARK] for b, ex in ctx.tune_examples.items() if ex}

    def tune_cost(self, ctx: Context) -> float:
        return sum(ctx.rates.eval_s_per_sample[b] * len(ex) for b, ex in self.tune_sets(ctx).items())

    def trial_floor(self, ctx: Context) -> float:
        """Seconds of the smallest trial worth running, its tune evaluation included."""
        return self.tune_cost(ctx) + MIN_TRIAL_SAMPLES * ctx.rates.train_s_per_sample

    def reserve(self, ctx: Context) -> float:
        """Seconds kept for the candidate's dev evaluation."""
        return self.eval_cost(ctx) + ctx.rates.load_s

    def search_seconds(self, ctx: Context) -> float:
        """Seconds this cycle's trials may use: a share of the time left, at most
        MAX_TRIALS_PER_CYCLE trials of MAX_TRIAL_SAMPLES."""
        largest = self.tune_cost(ctx) + MAX_TRIAL_SAMPLES * ctx.rates.train_s_per_sample
        return min(TIME_SHARE * (ctx.time_left_s - self.reserve(ctx)),
                   MAX_TRIALS_PER_CYCLE * largest)

    def estimate_cost(self, ctx: Context) -> float:
        """The trials that fit (at least the smallest) and the candidate's dev evaluation."""
        return self.reserve(ctx) + max(self.trial_floor(ctx), self.search_seconds(ctx))

    def propose(self, ctx: Context) -> Candidate:
        import optuna

        clock = Clock(ctx)
        if not self.tune_sets(ctx):
            raise ProposalFailed("optuna_hpo needs ctx.tune_examples (dev questions outside "
                                 "the decision subset) to score trials on; none were given")
        reserve = self.reserve(ctx)
        available = self.search_seconds(ctx)
        n_trials = min(MAX_TRIALS_PER_CYCLE, math.floor(available / self.trial_floor(ctx)))
        if n_trials < 1:
            need = self.trial_floor(ctx) / TIME_SHARE + reserve
            raise ProposalFailed(f"optuna_hpo needs about {need:.0f} s for one trial and the "
                                 f"dev evaluation; {ctx.time_left_s:.0f} s are left")
        storage = ctx.optuna_storage or f"sqlite:///{Path(ctx.workdir).resolve() / 'optuna.db'}"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            storage=storage, study_name=study_name(ctx), direction="maximize",
            load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=ctx.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
        stale = fail_stale_trials(study)
        study.sampler = optuna.samplers.TPESampler(seed=ctx.seed + len(study.trials))
        if not study.trials:
            study.enqueue_trial({**DEFAULT_PARAMS, "lr": ctx.train_lr})
        builder = SFTDataBuilder(ctx)
        ran = []
        for i in range(n_trials):
            per_trial = min(available - clock.elapsed(), clock.left(reserve)) / (n_trials - i)
            if per_trial < self.trial_floor(ctx):
                break
            ran.append(self._trial(ctx, study, builder, per_trial, clock, reserve))
        return self._best(ctx, study, ran, stale)

    def _trial(self, ctx: Context, study, builder: SFTDataBuilder, seconds: float,
               clock: Clock, reserve: float) -> int:
        """Run one trial within ``seconds``; returns its number. Never leaves it RUNNING."""
        from optuna.trial import TrialState

        trial = study.ask()
        started = clock.elapsed()
        try:
            params, mix = suggest(trial, ctx.train_lr)
            plan = plan_training(ctx, seconds - self.tune_cost(ctx), params.pop("steps_frac"))
            if plan is None:
                study.tell(trial, state=TrialState.FAIL)
                return trial.number
            seed = ctx.seed * 1000 + trial.number
            records, info = builder.build(plan.n_records, mix, seed)
            config = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, seed=seed, **params)
            trial_left = seconds - (clock.elapsed() - started)
            deadline_s = min(trial_left, clock.left(reserve)) - self.tune_cost(ctx)
            if deadline_s <= 0:
                study.tell(trial, state=TrialState.FAIL)
                return trial.number
            path, result = ctx.train(records, config, name=f"{study.study_name}-t{trial.number}",
                                     deadline_s=deadline_s)
            trial.set_user_attr("train", {"config": config.to_dict(),
                                          "status": getattr(result, "status", None)})
            trial.set_user_attr("data", info)
            if path is None:
                study.tell(trial, state=TrialState.FAIL)
                return trial.number
            trial.set_user_attr("adapter_path", str(path))
            trial.set_user_attr("cycle", ctx.cycle)
            value = self._score(ctx, trial, str(path))
            if value is None:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, value)
            return trial.number
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise

    def _score(self, ctx: Context, trial, adapter_path: str) -> float | None:
        """Mean tune accuracy over benchmarks, reported after each half; None when pruned."""
        halves = {b: _halves(ex) for b, ex in self.tune_sets(ctx).items()}
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

    def _best(self, ctx: Context, study, ran: list[int], stale: list[int]) -> Candidate:
        from optuna.trial import TrialState

        proposed = {(e.get("candidate") or {}).get("details", {}).get("trial_number")
                    for e in ctx.history if e.get("strategy") == self.name}
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number not in proposed and t.user_attrs.get("adapter_path")
                and Path(t.user_attrs["adapter_path"]).exists()]
        if not done:
            raise ProposalFailed(f"optuna_hpo: no completed trial with an adapter to propose "
                                 f"(this cycle ran trials {ran})")
        best = max(done, key=lambda t: (t.value, -t.number))
        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)
                  if t.number in ran}
        return ctx.champion.derive(
            self.name, f"Optuna trial {best.number} of study {study.study_name} "
            f"(tune accuracy {best.value:.3f})",
            adapter_path=best.user_attrs["adapter_path"], adapter_id=None,
            train=best.user_attrs.get("train"),
            details={"study": study.study_name, "trial_number": best.number,
                     "tune_value": best.value, "params": best.params,
                     "data": best.user_attrs.get("data"), "trials_this_cycle": states,
                     "stale_trials_failed": stale, "n_trials_total": len(study.trials),
                     "tune_n": {b: len(ex) for b, ex in self.tune_sets(ctx).items()}})


def _halves(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Two halves that keep MMBench-ru rotation groups together."""
    units = sorted({_unit(ex) for ex in examples})
    first = set(units[: (len(units) + 1) // 2])
    return ([ex for ex in examples if _unit(ex) in first],
            [ex for ex in examples if _unit(ex) not in first])


def _unit(ex: dict) -> str:
    if ex.get("benchmark") == "mmbench_ru":
        return f"grp:{int(ex['index']) % 1_000_000:09d}"
    return str(ex.get("id"))
