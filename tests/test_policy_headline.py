"""Every cycle can change the headline: the policy under little time and --objective benchmark.

Under ``--objective benchmark`` a prompt or decoding setting cannot win by itself; it is worth a
cycle only when the context distillation that turns it into an adapter can follow it, and a
setting that gained is distilled in the very next cycle. Nothing is chosen that does not fit in
the time left, and the strategies' estimates say what they would need, so a chosen strategy
never fails for lack of time.
"""

from __future__ import annotations

import json

import pytest

import strategies
from core.error_profile import ErrorProfile
from loop.policy import choose, stop_reason
from strategies.base import ProposalFailed
from tests import test_strategies as shared
from tests.test_strategies import make_ctx

world, fake_data = shared.world, shared.fake_data  # the strategies' synthetic world fixtures

CATALOG = {name: type(strategies.get(name)) for name in
           ("prompt_constraints", "generation_params", "answer_format_sft", "context_distill")}
COSTS = {"prompt_constraints": 10.0, "generation_params": 12.0, "answer_format_sft": 200.0,
         "context_distill": 150.0}
DISTILL_S = 60.0
"""The least seconds a context distillation needs after a setting."""


def _profiles():
    def one(b):
        return ErrorProfile(b, n=100, n_errors=50, counts={"format_mismatch": 25, "color": 25},
                            shares={"format_mismatch": 0.5, "color": 0.5}, per_category={},
                            examples={})
    return {b: one(b) for b in ("gqa_ru", "mmbench_ru")}


def _choose(history, left, follow_up_s=DISTILL_S, costs=COSTS, exhausted=frozenset()):
    ranking: list[dict] = []
    choice = choose(_profiles(), history, dict(costs), left, set(exhausted), CATALOG,
                    objective="benchmark", follow_up_s=follow_up_s, ranking_out=ranking)
    return choice, {r["strategy"]: r.get("skipped", "") for r in ranking}, ranking


def _setting(gain: float, index: int = 1, strategy: str = "prompt_constraints") -> dict:
    return {"index": index, "strategy": strategy, "status": "rejected", "gain": gain,
            "setting_only": True}


def test_a_setting_is_measured_when_its_distillation_fits_after_it():
    choice, _, _ = _choose([], left=10_000)
    assert choice.strategy == "prompt_constraints"
    assert "context distillation" in choice.rationale and "fits after it" in choice.rationale


def test_a_setting_whose_distillation_would_not_fit_is_not_measured():
    # 10 s for the setting + 60 s to distil it > 65 s; nothing that trains fits either
    choice, skipped, ranking = _choose([], left=65)
    assert choice is None
    assert "only the context_distill after it could change the headline" in \
        skipped["prompt_constraints"]
    assert "both need ~70 s, 65 s left" in skipped["prompt_constraints"]
    assert "needs ~3 min, 65 s left" in skipped["answer_format_sft"]
    reason = stop_reason(ranking, 65)
    assert reason.startswith("no strategy fits in the 65 s left")
    assert "answer_format_sft: needs ~3 min" in reason


def test_without_a_distiller_a_setting_cannot_change_the_headline():
    choice, skipped, _ = _choose([], left=10_000, follow_up_s=None)
    assert choice.strategy == "answer_format_sft"
    assert "no context_distill can follow it" in skipped["prompt_constraints"]
    assert "no context_distill can follow it" in skipped["generation_params"]


def test_a_setting_that_gained_is_distilled_in_the_next_cycle():
    choice, _, _ = _choose([_setting(0.03, index=4)], left=10_000)
    assert choice.strategy == "context_distill"
    assert "cycle 4's winning prompt/decoding setting" in choice.rationale
    assert "scheduled right after it" in choice.rationale


def test_a_setting_that_did_not_gain_feeds_no_distillation():
    choice, skipped, _ = _choose([_setting(-0.01)], left=10_000)
    assert choice.strategy == "answer_format_sft"
    assert "waits for a prompt or decoding setting that wins" in skipped["context_distill"]
    assert "one was already tried for this champion" in skipped["generation_params"]


def test_a_distilled_setting_is_not_distilled_twice():
    history = [_setting(0.03, index=1),
               {"index": 2, "strategy": "context_distill", "status": "rejected", "gain": -0.1}]
    choice, _, _ = _choose(history, left=10_000)
    assert choice.strategy == "answer_format_sft"


def test_a_distillation_that_does_not_fit_is_not_forced():
    choice, skipped, _ = _choose([_setting(0.03)], left=50)
    assert choice is None
    assert "needs ~2 min, 50 s left" in skipped["context_distill"]


@pytest.mark.parametrize("name", ["answer_format_sft", "context_distill", "optuna_hpo"])
def test_what_the_policy_lets_through_never_fails_for_lack_of_time(name, tmp_path, fake_data,
                                                                    world):
    """Sweep the time left: whenever the estimate fits, the proposal does not fail for time;
    whenever it fails for time, the estimate did not fit (so the policy never chose it)."""
    seen = set()
    for left in (5, 20, 40, 60, 80, 100, 130, 170, 220, 300, 600, 1200):
        storage = f"sqlite:///{tmp_path / f'optuna-{left}.db'}"
        ctx, _ = make_ctx(tmp_path / str(left), fake_data, world.protected, time_left=left,
                          history=shared.history_for(name), storage=storage)
        strategy = strategies.get(name)
        fits = strategy.estimate_cost(ctx) <= left
        try:
            strategy.propose(ctx)
            failed = None
        except ProposalFailed as exc:
            failed = str(exc)
        for_time = failed is not None and any(w in failed for w in ("left", "no time"))
        assert not (fits and for_time), f"{left} s left: estimate fits but {failed}"
        seen.add(fits)
    assert seen == {True, False}  # the sweep crosses the strategy's threshold


def test_cycles_that_end_for_lack_of_time_say_why_in_the_log(tmp_path, capsys):
    import argparse

    from loop.commands import log
    from loop.controller import Loop, RunConfig
    from loop.store import Store

    _, _, ranking = _choose([], left=65)
    with Store(tmp_path / "e.db") as store:
        run_id = store.create_run(config={"objective": "benchmark"}, environment={},
                                  budget_s=300, preset="demo", gpu="cpu")
        loop = Loop(RunConfig(budget_s=300, preset="demo"), store, echo=lambda msg: None)
        loop.run_id = run_id
        loop.end_cycles(3, stop_reason(ranking, 65), 65, ranking)
        stored = store.proposal(run_id, 3, "cycles-end")["payload"]
        assert stored["time_left_s"] == 65 and stored["reason"].startswith("no strategy fits")
    log.run(argparse.Namespace(db=str(tmp_path / "e.db"), json=True))
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["cycles_ended"] == stop_reason(ranking, 65)
    assert "answer_format_sft: needs ~3 min, 65 s left" in run["cycles_ended"]
