"""Cluster-aware paired tests and intervals (core.stats, re-exported by core.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.metrics import (
    accuracy,
    cluster_bootstrap,
    comparison_alpha,
    group_outcomes,
    is_better,
    mcnemar_exact,
    paired_test,
)
from core.stats import sign_flip_p


def _pairs(b_only: int, c_only: int, both: int = 5, neither: int = 3):
    baseline = [True] * b_only + [False] * c_only + [True] * both + [False] * neither
    candidate = [False] * b_only + [True] * c_only + [True] * both + [False] * neither
    return baseline, candidate


# (b_only, c_only): with one item per cluster the test is the exact McNemar test
MCNEMAR_TABLE = [(0, 0), (0, 1), (1, 1), (3, 5), (2, 8), (0, 10), (10, 0), (7, 19), (40, 61),
                 (300, 360)]


@pytest.mark.parametrize(("b_only", "c_only"), MCNEMAR_TABLE)
@pytest.mark.parametrize("singletons", [False, True])
def test_one_item_per_cluster_is_exact_mcnemar(b_only, c_only, singletons):
    baseline, candidate = _pairs(b_only, c_only)
    clusters = [f"img{i}" for i in range(len(baseline))] if singletons else None
    result = paired_test(baseline, candidate, clusters=clusters)
    assert result.p_value == pytest.approx(mcnemar_exact(b_only, c_only), rel=1e-9, abs=1e-15)
    assert (result.b_only, result.c_only, result.method) == (b_only, c_only, "exact")
    assert result.n_clusters == len(baseline)


def _clustered(seed: int = 0, n_images: int = 30, per_image: int = 6):
    rng = np.random.default_rng(seed)
    baseline, candidate, clusters = [], [], []
    for image in range(n_images):
        lift = rng.random() < 0.5  # the candidate helps on some images as a whole
        for _ in range(per_image):
            b = bool(rng.random() < 0.5)
            baseline.append(b)
            candidate.append(True if lift else b and rng.random() < 0.8)
            clusters.append(f"image-{image}")
    return baseline, candidate, clusters


@pytest.mark.parametrize("copies", [2, 5, 31])
def test_copying_every_question_equally_inside_its_cluster_changes_nothing(copies):
    baseline, candidate, clusters = _clustered()
    once = paired_test(baseline, candidate, clusters=clusters)
    rep = lambda xs: [x for x in xs for _ in range(copies)]  # noqa: E731
    many = paired_test(rep(baseline), rep(candidate), clusters=rep(clusters))
    assert many.p_value == pytest.approx(once.p_value, rel=1e-12)
    assert many.diff == pytest.approx(once.diff)
    assert (many.diff_low, many.diff_high) == pytest.approx((once.diff_low, once.diff_high))
    assert many.n == copies * once.n and many.n_clusters == once.n_clusters


def test_copying_some_questions_reweights_their_cluster_but_adds_no_unit():
    """The invariance is for equal copies only: extra copies of one question weigh its cluster
    more (its summed difference grows), so p may move; the test still counts clusters."""
    baseline = [False, False, True, True, True, False, True]
    candidate = [True, True, False, False, False, True, False]
    clusters = ["a", "a", "b", "c", "d", "e", "f"]
    once = paired_test(baseline, candidate, clusters=clusters)
    extra = 6  # question 0 of image "a" asked six more times
    more = paired_test(baseline + [False] * extra, candidate + [True] * extra,
                       clusters=clusters + ["a"] * extra)
    assert more.n_clusters == once.n_clusters == 6 and more.n == once.n + extra
    assert more.p_value != pytest.approx(once.p_value)


def test_copies_without_clusters_would_look_significant():
    # What the cluster-aware test protects against: 31 copies of a small lift.
    baseline, candidate = _pairs(3, 6)
    per_question = paired_test(baseline, candidate)
    copied = [x for x in baseline for _ in range(31)], [x for x in candidate for _ in range(31)]
    clusters = [i for i in range(len(baseline)) for _ in range(31)]
    naive = paired_test(*copied)
    honest = paired_test(*copied, clusters=clusters)
    assert naive.p_value < 0.001 < per_question.p_value == pytest.approx(honest.p_value)


def test_clusters_that_move_together_widen_the_interval():
    baseline, candidate, clusters = _clustered(seed=3)
    naive = paired_test(baseline, candidate)
    honest = paired_test(baseline, candidate, clusters=clusters)
    assert honest.diff == naive.diff
    assert honest.diff_high - honest.diff_low > naive.diff_high - naive.diff_low
    assert honest.p_value > naive.p_value


def test_sign_flip_exact_by_hand():
    # clusters with differences +3, -1, +2: 8 sign patterns, sums 4, -2, 6, 0, -6, 0, -4, 2
    # ... |sum| >= 4 in 4 of 8 patterns.
    assert sign_flip_p([3, -1, 2]) == (pytest.approx(0.5), "exact")
    assert sign_flip_p([0, 0]) == (1.0, "exact")


def test_sign_flip_monte_carlo_is_seeded_and_close_to_exact(monkeypatch):
    diffs = [3, -1, 2, 4, 1, 1, -2, 5, 2, 1, 3, -1, 2, 2]
    exact, method = sign_flip_p(diffs)
    assert method == "exact"
    monkeypatch.setattr("core.stats.EXACT_MAX_WORK", 0)
    first = sign_flip_p(diffs, seed=4)
    assert first == sign_flip_p(diffs, seed=4) and first[1] == "monte carlo"
    assert first[0] == pytest.approx(exact, abs=0.01)


def test_paired_test_checks_its_inputs():
    with pytest.raises(ValueError, match="same items"):
        paired_test([True], [True, False])
    with pytest.raises(ValueError, match="one cluster per item"):
        paired_test([True, False], [True, True], clusters=["a"])


def test_group_outcomes_are_circular():
    rows = [{"index": g + r * 1_000_000, "correct": not (g == 1 and r == 2)}
            for g in range(3) for r in range(3)]
    assert group_outcomes(rows) == {0: True, 1: False, 2: True}


def test_comparison_alpha_spends_at_most_alpha():
    assert comparison_alpha(0.05, 1) == pytest.approx(0.05 * 6 / math.pi**2)
    assert comparison_alpha(0.05, 3) == pytest.approx(0.05 * 6 / (9 * math.pi**2))
    assert sum(comparison_alpha(0.05, k) for k in range(1, 100_000)) < 0.05
    with pytest.raises(ValueError, match="from 1"):
        comparison_alpha(0.05, 0)


def test_is_better_at_the_comparison_alpha():
    baseline, candidate = _pairs(0, 6)  # p = 2 / 2**6 = 0.03125
    result = paired_test(baseline, candidate)
    assert is_better(result, comparison_alpha(0.1, 1))  # 0.0608
    assert not is_better(result, comparison_alpha(0.1, 2))  # 0.0152


def test_accuracy_interval_by_cluster_bootstrap():
    correct = [i % 2 == 0 for i in range(60)] * 1
    clusters = [i // 2 for i in range(60)]  # one right and one wrong per image
    honest = accuracy(correct, clusters)
    assert honest.value == 0.5 and honest.low == honest.high == 0.5  # no image varies
    lumpy = accuracy([i < 30 for i in range(60)], [i // 10 for i in range(60)])
    wilson = accuracy([i < 30 for i in range(60)])
    assert lumpy.high - lumpy.low > wilson.high - wilson.low
    assert cluster_bootstrap([]) == (0.0, 0.0)
