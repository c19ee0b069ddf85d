"""A short check of the CUDA training paths on a tiny random LLaVA; skips without a GPU.

Checks, each printed PASS or FAIL with its figures:

1. 4-bit NF4 load on CUDA: only language-model linears quantized (vision tower, projector,
   lm_head stay fp16), weights on the GPU.
2. t4 profile training: fp16 autocast with a GradScaler, LoRA weights fp32, gradient
   checkpointing, paged 8-bit AdamW; loss finite and falling, LoRA weights moved.
3. OOM backoff: a real CUDA out-of-memory (an impossible allocation inside the step) makes the
   trainer halve the micro-batch and finish with the same effective batch.
4. Adapter round trip on CUDA: reload the 4-bit base with the adapter, same logits.
5. bf16 profile (a100/h100) when the GPU has bf16.
6. Batch invariance: the demo model in fp16 answers the same GQA-ru and MMBench-ru dev
   questions at batch 1 and at batch 16; the agreement rate of the raw outputs, which ones
   differ, and both accuracies (lmms-eval #236 saw a llava score fall from 69.6 to 58.7 going
   from batch 1 to 2).
7. Prefix cache: the same questions at batch 16 with each image's prompt prefix computed once
   (the default) against every prompt computed whole (``--no-prefix-cache``); the agreement.

    .venv/bin/python bench/cuda_check.py [--n 64]
    .venv/bin/python bench/cuda_check.py --cpu --n 16   # checks 6 and 7 only, fp32 on the CPU
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CORPUS = ["Есть ли на картинке красный квадрат?", "Ответь одним словом.", "да", "нет",
          "красный", "синий", "зелёный", "На картинке синий квадрат.", "Какого цвета квадрат?"]
COLORS = {"красный": (220, 30, 30), "синий": (30, 30, 220), "зелёный": (30, 200, 30)}


def records(n: int) -> list[dict]:
    from PIL import Image

    names = list(COLORS)
    out = []
    for i in range(n):
        shown, asked = names[i % 3], names[(i // 3) % 3]
        out.append({"id": f"r{i}", "image": Image.new("RGB", (48, 48), COLORS[shown]),
                    "source": "cuda_check", "conversations": [
                        {"from": "human", "value": f"Есть ли на картинке {asked} квадрат?\n"
                                                   "Ответь одним словом."},
                        {"from": "gpt", "value": "да" if shown == asked else "нет"}]})
    return out


def logits(vlm, recs):
    import torch

    from core.processor import LLaVADataProcessor

    proc = LLaVADataProcessor(vlm.processor)
    batch = proc.collate(proc.encode_all(recs))
    batch.pop("labels")
    with torch.no_grad():
        return vlm.model(**{k: v.to(vlm.device) for k, v in batch.items()}).logits.float()


def batch_invariance(device: str, dtype: str, *, n: int = 64, batch_size: int = 16,
                     benchmarks: tuple[str, ...] = ("gqa_ru", "mmbench_ru"),
                     show: int = 10) -> dict:
    """Answer the same demo dev questions at batch 1 and at ``batch_size``; compare outputs.

    Returns:
        Per benchmark: ``n``, ``identical`` (raw outputs equal), ``agreement`` (their share),
        ``accuracy_batch_1`` and ``accuracy_batch_<batch_size>`` (lmms-eval protocol), and
        ``differ`` (up to ``show`` sample ids with both outputs).
    """
    from core.data import load_benchmark
    from core.evaluate import evaluate
    from core.model import LoadOptions, load_vlm
    from core.splits import make_splits, stratified_subset
    from loop.sources import resolve_sources

    sources = resolve_sources("demo")
    vlm = load_vlm(sources.model, options=LoadOptions(device=device, dtype=dtype))
    out = {}
    for bench in benchmarks:
        examples = stratified_subset(make_splits(load_benchmark(bench, sources.data))["dev"], n)
        one = evaluate(vlm, examples, batch_size=1, progress=False)
        many = evaluate(vlm, examples, batch_size=batch_size, progress=False)
        whole = evaluate(vlm, examples, batch_size=batch_size, progress=False, prefix_cache=False)
        batched = {s["sample_id"]: s["output"] for s in many.samples}
        no_cache = [s for s in whole.samples if s["output"] != batched[s["sample_id"]]]
        differ = [{"sample_id": s["sample_id"], "batch_1": s["output"],
                   f"batch_{batch_size}": batched[s["sample_id"]]}
                  for s in one.samples if s["output"] != batched[s["sample_id"]]]
        out[bench] = {"n": len(examples), "identical": len(examples) - len(differ),
                      "agreement": 1 - len(differ) / len(examples),
                      "accuracy_batch_1": one.metrics["accuracy"],
                      f"accuracy_batch_{batch_size}": many.metrics["accuracy"],
                      "differ": differ[:show],
                      "prefix_cache_identical": len(examples) - len(no_cache),
                      "prefix_cache_agreement": 1 - len(no_cache) / len(examples),
                      "prefix_cache_differ": [
                          {"sample_id": s["sample_id"], "cached": batched[s["sample_id"]],
                           "whole_prompt": s["output"]} for s in no_cache[:show]]}
    return out


def check_batch_invariance(check, device: str, dtype: str, n: int, min_agreement: float) -> None:
    """Check 6: batch 1 against batch 16, PASS when at least ``min_agreement`` of the outputs
    are identical on every benchmark."""
    t0 = time.time()
    result = batch_invariance(device, dtype, n=n)
    for bench, r in result.items():
        differ = "; ".join(f"{d['sample_id']}: {d['batch_1']!r} vs {d['batch_16']!r}"
                           for d in r["differ"])
        check(f"batch invariance {bench} ({device}, {dtype}, batch 1 vs 16)",
              r["agreement"] >= min_agreement,
              f"agreement {r['identical']}/{r['n']} ({100 * r['agreement']:.1f}%), accuracy "
              f"{100 * r['accuracy_batch_1']:.1f}% at batch 1 vs "
              f"{100 * r['accuracy_batch_16']:.1f}% at batch 16"
              + (f"; differ: {differ}" if differ else "") + f" ({time.time() - t0:.1f} s)")
        differ = "; ".join(f"{d['sample_id']}: {d['cached']!r} vs {d['whole_prompt']!r}"
                           for d in r["prefix_cache_differ"])
        check(f"prefix cache {bench} ({device}, {dtype}, with vs without)",
              r["prefix_cache_agreement"] >= min_agreement,
              f"agreement {r['prefix_cache_identical']}/{r['n']} "
              f"({100 * r['prefix_cache_agreement']:.1f}%)" + (f"; differ: {differ}" if differ else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="run only the batch-invariance and prefix-cache checks, in fp32 on "
                        "the CPU")
    parser.add_argument("--n", type=int, default=64,
                        help="dev questions per benchmark in the batch-invariance check")
    args = parser.parse_args(argv)
    import torch

    results: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        results.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    if args.cpu:
        # fp32 on the CPU: the same kernels at every batch size, so every output must agree
        check_batch_invariance(check, "cpu", "float32", args.n, min_agreement=1.0)
        return _summary(results)
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA GPU visible to torch; skipped (nothing to check on CPU; "
              "--cpu runs the batch-invariance check in fp32).")
        return 0
    logging.basicConfig(level=logging.WARNING)
    import bitsandbytes as bnb

    from core.demo.tiny_model import build_tiny_llava, train_tokenizer
    from core.device import detect_gpu, resolve_profile
    from core.model import load_vlm
    from core.train import TrainConfig, TrainHooks, train_lora

    gpu = detect_gpu()
    print(f"cuda_check on {gpu.name} (compute capability {gpu.capability[0]}."
          f"{gpu.capability[1]}, {gpu.memory_gb} GB), torch {torch.__version__}, "
          f"bitsandbytes {bnb.__version__}")
    tmp = Path(tempfile.mkdtemp(prefix="cuda_check-"))
    model, processor = build_tiny_llava(train_tokenizer(CORPUS * 8), seed=0)
    model.save_pretrained(tmp / "base")
    processor.save_pretrained(tmp / "base")
    t4 = resolve_profile("t4", micro_batch_size=4)
    data = records(32)

    # 1. 4-bit load
    vlm = load_vlm(tmp / "base", options=t4.load_options())
    quantized = [n for n, m in vlm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    vision_dtypes = {str(p.dtype) for n, p in vlm.model.named_parameters() if "vision_tower" in n}
    check("4-bit NF4 load", quantized and all(".language_model." in n for n in quantized)
          and vlm.device.type == "cuda" and vision_dtypes == {"torch.float16"},
          f"{len(quantized)} Linear4bit modules, all in the language model; vision tower "
          f"{sorted(vision_dtypes)}; device {vlm.device}")

    # 2. t4 training: fp16 autocast + scaler + checkpointing + paged 8-bit AdamW
    t0 = time.time()
    result = train_lora(vlm, data[:16], TrainConfig(steps=6, batch_size=8, lr=5e-3),
                        tmp / "t4", profile=t4, adapter_name="t4")
    lora = {n: p for n, p in vlm.model.named_parameters() if "lora_" in n and ".t4." in n}
    moved = any(float(p.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)
    curve = result.loss_curve
    check("t4 training (fp16 autocast, GradScaler, checkpointing, paged AdamW 8-bit)",
          result.status == "finished" and moved and curve and curve[-1] < curve[0]
          and {str(p.dtype) for p in lora.values()} == {"torch.float32"},
          f"status {result.status}, loss {curve[0] if curve else None} -> "
          f"{curve[-1] if curve else None}, LoRA dtypes {sorted({str(p.dtype) for p in lora.values()})}, "
          f"{result.tokens_per_s} tokens/s, peak {result.peak_memory_gb} GB, "
          f"{time.time() - t0:.1f} s")

    # 3. OOM backoff with a real CUDA out-of-memory error
    def real_oom(event):
        if event.micro_batch_size > 1:
            torch.empty(int(gpu.memory_gb * 2e9), dtype=torch.uint8, device="cuda")

    result = train_lora(vlm, data[16:], TrainConfig(steps=2, batch_size=8, lr=5e-3),
                        tmp / "oom", profile=t4, adapter_name="oom",
                        hooks=TrainHooks(before_micro_step=real_oom))
    check("OOM backoff", result.status == "finished" and result.micro_batch_size == 1
          and result.oom_retries == 2 and result.samples == 16,
          f"status {result.status}, micro-batch 4 -> {result.micro_batch_size}, "
          f"{result.oom_retries} retries, {result.samples} samples in {result.steps} steps")

    # 4. round trip of the t4 adapter on a fresh 4-bit base
    vlm.set_adapter("t4")
    before = logits(vlm, data[:4])
    fresh = load_vlm(tmp / "base", options=t4.load_options(), adapter=tmp / "t4")
    diff = float((logits(fresh, data[:4]) - before).abs().max())
    check("adapter round trip (4-bit, CUDA)", diff < 1e-2, f"max |logit difference| {diff:.2e}")
    del vlm, fresh
    torch.cuda.empty_cache()

    # 5. bf16 profile
    if gpu.bf16:
        bf = resolve_profile("auto")
        vlm = load_vlm(tmp / "base", options=bf.load_options())
        result = train_lora(vlm, data, TrainConfig(steps=4, batch_size=8, lr=5e-3),
                            tmp / "bf16", profile=bf, adapter_name="bf16")
        curve = result.loss_curve
        check(f"{bf.name} profile (bf16 autocast, no scaler)",
              result.status == "finished" and curve[-1] < curve[0],
              f"loss {curve[0]} -> {curve[-1]}, {result.tokens_per_s} tokens/s")
    else:
        print("[SKIP] bf16 profile: this GPU has no bf16")

    # 6. and 7. batch invariance and the prefix cache in fp16: kernels may differ with the batch shape, so a few
    # near-tie answers may flip; a padding or masking bug would flip many
    check_batch_invariance(check, "cuda", "float16", args.n, min_agreement=0.95)
    return _summary(results)


def _summary(results: list[tuple[str, bool, str]]) -> int:
    failed = [name for name, ok, _ in results if not ok]
    print(f"cuda_check: {len(results) - len(failed)}/{len(results)} passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
