"""bench/cuda_check.py: a clean skip without CUDA, and its batch-invariance check on the CPU."""

from __future__ import annotations

import re

import pytest


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("cuda_check")


def test_without_cuda_it_skips_and_exits_0(bench, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "skipped" in out and "[PASS]" not in out


def test_batch_invariance_on_cpu_fp32(bench, capsys):
    from core.demo.world import ensure_demo_world

    ensure_demo_world()
    result = bench.batch_invariance("cpu", "float32", n=12, batch_size=16)
    for bench_name in ("gqa_ru", "mmbench_ru"):
        r = result[bench_name]
        assert r["n"] >= 12 and r["identical"] == r["n"] and r["agreement"] == 1.0
        assert r["differ"] == [] and r["accuracy_batch_1"] == r["accuracy_batch_16"]
        assert r["prefix_cache_agreement"] == 1.0 and r["prefix_cache_differ"] == []
    assert bench.main(["--cpu", "--n", "12"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] batch invariance gqa_ru (cpu, float32, batch 1 vs 16): agreement" in out
    assert "[PASS] prefix cache mmbench_ru (cpu, float32, with vs without): agreement" in out
    assert "cuda_check: 4/4 passed" in out


def test_prefix_cache_check_reports_a_broken_cache(bench, capsys, monkeypatch):
    import core.evaluate

    real = core.evaluate.evaluate

    def broken_cache(vlm, examples, *args, prefix_cache=True, **kwargs):
        result = real(vlm, examples, *args, prefix_cache=prefix_cache, **kwargs)
        if prefix_cache and len(examples) > 1 and kwargs.get("batch_size", 16) > 1:
            result.samples[-1]["output"] += " сломано"
        return result

    monkeypatch.setattr(core.evaluate, "evaluate", broken_cache)
    assert bench.main(["--cpu", "--n", "4"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"\[FAIL\] prefix cache gqa_ru \(cpu, float32, with vs without\): "
                     r"agreement (\d+)/(\d+) .*сломано", out)


def test_batch_invariance_reports_the_outputs_that_differ(bench, capsys, monkeypatch):
    import core.evaluate

    real = core.evaluate.evaluate

    def padded_wrong(vlm, examples, *args, batch_size=16, **kwargs):
        result = real(vlm, examples, *args, batch_size=batch_size, **kwargs)
        if batch_size > 1:  # a batching bug: the first answer of every batched run changes
            result.samples[0]["output"] += " сломано"
        return result

    monkeypatch.setattr(core.evaluate, "evaluate", padded_wrong)
    assert bench.main(["--cpu", "--n", "4"]) == 1
    out = capsys.readouterr().out
    found = re.search(r"\[FAIL\] batch invariance gqa_ru \(cpu, float32, batch 1 vs 16\): "
                      r"agreement (\d+)/(\d+)", out)
    assert found and int(found[1]) == int(found[2]) - 1  # exactly the one changed answer
    assert "сломано" in out and "FAILED: batch invariance gqa_ru" in out
