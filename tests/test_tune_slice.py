"""The HPO tune slice keeps whole units: an MMBench-ru rotation group is never cut in two."""

from __future__ import annotations

from strategies.hpo_trial import MAX_TUNE_PER_BENCHMARK, tune_slice


def _group(index: int, rotations: int) -> list[dict]:
    return [{"benchmark": "mmbench_ru", "id": str(index + r * 1_000_000),
             "index": index + r * 1_000_000} for r in range(rotations)]


def test_the_slice_never_cuts_a_rotation_group():
    # 66 groups of 3 rotations = 198 rows, then a group of 4 straddles the 200 boundary
    rows = [row for i in range(66) for row in _group(i, 3)] + _group(66, 4) + _group(67, 2)
    kept = tune_slice(rows)
    assert len(kept) == 198 and len(rows[:MAX_TUNE_PER_BENCHMARK]) == 200  # [:200] cut group 66
    assert {r["index"] % 1_000_000 for r in kept} == set(range(66))


def test_rotations_spread_through_the_list_stay_together():
    rows = _group(1, 2)[:1] + _group(2, 2) + _group(1, 2)[1:]
    assert [r["id"] for r in tune_slice(rows, limit=2)] == ["1", "1000001"]


def test_gqa_keeps_whole_images_and_a_big_first_unit_is_kept_whole():
    rows = [{"benchmark": "gqa_ru", "id": f"q{i}", "imageId": f"img{i // 5}"} for i in range(20)]
    assert [r["id"] for r in tune_slice(rows, limit=7)] == [f"q{i}" for i in range(5)]
    assert len(tune_slice(rows, limit=3)) == 5  # one unit even when it is larger than the limit
