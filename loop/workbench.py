"""The loaded world of one run: the base model, the data and its splits, the store, the clock.

The controller reads like a recipe; this module does the work behind its verbs: evaluate a
candidate and record every prediction, train an adapter under a deadline and register it,
switch adapters on the one loaded base, and rebuild stored results on resume.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import strategies
from core.data import load_benchmark
from core.error_profile import BenchmarkOptimizer
from core.evaluate import EvalConfig, summarize
from core.exceptions import UserError
from core.splits import make_splits, stratified_subset, unit_of
from loop.budget import Budget, CostModel, subset_sizes
from loop.modelbench import ModelBench
from strategies.base import BENCHMARKS, Candidate

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One candidate's results on one benchmark: per-sample records, metrics, their eval id."""

    benchmark: str
    samples: list[dict]
    metrics: dict
    eval_id: int
    config: dict = field(default_factory=dict)
    adapter_path: str | None = None
    result: Any = None
    """The EvalResult while it is not recorded yet (eval_id -1)."""
    progress: dict | None = None
    """A chunked dev evaluation's progress (``loop.futility``): units and questions done of
    the total, whether and why it stopped for futility, the best-case bound."""


class Workbench(ModelBench):
    def __init__(self, *, store, run_id: int, vlm, profile, sources, budget: Budget,
                 costs: CostModel, seed: int, workdir: Path, batch_size: int, progress: bool,
                 prefix_cache: bool = True, packing: bool = True, on_train_step=None):
        self.store, self.run_id, self.vlm, self.profile = store, run_id, vlm, profile
        self.sources, self.budget, self.costs, self.seed = sources, budget, costs, seed
        self.workdir, self.batch_size, self.progress = workdir, batch_size, progress
        self.prefix_cache, self.packing = prefix_cache, packing
        self.on_train_step = on_train_step
        """Called with (adapter name, step, loss) after each optimizer step of a training."""
        self.examples: dict[str, list[dict]] = {}
        self.dev: dict[str, list[dict]] = {}
        self.tune: dict[str, list[dict]] = {}
        self.final: dict[str, list[dict]] = {}
        self.by_id: dict[str, dict[str, dict]] = {}
        self.optimizer = BenchmarkOptimizer(remedies=strategies.remedies())

    # ------------------------------------------------------------ data

    def load_data(self, dev_size: int | None = None, final_size: int | None = None) -> dict:
        """Load both benchmarks, split them, and size the dev, tune and final subsets.

        The subsets are decided once, at the start of the run, from the whole budget, and
        stored (their ids) before anything uses them; a resumed run reads them back.
        """
        stored = self.store.proposal(self.run_id, 0, "subsets")
        subsets = (stored or {}).get("payload") or {}
        sizes = {}
        for b in BENCHMARKS:
            records = load_benchmark(b, self.sources.data)
            splits = make_splits(records, seed=self.seed)
            if not splits["dev"] or not splits["final"]:
                where = self.sources.data.gqa if b == "gqa_ru" else self.sources.data.mmbench
                raise UserError(f"the {b} data at {where} has {len(records)} usable questions: "
                                "its dev or final split comes out empty. Point --data-dir at "
                                "the full dataset.")
            self.examples[b] = records
            self.by_id[b] = {e["id"]: e for e in records}
            if b in subsets:
                self._read_subsets(b, subsets[b])
            else:
                self._choose_subsets(b, splits, dev_size, final_size)
            sizes[b] = {"total": len(records), "dev": len(splits["dev"]), "final": len(splits["final"]),
                        "dev_subset": len(self.dev[b]), "final_subset": len(self.final[b]),
                        "tune_subset": len(self.tune[b])}
        if not subsets:
            self.store.save_proposal(self.run_id, 0, "subsets", {
                b: {part: [e["id"] for e in getattr(self, part)[b]]
                    for part in ("dev", "tune", "final")} for b in BENCHMARKS})
        return sizes

    def _choose_subsets(self, b: str, splits: dict, dev_size: int | None,
                        final_size: int | None) -> None:
        rate = self.costs.rates.eval_s_per_sample[b]
        dev = splits["dev"]
        sizes = subset_sizes(rate, self.budget.left_for_cycles(), self.budget.reserve_s,
                             len(dev), len(splits["final"]), dev_size=dev_size,
                             final_size=final_size,
                             questions_per_unit=len(dev) / len({unit_of(e) for e in dev}))
        self.dev[b] = stratified_subset(dev, sizes["dev_subset"], seed=self.seed)
        chosen = {e["id"] for e in self.dev[b]}
        rest = [e for e in dev if e["id"] not in chosen]
        self.tune[b] = stratified_subset(rest, sizes["tune_subset"], seed=self.seed)
        if not self.tune[b]:
            raise UserError(f"the {b} dev split has {len(splits['dev'])} questions: too few to "
                            f"keep some apart for searching (--dev-size {len(self.dev[b])})")
        self.final[b] = stratified_subset(splits["final"], sizes["final_subset"], seed=self.seed)

    def _read_subsets(self, b: str, ids: dict[str, list[str]]) -> None:
        missing = [i for part in ids.values() for i in part if i not in self.by_id[b]]
        if missing:
            raise UserError(f"the {b} data changed since this run started: {len(missing)} "
                            f"questions of its stored subsets are gone (e.g. {missing[0]!r}); "
                            "resume with the same --data-dir, or start a new run")
        for part in ("dev", "tune", "final"):
            getattr(self, part)[b] = [self.by_id[b][i] for i in ids[part]]

    def final_sizes(self, seconds: float, runs: int) -> dict[str, int]:
        """Final questions per benchmark that fit ``runs`` evaluations in ``seconds``."""
        need = sum(runs * self.costs.eval_seconds(b, len(self.final[b])) for b in self.final)
        scale = min(1.0, max(0.0, seconds) / max(need, 1e-9))
        return {b: max(min(30, len(f)), int(scale * len(f))) for b, f in self.final.items()}

    def final_subset(self, benchmark: str, n: int) -> list[dict]:
        return stratified_subset(self.final[benchmark], n, seed=self.seed)

    # ------------------------------------------------------------ evaluation

    def run_eval(self, benchmark: str, config: EvalConfig, adapter_path: str | None,
                 examples: list[dict]):
        """Evaluate without recording (strategies' searches); feeds the cost model.

        Under torchrun / accelerate launch the other processes answer shards of it
        (``loop.parallel``, ``core.distributed``); the result is the same.
        """
        from loop.parallel import announce

        self.activate(adapter_path)
        announce(self, benchmark, config, adapter_path, examples)
        result = self.score(config, adapter_path, examples)
        self.costs.observe_eval(benchmark, len(examples), result.seconds, config.mode)
        self.store.heartbeat()
        return result

    def evaluate(self, candidate: Candidate, benchmark: str, examples: list[dict], *, role: str,
                 cycle_index: int | None, split: str) -> Scored:
        """Evaluate and record the evaluation with every prediction (inside the caller's step)."""
        config = candidate.eval_configs[benchmark]
        result = self.run_eval(benchmark, config, candidate.adapter_path, examples)
        eval_id = self.record(candidate, benchmark, result, role=role, cycle_index=cycle_index,
                              split=split)
        return Scored(benchmark, result.samples, result.metrics, eval_id, config.to_dict(),
                      candidate.adapter_path)

    def record(self, candidate: Candidate, benchmark: str, result, *, role: str,
               cycle_index: int | None, split: str, progress: dict | None = None) -> int:
        eval_id = self.store.add_evaluation(
            run_id=self.run_id, cycle_index=cycle_index, role=role, benchmark=benchmark,
            split=split, protocol=result.protocol, metrics=result.metrics, n=result.n,
            seconds=result.seconds, adapter_id=candidate.adapter_id, candidate=candidate.to_dict(),
            progress=progress)
        self.store.add_predictions(eval_id, result.samples)
        return eval_id

    def load_scored(self, eval_id: int) -> Scored:
        """A recorded evaluation, rebuilt for paired tests and error profiles (on resume)."""
        ev = self.store.evaluation(eval_id)
        b = ev["benchmark"]
        samples = []
        for p in self.store.predictions(eval_id):
            s = dict(p)
            if b == "mmbench_ru":
                s["index"] = int(p["sample_id"])
            samples.append(s)
        cand = ev.get("candidate") or {}
        return Scored(b, samples, ev["metrics"] or summarize(b, samples), eval_id,
                      (cand.get("eval_configs") or {}).get(b, {}), cand.get("adapter_path"),
                      progress=ev.get("progress"))

    def error_profile(self, scored: Scored):
        samples = [{"example": self.by_id[scored.benchmark][s["sample_id"]],
                    "prediction": s.get("parsed") or s.get("output") or "",
                    "output": s.get("output"),
                    "image_ok": s["image_ok"], "labels": list(s.get("labels") or [])}
                   for s in scored.samples]
        return self.optimizer.profile(scored.benchmark, samples)

    # ------------------------------------------------------------ training

    def train(self, records: list[dict], config, *, name: str, deadline_s: float,
              strategy: str, parent_id: int | None = None, cycle: int = 0, hooks=None):
        """Train an adapter under a deadline, register it, feed the cost model.

        The proposal (data file with its sha256, full config) is stored before training starts,
        keyed by cycle and name. A resumed cycle trains with what was stored, from its
        checkpoint, whatever the strategy proposes this time; an unusable checkpoint is set
        aside and training starts again in a fresh folder.
        """
        # every path that trains passes the one leakage guard, whoever built the data
        records, guard = self.screened(records, source=f"{strategy} ({name})")
        out = self.workdir / "adapters" / name
        records, config, replayed = self._proposal(records, self.packed(config), name, strategy, parent_id,
                                                   cycle, out)
        deadline = self.budget.deadline(deadline_s)
        if self.on_train_step is not None:
            from dataclasses import replace

            from core.train import TrainHooks

            hooks = replace(hooks or TrainHooks(),
                            after_step=lambda step, loss: self.on_train_step(name, step, loss))
        try:
            result = self.fit(records, config, out, deadline=deadline, resume=True, hooks=hooks)
        except Exception as exc:
            if not replayed or not out.exists():
                raise
            aside = _set_aside(out)
            log.warning("cannot continue the training in %s (%s); moved it to %s and training "
                        "again from the start", out, exc, aside)
            result = self.fit(records, config, out, deadline=deadline, resume=False, hooks=hooks)
        self.store.heartbeat()
        if guard["refused"]:
            result.skipped["leakage_refused"] = guard["refused"]
        if result.samples:
            self.costs.observe_train(result.samples, result.seconds)
        if not result.ok:
            return None, result
        if not any(a["path"] == str(out) for a in self.store.adapters(self.run_id)):
            self.store.add_adapter(
                run_id=self.run_id, path=str(out), parent_id=parent_id, strategy=strategy,
                config=config.to_dict(), metrics={k: v for k, v in result.to_dict().items()
                                                  if k != "loss_curve"})
        return str(out), result

    def record_trial(self, trial: dict, *, strategy: str, parent_id: int | None) -> None:
        """Keep one finished HPO trial, whoever ran it (this process or a ``loop worker``):
        its record under ``hpo-trial-<study>-<number>`` of its cycle, and its adapter, when it
        trained one, among the run's adapters."""
        self.store.save_proposal(self.run_id, int(trial.get("cycle") or 0),
                                 f"hpo-trial-{trial['study']}-{trial['number']}", trial)
        path = trial.get("adapter_path") if trial["state"] in ("COMPLETE", "PRUNED") else None
        if path and not any(a["path"] == path for a in self.store.adapters(self.run_id)):
            self.store.add_adapter(
                run_id=self.run_id, path=path, parent_id=parent_id, strategy=strategy,
                config=(trial.get("train") or {}).get("config") or {},
                metrics={"tune_value": trial.get("value"), "state": trial["state"],
                         "worker": trial.get("worker"),
                         "train_status": (trial.get("train") or {}).get("status")})

    def _proposal(self, records: list[dict], config, name: str, strategy: str,
                  parent_id: int | None, cycle: int, out: Path):
        """(records, config, replayed): the stored proposal when it is intact, else this one,
        stored first."""
        from core.sft import data_fingerprint, load_sft_jsonl, write_sft_jsonl
        from core.train import TrainConfig

        key = f"train:{name}"
        stored = self.store.proposal(self.run_id, cycle, key)
        if stored is not None:
            path = Path(stored["data_file"])
            if path.is_file() and _sha256(path) == stored["data_sha256"]:
                log.info("cycle %d: training '%s' with its recorded data and config", cycle, name)
                config = TrainConfig.from_dict(stored["payload"]["config"])
                return load_sft_jsonl(path), config, True
            log.warning("the recorded data of '%s' (%s) is gone or changed; training from the "
                        "start with this proposal", name, path)
            if out.exists():
                _set_aside(out)
        path = self.workdir / "sft" / f"{data_fingerprint(records)}.jsonl"
        if not path.is_file():
            write_sft_jsonl(records, path)
        self.store.save_proposal(self.run_id, cycle, key, {
            "config": config.to_dict(), "strategy": strategy, "parent_id": parent_id,
            "adapter_path": str(out), "n_records": len(records)},
            data_file=str(path), data_sha256=_sha256(path))
        return load_sft_jsonl(path), config, False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _set_aside(out: Path) -> Path:
    """Move an unusable adapter folder out of the way: ``<name>.unusable-<k>``."""
    k = 1
    while (aside := out.with_name(f"{out.name}.unusable-{k}")).exists():
        k += 1
    shutil.move(str(out), str(aside))
    return aside
