"""context_distill: a winning prompt/decoding setting becomes an adapter judged under lmms-eval."""

from __future__ import annotations

import pytest

import strategies
from core.evaluate import EvalConfig, build_prompt
from strategies.base import ProposalFailed
from strategies.guard import check_records, template_questions
from tests import test_strategies as shared
from tests.test_strategies import make_ctx, winning_history

world, fake_data = shared.world, shared.fake_data  # the strategies' synthetic world fixtures


def test_context_distill_trains_on_training_questions_answered_under_the_winning_setting(
        tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, history=winning_history())
    cand = strategies.get("context_distill").propose(ctx)
    assert cand.eval_configs == {"gqa_ru": EvalConfig(), "mmbench_ru": EvalConfig()}
    assert cand.details["benchmarks"] == ["gqa_ru"] and cand.details["source_cycle"] == 1
    (gen,) = fakes.eval_calls
    assert gen["config"] == EvalConfig(max_new_tokens=8, stop_strings=["\n", "."])
    train_ids = {e["id"] for e in world.train}
    assert all(ex["id"].removeprefix("gqa-short-") in train_ids for ex in gen["examples"])
    (call,) = fakes.train_calls
    records = call["records"]
    assert records and all(r["conversations"][1]["value"] == "да" for r in records)
    for r in records:  # the standard lmms-eval prompt is the input
        q = r["meta"]["question"]
        assert r["conversations"][0]["value"] == build_prompt(
            {"benchmark": "gqa_ru", "question": q}, EvalConfig())
    check_records(records, world.protected, allowed_questions=template_questions(world.train))


def test_context_distill_distills_multiple_choice_as_letters(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected,
                          history=winning_history("mmbench_ru"))
    strategies.get("context_distill").propose(ctx)
    (gen,) = fakes.eval_calls
    assert gen["benchmark"] == "mmbench_ru" and all(ex["options"] for ex in gen["examples"])
    records = fakes.train_calls[0]["records"]
    assert {r["conversations"][1]["value"] for r in records} == {"A"}
    for r in records:  # the standard lmms-eval prompt is the input
        assert r["conversations"][0]["value"] == build_prompt(
            {"benchmark": "mmbench_ru", "question": r["meta"]["question"], "hint": None,
             "options": r["meta"]["options"]}, EvalConfig())


@pytest.mark.parametrize("history", [
    [],
    winning_history(gain=-0.02),
    winning_history(adapter_path="/elsewhere/adapter"),  # won on another champion
])
def test_context_distill_without_a_winning_setting_fails_and_waits(history, tmp_path, fake_data,
                                                                   world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, history=history)
    with pytest.raises(ProposalFailed, match="nothing to distill"):
        strategies.get("context_distill").propose(ctx)
    assert not fakes.train_calls


def test_context_distill_waits_in_the_policy_until_a_setting_wins():
    cls = type(strategies.get("context_distill"))
    assert "wins on dev" in cls.waiting([])
    assert cls.waiting(winning_history()) is None
    # a setting that won with an earlier champion is nothing to distill
    accepted = {"index": 2, "strategy": "answer_format_sft", "status": "accepted", "gain": 0.3}
    assert "wins on dev with this champion" in cls.waiting(winning_history() + [accepted])
    assert set(cls.addresses) >= set(type(strategies.get("prompt_constraints")).addresses)
