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
measured and recorded (context distillation reads it), but rejected.
"""

from __future__ import annotations

from core.metrics import comparison_alpha, group_outcomes, paired_test

OBJECTIVES = ("benchmark", "deployment")
SETTING_ONLY_REASON = "a prompt/decoding setting cannot win under --objective benchmark"


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
    clusters = [s.get("cluster") for s in champ.samples]
    return paired_test([a for a, _ in pairs], [b for _, b in pairs],
                       clusters=None if None in clusters else clusters)


def comparisons_made(history: list[dict]) -> int:
    """How many paired comparisons the run has made on dev (the largest stored k)."""
    return max((int(p.get("k") or 0) for h in history
                for p in (h.get("paired") or {}).values()), default=0)


def judge(champ: dict, cand: dict, *, alpha: float, k_done: int, setting_only: bool,
          objective: str) -> tuple[str, dict[str, dict]]:
    """Decide on a candidate and say why.

    Args:
        champ: benchmark -> the champion's ``Scored`` on dev.
        cand: benchmark -> the candidate's ``Scored`` on the same questions; the very same
            object as the champion's where nothing changed for that benchmark (no test then).
        alpha: The run's family-wise level.
        k_done: Comparisons the run made before this one (``comparisons_made``).
        setting_only: The candidate keeps the champion's adapter and changes only settings.
        objective: "benchmark" or "deployment".

    Returns:
        ("accepted" | "rejected", benchmark -> the paired record: the test's fields plus
        ``k``, ``alpha`` (the level used), ``better``, ``reason``, the cycle's ``decision``
        and ``setting_only``).
    """
    paired: dict[str, dict] = {}
    k = k_done
    for b in champ:
        result = paired_scores(champ[b], cand[b])
        row = result.to_dict()
        if cand[b] is champ[b]:
            row.update(k=None, alpha=None, better=False, reason="not changed: no test")
        else:
            k += 1
            level = comparison_alpha(alpha, k)
            better = result.diff > 0 and result.p_value < level
            row.update(k=k, alpha=level, better=better, reason=(
                f"p={result.p_value:.3g} {'<' if result.p_value < level else '>='} "
                f"α_{k}={level:.3g}, diff {100 * result.diff:+.1f} pts "
                f"[{100 * result.diff_low:+.1f}, {100 * result.diff_high:+.1f}]"))
        paired[b] = row
    if setting_only and objective == "benchmark":
        status, decision = "rejected", SETTING_ONLY_REASON
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
