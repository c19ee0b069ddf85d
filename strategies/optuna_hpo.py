"""Remedy ``optuna_hpo``: an Optuna search over LoRA hyper-parameters and the data mix.

One study per run, resumed across cycles and after a crash. By default it lives in
``ctx.optuna_storage``, the run's own ``experiments.db`` (Optuna owns its own tables there),
and the loop runs every trial itself; trials that a killed process left RUNNING are marked FAIL
before anything else, never left running. With ``loop run --storage URL`` the study lives in a
storage many processes share (``strategies.hpo_study``) and ``loop worker`` processes run the
trials.

Each cycle offers as many trials as fit in the time left after the candidate's dev evaluation,
each with the same time box, as slots (WAITING trials tagged with the cycle). Live workers take
them; when no worker is alive (always, without ``--storage``) the loop takes them itself, one
after the other. The loop waits until every slot is finished or the cycle's time is up, fails
the slots nobody took, and uses whatever finished: the best completed trial not yet proposed in
this run becomes the candidate. A trial still running at the deadline may finish later and be
proposed by a later cycle. Every trial (``strategies.hpo_trial.run_trial``, the same function in
the loop and in a worker) trains through ``ctx.train`` and is scored on ``ctx.tune_examples``;
while it trains it reports its score on a fixed slice of them, and the median pruner stops a
losing trial early (``strategies.hpo_reports``); the seconds it did not spend come back to the
cycle as one more slot. Every finished trial is recorded in experiments.db through
``ctx.record_trial``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from strategies import hpo_study
from strategies.base import Candidate, Context, ProposalFailed, Strategy
from strategies.common import DATA_S_PER_RECORD, Clock
from strategies.hpo_trial import (
    DEFAULT_PARAMS,
    run_trial,
    study_options,
    trial_record,
    tune_cost,
    tune_sets,
)
from strategies.sft_data import SFTDataBuilder
from strategies.sizing import TRIAL_FLOOR, Sizing, trial_sizing

log = logging.getLogger(__name__)

MAX_TRIALS_PER_CYCLE = 4
TIME_SHARE = 0.6
"""Share of the time left after the dev evaluation that one cycle's trials may use."""
POLL_S = 1.0
"""Seconds between looks at the shared study while workers run the trials."""


def study_name(ctx: Context) -> str:
    if ctx.study_name:
        return ctx.study_name
    return f"loop-hpo-run{ctx.run_id}" if ctx.run_id is not None else f"loop-hpo-{ctx.seed}"


def fail_stale_trials(study) -> list[int]:
    """Mark every RUNNING trial FAIL (only this run uses its own database's study, and it is
    starting now)."""
    from optuna.trial import TrialState

    stale = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in stale:
        study.tell(number, state=TrialState.FAIL)
    if stale:
        log.warning("optuna_hpo: trials %s were left running by a killed process; marked failed",
                    stale)
    return stale


def cycle_spec(ctx: Context, time_box_s: float, expires_at: float, n_trials: int) -> dict:
    """What a worker needs of this cycle to run its trials as the loop would."""
    keep = ("benchmark", "n", "n_errors", "counts", "shares", "per_category", "label_categories",
            "answer_styles")
    return {"cycle": ctx.cycle, "seed": ctx.seed, "train_lr": ctx.train_lr,
            "workdir": str(Path(ctx.workdir).resolve()),
            "eval_configs": {b: c.to_dict() for b, c in ctx.champion.eval_configs.items()},
            "champion_adapter": ctx.champion.adapter_path,
            "profiles": {b: {k: v for k, v in p.to_dict().items() if k in keep}
                         for b, p in ctx.profiles.items()},
            "rates": {"eval_s_per_sample": dict(ctx.rates.eval_s_per_sample),
                      "train_s_per_sample": ctx.rates.train_s_per_sample,
                      "load_s": ctx.rates.load_s},
            "time_box_s": time_box_s, "expires_at": expires_at, "n_trials": n_trials}


