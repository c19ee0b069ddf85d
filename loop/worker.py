"""``loop worker``: take HPO trials from a shared study and run them as the loop would.

A worker reads everything from the study the loop wrote (``strategies.hpo_study``): the model
and data sources, the seed, the data fingerprint, the tune subset's ids, the adapters' folder;
per cycle the champion's prompts, the error profile that weights the training data, the cost
rates and each trial's time box. It loads the same world, refuses when its data differs, and
runs every trial through ``strategies.hpo_trial.run_trial`` (the loop's own function) with
training behind the same leakage guard (``loop.modelbench``). It stops when the run closes the
study, after ``--max-trials``, or on Ctrl-C (its trial is then failed and queued again).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from core.exceptions import UserError
from loop.modelbench import ModelBench
from strategies import hpo_study
from strategies.base import BENCHMARKS, Candidate, Context, CostRates

log = logging.getLogger(__name__)

POLL_S = 2.0


class WorkerBench(ModelBench):
    """The base model and the evaluation data, loaded from the study's ``loop_world``."""

    def __init__(self, world: dict, gpu: str, batch_size: int | None, progress: bool,
                 packing: bool = True):
        from core.data import load_benchmark
        from core.device import resolve_profile
        from core.model import load_vlm
        from loop.sources import resolve_sources

        self.sources = resolve_sources(world["preset"], world.get("model"),
                                       world.get("data_dir"), world.get("coco_dir"),
                                       world.get("seed", 0))
        self.examples = {b: load_benchmark(b, self.sources.data) for b in BENCHMARKS}
        if self.data_fingerprint() != world["data_fingerprint"]:
            raise UserError(f"the data this worker sees ({self.sources.data}) differs from the "
                            "run's (fingerprint "
                            f"{self.data_fingerprint()} != {world['data_fingerprint']}); point "
                            "the worker at the same data")
        by_id = {b: {str(e["id"]): e for e in self.examples[b]} for b in BENCHMARKS}
        missing = [i for b, ids in world["tune_ids"].items() for i in ids if i not in by_id[b]]
        if missing:
            raise UserError(f"{len(missing)} questions of the run's tune subset are not in "
                            f"this worker's data (e.g. {missing[0]!r})")
        self.tune = {b: [by_id[b][i] for i in ids] for b, ids in world["tune_ids"].items()}
        self.profile = resolve_profile(gpu)
        self.profile.log_reasons()
        self.vlm = load_vlm(self.sources.model, options=self.profile.load_options())
        self.batch_size = batch_size or world.get("batch_size") or self.profile.eval_batch_size
        self.progress, self.prefix_cache = progress, world.get("prefix_cache", True)
        self.packing = run_packs(world, packing)
        self.adapter_dir = Path(world["adapter_dir"])

    def train(self, records: list[dict], config, *, name: str, deadline_s: float, worker: str,
              hooks=None):
        records, guard = self.screened(records, source=f"optuna_hpo on {worker} ({name})")
        result = self.fit(records, self.packed(config), self.adapter_dir / name,
                          deadline=time.time() + max(0.0, deadline_s), resume=False, hooks=hooks)
        if guard["refused"]:
            result.skipped["leakage_refused"] = guard["refused"]
        return (str(self.adapter_dir / name) if result.ok else None), result

    def context(self, spec: dict, world: dict, worker: str) -> Context:
        """The loop's context of cycle ``spec['cycle']``, as far as a trial reads it."""
        from core.error_profile import ErrorProfile
        from core.evaluate import EvalConfig

        configs = {b: EvalConfig(**c) for b, c in spec["eval_configs"].items()}
        rates = spec["rates"]
        return Context(
            cycle=spec["cycle"], seed=spec["seed"],
            champion=Candidate("champion", "the run's champion", configs,
                               adapter_path=spec.get("champion_adapter")),
            profiles={b: ErrorProfile(**p, examples={}) for b, p in spec["profiles"].items()},
            history=[], time_left_s=spec["time_box_s"],
            rates=CostRates(dict(rates["eval_s_per_sample"]), rates["train_s_per_sample"],
                            rates.get("load_s", 0.0)),
            dev_sizes={}, data=self.sources.data, protected=self.protected,
            workdir=Path(spec["workdir"]),
            train=lambda records, config, *, name, deadline_s, hooks=None: self.train(
                records, config, name=name, deadline_s=deadline_s, worker=worker, hooks=hooks),
            evaluate=lambda b, config, *, adapter_path, examples=None: self.score(
                config, adapter_path, examples if examples is not None else self.tune[b]),
            evaluate_live=lambda b, config, examples: self.score_live(config, examples),
            tune_examples=self.tune, train_lr=spec["train_lr"],
            run_id=world.get("run_id"))


