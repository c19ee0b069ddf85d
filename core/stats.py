"""Cluster-aware statistics: paired tests, intervals, and the α each comparison may spend.

GQA-ru asks about 31 questions per image and MMBench-ru rotates each question up to four
times, so questions are not independent: the image (GQA-ru) or the question group
(MMBench-ru) is the unit. Everything here resamples or permutes whole clusters, so copies of
questions never count as more units: copying every question the same number of times changes
neither a p-value nor an interval, and copying only some of them weighs their clusters more (as
it would in any average) without adding evidence from new images. With one question per
cluster the paired test is the exact McNemar test.

Re-exported by ``core.metrics``; pure Python plus numpy, deterministic for a given seed.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

EXACT_MAX_WORK = 50_000_000
"""Above this many (clusters × support) steps the sign-flip test is run by Monte Carlo."""


@dataclass(frozen=True)
class PairedResult:
    """Baseline against candidate on the same items."""

    n: int
    """Number of paired items."""
    baseline_acc: float
    candidate_acc: float
    diff: float
    """candidate_acc - baseline_acc."""
    diff_low: float
    """Lower end of the cluster bootstrap 95% interval of `diff`."""
    diff_high: float
    """Upper end of the cluster bootstrap 95% interval of `diff`."""
    b_only: int
    """Items the baseline got right and the candidate wrong."""
    c_only: int
    """Items the candidate got right and the baseline wrong."""
    p_value: float
    """Two-sided cluster sign-flip p-value; 1.0 without discordant pairs."""
    n_clusters: int = 0
    """Number of independent units (images, question groups); n when there are no clusters."""
    method: str = "exact"
    """"exact" (full sign-flip distribution) or "monte carlo" (seeded random sign flips)."""

    def to_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(b_only: int, c_only: int) -> float:
    """Exact two-sided McNemar p-value: a binomial test on the discordant pairs."""
    m = b_only + c_only
    if m == 0:
        return 1.0
    term = tail = 1  # math.comb(m, i), built up term by term
    for i in range(1, min(b_only, c_only) + 1):
        term = term * (m - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / 2**m)


def _cluster_sums(values: np.ndarray, clusters: Sequence[Hashable] | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums of ``values`` and per-cluster sizes, clusters in first-seen order."""
    if clusters is None:
        return values, np.ones(len(values))
    if len(clusters) != len(values):
        raise ValueError(f"`clusters` must name one cluster per item, but got {len(clusters)} "
                         f"cluster keys for {len(values)} items.")
    ids: dict[Hashable, int] = {}
    index = np.fromiter((ids.setdefault(c, len(ids)) for c in clusters), dtype=int,
                        count=len(clusters))
    return (np.bincount(index, weights=values, minlength=len(ids)),
            np.bincount(index, minlength=len(ids)).astype(float))


