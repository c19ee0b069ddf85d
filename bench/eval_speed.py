"""Evaluation speed: one question at a time (the seed pipeline's way), length-grouped batches,
and batches that compute each image's prompt prefix once (the default). Prints samples/s,
prefill tokens per question, the ratios, peak memory, and checks that the answers agree.

    .venv/bin/python bench/eval_speed.py [--preset demo|saiga-tiny] [--n 256] [--batch-size 32]
        [--benchmark gqa_ru|mmbench_ru] [--mode generate|likelihood] [--skip-single] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(vlm, examples, mode="generate", **kwargs):
    from core.evaluate import EvalConfig, evaluate

    t0 = time.perf_counter()
    result = evaluate(vlm, examples, EvalConfig(mode=mode), progress=False, **kwargs)
    return result, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="demo | saiga-tiny")
    parser.add_argument("--benchmark", default="gqa_ru", choices=["gqa_ru", "mmbench_ru"])
    parser.add_argument("--mode", default="generate", choices=["generate", "likelihood"],
                        help="MMBench-ru protocol: generate a letter, or score the options")
    parser.add_argument("--n", type=int, default=256, help="dev questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-single", action="store_true", help="skip one-at-a-time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from core.data import load_benchmark
    from core.model import load_vlm
    from core.splits import make_splits, stratified_subset
    from loop.sources import resolve_sources

    sources = resolve_sources(args.preset)
    vlm = load_vlm(sources.model)
    dev = make_splits(load_benchmark(args.benchmark, sources.data))["dev"]
    examples = stratified_subset(dev, args.n)
    if args.mode == "likelihood" and args.benchmark != "mmbench_ru":
        parser.error("--mode likelihood is a MMBench-ru protocol")
    _timed(vlm, examples[:8], args.mode, batch_size=8)  # warm-up

    runs = {}
    if not args.skip_single:
        t0 = time.perf_counter()
        single = [_timed(vlm, [ex], args.mode, batch_size=1, prefix_cache=False)[0]
                  for ex in examples]
        runs["one at a time"] = ({s.samples[0]["sample_id"]: s.samples[0]["output"] for s in single},
                                 time.perf_counter() - t0,
                                 sum(s.metrics["prefill_tokens_per_sample"] for s in single) / len(single))
    for name, cache in (("batched", False), ("batched + prefix cache", True)):
        result, seconds = _timed(vlm, examples, args.mode, batch_size=args.batch_size,
                                 prefix_cache=cache)
        runs[name] = ({s["sample_id"]: s["output"] for s in result.samples}, seconds,
                      result.metrics["prefill_tokens_per_sample"])

    plain_out, plain_s, plain_tok = runs["batched"]
    cached_out, cached_s, cached_tok = runs["batched + prefix cache"]
    images = len({ex.get("imageId", ex.get("index")) for ex in examples})
    report = {
        "preset": args.preset, "benchmark": args.benchmark, "mode": args.mode,
        "n": len(examples),
        "images_or_groups": images, "image_tokens": vlm.n_image_tokens,
        "batch_size": args.batch_size, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": {name: {"samples_per_s": round(len(examples) / s, 2),
                        "prefill_tokens_per_sample": round(tok, 1), "seconds": round(s, 2),
                        "identical_to_batched": sum(out[k] == plain_out[k] for k in out)}
                 for name, (out, s, tok) in runs.items()},
        "prefix_cache_speedup": round(plain_s / cached_s, 2),
        "prefill_reduction": round(plain_tok / cached_tok, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    same = sum(cached_out[k] == plain_out[k] for k in plain_out)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.preset} model ({vlm.n_image_tokens} image tokens), {len(examples)} "
              f"{args.benchmark} ({args.mode}) dev questions on {images} images/groups, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads")
        for name, r in report["runs"].items():
            print(f"{name:<24}: {r['samples_per_s']:8.1f} samples/s, "
                  f"{r['prefill_tokens_per_sample']:7.1f} prefill tokens/question "
                  f"({r['seconds']:.1f} s)")
        print(f"prefix cache            : {report['prefix_cache_speedup']:.2f}x samples/s, "
              f"{report['prefill_reduction']:.2f}x fewer prefill tokens")
        print(f"identical answers       : {same}/{len(examples)}")
        print(f"peak RSS                : {report['peak_rss_mb']} MB")
    return 0 if same == len(examples) else 1


if __name__ == "__main__":
    sys.exit(main())
