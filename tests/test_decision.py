"""The decision rule and the final verdict, on mocked scores (no model)."""

from __future__ import annotations

import math

import pytest

from core.evaluate import EvalConfig, EvalResult, summarize
from loop.budget import Budget, CostModel, priors
from loop.controller import Loop, RunConfig
from loop.decision import SETTING_ONLY_REASON, comparisons_made, judge, paired_scores
from loop.policy import choose
from loop.store import Store
from loop.workbench import Scored, Workbench
from strategies.base import Strategy, base_candidate

P6 = 2 / 2**6  # exact McNemar p of 6 discordant pairs, all for the candidate


def _gqa_samples(outcomes, per_image=1, copies=1):
    return [{"sample_id": f"q{i}-{c}", "correct": ok, "correct_normalized": ok,
             "cluster": f"img{i // per_image}", "image_ok": True, "category": "exist",
             "labels": [], "parsed": "да", "output": "да"}
            for i, ok in enumerate(outcomes) for c in range(copies)]


def _scored(outcomes, **kw):
    samples = _gqa_samples(outcomes, **kw)
    return Scored("gqa_ru", samples, summarize("gqa_ru", samples), 1)


def _mmb_scored(group_outcomes):
    samples = [{"sample_id": str(g + r * 1_000_000), "index": g + r * 1_000_000,
                "correct": ok, "cluster": g, "image_ok": True, "category": "c", "labels": [],
                "parsed": "A", "n_options": 2}
               for g, ok in enumerate(group_outcomes) for r in range(2)]
    return Scored("mmbench_ru", samples, summarize("mmbench_ru", samples), 2)


def _pair(copies=1, per_image=1):
    champ = [False] * 6 + [True] * 20 + [False] * 10
    cand = [True] * 6 + [True] * 20 + [False] * 10
    return (_scored(champ, per_image=per_image, copies=copies),
            _scored(cand, per_image=per_image, copies=copies))


# The first comparison of a run is tested at alpha * 6 / pi**2: alphas putting that level
# just above and just below the candidate's p.
@pytest.mark.parametrize(("level", "status"), [(P6 * 1.001, "accepted"), (P6 * 0.999, "rejected")])
def test_p_just_below_its_alpha_k_is_accepted_just_above_rejected(level, status):
    champ, cand = _pair()
    mmb = _mmb_scored([True, False] * 5)
    got, paired = judge({"gqa_ru": champ, "mmbench_ru": mmb}, {"gqa_ru": cand, "mmbench_ru": mmb},
                        alpha=level * math.pi**2 / 6, k_done=0, setting_only=False,
                        objective="benchmark")
    row = paired["gqa_ru"]
    assert got == status and row["p_value"] == pytest.approx(P6)
    assert row["k"] == 1 and row["alpha"] == pytest.approx(level)
    assert {"diff_low", "diff_high", "reason", "decision", "n_clusters"} <= set(row)
    assert paired["mmbench_ru"]["k"] is None  # nothing changed there: no comparison spent


def test_later_comparisons_face_a_smaller_alpha():
    champ, cand = _pair()
    first, _ = judge({"gqa_ru": champ}, {"gqa_ru": cand}, alpha=0.2, k_done=0,
                     setting_only=False, objective="benchmark")
    later, paired = judge({"gqa_ru": champ}, {"gqa_ru": cand}, alpha=0.2, k_done=3,
                          setting_only=False, objective="benchmark")
    assert (first, later) == ("accepted", "rejected")
    assert paired["gqa_ru"]["k"] == 4
    assert comparisons_made([{"paired": paired}, {"paired": {}}, {}]) == 4


