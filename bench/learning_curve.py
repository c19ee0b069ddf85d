"""The learning curve of ``answer_format_sft``: dev accuracy after N SFT records, from the base
and continuing a champion, and how many dev errors each record fixes.

The figures that size a training (issue 19): for each size in ``--sizes`` it builds the records
with the strategy's own data builder (``strategies.sft_data.SFTDataBuilder``, the mix
``answer_format_sft`` derives from the starting model's error profile on the analysis subset),
trains one epoch of them at the preset's learning rate and batch size through the loop's own
training path (``Workbench.train``: leakage guard, stored proposal, ``core.train.train_lora``)
and scores the adapter on the run's dev subsets (``core.splits``, sized as a default 5-minute
demo run sizes them) under the exact lmms-eval protocol (``core.evaluate``). Curve ``base``
starts from the base model; curve ``champion`` continues the ``--champion-size`` adapter of
the first curve (``TrainConfig.init_from``), with data aimed at that champion's own profile,
as the loop's next ``answer_format_sft`` cycle would. Each point compares its dev answers with
its starting model's: errors fixed and broken (per question; MMBench-ru rotations count one
each), per error label (``core.errors``), a cluster-aware paired test, and records per fixed
error. Every record is built anew for each size (as the strategy builds them), so two points
differ in their data as two candidates would. Deterministic for a seed on one machine.

    .venv/bin/python bench/learning_curve.py [--sizes 250,500,1000,2000] [--champion-size 500]
        [--preset demo] [--dev-size N] [--seed 0] [--json]

The demo's GQA-ru train holds 5,006 questions (and 249 usable LLaVA-Instruct-ru
conversations), so 4,000 records is about the largest size it can build without repeats.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCHMARKS = ("gqa_ru", "mmbench_ru")
DEMO_BUDGET_S = 300
"""The dev subsets are the ones a default 5-minute demo run (``make demo``) chooses."""
PER = 250
"""Records per step of the marginal figures."""


def open_bench(preset: str, seed: int, dev_size: int | None, folder: Path):
    """A ``Workbench`` on a throw-away database: the run's model, data, splits and subsets."""
    from core.device import resolve_profile
    from core.model import load_vlm
    from loop.budget import Budget, CostModel, priors
    from loop.sources import resolve_sources
    from loop.store import Store
    from loop.workbench import Workbench

    profile = resolve_profile("cpu")
    sources = resolve_sources(preset, seed=seed)
    store = Store(folder / "learning-curve.db")
    run_id = store.create_run(config={"preset": preset, "seed": seed}, environment={},
                              budget_s=DEMO_BUDGET_S, preset=preset, gpu="cpu")
    bench = Workbench(store=store, run_id=run_id,
                      vlm=load_vlm(sources.model, options=profile.load_options()),
                      profile=profile, sources=sources, budget=Budget(DEMO_BUDGET_S),
                      costs=CostModel(priors(preset, profile.name)), seed=seed, workdir=folder,
                      batch_size=profile.eval_batch_size, progress=False)
    bench.load_data(dev_size)
    bench.budget = Budget(1e9, 0.0)  # the subsets are chosen; training is not time-boxed
    return bench


def evaluate(bench, adapter: str | None, part: str = "dev") -> dict:
    """benchmark -> the EvalResult of ``adapter`` on the run's ``part`` subsets, lmms-eval protocol."""
    from core.evaluate import EvalConfig

    return {b: bench.run_eval(b, EvalConfig(), adapter, getattr(bench, part)[b])
            for b in BENCHMARKS}


