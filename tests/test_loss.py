"""The training loss applies the LM head only at labelled positions, and equals the full one."""

from __future__ import annotations

import pytest

from tests.test_train import _records


@pytest.mark.slow
def test_the_labelled_loss_equals_the_models_own_and_never_builds_full_logits(tiny_vlm_factory):
    import torch

    from core.loss import labelled_loss
    from core.processor import IGNORE_INDEX, LLaVADataProcessor

    vlm = tiny_vlm_factory()
    proc = LLaVADataProcessor(vlm.processor)
    records = _records(5)
    records[1]["conversations"][1]["value"] = "нет, там другой цвет"  # rows of other lengths
    batch = proc.collate(proc.encode_all(records))
    shapes = []
    hook = vlm.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            full = vlm.model(**batch).loss
            ours = labelled_loss(vlm.model, batch)
    finally:
        hook.remove()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    vocab = vlm.model.get_output_embeddings().out_features
    assert ours.dtype == torch.float32 and float(ours) == pytest.approx(float(full), rel=1e-5)
    assert shapes[0] == (*batch["labels"].shape, vocab)  # the model's own: every position
    assert shapes[1] == (labelled, vocab) and labelled < batch["labels"].numel() // 4
    assert "labels" in batch  # the caller's batch is left as it was


@pytest.mark.slow
def test_loss_memory_bench_builds_full_logits_only_for_the_full_loss(load_bench):
    bench = load_bench("loss_memory")
    full = bench.one_step("demo", 2, "cpu", "own", "full")
    ours = bench.one_step("demo", 2, "cpu", "own", "labelled")
    assert full["logits_shape"] == [2, full["sequence"], full["vocab"]]
    assert ours["logits_shape"] == [ours["labelled_tokens"], ours["vocab"]]
    assert ours["loss_value"] == pytest.approx(full["loss_value"], abs=1e-3)
