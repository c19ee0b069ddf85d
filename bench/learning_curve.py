"""The demo's learning curve, that the sizing rule's constants are checked against.

Dev accuracy of ``answer_format_sft`` adapters trained on 250, 500, 1,000 and 2,000 records
(the profile-aimed data the strategy builds, one epoch, batch 16), from the base and from a
champion (an adapter of ``--champion-records`` records from the base, continued with
``TrainConfig.init_from``), on the run's own dev subsets under the exact lmms-eval protocol.
It prints each point's gain over its starting model in points (summed over the benchmarks)
and records per point: compare with ``strategies.sizing.RECORDS_PER_POINT``, ``FLOOR_RECORDS``
and ``CEILING_RECORDS``.

    LOOP_DEMO_DIR=.demo .venv/bin/python bench/learning_curve.py [--sizes 250,500,1000,2000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="250,500,1000,2000")
    p.add_argument("--champion-records", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    from core.evaluate import EvalConfig
    from core.train import TrainConfig
    from loop import judging
    from loop.controller import TRAIN_LR, Loop, RunConfig
    from loop.store import Store
    from strategies.answer_format_sft import DROPOUT, RANK, profile_mix
    from strategies.base import BENCHMARKS, base_candidate
    from strategies.sft_data import SFTDataBuilder

    folder = Path(tempfile.mkdtemp(prefix="learning-curve-"))
    store = Store(str(folder / "experiments.db"))
    run = Loop(RunConfig(budget_s=86_400, gpu="cpu", preset="demo", seed=args.seed,
                         progress=False), store, echo=lambda msg: None)
    run.start()
    run.set_up()
    bench = run.bench

    def dev_accuracy(adapter: str | None) -> dict[str, float]:
        return {b: bench.run_eval(b, EvalConfig(), adapter, bench.dev[b]).accuracy
                for b in BENCHMARKS}

    def train(n: int, name: str, init_from: str | None, ctx) -> str:
        records, _ = SFTDataBuilder(ctx).build(n, profile_mix(ctx), args.seed * 1000 + n)
        config = TrainConfig(steps=math.ceil(len(records) / 16), batch_size=16,
                             lr=TRAIN_LR["demo"], rank=RANK, alpha=2 * RANK, dropout=DROPOUT,
                             seed=args.seed, init_from=init_from)
        path, result = bench.train(records, config, name=name, deadline_s=3600,
                                   strategy="answer_format_sft")
        return path

    def context(champion):
        analysis = judging.on_analysis(bench, champion)
        return run.context(champion, {b: bench.error_profile(s) for b, s in analysis.items()},
                           86_400)

    base = base_candidate()
    base_acc = dev_accuracy(None)
    ctx = context(base)
    champion = base.derive("answer_format_sft", "the champion of the curve",
                           adapter_path=train(args.champion_records, "champion", None, ctx))
    champ_acc = dev_accuracy(champion.adapter_path)
    champ_ctx = context(champion)
    rows = []
    for start, acc0, here, init in (("base", base_acc, ctx, None),
                                    ("champion", champ_acc, champ_ctx, champion.adapter_path)):
        for n in sizes:
            acc = dev_accuracy(train(n, f"{start}-{n}", init, here))
            points = 100 * sum(acc[b] - acc0[b] for b in BENCHMARKS)
            rows.append({"from": start, "records": n, "start": acc0, "dev": acc,
                         "points": round(points, 1),
                         "records_per_point": round(n / points, 1) if points > 0 else None})
    dev_n = {b: len(bench.dev[b]) for b in BENCHMARKS}
    if args.json:
        print(json.dumps({"dev_n": dev_n, "champion_records": args.champion_records,
                          "rows": rows}, indent=2))
        return 0
    print(f"dev subsets {dev_n}; champion: {args.champion_records} records from the base")
    print("from      records  gqa_ru   mmbench_ru  points gained  records/point")
    for r in rows:
        print(f"{r['from']:<9} {r['records']:>7}  {100 * r['dev']['gqa_ru']:5.1f}%  "
              f"{100 * r['dev']['mmbench_ru']:9.1f}%  {r['points']:+13.1f}  "
              f"{r['records_per_point'] or '-':>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