def context(bench, preset: str, champion, cycle: int, seed: int):
    """The ``Context`` the loop would give ``answer_format_sft`` in ``cycle`` with ``champion``:
    its error profiles come from the champion's answers on the analysis subset."""
    from loop.presets import train_lr
    from loop.workbench import Scored
    from strategies.base import Context

    tune = evaluate(bench, champion.adapter_path, "tune")
    profiles = {b: bench.error_profile(Scored(b, r.samples, r.metrics, -1))
                for b, r in tune.items()}
    return Context(
        cycle=cycle, seed=seed + cycle, champion=champion, profiles=profiles, history=[],
        time_left_s=1e9, rates=bench.costs.rates,
        dev_sizes={b: len(bench.dev[b]) for b in BENCHMARKS}, data=bench.sources.data,
        protected=bench.protected, workdir=bench.workdir / f"cycle-{cycle}",
        train=lambda records, config, *, name, deadline_s: bench.train(
            records, config, name=name, deadline_s=deadline_s, strategy="answer_format_sft",
            cycle=cycle),
        evaluate=lambda b, config, *, adapter_path, examples=None: bench.run_eval(
            b, config, adapter_path, examples if examples is not None else bench.tune[b]),
        tune_examples=bench.tune, train_lr=train_lr(preset), preset=preset)


def train_point(ctx, builder, n: int, attempt: int, name: str) -> tuple[str, dict]:
    """Build ``n`` records and train one epoch of them as ``answer_format_sft`` does."""
    from core.errors import CONTENT_LABELS
    from core.train import TrainConfig
    from strategies.answer_format_sft import DROPOUT, RANK, profile_mix
    from strategies.common import BATCH_SIZE, MIN_STEPS, train_adapter

    t0 = time.perf_counter()
    seed = ctx.seed * 1000 + attempt
    records, info = builder.build(n, profile_mix(ctx), seed)
    data_s = time.perf_counter() - t0
    steps = max(MIN_STEPS, math.ceil(len(records) / BATCH_SIZE))
    config = TrainConfig(steps=steps, batch_size=BATCH_SIZE, lr=ctx.train_lr, rank=RANK,
                         alpha=2 * RANK, dropout=DROPOUT, seed=seed,
                         init_from=ctx.champion.adapter_path)
    path, result, status = train_adapter(ctx, records, config, name=name, deadline_s=1e6,
                                         what=name)
    return path, {"records": len(records), "kinds": info["counts"], "mix": info["mix"],
                  "labelled": {lb: info["stats"].get(f"short_{lb}", 0) for lb in CONTENT_LABELS},
                  "steps": result["steps"], "train_status": status, "data_s": round(data_s, 1),
                  "train_s": round(result["seconds"], 1)}


def compare(start: dict, point: dict) -> dict:
    """Per benchmark: the point's dev accuracy, and what changed against its starting model."""
    from core.stats import paired_test

    out = {}
    for b in BENCHMARKS:
        before = {s["sample_id"]: s for s in start[b].samples}
        after = point[b].samples
        was = [before[s["sample_id"]]["correct"] for s in after]
        now = [s["correct"] for s in after]
        test = paired_test(was, now, clusters=[s["cluster"] for s in after])
        labels: dict[str, dict[str, int]] = {}
        for s in after:
            for lb in before[s["sample_id"]]["labels"]:
                row = labels.setdefault(lb, {"errors": 0, "fixed": 0})
                row["errors"] += 1
                row["fixed"] += s["correct"]
        fixed = sum(n and not w for w, n in zip(was, now))
        broken = sum(w and not n for w, n in zip(was, now))
        m = point[b].metrics
        out[b] = {"accuracy": m["accuracy"], "n": m["n"], "ci": m["ci"], "questions": len(now),
                  "errors_before": was.count(False), "fixed": fixed, "broken": broken,
                  "net": fixed - broken, "diff": test.diff, "p_value": test.p_value,
                  "labels": dict(sorted(labels.items()))}
    return out


def start_row(result: dict) -> dict:
    return {b: {"accuracy": r.metrics["accuracy"], "n": r.metrics["n"], "ci": r.metrics["ci"],
                "questions": len(r.samples), "errors": sum(not s["correct"] for s in r.samples)}
            for b, r in result.items()}


def curve(bench, ctx, builder, sizes: list[int], attempt: int, tag: str, start: dict,
          keep: int | None = None) -> tuple[list[dict], str | None]:
    """Train and score each size from ``ctx.champion``; the adapter of size ``keep`` stays."""
    points, kept = [], None
    for n in sizes:
        path, row = train_point(ctx, builder, n, attempt, f"{tag}-{n}")
        t0 = time.perf_counter()
        scored = evaluate(bench, path)
        row.update(size=n, eval_s=round(time.perf_counter() - t0, 1), dev=compare(start, scored))
        points.append(row)
        if n == keep:
            kept = path
        else:
            bench.drop(path)
        print(f"{tag} {n} records: " + ", ".join(f"{b} {v['accuracy']:.3f}" for b, v in
                                                 row["dev"].items()), file=sys.stderr)
    return points, kept


