"""Two runs side by side, possibly from two databases.

``compare_runs`` gathers, as plain JSON-ready data:

- each run's final scores per benchmark with their intervals, as the report shows them (the
  base model and the champion's adapter under the exact lmms-eval protocol, ``final_p``);
- the cluster-aware paired test of the two champions on the final questions both runs
  answered (the test ``final_p`` uses: GQA-ru questions paired by id and clustered by image,
  MMBench-ru question groups scored circularly), with run A as the baseline, so ``diff`` is
  B − A;
- the questions one run fixed (wrong under its base model, right under its champion) and the
  other did not;
- the two decision paths, cycle by cycle.

``loop.compare_page`` renders it as Markdown or HTML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from core.metrics import ROTATION_BASE
from loop.decision import paired_scores
from loop.report import build_report

if TYPE_CHECKING:
    from loop.store import Store

SIDES = ("A", "B")
UNITS = {"gqa_ru": "question", "mmbench_ru": "question group"}


@dataclass
class Comparison:
    """Everything ``loop compare`` shows.

    Attributes:
        runs: Per side ("A", "B"): id, database, status, preset, seed, model, objective,
            budget_s, spent_s.
        benchmarks: The benchmarks of either run, known ones first.
        scores: Per benchmark, per side: ``baseline`` and ``champion`` measures on ``final``
            (accuracy, n, ci, protocol; None when not measured) and ``final_p``.
        shared: Per benchmark: ``n_a``, ``n_b`` (final units of each run), ``n_shared`` and
            ``why`` (why nothing or not everything is shared; None when all is).
        paired: Per benchmark: the paired test of A's champion (baseline) against B's on the
            shared units (``PairedResult`` fields plus ``unit``, ``clustered_by``), or None.
        fixed: Per benchmark: counts of shared units fixed by ``both``, ``only_a``,
            ``only_b``, and up to ``limit`` examples of each ``only`` kind.
        decisions: One row per cycle index: ``{"cycle", "A", "B"}``, a side None when that run
            has no such cycle.
        notes: Caveats in words.
    """

    runs: dict[str, dict[str, Any]]
    benchmarks: list[str]
    scores: dict[str, dict[str, Any]]
    shared: dict[str, dict[str, Any]]
    paired: dict[str, dict[str, Any] | None]
    fixed: dict[str, dict[str, Any] | None]
    decisions: list[dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_runs(store_a: Store, run_a: int, store_b: Store, run_b: int, *,
                 limit: int = 10) -> Comparison:
    """Compare run ``run_a`` of ``store_a`` with run ``run_b`` of ``store_b``.

    Raises:
        UserError: a run id is not in its database (the message lists the known ones).
    """
    reports = {"A": build_report(store_a, run_a), "B": build_report(store_b, run_b)}
    stores = {"A": store_a, "B": store_b}
    runs = {s: _run_summary(stores[s], reports[s].run) for s in SIDES}
    benches = list(dict.fromkeys(reports["A"].benchmarks + reports["B"].benchmarks))
    scores, shared, paired, fixed = {}, {}, {}, {}
    for bench in benches:
        scores[bench] = {s: {"baseline": reports[s].headline.get(bench, {}).get("baseline"),
                             "champion": reports[s].headline.get(bench, {}).get("champion"),
                             "final_p": reports[s].headline.get(bench, {}).get("final_p")}
                         for s in SIDES}
        finals = {s: _final_units(stores[s], runs[s]["id"], bench) for s in SIDES}
        shared[bench], paired[bench], fixed[bench] = _pair(bench, runs, finals, limit)
    notes = []
    if any(r["preset"] in ("demo", "saiga-tiny") for r in runs.values()):
        notes.append("A demo or saiga-tiny run: its numbers show that the loop works; they are "
                     "not comparable with published scores.")
    notes.append("The paired test takes run A's champion as the baseline: a positive difference "
                 "means run B's champion is better on the same final questions. GQA-ru pairs "
                 "questions by id with images as the independent units; MMBench-ru pairs "
                 "question groups, each right only if every rotated copy is (the test behind "
                 "each run's own final p). Intervals are 95%.")
    return Comparison(runs=runs, benchmarks=benches, scores=scores, shared=shared,
                      paired=paired, fixed=fixed, decisions=_decisions(reports), notes=notes)


def _run_summary(store: Store, run: dict[str, Any]) -> dict[str, Any]:
    config = run.get("config") or {}
    return {"id": run["id"], "db": str(store.path), "status": run["status"],
            "preset": run["preset"], "gpu": run["gpu"], "seed": config.get("seed"),
            "model": config.get("model") or (run.get("environment") or {}).get("model"),
            "data_dir": config.get("data_dir"), "objective": config.get("objective", "benchmark"),
            "budget_s": run["budget_s"], "spent_s": run["spent_s"],
            "final_size": config.get("final_size"), "final_n": run.get("final_n")}


def _final_units(store: Store, run_id: int, bench: str) -> dict[str, dict[str, dict]] | None:
    """role ("baseline", "champion") -> unit id -> the unit's predictions on ``final``
    (the latest evaluation of each role); None when the run has no final evaluation."""
    out = {}
    for role in ("baseline", "champion"):
        evals = store.evaluations(run_id, role=f"final_{role}", benchmark=bench, split="final")
        if not evals:
            return None
        units: dict[str, dict] = {}
        for p in store.predictions(evals[-1]["id"]):
            key = (str(int(p["sample_id"]) % ROTATION_BASE) if bench == "mmbench_ru"
                   else p["sample_id"])
            units.setdefault(key, {"rows": []})["rows"].append(p)
        for unit in units.values():
            rows = unit["rows"]
            unit.update(correct=all(r["correct"] for r in rows),
                        right=sum(r["correct"] for r in rows),
                        signature=sorted((r["sample_id"], r["question"] or "", r["answer"] or "")
                                         for r in rows))
        out[role] = units
    return out


def _pair(bench: str, runs: dict, finals: dict, limit: int) -> tuple[dict, dict | None, dict | None]:
    """(shared, paired test, fixed questions) of one benchmark."""
    missing = [s for s in SIDES if finals[s] is None]
    if missing:
        why = "; ".join(f"run {runs[s]['id']} (run {s}) has no final evaluation of {bench} "
                        f"(status {runs[s]['status']})" for s in missing)
        n = {s: 0 if finals[s] is None else len(finals[s]["champion"]) for s in SIDES}
        return {"n_a": n["A"], "n_b": n["B"], "n_shared": 0, "why": why}, None, None
    champ = {s: finals[s]["champion"] for s in SIDES}
    common = champ["A"].keys() & champ["B"].keys()
    same = [k for k in champ["A"] if k in common  # in run A's order
            and champ["A"][k]["signature"] == champ["B"][k]["signature"]
            and all(k in finals[s]["baseline"] for s in SIDES)]
    shared = {"n_a": len(champ["A"]), "n_b": len(champ["B"]), "n_shared": len(same),
              "why": _why(bench, runs, champ, len(common), len(same))}
    if not same:
        return shared, None, None
    sides = {s: SimpleNamespace(benchmark=bench, samples=[
        {**r, "index": int(r["sample_id"])} if bench == "mmbench_ru" else r
        for k in same for r in champ[s][k]["rows"]]) for s in SIDES}
    result = paired_scores(sides["A"], sides["B"]).to_dict()
    by_image = bench == "gqa_ru" and all(r.get("cluster") is not None for r in sides["A"].samples)
    result.update(unit=UNITS.get(bench, "question"), clustered_by="image" if by_image else None)
    return shared, result, _fixed(bench, finals, same, limit)


def _why(bench: str, runs: dict, champ: dict, n_common: int, n_same: int) -> str | None:
    """Why the two runs share fewer final units than they have, in words; None when they
    share them all."""
    a, b = runs["A"], runs["B"]
    if n_same == len(champ["A"]) == len(champ["B"]):
        return None
    reasons = []
    if n_common > n_same:
        reasons.append(f"{n_common - n_same} {UNITS.get(bench, 'question')}s have the same id "
                       "but different questions or rotations (different data)")
    for key, what in (("preset", "presets"), ("model", "models"), ("data_dir", "data folders"),
                      ("seed", "seeds (the splits and final subsets are drawn from the seed)"),
                      ("final_size", "final subset sizes")):
        if a.get(key) != b.get(key):
            va, vb = (_setting(key, r.get(key)) for r in (a, b))
            reasons.append(f"different {what}: run A {va}, run B {vb}")
    if not reasons:
        reasons.append("the runs drew different final subsets")
    head = (f"the two runs share no final {bench} {UNITS.get(bench, 'question')}s" if n_same == 0
            else f"the two runs share {n_same} of their final {bench} "
                 f"{UNITS.get(bench, 'question')}s ({len(champ['A'])} in A, "
                 f"{len(champ['B'])} in B)")
    return f"{head}: {'; '.join(reasons)}"


def _setting(key: str, value: Any) -> Any:
    if value is None:
        return {"final_size": "sized from its budget", "model": "the preset's",
                "data_dir": "the preset's"}.get(key, value)
    return value


def _fixed(bench: str, finals: dict, keys: list[str], limit: int) -> dict[str, Any]:
    """Shared units fixed (wrong under the run's base model, right under its champion) by
    both runs, by A only and by B only, with examples of the last two."""
    fixed = {s: {k for k in keys if finals[s]["champion"][k]["correct"]
                 and not finals[s]["baseline"][k]["correct"]} for s in SIDES}
    out: dict[str, Any] = {"n": len(keys), "both": len(fixed["A"] & fixed["B"])}
    for side, other in (("A", "B"), ("B", "A")):
        only = [k for k in keys if k in fixed[side] and k not in fixed[other]]
        out[f"only_{side.lower()}"] = len(only)
        out[f"examples_only_{side.lower()}"] = [_example(bench, finals, k) for k in only[:limit]]
    return out


def _example(bench: str, finals: dict, key: str) -> dict[str, Any]:
    first = finals["A"]["champion"][key]["rows"][0]
    example = {"id": key, "question": first["question"], "answer": first["answer"]}
    for s in SIDES:
        for role in ("baseline", "champion"):
            unit = finals[s][role][key]
            example[f"{s}_{role}"] = (f"{unit['right']}/{len(unit['rows'])} rotations right"
                                      if bench == "mmbench_ru" else unit["rows"][0]["output"])
    return example


def _decisions(reports: dict) -> list[dict[str, Any]]:
    """The two decision paths, aligned by cycle index."""
    cycles = {s: {c["index"]: c for c in reports[s].cycles} for s in SIDES}
    rows = []
    for index in sorted(cycles["A"].keys() | cycles["B"].keys()):
        row: dict[str, Any] = {"cycle": index}
        for s in SIDES:
            c = cycles[s].get(index)
            row[s] = None if c is None else _decision(c)
        rows.append(row)
    return rows


def _decision(cycle: dict[str, Any]) -> dict[str, Any]:
    paired = {b: t for b, t in (cycle["paired"] or {}).items() if t}
    decision = next((t["decision"] for t in paired.values() if t.get("decision")), None)
    reason = "; ".join(x for x in (decision, cycle["error"] and f"error: {cycle['error']}") if x)
    return {"strategy": cycle["strategy"], "status": cycle["status"],
            "accepted": cycle["status"] == "accepted",
            "p": {b: t.get("p_value") for b, t in paired.items()},
            "alpha": {b: t.get("alpha") for b, t in paired.items()},
            "reason": reason or cycle["rationale"] or ""}
