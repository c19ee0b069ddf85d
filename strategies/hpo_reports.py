"""Intermediate scores of an HPO trial and the pruning they drive.

While a trial trains, after 1/4, 1/2 and 3/4 of its planned steps the adapter as it is then
(``core.train.TrainHooks.evaluate``) is scored on the *report slice*: the first whole units of
the tune set, at most ``REPORT_PER_BENCHMARK`` questions per benchmark, the same for every trial
of a study. The mean accuracy over benchmarks is reported at step 25, 50 or 75: the percent of
its planned steps, so that trials of different lengths are compared at the same point of their
schedule (warm-up and decay included). After training, the saved adapter is scored on the same
slice first and reported at step 100, then on the rest of the tune set.

After each report the study's pruner (``PRUNER_SETTINGS``) may stop the trial: its training
stops there (status "stopped", nothing saved), the trial is told PRUNED, and the user attribute
``pruned`` says where, at what score against which median, and how many seconds it did not
spend; ``strategies.hpo_study.refund`` gives those seconds back to the cycle as another slot.
"""

from __future__ import annotations

import statistics

REPORT_AT = (0.25, 0.5, 0.75)
"""Shares of a trial's planned steps after which the adapter trained so far is scored."""
END_STEP = 100
"""The report of the finished adapter (steps are percents of the planned steps)."""
REPORT_PER_BENCHMARK = 48
"""Questions per benchmark in the report slice (whole units; at most half the tune set)."""
PRUNER_SETTINGS = {"n_startup_trials": 2, "n_warmup_steps": 50, "interval_steps": 1,
                   "n_min_trials": 2}
"""Optuna's MedianPruner over the reports. A median rule rather than successive halving or
Hyperband: a cycle runs two to four trials and a study a few dozen at most, too few for the
rungs and brackets those need (with so few trials they prune by the order trials arrive in).
The median of the completed trials at the same point needs only a couple of them
(``n_startup_trials``, ``n_min_trials``: two); it never prunes at 25%, where the learning rate is
still warming up and the score says little about where a LoRA ends (``n_warmup_steps``: the
first report that may prune is the one at 50%)."""


def report_step(step: int, total: int) -> int:
    """The report point (25, 50, 75) nearest to optimizer step ``step`` of ``total``."""
    share = min(REPORT_AT, key=lambda f: abs(f - step / total))
    return round(100 * share)


def slice_cost(ctx, sets: dict[str, list[dict]]) -> float:
    return sum(ctx.rates.eval_s_per_sample[b] * len(ex) for b, ex in sets.items())


class Reports:
    """One trial's intermediate scores: the hook ``core.train`` calls, and the end report."""

    def __init__(self, ctx, trial, sets: dict[str, list[dict]]):
        self.ctx, self.trial, self.sets = ctx, trial, sets
        self.done: list[dict] = []
        self.pruned: dict | None = None
        self.trained: tuple[int, int] = (0, 0)
        """(steps done, steps planned) of the finished adapter, for its report."""

    def hooks(self):
        from core.train import TrainHooks

        return TrainHooks(evaluate_at=REPORT_AT, evaluate=self.during_training)

    def during_training(self, step: int, total: int) -> bool:
        """Score the adapter being trained; True when the pruner stops the trial."""
        at = report_step(step, total)
        if any(r["at"] == at for r in self.done):
            return False
        value, seconds = self._score(lambda b, ex: self.ctx.evaluate_live(
            b, self.ctx.champion.eval_configs[b], ex))
        return self.report(value, at, step, total, seconds)

    def report(self, value: float, at: int, step: int, total: int, seconds: float) -> bool:
        """Report ``value`` at ``at``; True (and ``pruned`` set) when the pruner stops here."""
        self.trial.report(value, at)
        self.done.append({"at": at, "step": step, "steps": total, "value": round(value, 4),
                          "seconds": round(seconds, 2)})
        if not self.trial.should_prune():
            return False
        self.pruned = {**self.done[-1], **self._against(at)}
        return True

    def _score(self, evaluate) -> tuple[float, float]:
        t0 = self.ctx.clock()
        accuracy = [evaluate(b, ex).accuracy for b, ex in self.sets.items()]
        return sum(accuracy) / len(accuracy), self.ctx.clock() - t0

    def _against(self, at: int) -> dict:
        """The median the pruner compared with: completed trials' reports at ``at``."""
        from optuna.trial import TrialState

        study = getattr(self.trial, "study", None)
        if study is None:
            return {}
        values = [t.intermediate_values[at] for t in
                  study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if at in t.intermediate_values]
        return {"median": round(statistics.median(values), 4), "n_compared": len(values)} \
            if values else {}

    def record(self, step_seconds: float, skipped_eval_s: float) -> dict:
        """The ``pruned`` attribute: where, why, and the seconds the trial did not spend
        (training steps not run at the measured step time, and the evaluations skipped)."""
        p = dict(self.pruned)
        p["saved_train_s"] = round(max(0, p["steps"] - p["step"]) * step_seconds, 2)
        p["saved_s"] = round(p["saved_train_s"] + skipped_eval_s, 2)
        median = (f" below the median {p['median']:.3f} of {p['n_compared']} completed trials "
                  "there") if "median" in p else ""
        p["reason"] = (f"pruned at {p['at']}% of its steps (step {p['step']}/{p['steps']}): "
                       f"report-slice accuracy {p['value']:.3f}{median}; "
                       f"{p['saved_s']:.0f} s not spent")
        return p
