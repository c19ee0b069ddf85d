"""Futility stopping of a candidate's dev evaluation, by curtailment.

A candidate is evaluated on dev in chunks of whole units (images for GQA-ru, question groups
for MMBench-ru), in a fixed seeded order of the units, the benchmarks interleaved. After each
chunk the *best case* is computed: the candidate answers every remaining unit right. When even
the best case could not be accepted by the full test (``loop.decision.futile``), the evaluation
stops and the candidate is rejected with that reason.

Why this never rejects a candidate the full test would accept. The full test's p-value is the
two-sided sign-flip p of the per-unit differences d_u (candidate minus champion: right answers
of the image, or the group's circular outcome): p(d) = P(|Σ ε_u |d_u|| ≥ |Σ d_u|). Raising one
d_j by 1 while Σ d ≥ 0 never raises p: for every sign vector ε, |T + ε_j| ≤ |T| + 1, so
{|T'| ≥ S + 1} ⊆ {|T| ≥ S}. Any completion x of the remaining units has d_u ≤ the best case
d_u on each of them, so if x ends with Σ d > 0 (a positive diff, needed to be better), walking
from x up to the best case one step at a time keeps Σ d > 0 and never raises p:
p(best) ≤ p(x). If p(best) ≥ α_k, or the best case's diff is not positive, no completion is
better at α_k. Symmetrically, lowering a d_j while Σ d ≤ 0 never raises p, so when the best case
is already worse with p < α, every completion is significantly worse. And the best-case diffs
bound every completion's diffs, so a best-case sum ≤ 0 means the sum can never be ahead. The
argument holds for the exact sign-flip distribution, which ``core.stats`` uses at every size
this project evaluates (Monte Carlo only past 50 million steps of work).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from core.metrics import ROTATION_BASE, group_outcomes
from core.stats import sign_flip_p

CHUNKS = 8
"""A dev evaluation runs in about this many chunks per benchmark."""


def unit_key(benchmark: str, item: dict) -> Hashable:
    """The unit of an example or of a scored sample: GQA-ru image, MMBench-ru question group."""
    if benchmark == "gqa_ru":
        return str(item["cluster"] if "cluster" in item else item["imageId"])
    return int(item["index"]) % ROTATION_BASE


def chunks(benchmark: str, examples: list[dict], *, seed: int, min_questions: int
           ) -> list[list[dict]]:
    """``examples`` cut into about ``CHUNKS`` chunks of whole units, units in a seeded order
    that is the same for every candidate of a run (so a partial evaluation is a random sample
    of dev's units), each chunk at least ``min_questions`` questions (one evaluation batch)."""
    units: dict[Hashable, list[dict]] = {}
    for e in examples:
        units.setdefault(unit_key(benchmark, e), []).append(e)
    order = sorted(units, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).digest())
    target = max(min_questions, math.ceil(len(examples) / CHUNKS))
    out: list[list[dict]] = [[]]
    for u in order:
        if len(out[-1]) >= target:
            out.append([])
        out[-1].extend(units[u])
    return [c for c in out if c]


def best_case(benchmark: str, champion: list[dict], candidate: list[dict]) -> dict:
    """The full paired test's numbers if the candidate answered every unit it has not been
    evaluated on right: ``best_diff`` (the largest diff any completion can reach), ``best_p``
    (its p; no completion with a positive diff has a smaller one), units done and total."""
    if benchmark == "mmbench_ru":
        champ = {k: int(v) for k, v in group_outcomes(champion).items()}
        cand = {k: int(v) for k, v in group_outcomes(candidate).items()}
        top = dict.fromkeys(champ, 1)
        n = len(champ)
    else:
        champ, top, cand = {}, {}, {}
        for s in champion:
            u = unit_key(benchmark, s)
            champ[u] = champ.get(u, 0) + int(bool(s["correct"]))
            top[u] = top.get(u, 0) + 1
        for s in candidate:
            u = unit_key(benchmark, s)
            cand[u] = cand.get(u, 0) + int(bool(s["correct"]))
        n = len(champion)
    missing = cand.keys() - champ.keys()
    if missing:
        raise ValueError(f"the candidate's {benchmark} answers cover {len(missing)} units the "
                         "champion's dev evaluation does not")
    diffs = [cand.get(u, top[u]) - champ[u] for u in champ]
    p, _ = sign_flip_p(diffs)
    return {"units_done": len(cand), "units_total": len(champ), "best_diff": sum(diffs) / n,
            "best_p": p}


