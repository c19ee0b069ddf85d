"""Evaluation speed on the demo model: one question at a time (the seed pipeline's way) versus
length-grouped batches. Prints samples/s, the ratio, peak memory, and checks the answers agree.

    .venv/bin/python bench/eval_speed.py [--n 128] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="questions (GQA-ru demo dev split)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch

    from core.data import load_benchmark
    from core.evaluate import evaluate
    from core.splits import make_splits, stratified_subset
    from loop.sources import resolve_sources

    sources = resolve_sources("demo")
    from core.model import load_vlm

    vlm = load_vlm(sources.model)
    dev = make_splits(load_benchmark("gqa_ru", sources.data))["dev"]
    examples = stratified_subset(dev, args.n)
    evaluate(vlm, examples[:8], batch_size=8, progress=False)  # warm-up

    t0 = time.perf_counter()
    single = [evaluate(vlm, [ex], batch_size=1, progress=False).samples[0] for ex in examples]
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = evaluate(vlm, examples, batch_size=args.batch_size, progress=False).samples
    t_batched = time.perf_counter() - t0

    by_id = {s["sample_id"]: s["output"] for s in batched}
    same = sum(s["output"] == by_id[s["sample_id"]] for s in single)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"demo model, {len(examples)} GQA-ru dev questions, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"one at a time : {len(examples) / t_single:7.1f} samples/s ({t_single:.1f} s)")
    print(f"batched ({args.batch_size:>3}) : {len(examples) / t_batched:7.1f} samples/s "
          f"({t_batched:.1f} s)")
    print(f"speed-up      : {t_single / t_batched:7.1f}x")
    print(f"identical answers: {same}/{len(examples)}")
    print(f"peak RSS      : {rss_mb:.0f} MB")
    return 0 if same == len(examples) else 1


if __name__ == "__main__":
    sys.exit(main())
