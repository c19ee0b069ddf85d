"""The loop, as a recipe: baseline → (diagnose → choose → propose → evaluate → judge → record)*
→ final evaluation on the held-out split → report.

Every step is recorded in ``experiments.db`` inside one transaction with the step's marker, so
a run killed at any moment resumes with ``--resume``: finished steps are read back, a half-done
step is marked failed and redone, nothing is counted twice.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import strategies
from core.evaluate import EvalConfig
from core.exceptions import UserError
from loop import hpo_share, judging
from loop.budget import DEFAULT_RESERVE, Budget, CostModel, fmt_s, priors
from loop.decision import OBJECTIVES, comparisons_made, judge, paired_scores
from loop.policy import Choice, next_choice, stop_reason
from loop.presets import train_lr
from loop.trackers import TRACKERS, RunReporter, Tracker, check, open_tracker
from loop.workbench import Scored, Workbench
from strategies.base import (
    BENCHMARKS,
    Candidate,
    Context,
    Exhausted,
    ProposalFailed,
    base_candidate,
)

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Everything ``loop run`` was asked to do; stored as JSON on the run."""

    budget_s: float
    """Wall-clock budget in seconds, everything included."""
    gpu: str = "auto"
    """GPU profile: auto | t4 | a100 | h100 | cpu."""
    preset: str = "saiga"
    """saiga (the real model and data) | demo (the embedded tiny world)."""
    model: str | None = None
    data_dir: str | None = None
    coco_dir: str | None = None
    seed: int = 0
    """Seed of the splits, the subsets, the SFT data and training."""
    reserve_fraction: float = DEFAULT_RESERVE
    """Share of the budget kept from the start for the final evaluation and the report."""
    alpha: float = 0.05
    """Family-wise significance level of the run: the k-th paired test on dev is run at
    alpha·6/(π²k²) (``loop.decision``)."""
    objective: str = "benchmark"
    """benchmark: judge candidates by the exact lmms-eval protocol, so only adapters can win;
    deployment: prompt and decoding settings are part of the candidate."""
    max_cycles: int | None = None
    dev_size: int | None = None
    """Dev questions per benchmark per evaluation; None lets the cost model pick."""
    final_size: int | None = None
    """Final questions per benchmark; None fits them into the reserve."""
    batch_size: int | None = None
    """Evaluation batch size; None takes the GPU profile's."""
    prefix_cache: bool = True
    """Compute each image's prompt prefix once per evaluation batch (same answers, less work)."""
    packing: bool = True
    """Pack every training's records by image (``TrainConfig.pack_by_image``): strategies, HPO
    trials, here or on a ``loop worker``."""
    workdir: str | None = None
    """Where adapters, SFT data and the report of each run go (<workdir>/run-<id>/...); None:
    beside the database, <db stem>.runs/run-<id>/."""
    strategies: list[str] = field(default_factory=lambda: strategies.names())
    progress: bool = True
    report_to: str = "none"
    """Experiment tracker that also receives the run's numbers: none | tensorboard | mlflow |
    wandb (``loop.trackers``); the database stays the record."""
    options: dict | None = None
    """The command's resolved options (flags over ``--config`` file over defaults), by argparse
    destination; ``loop show --config`` prints them as a file that reproduces the run."""
    storage: str | None = None
    """Optuna storage shared with ``loop worker`` processes, its password masked (the URL
    itself is given to ``Loop``); None: the study lives in experiments.db."""
    study: str | None = None
    """The HPO study's name in that storage; None: loop-hpo-run<id>."""
    hpo_here: bool = False
    """With a shared storage, the loop also runs HPO trials on its own GPU while workers run
    theirs; by default it runs them only when no worker is alive."""
    heartbeat_s: int = 20
    """Seconds between the heartbeats of a trial in a shared storage; a trial whose process
    is silent for three of them is failed and queued again."""

    def __post_init__(self) -> None:
        problems = []
        if self.budget_s <= 0:
            problems.append(f"budget_s must be positive, got {self.budget_s}")
        if not 0 <= self.reserve_fraction < 0.9:
            problems.append(f"reserve_fraction must be in [0, 0.9), got {self.reserve_fraction}")
        if not 0 < self.alpha < 0.5:
            problems.append(f"alpha must be in (0, 0.5), got {self.alpha}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, "
                            f"got '{self.objective}'")
        unknown = [s for s in self.strategies if s not in strategies.REGISTRY]
        if unknown:
            problems.append(f"unknown strategies {unknown}; valid: {strategies.names()}")
        if self.report_to not in TRACKERS:
            problems.append(f"report_to must be one of {', '.join(TRACKERS)}, "
                            f"got '{self.report_to}'")
        if self.heartbeat_s < 1:
            problems.append(f"heartbeat_s must be at least 1, got {self.heartbeat_s}")
        if problems:
            raise UserError("invalid run configuration: " + "; ".join(problems))




