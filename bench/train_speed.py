"""LoRA SFT speed on the demo model on this machine, and the T4 estimate for LLaVA-Saiga-8B.

Prints tokens/s, seconds per step and per sample, and peak memory for a short LoRA run on
GQA-ru demo train questions (cpu profile, or the one ``--gpu`` names); then the derivation of
the T4 priors that ``core.device.t4_priors()`` gives the loop's cost model.

``--packing`` instead runs ``python -m loop train`` (in this process) for one epoch over the
same GQA-ru train questions (drawn by image) twice, packed by image (the default) and with
``--no-packing``, and prints seconds, sequences, and image and text tokens per trained question.

    .venv/bin/python bench/train_speed.py [--steps 20] [--batch-size 16] [--4bit] [--json]
    .venv/bin/python bench/train_speed.py --packing [--preset demo|saiga-tiny] [--questions 256]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(steps: int, batch_size: int, gpu: str, load_in_4bit: bool | None,
            checkpointing: bool | None) -> dict:
    import random

    import torch

    from core.data import load_gqa
    from core.device import resolve_profile
    from core.model import load_vlm
    from core.sft import gqa_records
    from core.train import TrainConfig, train_lora
    from loop.sources import resolve_sources

    sources = resolve_sources("demo")
    profile = resolve_profile(gpu, load_in_4bit=load_in_4bit)
    rows = random.Random(0).sample(load_gqa(sources.data.gqa, "train"), (steps + 2) * batch_size)
    records = gqa_records(rows)
    vlm = load_vlm(sources.model, options=profile.load_options())
    with tempfile.TemporaryDirectory() as tmp:
        # Two warm-up steps, then the measured run on a fresh adapter.
        train_lora(vlm, records[:2 * batch_size], TrainConfig(steps=2, batch_size=batch_size),
                   Path(tmp) / "warmup", profile=profile)
        config = TrainConfig(steps=steps, batch_size=batch_size, lr=3e-3,
                             gradient_checkpointing=checkpointing, checkpoint_every=0,
                             checkpoint_every_s=0)
        t0 = time.perf_counter()
        result = train_lora(vlm, records[2 * batch_size:], config, Path(tmp) / "measured",
                            profile=profile)
        wall = time.perf_counter() - t0
    return {"device": profile.device, "profile": profile.name, "load_in_4bit": profile.load_in_4bit,
            "gradient_checkpointing": (profile.gradient_checkpointing if checkpointing is None
                                       else checkpointing),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "steps": result.steps, "batch_size": batch_size,
            "micro_batch_size": result.micro_batch_size, "status": result.status,
            "tokens_per_s": result.tokens_per_s, "step_seconds": result.step_seconds,
            "train_s_per_sample": round(1 / result.samples_per_s, 4) if result.samples_per_s else None,
            "tokens_per_sample": round(result.tokens / max(result.samples, 1), 1),
            "wall_seconds_with_encoding_and_save": round(wall, 2),
            "peak_memory_gb": result.peak_memory_gb, "memory_kind": result.memory_kind,
            "loss_first_last": [result.loss_curve[0], result.loss_curve[-1]]
            if result.loss_curve else None}


def loop_train(preset: str, limit: int, batch_size: int, gpu: str, out: Path, *,
               packing: bool = True, steps: int | None = None) -> dict:
    """``python -m loop train`` in this process (GQA-ru train, drawn by image, no evaluation);
    its ``--json`` report."""
    import contextlib
    import io

    from loop.cli import main as loop_main

    argv = ["-q", "train", "--preset", preset, "--source", "gqa_train", "--limit", str(limit),
            "--batch-size", str(batch_size), "--gpu", gpu, "--eval-limit", "0",
            "--out", str(out), "--json"]
    argv += ["--steps", str(steps)] if steps else ["--epochs", "1"]
    argv += [] if packing else ["--no-packing"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = loop_main(argv)
    if rc != 0:
        raise SystemExit(f"loop train failed ({rc}): {buf.getvalue()[-2000:]}")
    return json.loads(buf.getvalue())


def measure_packing(preset: str, n_questions: int, batch_size: int, gpu: str) -> dict:
    """One epoch of ``loop train`` over the same GQA-ru train questions (drawn by image),
    packed by image (the default) and with ``--no-packing``."""
    import torch

    out = {"preset": preset, "questions": n_questions, "batch_size": batch_size,
           "threads": torch.get_num_threads(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        loop_train(preset, 2 * batch_size, batch_size, gpu, Path(tmp) / "warmup", steps=2)
        for name, pack in (("one record per question", False), ("packed by image", True)):
            report = loop_train(preset, n_questions, batch_size, gpu,
                                Path(tmp) / name.replace(" ", "-"), packing=pack)
            t, done = report["train"], report["trained"]
            questions = max(done["questions"], 1)
            out["guard_refused"] = sum(g["refused"] for g in report["guard"].values())
            out["runs"][name] = {
                "status": t["status"], "steps": t["steps"], "records": done["records"],
                "questions": done["questions"], "packs": done["packs"],
                "seconds": round(t["seconds"], 2),
                "train_seconds": round(t["step_seconds"] * t["steps"], 2),
                "questions_per_s": round(questions / t["seconds"], 2),
                "tokens": done["tokens"], "image_tokens": done["image_tokens"],
                "text_tokens": done["text_tokens"],
                "tokens_per_question": round(done["tokens"] / questions, 1),
                "image_tokens_per_question": round(done["image_tokens"] / questions, 1),
                "text_tokens_per_question": round(done["text_tokens"] / questions, 1),
                "loss_first_last": [t["loss_curve"][0], t["loss_curve"][-1]]
                if t["loss_curve"] else None}
    plain, packed = out["runs"]["one record per question"], out["runs"]["packed by image"]
    out["trained_questions"] = packed["questions"]
    out["speedup"] = round(plain["seconds"] / packed["seconds"], 2)
    out["train_speedup"] = round(plain["train_seconds"] / packed["train_seconds"], 2)
    out["token_reduction"] = round(plain["tokens"] / packed["tokens"], 2)
    return out


def _print_packing(m: dict) -> None:
    print(f"loop train, one epoch over {m['trained_questions']} GQA-ru train questions "
          f"({m['questions']} drawn by image, {m['guard_refused']} refused by the leakage guard), "
          f"{m['preset']} model, batch {m['batch_size']} records, {m['threads']} threads")
    for name, r in m["runs"].items():
        print(f"  {name:<24}: {r['packs']:4d} sequences, {r['steps']:3d} steps, "
              f"{r['seconds']:7.1f} s ({r['train_seconds']:.1f} s in steps), "
              f"{r['tokens_per_question']:6.1f} tokens per question ({r['image_tokens_per_question']:.1f} "
              f"image + {r['text_tokens_per_question']:.1f} text)")
    print(f"  packing: {m['speedup']:.2f}x faster per epoch ({m['train_speedup']:.2f}x in the "
          f"steps), {m['token_reduction']:.2f}x fewer tokens")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--gpu", default="cpu", help="profile to measure (default cpu)")
    parser.add_argument("--4bit", dest="load_in_4bit", action="store_true",
                        help="4-bit NF4 base (bitsandbytes; works on CPU too)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing on (the t4 profile's setting)")
    parser.add_argument("--packing", action="store_true",
                        help="compare one epoch with and without per-image packing")
    parser.add_argument("--preset", default="saiga-tiny", help="--packing: demo | saiga-tiny")
    parser.add_argument("--questions", type=int, default=256, help="--packing: train questions")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.packing:
        figures = measure_packing(args.preset, args.questions, args.batch_size, args.gpu)
        print(json.dumps(figures, indent=2)) if args.json else _print_packing(figures)
        return 0

    from core.device import t4_estimate

    measured = measure(args.steps, args.batch_size, args.gpu, args.load_in_4bit or None,
                       args.checkpointing or None)
    figures, derivation = t4_estimate()
    if args.json:
        print(json.dumps({"measured": measured, "t4_priors": figures,
                          "t4_derivation": derivation}, ensure_ascii=False, indent=2))
        return 0
    m = measured
    print(f"LoRA SFT on the demo model ({m['device']}, profile {m['profile']}, "
          f"{'4-bit NF4' if m['load_in_4bit'] else 'fp32'}, checkpointing "
          f"{'on' if m['gradient_checkpointing'] else 'off'}, torch {m['torch']}, "
          f"{m['threads']} threads)")
    print(f"  {m['steps']} steps x {m['batch_size']} samples (micro-batch "
          f"{m['micro_batch_size']}), {m['tokens_per_sample']} tokens per sample, status "
          f"{m['status']}")
    print(f"  tokens/s            {m['tokens_per_s']}")
    print(f"  seconds per step    {m['step_seconds']}")
    print(f"  seconds per sample  {m['train_s_per_sample']}")
    print(f"  peak memory         {m['peak_memory_gb']} GB ({m['memory_kind']})")
    print(f"  loss first -> last  {m['loss_first_last']}")
    print()
    print("LLaVA-Saiga-8B on a T4, t4 profile (estimate; core.device.t4_priors()):")
    for line in derivation:
        print(f"  - {line}")
    print("  priors: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