@dataclass(frozen=True)
class Trials:
    """How many trials a cycle offers, and each one's sizing."""

    trials: int
    sizing: Sizing


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
        return tune_sets(ctx)

    def tune_cost(self, ctx: Context) -> float:
        return tune_cost(ctx)

    def trial_floor(self, ctx: Context) -> float:
        """Seconds of the smallest trial worth running, its tune evaluation included."""
        return self.tune_cost(ctx) + TRIAL_FLOOR * (ctx.rates.train_s_per_sample
                                                    + DATA_S_PER_RECORD)

    def reserve(self, ctx: Context) -> float:
        """Seconds kept for the candidate's dev evaluation."""
        return self.eval_cost(ctx) + ctx.rates.load_s

    def search_seconds(self, ctx: Context) -> float:
        """Seconds this cycle's trials may use: a share of the time left, at most
        MAX_TRIALS_PER_CYCLE trials of the largest size ``strategies.sizing`` gives a trial."""
        largest = self.tune_cost(ctx) + trial_sizing(ctx, math.inf).seconds
        return min(TIME_SHARE * (ctx.time_left_s - self.reserve(ctx)),
                   MAX_TRIALS_PER_CYCLE * largest)

    def sizing(self, ctx: Context) -> Trials:
        """This cycle's trials and the sizing of each (from the base), as ``propose`` runs them."""
        available = self.search_seconds(ctx)
        n = min(MAX_TRIALS_PER_CYCLE, math.floor(available / self.trial_floor(ctx)))
        return Trials(n, trial_sizing(ctx, available / max(n, 1) - self.tune_cost(ctx)))

    def estimate_cost(self, ctx: Context) -> float:
        """The trials that fit and the candidate's dev evaluation; when not even the smallest
        trial fits in its share of the time left, the time left that it would need."""
        if self.search_seconds(ctx) < self.trial_floor(ctx):
            return self.reserve(ctx) + self.trial_floor(ctx) / TIME_SHARE
        return self.reserve(ctx) + self.search_seconds(ctx)

    def propose(self, ctx: Context) -> Candidate:
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
        study = self.open_study(ctx)
        if ctx.shared_storage:
            stale: list[int] = []  # dead workers' trials: failed by their heartbeat, retried
            hpo_study.fail_dead_trials(study)
        else:
            stale = fail_stale_trials(study)
        time_box = available / n_trials
        study.set_user_attr(f"loop_cycle_{ctx.cycle}", cycle_spec(
            ctx, time_box, time.time() + min(available, clock.left(reserve)), n_trials))
        self._offer(ctx, study, n_trials)
        try:
            ran = self._wait_or_run(ctx, study, clock, available, reserve, time_box)
        finally:  # no slot of a cycle that is over may be taken later
            cancelled = hpo_study.cancel_waiting(study, ctx.cycle, "nobody took it before "
                                                 "the cycle ended")
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and hpo_study.CYCLE_ATTR in t.user_attrs:
                ctx.record_trial(trial_record(study.study_name, t))
        return self._best(ctx, study, ran, stale, cancelled)

    def open_study(self, ctx: Context):
        """This run's study (created on first use); in a shared storage, checked to be ours
        and carrying what workers need (``loop_world``)."""
        import optuna

        url = ctx.optuna_storage or f"sqlite:///{Path(ctx.workdir).resolve() / 'optuna.db'}"
        heartbeat = ctx.world.get("heartbeat_s") if ctx.shared_storage else None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(storage=hpo_study.open_storage(url, heartbeat),
                                    study_name=study_name(ctx), direction="maximize",
                                    load_if_exists=True, **study_options(ctx.seed))
        study.sampler = study_options(ctx.seed + len(study.trials))["sampler"]
        if ctx.shared_storage:
            hpo_study.check_owner(study, ctx.world["owner"], url)
            if "loop_world" not in study.user_attrs:  # the controller writes it at the start
                study.set_user_attr("loop_world", {
                    "tune_ids": {b: [str(e["id"]) for e in ex]
                                 for b, ex in self.tune_sets(ctx).items()},
                    **{k: v for k, v in ctx.world.items() if k != "owner"}})
        return study

    def _offer(self, ctx: Context, study, n_trials: int) -> None:
        """Queue this cycle's slots: ``n_trials`` less those already there (a resumed cycle).
        The study's first slot tries the usual LoRA settings; once the champion has an
        adapter, a cycle's first slot continues it with the usual settings."""
        from optuna.trial import TrialState

        have = [t for t in hpo_study.cycle_trials(study, ctx.cycle) if t.state != TrialState.FAIL]
        usual = {**DEFAULT_PARAMS, "lr": ctx.train_lr}
        if ctx.champion.adapter_path:
            usual = {"init": "champion", **{k: v for k, v in usual.items()
                                            if k not in ("rank", "alpha_mult")}}
        elif study.trials:
            usual = {}
        for i in range(n_trials - len(have)):
            params = usual if i == 0 and not have else {}
            study.enqueue_trial(params, user_attrs={hpo_study.CYCLE_ATTR: ctx.cycle})

    def _wait_or_run(self, ctx: Context, study, clock: Clock, available: float,
                     reserve: float, time_box: float) -> list[int]:
        """Until every slot of this cycle is finished or the time is up: while a worker is
        alive, wait for the workers; otherwise (or always with ``loop run --hpo-here``) run
        the next slot here. Returns the numbers of the trials this process ran."""
        from optuna.trial import TrialState

        beat = float(ctx.world.get("heartbeat_s") or hpo_study.HEARTBEAT_S)
        builder, ran = None, []
        while True:
            left = min(available - clock.elapsed(), clock.left(reserve))
            if ctx.shared_storage:
                hpo_study.fail_dead_trials(study)
            hpo_study.refund(study, ctx.cycle, time_box, left, self.trial_floor(ctx))
            mine = hpo_study.cycle_trials(study, ctx.cycle, (TrialState.WAITING,
                                                             TrialState.RUNNING))
            if not mine or left <= 0:
                return ran
            waiting = any(t.state == TrialState.WAITING for t in mine)
            alone = ctx.world.get("hpo_here") or not (
                ctx.shared_storage and hpo_study.live_workers(study, 3 * beat))
            if waiting and alone and min(time_box, left) >= self.trial_floor(ctx):
                trial = hpo_study.claim(study, ctx.cycle)
                if trial is not None:
                    builder = builder or SFTDataBuilder(ctx)
                    keep = (hpo_study.beating(study, trial._trial_id, beat) if ctx.shared_storage
                            else contextlib.nullcontext())
                    box = trial.user_attrs.get(hpo_study.REFUND_ATTR) or time_box
                    with keep:
                        ran.append(run_trial(ctx, study, trial, builder, min(box, left)))
                continue
            if not ctx.shared_storage or (alone and not any(
                    t.state == TrialState.RUNNING for t in mine)):
                return ran  # nobody else will run what is left
            time.sleep(min(POLL_S, max(0.05, left)))

    def _best(self, ctx: Context, study, ran: list[int], stale: list[int],
              cancelled: list[int]) -> Candidate:
        from optuna.trial import TrialState

        proposed = {(e.get("candidate") or {}).get("details", {}).get("trial_number")
                    for e in ctx.history if e.get("strategy") == self.name}
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number not in proposed and t.user_attrs.get("adapter_path")
                and Path(t.user_attrs["adapter_path"]).exists()]
        this_cycle = hpo_study.cycle_trials(study, ctx.cycle)
        states = {t.number: t.state.name for t in this_cycle}
        pruned = {t.number: t.user_attrs["pruned"] for t in this_cycle
                  if t.state == TrialState.PRUNED and t.user_attrs.get("pruned")}
        if not done:
            raise ProposalFailed(f"optuna_hpo: no completed trial with an adapter to propose "
                                 f"(this cycle's trials: {states})")
        best = max(done, key=lambda t: (t.value, -t.number))
        return ctx.champion.derive(
            self.name, f"Optuna trial {best.number} of study {study.study_name} "
            f"(tune accuracy {best.value:.3f})",
            adapter_path=best.user_attrs["adapter_path"], adapter_id=None,
            train=best.user_attrs.get("train"),
            details={"study": study.study_name, "trial_number": best.number,
                     "tune_value": best.value, "params": best.params,
                     "data": best.user_attrs.get("data"), "trials_this_cycle": states,
                     "sizing": best.user_attrs.get("sizing"),
                     "reports": best.user_attrs.get("reports"), "pruned": pruned,
                     "refunded_s": round(sum(t.user_attrs.get(hpo_study.REFUND_ATTR) or 0.0
                                             for t in this_cycle), 2),
                     "run_here": ran, "cancelled": cancelled,
                     "workers": {t.number: (t.user_attrs.get("worker") or {}).get("name")
                                 for t in this_cycle if t.user_attrs.get("worker")},
                     "storage": hpo_study.masked(ctx.optuna_storage or "") if
                     ctx.shared_storage else "experiments.db",
                     "stale_trials_failed": stale, "n_trials_total": len(study.trials),
                     "tune_n": {b: len(ex) for b, ex in self.tune_sets(ctx).items()}})


def worker_seed(seed: int, name: str, n_trials: int) -> int:
    """A sampler seed of its own for each process: two workers seeded alike would sample the
    same parameters from the same history."""
    return seed + n_trials + zlib.crc32(name.encode()) % 100_000