class Loop:
    """One run of the loop. ``Loop(config, store).run()`` returns the run id."""

    def __init__(self, config: RunConfig, store, *, resume: bool = False, echo=None,
                 storage_url: str | None = None):
        self.config, self.store, self.resume = config, store, resume
        self.storage_url = storage_url  # the shared Optuna storage, password included
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.history: list[dict] = []
        self.exhausted: set[str] = set()  # nothing left to try in this run
        self.blocked: set[str] = set()  # could not propose; not again before a new champion
        self.since = 0  # the cycle whose candidate is the champion (0: the base model)
        self.analysis: dict[str, Scored] | None = None  # the champion on the analysis subsets
        self.report = RunReporter(Tracker())  # --report-to: a copy of the numbers, off by default

    # ------------------------------------------------------------ the recipe

    def run(self) -> int:
        try:
            self.start()
            self.set_up()
            champion, scores = self.baseline()
            while (choice := self.choose_next(champion, scores)) is not None:
                champion, scores = self.cycle(choice, champion, scores)
            self.final(champion)
            self.finish("finished")
        except KeyboardInterrupt:
            self.finish("interrupted")
            raise
        except BaseException as exc:
            try:
                self.finish("failed", error=f"{type(exc).__name__}: {exc}")
            except sqlite3.Error:  # a broken database cannot record its own failure
                log.error("could not record the failure of run %s", self.run_id)
            raise
        finally:
            self.store.release_run_lock()
            self.report.close()
        return self.run_id

    # ------------------------------------------------------------ steps

    def start(self) -> None:
        """Create the run (or pick up the one to resume) and take the database's run lock."""
        from loop.environment import environment

        cfg = self.config
        if self.resume:
            run = self.store.latest_run()
            if run is None or run["status"] == "finished":
                raise UserError("nothing to resume: the latest run in this database is "
                                f"{'finished' if run else 'absent'}; start one with `loop run`")
            # The run keeps its own configuration; only the progress display is the caller's.
            stored = {k: v for k, v in (run.get("config") or {}).items()
                      if k in RunConfig.__dataclass_fields__}
            self.config = cfg = RunConfig(**{**stored, "progress": cfg.progress})
            check(cfg.report_to)  # the run's own tracker, before the run is taken up again
            self.storage_url = hpo_share.resumed_storage(cfg, self.storage_url)
            self.store.acquire_run_lock(run["id"])
            self.run_id = run["id"]
            if self.storage_url:
                hpo_share.check(self.storage_url, hpo_share.study_of(cfg, self.run_id),
                                hpo_share.run_owner(self.store, self.run_id))
            _ensure_writable(self.store.run_dir(self.run_id))
            failed = self.store.mark_unfinished_failed(self.run_id)
            self.store.update_run(self.run_id, status="running")
            spent = float(run.get("spent_s") or 0.0)
            self.store.add_resume(self.run_id, spent, failed)
            self.echo(f"resuming run {self.run_id}: {fmt_s(spent)} of {fmt_s(cfg.budget_s)} spent"
                      f"{f', {failed} half-done step redone' if failed else ''}")
        else:
            self.store.acquire_run_lock(None)  # refuse before recording anything
            if self.storage_url:
                hpo_share.check(self.storage_url, cfg.study, owner=None)
            _ensure_writable(Path(cfg.workdir) if cfg.workdir else self.store.files_dir())
            self.run_id = self.store.create_run(config=asdict(cfg), environment=environment(cfg),
                                                budget_s=cfg.budget_s, preset=cfg.preset,
                                                gpu=cfg.gpu)
            self.store.acquire_run_lock(self.run_id)
            spent = 0.0
        # One-time set-up outside the budget, like downloading the weights: the demo preset
        # builds its world on first use (about 2.5 min on 2 cores) and caches it.
        from loop.sources import resolve_sources

        self.sources = resolve_sources(cfg.preset, cfg.model, cfg.data_dir, cfg.coco_dir, cfg.seed)
        self.budget = Budget(cfg.budget_s, cfg.reserve_fraction, spent_before=spent)
        self.store.track_spent(self.run_id, self.budget.spent)
        self.report = RunReporter(open_tracker(cfg.report_to, folder=self.store.run_dir(self.run_id),
                                               run_name=f"run-{self.run_id}",
                                               config=cfg.options or asdict(cfg)))

    def set_up(self) -> None:
        """Load the base model once, load the data, build the fixed splits and subsets."""
        from core.device import resolve_profile
        from core.model import load_vlm
        from loop.environment import model_fingerprint

        cfg, sources = self.config, self.sources
        profile = resolve_profile(cfg.gpu)
        profile.log_reasons()
        costs = CostModel(priors(cfg.preset, profile.name, cfg.prefix_cache, cfg.packing))
        t0 = time.time()
        vlm = load_vlm(sources.model, options=profile.load_options())
        workdir = self.store.run_dir(self.run_id)
        self.bench = Workbench(store=self.store, run_id=self.run_id, vlm=vlm, profile=profile,
                               sources=sources, budget=self.budget, costs=costs, seed=cfg.seed,
                               workdir=workdir, batch_size=cfg.batch_size or profile.eval_batch_size,
                               progress=cfg.progress, prefix_cache=cfg.prefix_cache,
                               packing=cfg.packing,
                               on_train_step=self.report.train_step)
        sizes = self.bench.load_data(cfg.dev_size, cfg.final_size)
        if self.storage_url and "optuna_hpo" in cfg.strategies:
            hpo_share.open_for_workers(self)
        self.echo(f"run {self.run_id}: {sources.model} on {profile.name}, loaded in "
                  f"{time.time() - t0:.0f} s; dev subsets "
                  + ", ".join(f"{b} {s['dev_subset']}/{s['dev']}" for b, s in sizes.items())
                  + "; final " + ", ".join(f"{b} {s['final_subset']}/{s['final']}"
                                           for b, s in sizes.items()))
        self.store.update_run(self.run_id, environment={
            **(self.store.get_run(self.run_id).get("environment") or {}),
            "data_fingerprint": self.bench.data_fingerprint(), "sizes": sizes,
            "model_source": sources.model, "model_fingerprint": model_fingerprint(sources.model),
            "profile": profile.to_dict()})

    def baseline(self) -> tuple[Candidate, dict[str, Scored]]:
        """The base model on the dev subsets; then the champion as left by finished cycles."""
        champion = base_candidate()
        done = self.store.step(self.run_id, "baseline")
        if done is None:
            self.store.begin_step(self.run_id, "baseline", "baseline")
            scores = {b: self.bench.run_eval(b, champion.eval_configs[b], None, self.bench.dev[b])
                      for b in BENCHMARKS}
            with self.store.transaction():
                ids = {b: self.bench.record(champion, b, r, role="baseline", cycle_index=None,
                                            split="dev") for b, r in scores.items()}
                self.store.finish_step(self.run_id, "baseline", {"eval_ids": ids})
                self.store.update_run(self.run_id, spent_s=self.budget.spent())
            done = {"eval_ids": ids}
        scores = {b: self.bench.load_scored(i) for b, i in done["eval_ids"].items()}
        self.echo("baseline (dev): " + _fmt_scores(scores))
        self.report.baseline(scores)
        champion, scores = self.replay(champion, scores)
        self.report.set_champion(scores)  # a resumed run's, for the next cycles' curve
        return champion, scores

    def replay(self, champion: Candidate, scores: dict[str, Scored]):
        """Rebuild the champion and the history from the cycles already recorded (resume)."""
        for c in self.store.cycles(self.run_id):
            self.history.append(_history_entry(c["index"], c["strategy"], c["status"],
                                               c.get("candidate"), c.get("paired") or {}))
            if c["status"] == "accepted":
                champion, self.since = Candidate.from_dict(c["candidate"]), c["index"]
                scores = {b: self.bench.load_scored(i) for b, i in c["eval_ids"].items()}
        sets = self.store.proposal(self.run_id, 0, "strategy-sets")
        if sets is not None:  # what a resumed run had ruled out stays ruled out
            self.exhausted = set(sets["payload"]["exhausted"])
            self.blocked = set(sets["payload"]["blocked"])
        return champion, scores

    def save_strategy_sets(self) -> None:
        """Store the exhausted and blocked strategies, so that a resumed run keeps them."""
        self.store.save_proposal(self.run_id, 0, "strategy-sets",
                                 {"exhausted": sorted(self.exhausted),
                                  "blocked": sorted(self.blocked)})

    def choose_next(self, champion: Candidate, scores: dict[str, Scored]):
        """Diagnose the champion's errors on the analysis subsets (never on dev, which judges)
        and let the policy pick a strategy that fits."""
        cfg = self.config
        if cfg.max_cycles is not None and len(self.history) >= cfg.max_cycles:
            return None
        index = len(self.history) + 1
        self.analysis = judging.champion_analysis(self.bench, champion, self.since,
                                                  self.analysis)
        profiles = {b: self.bench.error_profile(s) for b, s in self.analysis.items()}
        stored = self.store.proposal(self.run_id, index, "choice")
        if stored is not None and self.budget.left_for_cycles() > 0:
            # A cycle cut short by a crash is done again as it was decided, with the time it had.
            data = stored["payload"]
            choice = Choice(data["strategy"], data["est_cost_s"], data["score"],
                            data["rationale"], data.get("ranking") or [])
            choice.profiles, choice.time_left_s = profiles, data["time_left_s"]
            return choice
        time_left = self.budget.left_for_cycles()
        ctx = self.context(champion, profiles, time_left)

        def left_out(name: str, exc: Exception) -> None:
            log.warning("%s cannot estimate its cost, leaving it out: %s", name, exc)
            self.blocked.add(name)
            self.save_strategy_sets()

        ranking: list[dict] = []
        choice, _ = next_choice(ctx, cfg.strategies, self.exhausted | self.blocked,
                                objective=cfg.objective, ranking_out=ranking, on_error=left_out)
        if choice is None:
            self.end_cycles(index, stop_reason(ranking, time_left), time_left, ranking)
            return None
        choice.profiles, choice.time_left_s = profiles, time_left
        self.store.save_proposal(self.run_id, index, "choice",
                                 {**choice.to_dict(), "time_left_s": time_left})
        return choice

    def end_cycles(self, index: int, reason: str, time_left: float, ranking: list[dict]) -> None:
        """Nothing fits: the cycles end here, and the record says why."""
        if self.store.proposal(self.run_id, index, "cycles-end") is None:
            self.store.save_proposal(self.run_id, index, "cycles-end",
                                     {"reason": reason, "time_left_s": round(time_left, 1),
                                      "ranking": ranking})
        self.echo(f"{reason}; going to the final evaluation")

    def cycle(self, choice, champion: Candidate, scores: dict[str, Scored]):
        """Propose, evaluate on dev, judge with paired tests, record; returns the champion."""
        index = len(self.history) + 1
        key = f"cycle-{index}"
        self.echo(f"cycle {index}: {choice.strategy} (est. {fmt_s(choice.est_cost_s)}; "
                  f"champion {_fmt_scores(scores)}; {fmt_s(self.budget.left())} left)")
        log.info("why: %s", choice.rationale)
        t0 = time.time()
        self.store.begin_step(self.run_id, key, "cycle")
        ctx = self.context(champion, choice.profiles, choice.time_left_s, index, choice.strategy)
        try:
            candidate = strategies.get(choice.strategy).propose(ctx)
            candidate.adapter_id = self._adapter_id(candidate.adapter_path, champion)
            setting_only = candidate.adapter_path == champion.adapter_path
            k_done, stopped = comparisons_made(self.history), None
            if self.config.objective == "benchmark" and setting_only:
                # It cannot win, only feed context distillation: measured on the analysis
                # subsets, it looks at no question that judges.
                subset, reference = "analysis", self.analysis
                results = judging.on_analysis(self.bench, candidate, reference)
            else:
                if self.config.objective == "benchmark":
                    # An adapter is judged by the exact lmms-eval protocol, whatever settings
                    # it came with.
                    candidate.eval_configs = {b: EvalConfig() for b in BENCHMARKS}
                subset, reference = "dev", scores
                results, stopped = judging.on_dev(self.bench, candidate, scores,
                                                  alpha=self.config.alpha, k_done=k_done)
            status, paired = judge(reference, results, alpha=self.config.alpha, k_done=k_done,
                                   setting_only=setting_only, objective=self.config.objective,
                                   subset=subset, stopped=stopped)
        except Exhausted as exc:
            self.exhausted.add(choice.strategy)
            self.save_strategy_sets()
            self.store.fail_step(self.run_id, key, f"exhausted: {exc}")
            self.store.drop_proposal(self.run_id, index, "choice")
            return champion, scores
        except ProposalFailed as exc:
            # Not again until the champion changes: time only shrinks, the data stays the same.
            self.blocked.add(choice.strategy)
            self.save_strategy_sets()
            log.warning("%s could not propose: %s", choice.strategy, exc)
            self.record_cycle(index, choice, champion, None, {}, "failed", t0,
                              error=f"ProposalFailed: {exc}")
            return champion, scores
        except (KeyboardInterrupt, sqlite3.DatabaseError):
            raise  # Ctrl-C and a broken database end the run
        except Exception as exc:  # anything else is this cycle's failure; the run goes on
            log.warning("cycle %d (%s) failed: %s: %s", index, choice.strategy,
                        type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.record_cycle(index, choice, champion, None, {}, "failed", t0,
                              error=f"{type(exc).__name__}: {exc}")
            return champion, scores
        self.record_cycle(index, choice, champion, candidate, results, status, t0, paired=paired,
                          subset=subset, reference=reference)
        if status == "accepted":
            self.blocked.clear()
            self.save_strategy_sets()
            self.since = index
            return candidate, results
        if candidate.adapter_path != champion.adapter_path:
            self.bench.drop(candidate.adapter_path)
        return champion, scores

    def final(self, champion: Candidate) -> None:
        """Base and champion on the held-out final split, once; nothing here feeds a decision.

        ``final`` is always the champion's adapter under the exact lmms-eval protocol, beside
        the base model under the same; settings the champion carries are measured as well,
        as ``final_deployed``, and never compared with the baseline. The final subsets are
        sized to the time left (nested subsets, so a smaller n is part of a larger one),
        decided once and stored with the first step.
        """
        base = base_candidate()
        adapter = Candidate(strategy=champion.strategy, description=champion.description,
                            eval_configs=base.eval_configs, adapter_path=champion.adapter_path,
                            adapter_id=champion.adapter_id, train=champion.train)
        roles = {"final_baseline": base, "final_champion": adapter}
        if not _same_setting(adapter, champion):
            roles["final_deployed"] = champion
        same = _same_setting(base, adapter)
        sizes = self.final_sizes(runs=len(roles) - int(same))
        results: dict[str, dict[str, Scored]] = {}
        for role, cand in roles.items():
            key = role.replace("_", "-")
            done = self.store.step(self.run_id, key)
            if done is None:
                self.store.begin_step(self.run_id, key, "final")
                if same and role == "final_champion":
                    evals = {b: s.result for b, s in results["final_baseline"].items()}
                else:
                    evals = {b: self.bench.run_eval(b, cand.eval_configs[b], cand.adapter_path,
                                                    self.bench.final_subset(b, sizes[b]))
                             for b in BENCHMARKS}
                with self.store.transaction():
                    ids = {b: self.bench.record(cand, b, r, role=role, cycle_index=None,
                                                split="final") for b, r in evals.items()}
                    self.store.finish_step(self.run_id, key, {"eval_ids": ids, "sizes": sizes})
                    self.store.update_run(self.run_id, spent_s=self.budget.spent())
                done = {"eval_ids": ids}
            results[role] = {b: self.bench.load_scored(i) for b, i in done["eval_ids"].items()}
            if role == "final_baseline" and same:
                for s in results[role].values():
                    s.result = _as_result(self.bench, s)
        base_s, champ_s = results["final_baseline"], results["final_champion"]
        deployed = results.get("final_deployed")
        final_p = {b: paired_scores(base_s[b], champ_s[b]).p_value for b in BENCHMARKS}
        self.store.update_run(
            self.run_id, baseline={b: s.metrics["accuracy"] for b, s in base_s.items()},
            final={b: s.metrics["accuracy"] for b, s in champ_s.items()},
            final_n={b: s.metrics["n"] for b, s in champ_s.items()},
            final_deployed={b: s.metrics["accuracy"] for b, s in deployed.items()}
            if deployed else None,
            final_p=final_p)
        self.report.final(base_s, champ_s, deployed, final_p, step=len(self.history) + 1)
        self.echo("final split (lmms-eval protocol): " + "; ".join(
            f"{b} baseline {_pct_ci(base_s[b].metrics)} -> champion {_pct_ci(champ_s[b].metrics)}"
            for b in BENCHMARKS))
        if deployed:
            self.echo("final split, champion with its own settings (deployment, not comparable "
                      "to the baseline): " + "; ".join(
                          f"{b} {_pct_ci(deployed[b].metrics)}" for b in BENCHMARKS))

    def final_sizes(self, runs: int) -> dict[str, int]:
        """The final subsets' sizes for ``runs`` evaluations, fitted to the time left once and
        stored before use."""
        stored = self.store.proposal(self.run_id, 0, "final-sizes")
        if stored is not None:
            return stored["payload"]
        sizes = self.bench.final_sizes(self.budget.left() - max(5.0, 0.01 * self.config.budget_s),
                                       runs=runs)
        self.store.save_proposal(self.run_id, 0, "final-sizes", sizes)
        return sizes

    def finish(self, status: str, error: str | None = None) -> None:
        if not hasattr(self, "budget"):
            return  # refused before the run was ours
        fields = {"status": status, "spent_s": self.budget.spent()}
        if error:
            fields["error"] = error[:2000]
        self.store.update_run(self.run_id, **fields)
        if self.storage_url:
            hpo_share.close(self.storage_url, hpo_share.study_of(self.config, self.run_id), status)
        if status == "finished":  # the report reads the finished run
            self.store.update_run(self.run_id, report_path=self.write_report(),
                                  spent_s=self.budget.spent())
        self.echo(f"run {self.run_id} {status} after {fmt_s(self.budget.spent())} "
                  f"of {fmt_s(self.config.budget_s)}")

    # ------------------------------------------------------------ pieces

    def context(self, champion: Candidate, profiles: dict, time_left: float,
                index: int | None = None, strategy: str = "") -> Context:
        index = index or len(self.history) + 1
        bench = self.bench
        return Context(
            cycle=index, seed=self.config.seed + index, champion=champion, profiles=profiles,
            history=list(self.history), time_left_s=time_left, rates=bench.costs.rates,
            dev_sizes={b: len(bench.dev[b]) for b in BENCHMARKS}, data=bench.sources.data,
            analysis_sizes={b: len(bench.tune[b]) for b in BENCHMARKS},
            protected=bench.protected, workdir=bench.workdir / f"cycle-{index}",
            train=lambda records, config, *, name, deadline_s, hooks=None: bench.train(
                records, config, name=name, deadline_s=deadline_s, strategy=strategy,
                parent_id=champion.adapter_id, cycle=index, hooks=hooks),
            evaluate=lambda b, config, *, adapter_path, examples=None: bench.run_eval(
                b, config, adapter_path, examples if examples is not None else bench.tune[b]),
            evaluate_live=lambda b, config, examples: bench.score_live(config, examples),
            tune_examples=bench.tune,
            optuna_storage=self.storage_url or self.store.optuna_storage_url(),
            shared_storage=bool(self.storage_url), study_name=self.config.study,
            world=hpo_share.world(self) if self.storage_url else {},
            record_trial=lambda trial: bench.record_trial(trial, strategy=strategy,
                                                          parent_id=champion.adapter_id),
            profile_name=bench.profile.name, preset=self.config.preset, run_id=self.run_id,
            train_lr=train_lr(self.config.preset))

    def _adapter_id(self, path: str | None, champion: Candidate) -> int | None:
        if path is None:
            return None
        if path == champion.adapter_path:
            return champion.adapter_id
        for a in self.store.adapters(self.run_id):
            if a["path"] == path:
                return a["id"]
        return None

    def record_cycle(self, index, choice, champion, candidate, results, status, t0, *,
                     paired=None, error=None, subset="dev", reference=None):
        key = f"cycle-{index}"
        with self.store.transaction():
            eval_ids = {}
            for b, s in results.items():
                if s.eval_id == -1:
                    s.eval_id = self.bench.record(candidate, b, s.result, role="candidate",
                                                  cycle_index=index, split=subset,
                                                  progress=s.progress)
                eval_ids[b] = s.eval_id
            subsets = judging.roles(self.analysis or {}, results, subset, reference or {})
            # ``dev`` holds dev accuracies only: a candidate measured on the analysis subsets
            # has its numbers in ``subsets`` and ``paired``
            on_dev = results if subset == "dev" else {}
            self.store.add_cycle(
                run_id=self.run_id, index=index, strategy=choice.strategy, status=status,
                rationale=choice.rationale, candidate=candidate.to_dict() if candidate else {},
                dev={b: s.metrics["accuracy"] for b, s in on_dev.items()},
                dev_ci={b: s.metrics["ci"] for b, s in on_dev.items()},
                paired=paired or {}, error_profile={b: p.to_dict() for b, p in choice.profiles.items()},
                duration_s=time.time() - t0,
                adapter_id=candidate.adapter_id if candidate else None, eval_ids=eval_ids,
                error=error, subsets=subsets)
            self.store.finish_step(self.run_id, key, {"status": status})
            self.store.update_run(self.run_id, spent_s=self.budget.spent())
        self.history.append(_history_entry(index, choice.strategy, status,
                                           candidate.to_dict() if candidate else None,
                                           paired or {}))
        self.report.cycle(index, choice.strategy, status, choice.rationale, on_dev,
                          paired or {}, error)
        stops = [f"{b} {p['progress']['n_done']}/{p['progress']['n_total']}"
                 for b, p in (paired or {}).items() if (p.get("progress") or {}).get("stopped")]
        self.echo(f"cycle {index}: {choice.strategy} {status}"
                  + (f" ({subset}: {_fmt_scores(results)}; " + ", ".join(
                      f"{b} p={p['p_value']:.3g}" for b, p in (paired or {}).items()) + ")"
                     if results else f" ({error})")
                  + (f"; stopped for futility after {', '.join(stops)} questions" if stops
                     else ""))

    def write_report(self) -> str | None:
        try:
            from loop.report import build_report, write_report
        except ImportError:
            return None
        out = self.store.run_dir(self.run_id) / "report"
        md, html = write_report(build_report(self.store, self.run_id), out)
        self.echo(f"report: {md} and {html}")
        return str(html)


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write the run's files to {folder}: {exc.strerror or exc}. "
                        "Choose a folder you may write to with --workdir DIR (or move --db)."
                        ) from None


