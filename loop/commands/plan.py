"""``python -m loop plan``: what a run would do with this budget, from the priors alone."""

from __future__ import annotations

import argparse

from loop.commands._common import (
    GPU_PROFILES,
    PRESETS,
    add_json_arg,
    format_table,
    print_json,
)

# Evaluation sizes of the real benchmarks (DESIGN section 4).
SAIGA_SIZES = {"gqa_ru": 12216, "mmbench_ru": 3910}


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
    p.add_argument("--reserve", type=float, default=0.2, metavar="FRACTION",
                   help="share of the budget kept for the final evaluation (default 0.2)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="plan as if every question's whole prompt were computed (for comparison)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.budget import parse_duration
    from loop.planning import make_plan

    gpu = "t4" if args.gpu == "auto" else args.gpu
    plan = make_plan(parse_duration(args.budget), args.preset, gpu, args.reserve,
                     prefix_cache=args.prefix_cache)
    if args.json:
        print_json(plan)
        return 0
    print(f"Plan for --preset {args.preset} --gpu {gpu}, budget {plan['budget']} "
          f"(priors: {plan['priors_source']}; prefix cache "
          f"{'on' if args.prefix_cache else 'off'})\n")
    print(format_table(["", ""], [[k, v] for k, v in plan["summary"].items()]).split("\n", 2)[-1])
    print()
    print(format_table(["benchmark", "eval questions", "dev", "dev subset/cycle", "final",
                        "final subset", "s/question", "dev images/cycle"],
                       [[b, d["total"], d["dev"], d["dev_subset"], d["final"], d["final_subset"],
                         d["s_per_question"], d["dev_images"] or "-"]
                        for b, d in plan["benchmarks"].items()]))
    print()
    print(format_table(["strategy", "trains", "est. cost", "training examples", "note"],
                       [[s["strategy"], s["trains"], s["cost"], s["train_examples"], s["note"]]
                        for s in plan["strategies"]]))
    print()
    print("Expected schedule if every candidate were rejected (the policy scales a strategy's "
          "score by 0.4 after each rejection):")
    print("  " + " -> ".join(plan["schedule"]) if plan["schedule"] else "  (nothing fits)")
    return 0
