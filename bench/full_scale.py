"""LLaVA-Saiga-8B's exact architecture with random weights on a lent GPU: load, evaluate, train.

Nothing is downloaded: the model (Llama-3-8B text config, CLIP ViT-L/14-336, 2-layer GELU
projector, vocabulary 128,320) is built with random weights directly on the GPU, and goes
through the project's own code (``core.model.VLM``, ``core.evaluate.evaluate``,
``core.train.train_lora``). For each profile:

- ``t4``: the language model in 4-bit NF4 with double quantization, fp16 elsewhere, and the
  process capped with ``torch.cuda.set_per_process_memory_fraction`` to what a 16 GB T4 offers;
- ``a100``: bf16, no quantization.

It measures the build time (random init + quantization, standing in for the load), peak memory
and seconds per sample of generate evaluation at batch 1/4/8/16 and of the likelihood mode,
and one LoRA training step at micro-batch 1 and 2 with gradient checkpointing, then writes JSON.
Random weights never emit ``<|eot_id|>``, so every answer runs to ``max_new_tokens``: the
generate figures are the worst case. Without CUDA it says so and exits 0; ``--tiny`` runs the
same code at tiny width (on the CPU too), for tests.

    python bench/full_scale.py --out bench/full_scale.json
    python bench/full_scale.py --tiny --device cpu --profiles cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu")
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
T4_USABLE_BYTES = 15.0 * 2**30
"""What a 16 GB T4 offers a process (nvidia-smi shows about 15 GiB)."""
DTYPE = {"t4": "float16", "a100": "bfloat16", "cpu": "float32"}
EVAL_BATCHES = (1, 4, 8, 16)
TRAIN_MICRO_BATCHES = (1, 2)
CORPUS = ["Какого цвета круг?", "Ответь одним словом.", "Выбери правильный вариант ответа буквой.",
          "There are several options:", "красный синий зелёный жёлтый слева справа да нет"] * 4


def saiga_config(tiny: bool = False):
    """LlavaConfig of LLaVA-Saiga-8B (``tiny``: the same with 2 small layers per tower)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from core.demo import saiga_tiny as st

    text = dict(st.TEXT) if tiny else LLAMA3_8B
    vision = dict(st.VISION) if tiny else CLIP_L336
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(vocab_size=st.VOCAB_SIZE, bos_token_id=128000,
                                eos_token_id=128001, tie_word_embeddings=False, **text),
        image_token_index=st.SPECIAL_IDS["<image>"], image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu")


def build_vlm(profile: str, device: str, tiny: bool = False):
    """A random-weight VLM of the real architecture on ``device``; returns (vlm, seconds)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from core.checkpoint import fill_processor_fields
    from core.demo import saiga_tiny as st
    from core.model import VLM

    tokenizer = st.build_tokenizer(CORPUS)
    processor = _processor(tokenizer)
    config = saiga_config(tiny)
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, DTYPE[profile])
    _sync(device)
    t0 = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    if profile == "t4":
        quantize_nf4(model.model.language_model, device, dtype)
    model.generation_config.eos_token_id = 128001
    model.eval()
    _sync(device)
    seconds = time.perf_counter() - t0
    fill_processor_fields(processor, config)
    return VLM(model, processor, f"random LLaVA-Saiga-8B architecture{' (tiny)' if tiny else ''}"), seconds


def _processor(tokenizer):
    """CLIP at 336 px and the Llama-3 template; the patch fields come from the model config."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from core.demo import saiga_tiny as st

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
        image_mean=st.CLIP_MEAN, image_std=st.CLIP_STD)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          chat_template=st.CHAT_TEMPLATE)


def quantize_nf4(module, device: str, compute_dtype) -> int:
    """Replace every Linear under ``module`` by a bitsandbytes NF4 layer (double quantization)."""
    import bitsandbytes as bnb
    import torch

    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4").to(device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)
            count += 1
            del child
    return count


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def examples(benchmark: str, n: int) -> list[dict]:
    """Synthetic questions in the evaluators' record format, 336-pixel images."""
    from PIL import Image

    out = []
    for i in range(n):
        img = Image.new("RGB", (336, 336), ((40 * i) % 256, 120, 200))
        common = {"benchmark": benchmark, "id": f"{benchmark}{i}",
                  "question": "Какого цвета круг слева от квадрата?", "_image": lambda img=img: img}
        if benchmark == "gqa_ru":
            out.append({**common, "imageId": f"i{i}", "answer": "красный",
                        "types": {"structural": "query", "semantic": "attr", "detailed": "color"}})
        else:
            out.append({**common, "index": i, "hint": None, "answer": "A", "category": "color",
                        "options": {"A": "красный", "B": "синий", "C": "зелёный", "D": "жёлтый"}})
    return out