def sign_flip_p(cluster_diffs: Sequence[int], *, n_perm: int = 20_000, seed: int = 0
                ) -> tuple[float, str]:
    """Two-sided p-value of the sum of per-cluster differences under random sign flips.

    Under "no difference" the two systems' labels can be swapped within a cluster, which flips
    the sign of its difference. The full distribution of the sum is built by convolution when
    that is cheap (exact, any number of clusters), otherwise by ``n_perm`` seeded draws.

    Returns:
        (p_value, method) with method "exact" or "monte carlo".
    """
    d = np.abs(np.rint(np.asarray(cluster_diffs, dtype=float))).astype(np.int64)
    d = d[d != 0]
    observed = abs(int(np.rint(np.sum(cluster_diffs))))
    if d.size == 0:
        return 1.0, "exact"
    support = int(d.sum())
    if d.size * (2 * support + 1) <= EXACT_MAX_WORK:
        dist = np.zeros(2 * support + 1)
        dist[support] = 1.0
        for step in d:
            dist = 0.5 * (np.roll(dist, step) + np.roll(dist, -step))
        totals = np.abs(np.arange(-support, support + 1))
        return float(min(1.0, dist[totals >= observed].sum())), "exact"
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1000):
        signs = rng.choice((-1, 1), size=(min(1000, n_perm - start), d.size))
        hits += int(np.sum(np.abs(signs @ d) >= observed))
    return (1 + hits) / (1 + n_perm), "monte carlo"


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[Hashable] | None = None, *,
                      n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
                      ) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` when whole clusters are resampled.

    A resample draws clusters with replacement and takes the ratio of their summed values to
    their summed sizes, so large clusters weigh as much as their questions do and copies
    within a cluster change nothing. Without clusters it is the ordinary bootstrap.
    """
    if len(values) == 0:
        return 0.0, 0.0
    sums, sizes = _cluster_sums(np.asarray(values, dtype=float), clusters)
    k = len(sums)
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // k)
    means = []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(k, np.full(k, 1.0 / k), size=min(chunk, n_boot - start))
        means.append((counts @ sums) / (counts @ sizes))
    low, high = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_test(baseline: Sequence[bool], candidate: Sequence[bool], *,
                clusters: Sequence[Hashable] | None = None, n_boot: int = 2000,
                n_perm: int = 20_000, seed: int = 0) -> PairedResult:
    """Paired comparison of two systems scored on the same items, in the same order.

    The p-value is a two-sided cluster sign-flip test of the summed per-cluster differences
    (with one item per cluster, or ``clusters=None``, it equals the exact McNemar test); the
    interval of ``diff`` is a cluster bootstrap.

    Args:
        baseline: Per-item outcomes of the system to beat.
        candidate: Per-item outcomes of the challenger, same items, same order.
        clusters: Per-item key of the independent unit (GQA-ru imageId, MMBench-ru question
            group); None treats every item as its own unit.
        n_boot: Bootstrap resamples of the interval.
        n_perm: Random sign flips when the exact distribution is too large to build.
        seed: Seed of the bootstrap and of the Monte Carlo sign flips.

    Raises:
        ValueError: If the lists differ in length or ``clusters`` does not name every item.
    """
    if len(baseline) != len(candidate):
        raise ValueError(
            f"`baseline` and `candidate` must score the same items, but got {len(baseline)} "
            f"and {len(candidate)} outcomes. Evaluate both on the same questions."
        )
    b = np.asarray(baseline, dtype=bool)
    c = np.asarray(candidate, dtype=bool)
    n = len(b)
    diffs = c.astype(float) - b.astype(float)
    sums, _ = _cluster_sums(diffs, clusters)
    p_value, method = sign_flip_p(sums, n_perm=n_perm, seed=seed)
    low, high = cluster_bootstrap(diffs, clusters, n_boot=n_boot, seed=seed)
    base_acc = float(b.mean()) if n else 0.0
    cand_acc = float(c.mean()) if n else 0.0
    return PairedResult(n=n, baseline_acc=base_acc, candidate_acc=cand_acc,
                        diff=cand_acc - base_acc, diff_low=low, diff_high=high,
                        b_only=int(np.sum(b & ~c)), c_only=int(np.sum(c & ~b)),
                        p_value=p_value, n_clusters=len(sums), method=method)


def is_better(result: PairedResult, alpha: float = 0.05) -> bool:
    """Whether the candidate beats the baseline: a positive difference with p < alpha."""
    return result.diff > 0 and result.p_value < alpha


def comparison_alpha(alpha: float, k: int) -> float:
    """The level of the ``k``-th comparison of a run (k = 1, 2, ...): α·6/(π²k²).

    The levels sum to α over any number of comparisons (Σ 1/k² = π²/6), so the chance that
    any comparison of the run wrongly accepts a candidate stays at most α, however many
    candidates the run looks at on the same dev questions.

    Raises:
        ValueError: If ``k`` is below 1.
    """
    if k < 1:
        raise ValueError(f"`k` counts comparisons from 1, but got {k}.")
    return alpha * 6.0 / (math.pi**2 * k * k)