def _same_setting(a: Candidate, b: Candidate) -> bool:
    return a.adapter_path == b.adapter_path and all(
        a.eval_configs[k].to_dict() == b.eval_configs[k].to_dict() for k in BENCHMARKS)


def _as_result(bench: Workbench, scored: Scored):
    """A recorded evaluation as an EvalResult, to record it again under another role."""
    from core.evaluate import EvalResult

    ev = bench.store.evaluation(scored.eval_id)
    return EvalResult(benchmark=scored.benchmark, protocol=ev["protocol"], config=scored.config,
                      metrics=scored.metrics, samples=scored.samples, seconds=ev["seconds"])


def _history_entry(index: int, strategy: str, status: str, candidate: dict | None,
                   paired: dict) -> dict:
    """What the policy and the strategies see of a past cycle (``Context.history``)."""
    return {"index": index, "strategy": strategy, "status": status, "gain": _gain(paired),
            "candidate": candidate, "paired": paired,
            "setting_only": any(p.get("setting_only") for p in paired.values())}


def _gain(paired: dict) -> float:
    diffs = [p["diff"] for p in paired.values()]
    return sum(diffs) / len(diffs) if diffs else 0.0


def _pct_ci(m: dict) -> str:
    return f"{100 * m['accuracy']:.1f}% [{100 * m['ci'][0]:.1f}, {100 * m['ci'][1]:.1f}] (n={m['n']})"


def _fmt_scores(scores: dict[str, Scored]) -> str:
    return ", ".join(f"{b} {100 * s.metrics['accuracy']:.1f}%" for b, s in scores.items())