@pytest.mark.parametrize("copies", [1, 3, 31])
def test_copying_questions_inside_images_does_not_change_the_decision(copies):
    champ, cand = _pair(copies=copies, per_image=2)
    status, paired = judge({"gqa_ru": champ}, {"gqa_ru": cand}, alpha=0.3, k_done=0,
                           setting_only=False, objective="benchmark")
    once_status, once = judge({"gqa_ru": _pair(per_image=2)[0]},
                              {"gqa_ru": _pair(per_image=2)[1]}, alpha=0.3, k_done=0,
                              setting_only=False, objective="benchmark")
    assert status == once_status
    assert paired["gqa_ru"]["p_value"] == pytest.approx(once["gqa_ru"]["p_value"], rel=1e-12)
    assert paired["gqa_ru"]["n_clusters"] == 18


def test_a_setting_cannot_win_under_benchmark_but_can_under_deployment():
    champ, cand = _pair()
    bench, paired = judge({"gqa_ru": champ}, {"gqa_ru": cand}, alpha=0.3, k_done=0,
                          setting_only=True, objective="benchmark")
    deploy, _ = judge({"gqa_ru": champ}, {"gqa_ru": cand}, alpha=0.3, k_done=0,
                      setting_only=True, objective="deployment")
    assert (bench, deploy) == ("rejected", "accepted")
    assert paired["gqa_ru"]["decision"] == SETTING_ONLY_REASON
    assert paired["gqa_ru"]["setting_only"] and paired["gqa_ru"]["better"]


def test_significantly_worse_on_one_benchmark_is_rejected():
    champ, cand = _pair()
    good, bad = _mmb_scored([True] * 12), _mmb_scored([False] * 12)
    status, paired = judge({"gqa_ru": champ, "mmbench_ru": good},
                           {"gqa_ru": cand, "mmbench_ru": bad}, alpha=0.3, k_done=0,
                           setting_only=False, objective="deployment")
    assert status == "rejected" and "worse on mmbench_ru" in paired["gqa_ru"]["decision"]


class _Setting:
    trains = False
    addresses = {"format_mismatch": 0.5}
    requires = None
    waiting = classmethod(Strategy.waiting.__func__)


class _Adapter(_Setting):
    trains = True


def _profiles():
    from core.error_profile import ErrorProfile

    return {"gqa_ru": ErrorProfile("gqa_ru", n=100, n_errors=50,
                                   counts={"format_mismatch": 50},
                                   shares={"format_mismatch": 1.0}, per_category={},
                                   examples={})}


def test_policy_tries_a_setting_once_per_champion_under_benchmark():
    catalog = {"prompt_constraints": _Setting, "answer_format_sft": _Adapter}
    costs = {"prompt_constraints": 10.0, "answer_format_sft": 1000.0}
    first = choose(_profiles(), [], costs, 10_000, set(), catalog, objective="benchmark",
                   follow_up_s=100.0)  # a context distillation fits after it
    assert first.strategy == "prompt_constraints" and "cannot win" in first.rationale
    history = [{"strategy": "prompt_constraints", "status": "rejected", "gain": 0.1,
                "setting_only": True}]
    second = choose(_profiles(), history, costs, 10_000, set(), catalog, objective="benchmark",
                    follow_up_s=100.0)
    assert second.strategy == "answer_format_sft"
    skipped = {r["strategy"]: r.get("skipped", "") for r in second.ranking}
    assert "one was already tried for this champion" in skipped["prompt_constraints"]
    # nothing that trains fits: the setting is tried again, and the rationale says so
    again = choose(_profiles(), history, costs, 500, set(), catalog, objective="benchmark",
                   follow_up_s=100.0)
    assert again.strategy == "prompt_constraints" and "tried again" in again.rationale
    # under deployment a setting is an ordinary candidate
    deploy = choose(_profiles(), history, costs, 10_000, set(), catalog, objective="deployment")
    assert deploy.strategy == "prompt_constraints"


# ---------------------------------------------------------------------------- final