def train_records(n: int) -> list[dict]:
    from PIL import Image

    return [{"id": f"t{i}", "image": Image.new("RGB", (336, 336), (200, 30, 30)),
             "source": "bench", "conversations": [
                 {"from": "human", "value": "Какого цвета круг?\nОтветь одним словом."},
                 {"from": "gpt", "value": "красный"}]} for i in range(n)]


def measure(profile: str, device: str, *, tiny: bool = False,
            eval_batches=EVAL_BATCHES, micro_batches=TRAIN_MICRO_BATCHES) -> dict:
    """Every figure of one profile."""
    import torch

    from core.device import resolve_profile
    from core.evaluate import EvalConfig, evaluate
    from core.train import TrainConfig, train_lora

    _reset_peak(device)
    vlm, build_s = build_vlm(profile, device, tiny)
    result = {"profile": profile, "device": device, "tiny": tiny, "dtype": DTYPE[profile],
              "build_s": round(build_s, 2), "build_peak_gb": _peak_gb(device),
              "image_tokens": vlm.n_image_tokens, "eval": [], "train": []}
    if profile == "t4" and device.startswith("cuda"):
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, T4_USABLE_BYTES / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        result["memory_cap_gb"] = round(fraction * total / 2**30, 2)
    for mode, benchmark, batches in (("generate", "gqa_ru", eval_batches),
                                     ("likelihood", "mmbench_ru", (max(eval_batches[:3]),))):
        for batch in batches:
            _reset_peak(device)
            exs = examples(benchmark, 2 * batch)
            try:
                res = evaluate(vlm, exs, EvalConfig(mode=mode), batch_size=batch, progress=False)
                row = {"mode": mode, "batch": batch, "n": res.n if mode == "generate" else len(exs),
                       "s_per_sample": round(res.seconds / len(exs), 4)}
            except Exception as exc:  # noqa: BLE001 - an OOM here is a figure, not a crash
                row = {"mode": mode, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]}
            row["peak_gb"] = _peak_gb(device)
            result["eval"].append(row)
            print(json.dumps(row), flush=True)
    train_profile = resolve_profile(profile if device.startswith("cuda") else "cpu")
    for micro in micro_batches:
        _reset_peak(device)
        with tempfile.TemporaryDirectory() as tmp:
            # one sequence per record: the micro-batch measured is `micro` real-shaped rows
            config = TrainConfig(steps=1, batch_size=micro, micro_batch_size=micro,
                                 gradient_checkpointing=True, max_length=1024, lr=2e-4,
                                 pack_by_image=False)
            t0 = time.perf_counter()
            try:
                out = train_lora(vlm, train_records(micro), config, Path(tmp) / f"mb{micro}",
                                 profile=train_profile)
                row = {"micro_batch": micro, "status": out.status,
                       "s_per_step": round(time.perf_counter() - t0, 3)}
            except Exception as exc:  # noqa: BLE001
                row = {"micro_batch": micro, "error": f"{type(exc).__name__}: {exc}"[:300]}
        row["peak_gb"] = _peak_gb(device)
        result["train"].append(row)
        print(json.dumps(row), flush=True)
    del vlm
    _reset_peak(device)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", nargs="+", default=["t4", "a100"],
                        choices=sorted(DTYPE), help="profiles to measure (default: t4 a100)")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--tiny", action="store_true",
                        help="the same architecture at tiny width (tests, CPU)")
    parser.add_argument("--out", default="bench/full_scale.json", help="JSON file to write")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/full_scale.py: no CUDA GPU here; nothing measured (run it on a lent GPU, "
              "or use --tiny --device cpu --profiles cpu to check the code path)")
        return 0
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    report = {"gpu": gpu, "torch": torch.__version__, "results": []}
    for profile in args.profiles:
        print(f"== {profile} on {gpu}{' (tiny)' if args.tiny else ''}", flush=True)
        report["results"].append(measure(profile, args.device, tiny=args.tiny))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
