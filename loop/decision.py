"""The decision rule: when a candidate becomes the champion.

A candidate is compared with the champion on the same dev questions, per benchmark, by the
cluster-aware paired test (``core.metrics.paired_test``: GQA-ru questions clustered by image,
MMBench-ru question groups scored circularly). The k-th comparison of the run is tested at
α·6/(π²k²), so the chance that the run ever accepts a candidate by luck stays below α
however many candidates it tries (``comparison_alpha``). k counts every benchmark on which a
candidate was evaluated on dev, read back from the stored cycles, so a resumed run keeps
counting where it stopped.

Under ``--objective benchmark`` the headline is the exact lmms-eval protocol, so only an
adapter can win; a candidate that changes only prompt/decoding/likelihood settings is still
measured and recorded (context distillation reads it), but rejected. It is measured on the
*analysis* subset (``subset="analysis"``), not on dev: it spends no α_k, and the setting a
distillation carries is chosen without looking at the questions that judge the distilled
adapter.

A dev evaluation may stop early for futility (``loop.futility``, ``futile``): the candidate
is then rejected with the reason, its rows carry the partial test and where it stopped.
"""

from __future__ import annotations

from core.metrics import clusters_of, comparison_alpha, group_outcomes, paired_test

OBJECTIVES = ("benchmark", "deployment")
DEFAULT_OBJECTIVE = "benchmark"
"""What ``loop run`` optimises unless told otherwise: the exact lmms-eval protocol."""
SETTING_ONLY_REASON = "a prompt/decoding setting cannot win under --objective benchmark"
ANALYSIS_NOTE = ("measured on the analysis subset, not on dev: no test, it feeds context "
                 "distillation")


def paired_scores(champ, cand):
    """The cluster-aware paired test of two evaluations (``Scored``) of the same questions.

    GQA-ru pairs questions by ``sample_id``, clustered by image; MMBench-ru pairs question
    groups (right only when every rotation is), one group per cluster.
    """
    if champ.benchmark == "mmbench_ru":
        base, other = group_outcomes(champ.samples), group_outcomes(cand.samples)
        if base.keys() != other.keys():
            raise ValueError(f"the two MMBench-ru evaluations cover different question groups "
                             f"({len(base.keys() ^ other.keys())} differ)")
        keys = sorted(base)
        return paired_test([base[k] for k in keys], [other[k] for k in keys])
    by_id = {s["sample_id"]: s for s in cand.samples}
    pairs = [(s["correct"], by_id[s["sample_id"]]["correct"]) for s in champ.samples]
    return paired_test([a for a, _ in pairs], [b for _, b in pairs],
                       clusters=clusters_of(champ.samples))


def restrict(scored, to):
    """``scored`` (a ``Scored``) cut to the questions ``to`` (a partial ``Scored``) answered."""
    from dataclasses import replace

    ids = {s["sample_id"] for s in to.samples}
    # only the paired test reads it: no metrics of its own
    return replace(scored, samples=[s for s in scored.samples if s["sample_id"] in ids],
                   metrics={})


def levels(changed: list[str], *, alpha: float, k_done: int) -> dict[str, tuple[int, float]]:
    """benchmark -> (k, α_k) for the benchmarks a candidate changed, in that order."""
    return {b: (k_done + i + 1, comparison_alpha(alpha, k_done + i + 1))
            for i, b in enumerate(changed)}


def futile(bounds: dict[str, dict], at: dict[str, float], alpha: float) -> str | None:
    """Why no way of answering the remaining dev units can get the candidate accepted, or None.

    ``bounds``: benchmark -> ``loop.futility.best_case`` of each benchmark the candidate
    changed (an unchanged one has diff 0 and no test); ``at``: benchmark -> its α_k. The
    mirror of ``_accept`` on the best case, which bounds every completion (``loop.futility``).
    """
    def where(b):
        x = bounds[b]
        return f"{b} after {x['units_done']}/{x['units_total']} units"

    worse = [b for b, x in bounds.items() if x["best_diff"] < 0 and x["best_p"] < alpha]
    if worse:
        return ("significantly worse whatever the remaining units answer: " + "; ".join(
            f"{where(b)}, best case diff {100 * bounds[b]['best_diff']:+.1f} pts, "
            f"p={bounds[b]['best_p']:.3g} < α={alpha:g}" for b in worse))
    if not any(x["best_diff"] > 0 and x["best_p"] < at[b] for b, x in bounds.items()):
        return ("cannot pass its α_k even if it answers every remaining unit right: " + "; ".join(
            f"{where(b)}, best case diff {100 * x['best_diff']:+.1f} pts, "
            f"p={x['best_p']:.3g} vs α_k={at[b]:.3g}" for b, x in bounds.items()))
    if sum(x["best_diff"] for x in bounds.values()) <= 0:
        return ("cannot be ahead summed over benchmarks even if it answers every remaining "
                "unit right: " + ", ".join(
                    f"{where(b)}: {100 * x['best_diff']:+.1f} pts" for b, x in bounds.items()))
    return None