def run_packs(world: dict, packing: bool = True) -> bool:
    """Whether this worker packs its trials' records by image: as the run does
    (``loop run --no-packing`` turns it off for every worker), unless the worker itself was
    started with ``--no-packing``."""
    return packing and world.get("packing", True)


def default_name() -> str:
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}-{f'gpu{gpus}-' if gpus else ''}{os.getpid()}"


def wait_for_study(url: str, name: str, echo) -> tuple:
    """The study and its ``loop_world`` once the loop has made them (its first HPO cycle)."""
    storage = hpo_study.open_storage(url)
    said = False
    while True:
        study = hpo_study.load_or_none(url, name, storage)
        if study is not None and "loop_world" in study.user_attrs:
            return study, study.user_attrs["loop_world"]
        if not said:
            echo(f"waiting for the loop to open study '{name}' in {hpo_study.masked(url)} "
                 "(at its first HPO cycle)")
            said = True
        time.sleep(POLL_S)


def check_db(db: str, owner: dict) -> None:
    """Refuse a study that belongs to another database or run than ``db``'s."""
    from loop.store import Store

    store = Store.open_existing(db)
    try:
        runs = {r["id"]: (r.get("environment") or {}).get("run_token") for r in store.runs()}
    finally:
        store.close()
    if runs.get(owner.get("run_id")) != owner.get("run_token"):
        raise UserError(f"the study belongs to run {owner.get('run_id')} of {owner.get('db')}, "
                        f"not to a run of {db}; check --study and --db")


def work(url: str, study_name: str, *, gpu: str = "auto", db: str | None = None,
         name: str | None = None, max_trials: int | None = None,
         batch_size: int | None = None, progress: bool = True, packing: bool = True,
         echo=None) -> int:
    """Run trials of ``study_name`` until the run closes it; returns how many ran here."""
    import optuna

    from strategies.hpo_trial import run_trial, study_options
    from strategies.optuna_hpo import worker_seed
    from strategies.sft_data import SFTDataBuilder

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    name = name or default_name()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, world = wait_for_study(url, study_name, echo)
    owner = study.user_attrs.get("loop_run") or {}
    if db:
        check_db(db, owner)
    world = {**world, "run_id": owner.get("run_id")}
    beat = float(world["heartbeat_s"])
    study = optuna.load_study(study_name=study_name, storage=hpo_study.open_storage(url, int(beat)),
                              **study_options(world["seed"]))
    with hpo_study.beating(study, None, beat,
                           alive=lambda: hpo_study.report_alive(study, name, "loading")):
        bench = WorkerBench(world, gpu, batch_size, progress, packing)
    echo(f"worker {name}: {bench.sources.model} on {bench.profile.name}, taking trials of "
         f"study '{study_name}'{'' if bench.packing else ', records not packed by image'}")
    builders: dict[int, SFTDataBuilder] = {}
    done = 0
    try:
        while max_trials is None or done < max_trials:
            if study.user_attrs.get("loop_closed"):
                echo(f"worker {name}: the run is {study.user_attrs['loop_closed']}; stopping")
                break
            hpo_study.fail_dead_trials(study)
            study.sampler = study_options(worker_seed(world["seed"], name, len(study.trials)))[
                "sampler"]
            trial = hpo_study.claim(study)
            if trial is None:
                hpo_study.report_alive(study, name, "idle")
                time.sleep(POLL_S)
                continue
            cycle = trial.user_attrs[hpo_study.CYCLE_ATTR]
            spec = study.user_attrs[f"loop_cycle_{cycle}"]
            seconds = min(trial.user_attrs.get(hpo_study.REFUND_ATTR) or spec["time_box_s"],
                          spec["expires_at"] - time.time())
            if seconds <= 0:
                trial.set_user_attr("cancelled", "the cycle had ended when a worker took it")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            echo(f"worker {name}: trial {trial.number} of cycle {cycle} ({seconds:.0f} s)")
            with hpo_study.beating(study, trial._trial_id, beat,
                                   alive=lambda n=trial.number: hpo_study.report_alive(
                                       study, name, f"trial {n}")):
                try:
                    ctx = bench.context(spec, world, name)
                    if cycle not in builders:
                        builders[cycle] = SFTDataBuilder(ctx)
                except BaseException:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                number = run_trial(ctx, study, trial, builders[cycle], seconds, worker=name)
            frozen = study.trials[number]
            bench.drop(frozen.user_attrs.get("adapter_path"))
            echo(f"worker {name}: trial {number} {frozen.state.name}"
                 + (f" (tune accuracy {frozen.value:.3f})" if frozen.value is not None else ""))
            done += 1
    finally:
        hpo_study.report_alive(study, name, "stopped")
    return done