def measure(preset: str, sizes: list[int], champion_size: int, seed: int,
            dev_size: int | None, folder: Path) -> dict:
    from strategies.base import base_candidate
    from strategies.common import BATCH_SIZE
    from strategies.sft_data import SFTDataBuilder

    t0 = time.perf_counter()
    bench = open_bench(preset, seed, dev_size, folder)
    load_s = time.perf_counter() - t0
    images = folder / "sft_images"
    base = base_candidate()
    base_dev = evaluate(bench, None)
    # curve 1: cycle 1 of a run, answer_format_sft's first attempt, from the base model
    ctx = context(bench, preset, base, 1, seed)
    extra = [] if champion_size in sizes else [champion_size]
    base_points, champ_path = curve(bench, ctx, SFTDataBuilder(ctx, images), sizes + extra, 0,
                                    "base", base_dev, keep=champion_size)
    champ_point = next(p for p in base_points if p["size"] == champion_size)
    base_points = [p for p in base_points if p["size"] in sizes]
    # curve 2: cycle 2, its second attempt, continuing the champion it made in cycle 1
    champion = base.derive("answer_format_sft", f"{champion_size} records from the base",
                           adapter_path=champ_path)
    ctx2 = context(bench, preset, champion, 2, seed)
    champ_dev = evaluate(bench, champ_path)
    champ_points, _ = curve(bench, ctx2, SFTDataBuilder(ctx2, images), sizes, 1, "champion",
                            champ_dev)
    out = {"preset": preset, "seed": seed, "lr": ctx.train_lr, "batch_size": BATCH_SIZE,
           "champion_size": champion_size, "champion_trained": champ_point,
           "load_s": round(load_s, 1),
           "dev": {b: {"questions": len(bench.dev[b]),
                       "units": len({s["cluster"] for s in base_dev[b].samples})}
                   for b in BENCHMARKS},
           "curves": [{"start": "base", "start_dev": start_row(base_dev), "points": base_points},
                      {"start": "champion", "start_dev": start_row(champ_dev),
                       "points": champ_points}],
           "seconds": round(time.perf_counter() - t0, 1)}
    bench.store.close()
    return out


def sizing(curve_: dict) -> dict:
    """The figures a sizing rule reads off one curve (definitions in the printed legend)."""
    prev_n = prev_net = 0
    rows, best = [], max((_net(p) for p in curve_["points"]), default=0)
    for p in curve_["points"]:
        net = _net(p)
        rows.append({"size": p["size"], "net_fixed": net,
                     "fixed_per_record": round(net / p["records"], 4),
                     "records_per_fixed": round(p["records"] / net, 1) if net > 0 else None,
                     "marginal_per_250": round(PER * (net - prev_net) / (p["size"] - prev_n), 1)})
        prev_n, prev_net = p["size"], net
    moved = [p["size"] for p in curve_["points"]
             if any(d["p_value"] < 0.05 and d["diff"] > 0 for d in p["dev"].values())]
    # flat from the smallest size with 90% of the best net fixes on; not seen when that is the
    # largest size measured (the curve may still rise beyond it)
    near = [p["size"] for p in curve_["points"][:-1] if best > 0 and _net(p) >= 0.9 * best]
    labels: dict[str, dict] = {}
    for p in curve_["points"]:
        for lb, row in p["dev"]["gqa_ru"]["labels"].items():
            aimed = p["labelled"].get(lb)
            if aimed and row["fixed"]:
                labels.setdefault(lb, {})[p["size"]] = round(aimed / row["fixed"], 1)
    return {"points": rows, "floor": moved[0] if moved else None,
            "ceiling": near[0] if near else None, "aimed_records_per_fixed_gqa": labels}