def comparisons_made(history: list[dict]) -> int:
    """How many paired comparisons the run has made on dev (the largest stored k)."""
    return max((int(p.get("k") or 0) for h in history
                for p in (h.get("paired") or {}).values()), default=0)


def judge(champ: dict, cand: dict, *, alpha: float, k_done: int, setting_only: bool,
          objective: str, subset: str = "dev", stopped: str | None = None
          ) -> tuple[str, dict[str, dict]]:
    """Decide on a candidate and say why.

    Args:
        champ: benchmark -> the champion's ``Scored`` on dev.
        cand: benchmark -> the candidate's ``Scored`` on the same questions; the very same
            object as the champion's where nothing changed for that benchmark (no test then).
        alpha: The run's family-wise level.
        k_done: Comparisons the run made before this one (``comparisons_made``).
        setting_only: The candidate keeps the champion's adapter and changes only settings.
        objective: "benchmark" or "deployment".
        subset: "dev" (a comparison: it spends α_k) or "analysis" (a setting-only candidate
            under ``--objective benchmark``, measured for context distillation: no test).
        stopped: Why the dev evaluation stopped for futility; the candidate's ``Scored`` then
            cover part of dev (their ``progress`` says which) and the test runs on that part.

    Returns:
        ("accepted" | "rejected", benchmark -> the paired record: the test's fields plus
        ``k``, ``alpha`` (the level used), ``better``, ``reason``, the cycle's ``decision``
        and ``setting_only``).
    """
    paired: dict[str, dict] = {}
    k = k_done
    for b in champ:
        progress = getattr(cand[b], "progress", None)
        partial = progress is not None and progress["n_done"] < progress["n_total"]
        result = paired_scores(restrict(champ[b], cand[b]) if partial else champ[b], cand[b])
        row = result.to_dict()
        if cand[b] is champ[b]:
            row.update(k=None, alpha=None, better=False, reason="not changed: no test")
        elif subset == "analysis":
            row.update(k=None, alpha=None, better=False, reason=(
                f"{ANALYSIS_NOTE}; diff {100 * result.diff:+.1f} pts "
                f"[{100 * result.diff_low:+.1f}, {100 * result.diff_high:+.1f}]"))
        else:
            k += 1
            level = comparison_alpha(alpha, k)
            better = result.diff > 0 and result.p_value < level
            row.update(k=k, alpha=level, better=better, reason=(
                f"p={result.p_value:.3g} {'<' if result.p_value < level else '>='} "
                f"α_{k}={level:.3g}, diff {100 * result.diff:+.1f} pts "
                f"[{100 * result.diff_low:+.1f}, {100 * result.diff_high:+.1f}]"))
            if partial:
                row["better"] = False  # only the full test accepts
                row["reason"] = (f"partial test on {progress['units_done']}/"
                                 f"{progress['units_total']} units: " + row["reason"])
        row["subset"] = subset
        if progress is not None:
            row["progress"] = progress
        paired[b] = row
    if setting_only and objective == "benchmark":
        status, decision = "rejected", SETTING_ONLY_REASON + (
            f" ({ANALYSIS_NOTE})" if subset == "analysis" else "")
    elif stopped:
        status, decision = "rejected", f"stopped for futility: {stopped}"
    else:
        status, decision = _accept(paired, alpha)
    for row in paired.values():
        row.update(decision=decision, setting_only=setting_only)
    return status, paired


def _accept(paired: dict[str, dict], alpha: float) -> tuple[str, str]:
    """Better on at least one benchmark, significantly worse on none, ahead on the sum."""
    worse = [b for b, p in paired.items() if p["diff"] < 0 and p["p_value"] < alpha]
    better = [b for b, p in paired.items() if p["better"]]
    if worse:
        return "rejected", f"significantly worse on {', '.join(worse)} (p < α={alpha:g})"
    if not better:
        return "rejected", "not significantly better on any benchmark at its α_k"
    if sum(p["diff"] for p in paired.values()) <= 0:
        return "rejected", f"better on {', '.join(better)} but not ahead summed over benchmarks"
    return "accepted", f"significantly better on {', '.join(better)}, worse on none"