def _examples(benchmark):
    if benchmark == "gqa_ru":
        return [{"benchmark": "gqa_ru", "id": f"q{i}", "imageId": f"img{i // 3}",
                 "question": "Что это?", "answer": "кот", "types": {"detailed": "exist"}}
                for i in range(30)]
    return [{"benchmark": "mmbench_ru", "id": str(g + r * 1_000_000), "index": g + r * 1_000_000,
             "question": "Что это?", "answer": "A", "options": {"A": "кот", "B": "пёс"},
             "category": "c"} for g in range(10) for r in range(2)]


def _fake_evaluate(vlm, examples, config, **kwargs):
    """Half right under the lmms-eval protocol; every setting the champion carries is better."""
    b = examples[0]["benchmark"]
    samples = []
    for i, ex in enumerate(examples):
        ok = config.mode == "likelihood" or config.max_new_tokens == 8 or i % 2 == 0
        samples.append({"sample_id": ex["id"], "question": ex["question"], "answer": ex["answer"],
                        "correct": ok, "correct_normalized": ok, "image_ok": True, "labels": [],
                        "category": "c", "parsed": "A" if ok else "B", "output": "x",
                        "cluster": ex.get("imageId") or int(ex["index"]) % 1_000_000,
                        **({"index": ex["index"], "n_options": 2} if b == "mmbench_ru" else {})})
    return EvalResult(b, config.protocol(b), config.to_dict(), summarize(b, samples), samples, 0.1)


class _VLM:
    adapters: dict = {}

    def set_adapter(self, name):
        pass


@pytest.mark.parametrize("setting", ["decoding", "likelihood"])
def test_a_settings_champion_leaves_final_equal_to_the_baseline(setting, tmp_path, monkeypatch):
    monkeypatch.setattr("loop.modelbench.evaluate", _fake_evaluate)
    store = Store(":memory:")
    config = RunConfig(budget_s=100.0, preset="demo", objective="benchmark")
    loop = Loop(config, store, echo=lambda msg: None)
    loop.run_id = store.create_run(config={}, environment={}, budget_s=100.0, preset="demo",
                                   gpu="cpu")
    loop.budget = Budget(100.0)
    loop.bench = Workbench(store=store, run_id=loop.run_id, vlm=_VLM(), profile=None,
                           sources=None, budget=loop.budget, costs=CostModel(priors("demo", "cpu")),
                           seed=0, workdir=tmp_path, batch_size=4, progress=False)
    loop.bench.final = {b: _examples(b) for b in ("gqa_ru", "mmbench_ru")}
    champion = base_candidate()
    if setting == "decoding":
        champion.eval_configs["gqa_ru"] = EvalConfig(max_new_tokens=8, stop_strings=["\n"])
    else:
        champion.eval_configs["mmbench_ru"] = EvalConfig(mode="likelihood")
    loop.final(champion)
    run = store.get_run(loop.run_id)
    assert run["final"] == run["baseline"]
    assert run["final_p"] == {"gqa_ru": 1.0, "mmbench_ru": 1.0}
    changed = "gqa_ru" if setting == "decoding" else "mmbench_ru"
    assert run["final_deployed"][changed] == 1.0 > run["final"][changed]
    roles = {e["role"] for e in store.evaluations(loop.run_id)}
    assert roles == {"final_baseline", "final_champion", "final_deployed"}
    # the stored predictions keep their clusters, so a resumed run tests by image
    first = store.evaluations(loop.run_id)[0]
    assert all(s["cluster"] is not None for s in loop.bench.load_scored(first["id"]).samples)


def test_a_gqa_sample_without_its_image_is_an_error_not_a_per_question_test():
    from core.exceptions import DataError

    champ, cand = _scored([True] * 3 + [False] * 3), _scored([True] * 6)
    del cand.samples[0]["cluster"]  # the candidate's side is not read for clusters
    paired_scores(champ, cand)
    del champ.samples[4]["cluster"]
    with pytest.raises(DataError, match=r"1 of 6 GQA-ru predictions name no image.*'q4-0'"):
        paired_scores(champ, cand)
    with pytest.raises(DataError, match="name no image"):
        summarize("gqa_ru", champ.samples)