@dataclass
class ChunkedEval:
    """One benchmark's dev evaluation of a candidate, chunk by chunk."""

    benchmark: str
    chunks: list[list[dict]]
    champion: list[dict]
    """The champion's scored samples on the whole dev subset."""
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    done: int = 0
    """Chunks evaluated."""
    protocol: str = ""

    @property
    def finished(self) -> bool:
        return self.done == len(self.chunks)

    @property
    def fraction(self) -> float:
        return self.done / len(self.chunks)

    def add(self, result) -> None:
        self.samples += result.samples
        self.seconds += result.seconds
        self.protocol = result.protocol
        self.done += 1

    def progress(self, stopped: str | None, level: float | None) -> dict:
        """What is stored with the evaluation: where it stopped and why, and the bound."""
        bound = best_case(self.benchmark, self.champion, self.samples)
        n_total = sum(len(c) for c in self.chunks)
        return {**bound, "n_done": len(self.samples), "n_total": n_total,
                "chunks_done": self.done, "chunks_total": len(self.chunks),
                "stopped": bool(stopped) and not self.finished,
                "reason": stopped if stopped and not self.finished else None,
                "level": level, "seconds": round(self.seconds, 3),
                "full_s_est": round(self.seconds * n_total / max(1, len(self.samples)), 3)}


def run_chunks(evals: dict[str, ChunkedEval], run_chunk: Callable[[str, list[dict]], object],
               should_stop: Callable[[dict[str, dict]], str | None]) -> str | None:
    """Evaluate chunk after chunk, always the benchmark least far along, until every one is
    done or, once each has at least one chunk, ``should_stop`` (given each benchmark's
    ``best_case``) gives a reason; returns that reason or None."""
    while True:
        open_ = [b for b, e in evals.items() if not e.finished]
        if not open_:
            return None
        b = min(open_, key=lambda name: evals[name].fraction)
        e = evals[b]
        e.add(run_chunk(b, e.chunks[e.done]))
        if all(x.done for x in evals.values()):
            reason = should_stop({name: best_case(name, x.champion, x.samples)
                                  for name, x in evals.items()})
            if reason and not all(x.finished for x in evals.values()):
                return reason


def replay(benchmark_tables: dict[str, tuple[list[dict], list[dict]]], *, seed: int,
           should_stop: Callable[[dict[str, dict]], str | None], min_questions: int = 1
           ) -> dict:
    """Replay the rule on complete evaluations: ``benchmark -> (champion samples, candidate
    samples)`` on the same dev questions. Returns ``{"stopped": reason or None,
    "n_done": questions evaluated when it stopped, "n_total": ...}``."""
    by_id = {b: {s["sample_id"]: s for s in cand} for b, (_, cand) in benchmark_tables.items()}
    evals = {b: ChunkedEval(b, chunks(b, champ, seed=seed, min_questions=min_questions), champ)
             for b, (champ, _) in benchmark_tables.items()}

    class _Result:
        def __init__(self, b, chunk):
            self.samples = [by_id[b][s["sample_id"]] for s in chunk]
            self.seconds, self.protocol = float(len(chunk)), ""

    reason = run_chunks(evals, _Result, should_stop)
    return {"stopped": reason, "n_done": sum(len(e.samples) for e in evals.values()),
            "n_total": sum(len(s) for s, _ in benchmark_tables.values())}


def replay_run(store, run_id: int, *, min_questions: int) -> list[dict]:
    """Replay the rule over every stored candidate dev evaluation of a run that ran to the end,
    against the champion's dev answers it was compared with, at the α_k it was tested at.

    Returns one row per cycle: its status, whether the replayed rule would have stopped it (and
    why), and the questions it would have evaluated of the total. A stopped evaluation has no
    full test to compare with; its row says so.
    """
    from loop.decision import futile

    alpha = float((store.get_run(run_id).get("config") or {}).get("alpha", 0.05))
    seed = int((store.get_run(run_id).get("config") or {}).get("seed", 0))
    rows = []
    for c in store.cycles(run_id):
        judged = (c.get("subsets") or {}).get("judged") or {}
        tested = {b: j for b, j in judged.items()
                  if j["subset"] == "dev" and (c["paired"].get(b) or {}).get("k")}
        if not tested:
            continue
        progress = {b: store.evaluation(c["eval_ids"][b]).get("progress") or {}
                    for b in tested}
        row = {"cycle": c["index"], "strategy": c["strategy"], "status": c["status"]}
        if any(p.get("stopped") for p in progress.values()):
            rows.append({**row, "live": "stopped", "replay": None})
            continue
        tables = {b: (_samples(store, j["champion_eval_id"]), _samples(store, c["eval_ids"][b]))
                  for b, j in tested.items()}
        at = {b: c["paired"][b]["alpha"] for b in tested}
        out = replay(tables, seed=seed, min_questions=min_questions,
                     should_stop=lambda bounds, at=at: futile(bounds, at, alpha))
        rows.append({**row, "live": "full", "replay": out})
    return rows


def _samples(store, eval_id: int) -> list[dict]:
    mmbench = store.evaluation(eval_id)["benchmark"] == "mmbench_ru"
    return [{**p, "index": int(p["sample_id"])} if mmbench else dict(p)
            for p in store.predictions(eval_id)]