def _net(point: dict) -> int:
    return sum(d["net"] for d in point["dev"].values())


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def print_table(m: dict) -> None:
    dev = m["dev"]
    print(f"answer_format_sft learning curve, {m['preset']} world, seed {m['seed']}: lr "
          f"{m['lr']:g}, batch {m['batch_size']}, one epoch per size; dev subsets GQA-ru "
          f"{dev['gqa_ru']['questions']} questions on {dev['gqa_ru']['units']} images, "
          f"MMBench-ru {dev['mmbench_ru']['units']} questions ({dev['mmbench_ru']['questions']}"
          " rows), lmms-eval protocol (GQA-ru exact match, MMBench-ru circular)")
    for c in m["curves"]:
        s, rule = c["start_dev"], sizing(c)
        start = (f"the {m['champion_size']}-record adapter" if c["start"] == "champion"
                 else "the base model")
        print(f"\nfrom {start}: GQA-ru {_pct(s['gqa_ru']['accuracy'])}% "
              f"({s['gqa_ru']['errors']} wrong), MMBench-ru {_pct(s['mmbench_ru']['accuracy'])}% "
              f"({s['mmbench_ru']['errors']} wrong rows)")
        print("records steps  GQA-ru (p)        MMBench-ru (p)    GQA +fix/-brk  MMB +fix/-brk"
              "  net  rec/fix  net per 250 (marginal)  data+train+eval s")
        for p, r in zip(c["points"], rule["points"]):
            g, b = p["dev"]["gqa_ru"], p["dev"]["mmbench_ru"]
            rpf = f"{r['records_per_fixed']:7.1f}" if r["records_per_fixed"] else "      -"
            print(f"{p['records']:7d} {p['steps']:5d}  {_pct(g['accuracy'])} ({g['p_value']:.3f})"
                  f"   {_pct(b['accuracy'])} ({b['p_value']:.3f})   {g['fixed']:5d}/{g['broken']:<5d}"
                  f"  {b['fixed']:5d}/{b['broken']:<5d}  {r['net_fixed']:4d}  {rpf}  "
                  f"{PER * r['fixed_per_record']:6.1f} ({r['marginal_per_250']:6.1f})"
                  f"           {p['data_s']:.0f}+{p['train_s']:.0f}+{p['eval_s']:.0f}")
        for p in c["points"]:
            parts = []
            for b in BENCHMARKS:
                for lb, row in p["dev"][b]["labels"].items():
                    aimed = p["labelled"].get(lb) if b == "gqa_ru" else None
                    parts.append(f"{b}/{lb} {row['fixed']}/{row['errors']}"
                                 + (f" ({aimed} aimed records)" if aimed else ""))
            print(f"  {p['records']:5d} records, fixed/errors by label: " + ", ".join(parts))
        print(f"  floor (smallest size with a significant dev gain, p < 0.05): {rule['floor']}; "
              "ceiling (smallest size with >= 90% of the curve's best net fixes): "
              + (str(rule["ceiling"]) if rule["ceiling"] else
                 f"not reached by {c['points'][-1]['size']}")
              + "; aimed GQA-ru records per fixed error by label: "
              + str(rule["aimed_records_per_fixed_gqa"]))
    print(f"\n{m['seconds']:.0f} s in all (model and data loaded in {m['load_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="the world to measure (default demo)")
    p.add_argument("--sizes", default="250,500,1000,2000",
                   help="SFT records per point, comma-separated (default 250,500,1000,2000)")
    p.add_argument("--champion-size", type=int, default=500,
                   help="records of the base-curve adapter the second curve continues")
    p.add_argument("--dev-size", type=int,
                   help="dev questions per benchmark (default: a 5-minute demo run's)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the splits and subsets, the SFT data and the training")
    p.add_argument("--workdir", help="keep the data and adapters here (default: a temporary "
                   "folder, removed at the end)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1 or args.champion_size < 1:
        p.error(f"--sizes and --champion-size must be positive record counts, but got "
                f"'{args.sizes}' and {args.champion_size}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.workdir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        m = measure(args.preset, sizes, args.champion_size, args.seed, args.dev_size, folder)
    for c in m["curves"]:
        c["sizing"] = sizing(c)
    print(json.dumps(m, ensure_ascii=False, indent=1)) if args.json else print_table(m)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
