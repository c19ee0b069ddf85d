"""Each training sized to the errors it targets, and ``loop plan`` running the run's own logic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from core.error_profile import ErrorProfile
from loop.budget import Budget, priors
from loop.planning import make_plan
from loop.policy import expected_gain
from strategies.answer_format_sft import AnswerFormatSFT
from strategies.base import Candidate, Context, CostRates, ProposalFailed, base_candidate
from strategies.sizing import (
    CEILING_RECORDS,
    FLOOR_RECORDS,
    PRIOR_POINTS,
    RECORDS_PER_POINT,
    describe,
    size_training,
)


def profile(benchmark: str, n: int, counts: dict[str, int]) -> ErrorProfile:
    n_errors = sum(counts.values())
    return ErrorProfile(benchmark=benchmark, n=n, n_errors=n_errors, counts=dict(counts),
                        shares={k: v / n_errors for k, v in counts.items()}, per_category={},
                        examples={})


PROFILES = {"gqa_ru": profile("gqa_ru", 400, {"color": 60, "counting": 40, "other": 100}),
            "mmbench_ru": profile("mmbench_ru", 200, {"other": 70, "format_mismatch": 10})}


def ctx_with(*, time_left: float = 100_000.0, history: list | None = None,
             champion: Candidate | None = None) -> Context:
    def never(*args, **kwargs):
        raise AssertionError("sizing never trains or evaluates")

    return Context(cycle=len(history or []) + 1, seed=0, champion=champion or base_candidate(),
                   profiles=PROFILES, history=history or [], time_left_s=time_left,
                   rates=CostRates({"gqa_ru": 0.1, "mmbench_ru": 0.2}, 0.5, load_s=10.0),
                   dev_sizes={"gqa_ru": 300, "mmbench_ru": 100}, data=None, protected={},
                   workdir=Path("."), train=never, evaluate=never)


def accepted_training(index: int, records: int, diffs: dict[str, float]) -> dict:
    """A past cycle whose trained candidate was accepted with these paired differences."""
    return {"index": index, "strategy": "answer_format_sft", "status": "accepted",
            "gain": sum(diffs.values()) / len(diffs), "setting_only": False,
            "candidate": {"details": {"sizing": {"records": records}}},
            "paired": {b: {"diff": d, "n": 300} for b, d in diffs.items()}}


def test_from_the_base_the_records_follow_the_addressed_errors():
    sft = AnswerFormatSFT()
    sizing = sft.sizing(ctx_with())
    # the targeted points are the policy's expected gain, in points
    assert sizing.targeted_points == pytest.approx(
        100 * expected_gain(sft.addresses, PROFILES), abs=0.02)
    assert sizing.records == math.ceil(sizing.targeted_points * RECORDS_PER_POINT)
    assert FLOOR_RECORDS <= sizing.records <= CEILING_RECORDS
    assert not sizing.continuation and sizing.relearn_points == 0
    assert "prior" in sizing.ratio_source
    assert sizing.steps == math.ceil(sizing.records / sizing.batch_size)
    # fewer errors to fix, fewer records
    fewer = dict(PROFILES, gqa_ru=profile("gqa_ru", 400, {"color": 10, "other": 20}))
    ctx = ctx_with()
    ctx.profiles = fewer
    assert sft.sizing(ctx).records < sizing.records


def test_continuing_the_champion_trains_the_delta_not_a_fresh_set():
    history = [accepted_training(1, 300, {"gqa_ru": 0.10, "mmbench_ru": 0.05})]
    champion = base_candidate()
    champion.adapter_path = "/adapters/c1"
    ctx = ctx_with(history=history, champion=champion)
    continued = AnswerFormatSFT().sizing(ctx)
    fresh = size_training(ctx, AnswerFormatSFT.addresses, continuation=False,
                          time_cap_s=AnswerFormatSFT().budget(ctx))
    assert continued.continuation and continued.relearn_points == 0
    assert fresh.relearn_points == pytest.approx(15.0)  # what the champion gained, learnt again
    assert FLOOR_RECORDS < continued.records < fresh.records < CEILING_RECORDS
    # the ratio comes from the accepted training: 300 records fixed 15 points
    ratio = (RECORDS_PER_POINT * PRIOR_POINTS + 300) / (PRIOR_POINTS + 15.0)
    assert continued.records_per_point == pytest.approx(ratio, abs=0.01)
    assert continued.records == math.ceil(continued.targeted_points * continued.records_per_point)
    assert "cycles 1: 300 records fixed 15.0 points" in continued.ratio_source


def test_rejected_candidates_do_not_move_the_ratio():
    rejected = dict(accepted_training(1, 2000, {"gqa_ru": 0.01, "mmbench_ru": 0.0}),
                    status="rejected")
    assert (AnswerFormatSFT().sizing(ctx_with(history=[rejected])).records_per_point
            == pytest.approx(RECORDS_PER_POINT))


def test_little_time_left_caps_the_records_then_declines():
    sft = AnswerFormatSFT()
    roomy = sft.sizing(ctx_with())
    per = roomy.s_per_record
    # a time cap between the floor and what the errors ask for: capped there
    time_left = sft.eval_cost(ctx_with()) + (10.0 + 400 * per) / 0.5
    capped = sft.sizing(ctx_with(time_left=time_left))
    assert FLOOR_RECORDS <= capped.records < roomy.records
    assert capped.records == capped.time_cap_records
    # too little for the floor: declined, and the policy is told what it would need
    tight = ctx_with(time_left=sft.eval_cost(ctx_with()) + (10.0 + 100 * per) / 0.5)
    declined = sft.sizing(tight)
    assert declined.records == 0 and "floor" in declined.declined
    assert sft.estimate_cost(tight) > tight.time_left_s
    with pytest.raises(ProposalFailed, match="declines"):
        sft.propose(tight)
    assert "declined" in describe(declined.to_dict())


def test_the_sizing_line_of_loop_show_names_its_inputs():
    line = describe(AnswerFormatSFT().sizing(ctx_with()).to_dict())
    for part in ("records", "from the base", "gqa_ru", "records/point", "floor", "ceiling",
                 "time cap"):
        assert part in line


def test_the_t4_six_hour_plan_trains_six_candidates_on_100_images():
    plan = make_plan(6 * 3600, "saiga", "t4")
    assert plan["objective"] == "benchmark"
    assert plan["trained_candidates"] >= 6
    assert plan["benchmarks"]["gqa_ru"]["dev_units"] >= 100
    trained = [r for r in plan["schedule"] if r["trains"]]
    # packed by image: 576 image tokens shared by GQA-ru train's ~1.45 questions, 80 text tokens
    assert all(r["tokens_per_record"] == pytest.approx(576 / 1.4535 + 80, abs=1) for r in trained)
    unpacked = make_plan(6 * 3600, "saiga", "t4", packing=False)
    assert unpacked["rates"]["train_s_per_sample"] > 1.3 * plan["rates"]["train_s_per_sample"]


def test_the_plan_sizes_the_subsets_as_the_run_does():
    """``loop plan``'s subsets are what ``Workbench`` chooses from splits of those sizes."""
    from loop.workbench import Workbench

    plan = make_plan(300, "demo", "cpu")
    rates = priors("demo", "cpu")
    # the run has loaded the model when it sizes its subsets
    budget = Budget(300, 0.2, clock=iter([0.0] + [rates.load_s] * 100).__next__)
    bench = Workbench(store=None, run_id=1, vlm=None, profile=None, sources=None, budget=budget,
                      costs=type("C", (), {"rates": rates})(), seed=0, workdir=Path("."),
                      batch_size=8, progress=False)
    for b, per_unit in (("gqa_ru", 4), ("mmbench_ru", 3)):
        p = plan["benchmarks"][b]
        splits = {part: [_example(b, f"{part}{u}", q, per_unit) for u in range(p[part] // per_unit)
                         for q in range(per_unit)] for part in ("dev", "final")}
        bench._choose_subsets(b, splits, None, None)
        # whole units only: within one unit of the planned size
        assert abs(len(bench.dev[b]) - p["dev_subset"]) < per_unit
        assert abs(len(bench.tune[b]) - p["tune_subset"]) < per_unit
        assert abs(len(bench.final[b]) - p["final_subset"]) < per_unit


def _example(benchmark: str, unit: str, q: int, per_unit: int) -> dict:
    if benchmark == "gqa_ru":
        return {"benchmark": benchmark, "id": f"{unit}-{q}", "imageId": unit,
                "types": {"structural": "query", "semantic": "attr"}}
    index = int(unit.removeprefix("dev").removeprefix("final")) + (0 if "dev" in unit else 10_000)
    return {"benchmark": benchmark, "id": f"{unit}-{q}", "index": index + q * 1_000_000,
            "category": "c"}


def test_the_plan_follows_the_flags_the_run_takes():
    deploy = make_plan(6 * 3600, "saiga", "t4", objective="deployment")
    assert deploy["objective"] == "deployment"
    only_sft = make_plan(6 * 3600, "saiga", "t4", names=["answer_format_sft"])
    assert {r["strategy"] for r in only_sft["schedule"]} == {"answer_format_sft"}
    fixed = make_plan(6 * 3600, "saiga", "t4", dev_size=500, final_size=700)
    assert fixed["benchmarks"]["gqa_ru"]["dev_subset"] == 500
    assert fixed["benchmarks"]["mmbench_ru"]["final_subset"] == 700


def test_loop_run_prices_with_its_prefix_cache_flag(monkeypatch):
    """``--no-prefix-cache`` reaches the priors the run's cost model starts from."""
    import loop.controller as controller
    from loop.controller import Loop, RunConfig

    seen = []

    class Priced(Exception):
        pass

    def fake_priors(*args, **kwargs):
        seen.append((args, kwargs))
        raise Priced

    monkeypatch.setattr(controller, "priors", fake_priors)
    for flag in (False, True):
        run = Loop(RunConfig(budget_s=60, gpu="cpu", preset="demo", prefix_cache=flag,
                             packing=not flag), store=None)
        run.sources = None
        with pytest.raises(Priced):
            run.set_up()
    assert [args[2] if len(args) > 2 else kwargs["prefix_cache"] for args, kwargs in seen] == [
        False, True]
    # --no-packing reaches them too: unpacked training is priced per record
    assert [args[3] if len(args) > 3 else kwargs["packing"] for args, kwargs in seen] == [
        True, False]


def test_loop_plan_lists_each_cycle_with_its_kind_records_and_cost(capsys):
    from loop.cli import main

    assert main(["plan", "--budget", "6h", "--gpu", "t4", "--preset", "saiga"]) == 0
    out = capsys.readouterr().out
    assert "--objective benchmark" in out and "packed by image" in out
    table = out.split("The run's cycles if every candidate were rejected", 1)[1]
    assert "trained; the run's own policy" in table
    header = next(line for line in table.splitlines() if line.startswith("cycle"))
    for column in ("strategy", "trains", "records", "tokens/record", "cost"):
        assert column in header
    rows = [line.split() for line in table.splitlines()[3:] if line.strip()]
    assert sum(r[2] == "yes" for r in rows) >= 6


def test_loop_show_prints_the_sizing_of_a_trained_candidate():
    from loop.commands.show import render

    sizing = AnswerFormatSFT().sizing(ctx_with()).to_dict()
    view = {"run_id": 1, "index": 2, "strategy": "answer_format_sft", "status": "rejected",
            "decision": "rejected: the champion stays", "rationale": "r",
            "candidate": {"details": {"sizing": sizing}}, "adapter_id": None, "duration_s": 3.0,
            "subsets": {}, "run_dir": "/tmp/x", "proposals": [], "paired": {}, "dev": {},
            "dev_ci": {}, "error_profile": {}, "examples": {}}
    assert describe(sizing) in render(view).splitlines()
