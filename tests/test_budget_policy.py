"""Budget arithmetic, the cost model and the policy's choices (pure logic, no model)."""

from __future__ import annotations

import pytest

from core.error_profile import ErrorProfile
from core.exceptions import UserError
from loop.budget import Budget, CostModel, dev_subset_size, final_subset_size, parse_duration
from loop.policy import choose
from strategies.base import CostRates


@pytest.mark.parametrize("text,seconds", [("6h", 21600), ("90m", 5400), ("1h30m", 5400),
                                          ("45s", 45), ("300", 300), (" 2h ", 7200), ("0.5h", 1800)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["6x", "", "h", "-5m", "0", "0h"])
def test_parse_duration_rejects_with_the_flag_named(text):
    with pytest.raises(UserError, match="--budget"):
        parse_duration(text)


def test_budget_keeps_the_reserve_and_counts_time_already_spent():
    now = [100.0]
    budget = Budget(1000, 0.2, spent_before=300, clock=lambda: now[0])
    assert budget.spent() == pytest.approx(300)
    assert budget.left_for_cycles() == pytest.approx(500)
    assert budget.fits(500) and not budget.fits(501)
    now[0] += 450
    assert budget.left_for_cycles() == pytest.approx(50)


def test_cost_model_moves_from_prior_to_measurement():
    costs = CostModel(CostRates({"gqa_ru": 1.0, "mmbench_ru": 1.0}, train_s_per_sample=2.0))
    costs.observe_eval("gqa_ru", 2000, 200.0)  # measured 0.1 s/sample
    assert 0.1 < costs.rates.eval_s_per_sample["gqa_ru"] < 0.12
    assert costs.rates.eval_s_per_sample["mmbench_ru"] == 1.0
    costs.observe_train(1000, 500.0)
    assert costs.rates.train_s_per_sample == pytest.approx((500 + 40) / 1020)


def test_subset_sizes_follow_the_budget():
    assert dev_subset_size(0.5, 20000, 4000) == 900  # 4.5% of the cycles' time, half each
    assert dev_subset_size(0.5, 100, 4000) == 100  # never below the floor
    assert dev_subset_size(0.5, 10**7, 4000) == 4000  # never above the split
    assert final_subset_size(0.5, 4000, 8000) == 2000


def _profile(bench, n, n_errors, shares):
    return ErrorProfile(benchmark=bench, n=n, n_errors=n_errors,
                        counts={k: int(v * n_errors) for k, v in shares.items()},
                        shares=shares, per_category={}, examples={})


FORMAT = {"gqa_ru": _profile("gqa_ru", 200, 150, {"format_mismatch": 0.9, "color": 0.1}),
          "mmbench_ru": _profile("mmbench_ru", 100, 90, {"format_mismatch": 1.0})}
COSTS = {"prompt_constraints": 60.0, "generation_params": 60.0, "answer_format_sft": 900.0,
         "optuna_hpo": 3000.0}


def test_format_errors_choose_a_cheap_remedy_first_with_a_rationale():
    choice = choose(FORMAT, [], COSTS, 10_000, set())
    assert choice.strategy in ("prompt_constraints", "generation_params")
    assert "format_mismatch is 90% of GQA-ru errors" in choice.rationale
    assert "has not been tried" in choice.rationale


def test_rejections_move_the_policy_on_and_hpo_waits_for_sft():
    history = [{"strategy": "prompt_constraints", "status": "rejected", "gain": 0.0},
               {"strategy": "generation_params", "status": "rejected", "gain": 0.0}] * 3
    choice = choose(FORMAT, history, COSTS, 10_000, set())
    assert choice.strategy == "answer_format_sft"
    hpo = next(r for r in choice.ranking if r["strategy"] == "optuna_hpo")
    assert "waits until answer_format_sft" in hpo["skipped"]


def test_nothing_that_does_not_fit_is_chosen():
    assert choose(FORMAT, [], COSTS, 30, set()) is None
    only_cheap = choose(FORMAT, [], COSTS, 100, {"prompt_constraints"})
    assert only_cheap.strategy == "generation_params"


def test_no_errors_means_no_cycle():
    perfect = {b: _profile(b, 100, 0, {}) for b in ("gqa_ru", "mmbench_ru")}
    assert choose(perfect, [], COSTS, 10_000, set()) is None


CONTENT = {"gqa_ru": _profile("gqa_ru", 192, 104, {"color": 0.45, "counting": 0.3, "location": 0.06,
                                                   "other": 0.16, "format_mismatch": 0.03}),
           "mmbench_ru": _profile("mmbench_ru", 158, 72, {"color": 0.35, "counting": 0.33,
                                                          "location": 0.12, "other": 0.17,
                                                          "format_mismatch": 0.03})}
"""The demo base's dev profile: content errors, format slips a small minority."""


def test_content_errors_choose_training_data_and_say_which_causes():
    # What the 5-minute demo does: one setting first (cheap; under --objective benchmark it is
    # measured for context distillation), then SFT data aimed at the content causes.
    setting = {"strategy": "prompt_constraints", "status": "rejected", "gain": 0.0,
               "setting_only": True}
    for history in ([setting], [setting, {**setting, "strategy": "generation_params"}]):
        choice = choose(CONTENT, history, {**COSTS, "answer_format_sft": 120.0}, 300, set(),
                        objective="benchmark")
        assert choice.strategy == "answer_format_sft"
        assert "color is 45% of GQA-ru errors" in choice.rationale
        assert "color is 35% of MMBench-ru errors" in choice.rationale
    by_name = {r["strategy"]: r for r in choice.ranking}
    assert by_name["answer_format_sft"]["expected_gain"] > 5 * by_name["prompt_constraints"]["expected_gain"]
