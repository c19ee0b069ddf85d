"""Evaluating an adapter between training steps (``TrainHooks.evaluate``): the model it sees,
that training goes on exactly as without it, and stopping."""

from __future__ import annotations

import random

import pytest
from square_records import logits, square_records

from core.train import TrainConfig, TrainHooks, train_lora

_records = square_records


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> TrainConfig:
    base = dict(steps=4, batch_size=4, micro_batch_size=2, lr=5e-3, max_length=128, seed=0,
                dropout=0.2, gradient_checkpointing=True)
    return TrainConfig(**{**base, **kw})


_logits = logits


def _lora(vlm, name) -> list:
    return [p.detach().clone() for k, p in vlm.model.named_parameters()
            if f".{name}." in k and "lora_" in k]


def test_evaluating_between_steps_sees_the_adapter_so_far_and_leaves_training_as_it_was(
        tiny_vlm_factory, tmp_path):
    import torch

    records = _records(8)
    plain_vlm = tiny_vlm_factory()
    plain = train_lora(plain_vlm, records, _config(), tmp_path / "plain", adapter_name="plain")
    vlm = tiny_vlm_factory()
    base_logits = _logits(vlm, records[:2])
    seen = []

    def evaluate(step, total):
        base = vlm.model.get_base_model()
        checkpointing = (base.is_activation_checkpointing
                         if hasattr(type(base), "is_activation_checkpointing")
                         else base.is_gradient_checkpointing)  # transformers < 5.x
        seen.append({"at": (step, total), "training": vlm.model.training,
                     "checkpointing": checkpointing,
                     "logits": _logits(vlm, records[:2])})
        torch.rand(3), random.random()  # an evaluation may draw random numbers
        return False

    result = train_lora(vlm, records, _config(), tmp_path / "evaluated", adapter_name="evald",
                        hooks=TrainHooks(evaluate_at=(0.25, 0.5, 0.75), evaluate=evaluate))
    assert [s["at"] for s in seen] == [(1, 4), (2, 4), (3, 4)]
    assert not any(s["training"] or s["checkpointing"] for s in seen)
    # the adapter as trained so far is in effect, and it changes from step to step
    assert not torch.allclose(seen[0]["logits"], base_logits)
    assert not torch.allclose(seen[0]["logits"], seen[2]["logits"])
    # training went on as if nothing had happened: same losses, same weights
    assert result.status == "finished" and result.steps == 4
    assert result.loss_curve == plain.loss_curve
    assert all(torch.equal(a, b) for a, b in zip(_lora(vlm, "evald"), _lora(plain_vlm, "plain"),
                                                 strict=True))


def test_an_evaluation_that_says_stop_stops_training_and_saves_nothing(tiny_vlm_factory,
                                                                       tmp_path):
    vlm = tiny_vlm_factory()
    out = tmp_path / "stopped"
    calls = []

    def evaluate(step, total):
        calls.append(step)
        return step >= 4

    result = train_lora(vlm, _records(8), _config(steps=8, checkpoint_every=1), out,
                        adapter_name="stopme",
                        hooks=TrainHooks(evaluate_at=(0.25, 0.5, 0.75), evaluate=evaluate))
    assert calls == [2, 4]
    assert result.status == "stopped" and result.steps == 4 and not result.ok
    assert result.adapter_path is None and not (out / "adapter_config.json").exists()
    assert not (out / "checkpoint").exists()
    assert "stopme" not in vlm.adapters
    assert "stopme" not in getattr(vlm.model, "peft_config", {})
