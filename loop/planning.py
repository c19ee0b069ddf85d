"""The plan of a run from priors alone (``loop plan``): no weights, no data are loaded."""

from __future__ import annotations

from pathlib import Path

import strategies
from core.device import GQA_QUESTIONS_PER_IMAGE
from core.error_profile import ErrorProfile
from loop.budget import Budget, dev_subset_size, final_subset_size, fmt_s, priors
from loop.policy import choose
from strategies.base import BENCHMARKS, Context

SAIGA_SIZES = {"gqa_ru": 12216, "mmbench_ru": 3910}
DEV_FRACTION = 1 / 3
# What the seed pipeline saw (DESIGN section 3): mostly answers in the wrong format.
ASSUMED_ERRORS = {
    "gqa_ru": (0.6, {"format_mismatch": 0.6, "color": 0.15, "location": 0.1, "counting": 0.05,
                     "other": 0.1}),
    "mmbench_ru": (0.6, {"format_mismatch": 0.7, "other": 0.2, "location": 0.1}),
}


def eval_sizes(preset: str) -> dict[str, int]:
    if preset == "saiga":
        return dict(SAIGA_SIZES)
    from core.demo import world

    return {"gqa_ru": world.N_TESTDEV_IMAGES * 4, "mmbench_ru": world.N_MMBENCH_QUESTIONS * 3}


def assumed_profiles(n: dict[str, int]) -> dict[str, ErrorProfile]:
    out = {}
    for b, (rate, shares) in ASSUMED_ERRORS.items():
        n_err = int(rate * n[b])
        out[b] = ErrorProfile(benchmark=b, n=n[b], n_errors=n_err,
                              counts={k: int(v * n_err) for k, v in shares.items()},
                              shares=dict(shares), per_category={}, examples={})
    return out


def make_plan(budget_s: float, preset: str, gpu: str, reserve: float = 0.2,
              prefix_cache: bool = True) -> dict:
    rates = priors(preset, gpu, prefix_cache)
    budget = Budget(budget_s, reserve, clock=lambda: 0.0)
    cycles_s = budget.left_for_cycles() - rates.load_s
    sizes = eval_sizes(preset)
    benches, dev_sizes = {}, {}
    for b in BENCHMARKS:
        dev = int(sizes[b] * DEV_FRACTION)
        final = sizes[b] - dev
        rate = rates.eval_s_per_sample[b]
        dev_sizes[b] = dev_subset_size(rate, cycles_s, dev)
        benches[b] = {"total": sizes[b], "dev": dev, "dev_subset": dev_sizes[b], "final": final,
                      "final_subset": final_subset_size(rate, budget.reserve_s, final),
                      "s_per_question": round(rate, 3),
                      "dev_images": (round(dev_sizes[b] / GQA_QUESTIONS_PER_IMAGE)
                                     if b == "gqa_ru" and preset == "saiga" else None)}
    ctx = Context(cycle=1, seed=0, champion=strategies.base.base_candidate(),
                  profiles=assumed_profiles(dev_sizes), history=[], time_left_s=cycles_s,
                  rates=rates, dev_sizes=dev_sizes, data=None, protected={}, workdir=Path("."),
                  train=_no_call, evaluate=_no_call, profile_name=gpu, preset=preset)
    rows, costs = [], {}
    for name in strategies.names():
        s = strategies.get(name)
        costs[name] = s.estimate_cost(ctx)
        train_n = (int(max(0.0, costs[name] - s.eval_cost(ctx)) / rates.train_s_per_sample)
                   if s.trains else 0)
        rows.append({"strategy": name, "trains": "yes" if s.trains else "no",
                     "cost": fmt_s(costs[name]), "cost_s": round(costs[name], 1),
                     "train_examples": train_n or "-", "note": s.summary})
    schedule, history, left = [], [], cycles_s
    while True:
        choice = choose(ctx.profiles, history, costs, left, set())
        if choice is None or len(schedule) >= 50:
            break
        schedule.append(f"{choice.strategy} ({fmt_s(costs[choice.strategy])})")
        history.append({"strategy": choice.strategy, "status": "rejected", "gain": 0.0})
        left -= costs[choice.strategy]
    return {
        "budget": fmt_s(budget_s), "budget_s": budget_s, "preset": preset, "gpu": gpu,
        "priors_source": "measured on 2 CPU cores with the tiny model" if preset == "demo"
        else "loop run on 2 CPU cores with saiga-tiny" if preset == "saiga-tiny"
        else "core.device.t4_priors (parameter counts, T4 fp16 rate and bandwidth)"
        + ("" if gpu == "t4" else f", scaled for {gpu}"),
        "summary": {"reserve for final evaluation + report": fmt_s(budget.reserve_s),
                    "model load (prior)": fmt_s(rates.load_s),
                    "time for cycles": fmt_s(cycles_s),
                    "cycles that fit (all rejected)": len(schedule),
                    "train s/example (prior)": round(rates.train_s_per_sample, 3)},
        "prefix_cache": prefix_cache, "benchmarks": benches, "strategies": rows, "schedule": schedule,
        "rates": {"eval_s_per_sample": rates.eval_s_per_sample,
                  "train_s_per_sample": rates.train_s_per_sample, "load_s": rates.load_s},
    }


def _no_call(*args, **kwargs):
    raise RuntimeError("planning never trains or evaluates")
