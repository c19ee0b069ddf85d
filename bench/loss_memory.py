"""Peak memory of one LoRA training step: the loss at every position vs at labelled ones only.

For the model's own vocabulary (128,320 on saiga-tiny, LLaVA-Saiga-8B's) and a 32k LM head put
in its place, one forward and backward step on the same batch of GQA-ru train questions runs in
a fresh process with each loss:

- ``full``: the model's own ``labels=`` loss, which applies the LM head at every position
  ([batch × sequence × vocabulary] logits, then upcast to fp32);
- ``labelled``: ``core.loss.labelled_loss`` (what the trainer uses), the LM head only where a
  label follows.

It prints the logits each builds and the peak memory the step adds (CUDA: the rise of
``max_memory_allocated``; CPU: the rise of the process's peak resident size).

    .venv/bin/python bench/loss_memory.py [--preset saiga-tiny|demo] [--batch-size 4] [--gpu cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL_VOCAB = 32_000
LOSSES = ("full", "labelled")


def one_step(preset: str, batch_size: int, gpu: str, vocab: str, loss: str) -> dict:
    """One training step in this process; what it built and the memory it added."""
    import random
    import resource

    import torch

    from core.data import load_gqa
    from core.device import resolve_profile
    from core.lora import attach_lora, lora_config
    from core.loss import labelled_loss
    from core.model import load_vlm
    from core.processor import IGNORE_INDEX, LLaVADataProcessor
    from core.sft import gqa_records
    from loop.sources import resolve_sources

    sources = resolve_sources(preset)
    profile = resolve_profile(gpu)
    vlm = load_vlm(sources.model, options=profile.load_options())
    model = vlm.model
    own = model.get_output_embeddings().out_features
    if vocab == "32k":  # a smaller head in the same place; targets folded into its range
        head = model.get_output_embeddings()
        model.lm_head = torch.nn.Linear(head.in_features, SMALL_VOCAB, bias=False,
                                        dtype=head.weight.dtype, device=head.weight.device)
        getattr(model.config, "text_config", model.config).vocab_size = SMALL_VOCAB
    attach_lora(vlm, "bench", lora_config(
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"))
    rows = random.Random(0).sample(load_gqa(sources.data.gqa, "train"), batch_size)
    proc = LLaVADataProcessor(vlm.processor)
    batch = proc.collate(proc.encode_all(gqa_records(rows)))
    if vocab == "32k":
        labels = batch["labels"]
        batch["labels"] = torch.where(labels == IGNORE_INDEX, labels, labels % SMALL_VOCAB)
    batch = {k: v.to(profile.device) for k, v in batch.items()}
    shapes: list[tuple] = []
    vlm.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: shapes.append(tuple(out.shape)))
    cuda = profile.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = vlm.model(**batch).loss if loss == "full" else labelled_loss(vlm.model, batch)
    value.float().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"vocab": own if vocab == "own" else SMALL_VOCAB, "loss": loss,
            "logits_shape": list(shapes[0]), "logits_mib": round(
                4 * _prod(shapes[0]) / 2**20, 1),  # fp32, as both losses upcast them
            "sequence": int(batch["input_ids"].shape[1]),
            "labelled_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            "step_peak_mib": round(peak / 2**20, 1), "device": profile.device,
            "loss_value": round(float(value.detach()), 4)}


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def measure(preset: str, batch_size: int, gpu: str) -> dict:
    """Every (vocabulary, loss) pair, each in a fresh process (peak memory is per process)."""
    runs = []
    for vocab in ("own", "32k"):
        for loss in LOSSES:
            cmd = [sys.executable, __file__, "--one", vocab, loss, "--preset", preset,
                   "--batch-size", str(batch_size), "--gpu", gpu]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"preset": preset, "batch_size": batch_size, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="saiga-tiny", help="saiga-tiny (default) | demo")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gpu", default="cpu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("VOCAB", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.preset, args.batch_size, args.gpu, *args.one)))
        return 0
    out = measure(args.preset, args.batch_size, args.gpu)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['preset']}, batch {out['batch_size']}: one LoRA step (forward + backward)")
    print(f"{'vocabulary':>10}  {'loss':>8}  {'logits':>22}  {'logits MiB':>10}  "
          f"{'step peak MiB':>13}")
    for r in out["runs"]:
        print(f"{r['vocab']:>10,}  {r['loss']:>8}  {str(tuple(r['logits_shape'])):>22}  "
              f"{r['logits_mib']:>10}  {r['step_peak_mib']:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
