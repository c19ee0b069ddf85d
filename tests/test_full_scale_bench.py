"""bench/full_scale.py: the full-size architecture, a clean skip without CUDA, the tiny path."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("full_scale")


def test_full_size_config_is_llava_saiga_8b(bench):
    import torch
    from transformers import LlavaForConditionalGeneration

    config = bench.saiga_config()
    text, vision = config.text_config, config.vision_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_key_value_heads,
            text.intermediate_size) == (128320, 4096, 32, 8, 14336)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size,
            vision.patch_size) == (1024, 24, 336, 14)
    assert config.image_token_index == 128256 and config.vision_feature_layer == -2
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    assert 8.3e9 < params < 8.4e9  # Llama-3-8B with 64 extra rows + CLIP-L + projector


def test_without_cuda_it_says_so_and_exits_0(bench, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path / "out.json")]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_tiny_run_on_cpu_measures_every_figure(bench):
    result = bench.measure("cpu", "cpu", tiny=True, eval_batches=(1, 2), micro_batches=(1, 2))
    assert result["image_tokens"] == 576
    modes = [(row["mode"], row["batch"]) for row in result["eval"]]
    assert modes == [("generate", 1), ("generate", 2), ("likelihood", 2)]
    assert all("error" not in row and row["s_per_sample"] > 0 for row in result["eval"])
    assert [row["micro_batch"] for row in result["train"]] == [1, 2]
    assert all(row.get("status") == "finished" for row in result["train"]), result["train"]
    json.dumps(result)
