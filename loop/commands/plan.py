"""``python -m loop plan``: what a run would do with this budget, from the priors alone."""

from __future__ import annotations

import argparse

from loop.budget import DEFAULT_RESERVE
from loop.commands._common import (
    GPU_PROFILES,
    PRESETS,
    add_json_arg,
    format_table,
    print_json,
)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="print what a run would do, without loading any weights",
                       description="The plan of a run from the cost-model priors of the preset "
                       "and GPU profile: reserve, dev and final subset sizes, the cost of each "
                       "strategy, training sizes and the number of cycles that fit.")
    p.add_argument("--budget", required=True, metavar="DURATION", help="e.g. 6h, 90m, 300s")
    p.add_argument("--gpu", choices=GPU_PROFILES, default="t4",
                   help="GPU profile to plan for (default t4; no GPU is needed to plan)")
    p.add_argument("--preset", choices=PRESETS, default="saiga",
                   help="the model and data to plan for, as `loop run --preset` (default saiga)")
    p.add_argument("--reserve", type=float, default=DEFAULT_RESERVE, metavar="FRACTION",
                   help=f"share of the budget kept for the final evaluation (default {DEFAULT_RESERVE:g})")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="plan as if every question's whole prompt were computed (for comparison)")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="plan as if every trained question carried its own image (for comparison)")
    p.add_argument("--objective", choices=("benchmark", "deployment"), default="benchmark",
                   help="what the run optimises, as `loop run --objective` (default benchmark)")
    p.add_argument("--strategies", metavar="NAMES",
                   help="comma-separated strategies to allow, as `loop run --strategies`")
    p.add_argument("--dev-size", type=int, metavar="N",
                   help="dev questions per benchmark per evaluation, as `loop run --dev-size`")
    p.add_argument("--final-size", type=int, metavar="N",
                   help="final questions per benchmark, as `loop run --final-size`")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.budget import parse_duration
    from loop.planning import make_plan

    gpu = "t4" if args.gpu == "auto" else args.gpu
    names = [n.strip() for n in args.strategies.split(",") if n.strip()] if args.strategies else None
    plan = make_plan(parse_duration(args.budget), args.preset, gpu, args.reserve,
                     prefix_cache=args.prefix_cache, packing=args.packing,
                     objective=args.objective, names=names, dev_size=args.dev_size,
                     final_size=args.final_size)
    if args.json:
        print_json(plan)
        return 0
    print(f"Plan for --preset {args.preset} --gpu {gpu} --objective {args.objective}, budget "
          f"{plan['budget']} (priors: {plan['priors_source']}; prefix cache "
          f"{'on' if args.prefix_cache else 'off'}; training "
          f"{'packed by image' if args.packing else 'unpacked'})\n")
    print(format_table(["", ""], [[k, v] for k, v in plan["summary"].items()]).split("\n", 2)[-1])
    print()
    print(format_table(["benchmark", "eval questions", "dev", "dev subset/cycle", "analysis",
                        "final", "final subset", "s/question", "dev units/cycle"],
                       [[b, d["total"], d["dev"], d["dev_subset"], d["tune_subset"], d["final"],
                         d["final_subset"], d["s_per_question"], d["dev_units"]]
                        for b, d in plan["benchmarks"].items()]))
    print()
    print(format_table(["strategy", "trains", "est. cost", "training records", "note"],
                       [[s["strategy"], s["trains"], s["cost"], s["train_examples"], s["note"]]
                        for s in plan["strategies"]]))
    print()
    print(f"The run's cycles if every candidate were rejected ({plan['trained_candidates']} "
          "trained; the run's own policy, objective and training sizes):")
    print(format_table(["cycle", "strategy", "trains", "records", "tokens/record", "cost",
                        "time left before"],
                       [[r["cycle"], r["strategy"], "yes" if r["trains"] else "no", r["records"],
                         r["tokens_per_record"] or "-", r["cost"], r["left_before"]]
                        for r in plan["schedule"]]) if plan["schedule"] else "  (nothing fits)")
    return 0
