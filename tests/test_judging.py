"""Which questions shape a candidate and which judge it, through the real controller and
store with a fake model (``loop.judging``): the error profile and a setting-only candidate
read the analysis subset, dev judges, a clearly worse candidate stops for futility."""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import pytest

import strategies
from core.evaluate import EvalConfig, EvalResult, summarize
from loop.budget import Budget, CostModel, priors
from loop.cli import main
from loop.controller import Loop, RunConfig
from loop.decision import SETTING_ONLY_REASON, comparisons_made
from loop.futility import replay_run
from loop.store import Store
from loop.workbench import Workbench
from strategies.base import Strategy
from strategies.context_distill import winning_setting

SEEN: list[str] = []
PROFILE = SimpleNamespace(name="cpu")


def _gqa(prefix: str, images: int) -> list[dict]:
    return [{"benchmark": "gqa_ru", "id": f"{prefix}q{i}", "imageId": f"{prefix}img{i // 3}",
             "question": f"Вопрос {prefix}{i}?", "answer": "кот",
             "types": {"detailed": "exist", "structural": "verify", "semantic": "attr"}}
            for i in range(3 * images)]


def _mmb(first: int, groups: int) -> list[dict]:
    return [{"benchmark": "mmbench_ru", "id": str(g + r * 1_000_000), "index": g + r * 1_000_000,
             "question": f"Что на картинке {g}?", "answer": "A", "hint": None,
             "options": {"A": "кот", "B": "пёс"}, "category": "c"}
            for g in range(first, first + groups) for r in range(2)]


def _right(vlm, config: EvalConfig, ex: dict) -> bool:
    adapter = vlm.adapters.get(vlm.active) if vlm.active else None
    if adapter and adapter.endswith("good"):
        return True
    if adapter and adapter.endswith("bad"):
        return False
    if config.max_new_tokens == 8:  # the setting the fake remedy proposes
        return True
    key = ex["imageId"] if ex["benchmark"] == "gqa_ru" else str(int(ex["index"]) % 1_000_000)
    return zlib.crc32(f"{key}:{ex['id']}".encode()) % 2 == 0


def _fake_evaluate(vlm, examples, config, **kwargs):
    b = examples[0]["benchmark"]
    samples = []
    for ex in examples:
        ok = _right(vlm, config, ex)
        samples.append({"sample_id": ex["id"], "question": ex["question"], "answer": ex["answer"],
                        "prompt": "p", "output": "кот" if ok else "пёс",
                        "parsed": ("A" if ok else "B") if b == "mmbench_ru" else None,
                        "correct": ok, "correct_normalized": ok, "image_ok": True,
                        "labels": [] if ok else ["other"], "category": "c", "seconds": 0.01,
                        "cluster": ex.get("imageId") or int(ex["index"]) % 1_000_000,
                        **({"index": ex["index"], "n_options": 2} if b == "mmbench_ru" else {})})
    return EvalResult(b, config.protocol(b), config.to_dict(), summarize(b, samples), samples,
                      0.01 * len(samples))


class _VLM:
    def __init__(self):
        self.adapters, self.active = {}, None

    def set_adapter(self, name):
        self.active = name

    def load_adapter(self, path, name):
        self.adapters[name] = path

    def delete_adapter(self, name):
        self.adapters.pop(name, None)


class _Fake(Strategy):
    family, trains, summary = "fake", True, "fake"
    addresses = {"other": 1.0}
    adapter = ""

    def propose(self, ctx):
        SEEN.extend(str(e["id"]) for p in ctx.profiles.values()
                    for kept in p.examples.values() for e in kept)
        if not self.adapter:  # a setting: the champion with another decoding on GQA-ru
            configs = dict(ctx.champion.eval_configs)
            configs["gqa_ru"] = EvalConfig(max_new_tokens=8)
            return ctx.champion.derive(self.name, "setting", eval_configs=configs)
        return ctx.champion.derive(self.name, self.adapter, adapter_path=f"/fake/{self.adapter}")

    def estimate_cost(self, ctx):
        return 1.0


class Good(_Fake):
    name, adapter = "fake_good", "good"


class Bad(_Fake):
    name, adapter = "fake_bad", "bad"


class Setting(_Fake):
    name, trains = "fake_setting", False


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setattr("loop.modelbench.evaluate", _fake_evaluate)
    for cls in (Good, Bad, Setting):
        monkeypatch.setitem(strategies.REGISTRY, cls.name, f"{__name__}:{cls.__name__}")
    SEEN.clear()
    store = Store(tmp_path / "e.db")

    def make(names, objective="benchmark", run_id=None):
        config = RunConfig(budget_s=3600.0, preset="demo", objective=objective, strategies=names)
        loop = Loop(config, store, echo=lambda msg: None)
        loop.run_id = run_id or store.create_run(config={}, environment={}, budget_s=3600.0,
                                                 preset="demo", gpu="cpu")
        loop.budget = Budget(3600.0)
        bench = Workbench(store=store, run_id=loop.run_id, vlm=_VLM(), profile=PROFILE,
                          sources=SimpleNamespace(data=None), budget=loop.budget,
                          costs=CostModel(priors("demo", "cpu")), seed=0, workdir=tmp_path,
                          batch_size=4, progress=False)
        bench.dev = {"gqa_ru": _gqa("d", 30), "mmbench_ru": _mmb(0, 20)}
        bench.tune = {"gqa_ru": _gqa("t", 10), "mmbench_ru": _mmb(100, 8)}
        bench.final = {"gqa_ru": _gqa("f", 10), "mmbench_ru": _mmb(200, 8)}
        bench.by_id = {b: {e["id"]: e for part in (bench.dev, bench.tune, bench.final)
                           for e in part[b]} for b in bench.dev}
        bench.protected = {"images": set(), "questions": set()}
        loop.bench = bench
        return loop

    return SimpleNamespace(store=store, make=make, db=tmp_path / "e.db")


def _cycle(loop, champion=None, scores=None):
    if champion is None:
        champion, scores = loop.baseline()
    choice = loop.choose_next(champion, scores)
    return loop.cycle(choice, champion, scores)


def _ids(store, eval_id) -> set[str]:
    return {p["sample_id"] for p in store.predictions(eval_id)}


def test_the_profile_a_candidate_is_built_from_shares_no_question_with_its_paired_test(world,
                                                                                     capsys):
    """The planted dependency: a remedy that reads the champion's wrong answers through its
    context. Those answers must come from questions the paired test never uses."""
    loop = world.make(["fake_good"])
    champion, scores = _cycle(loop)
    store = world.store
    (cycle,) = store.cycles(loop.run_id)
    assert cycle["status"] == "accepted"
    judged = {b: _ids(store, i) for b, i in cycle["eval_ids"].items()}
    champion_dev = {b: _ids(store, e["id"]) for e in store.evaluations(loop.run_id, role="baseline")
                    for b in [e["benchmark"]]}
    seen = set(SEEN)
    assert seen and not seen & set().union(*judged.values(), *champion_dev.values())
    # through the store: the profile's evaluations and the judging ones, role by role
    roles = cycle["subsets"]
    for b, side in roles["profile"].items():
        profile_ev = store.evaluation(side["eval_id"])
        assert (profile_ev["role"], profile_ev["split"]) == ("analysis", "analysis")
        assert not _ids(store, side["eval_id"]) & judged[b]
        assert roles["judged"][b]["subset"] == "dev"
        assert store.evaluation(cycle["eval_ids"][b])["split"] == "dev"
    # the new champion is analysed once more, on the analysis subsets; a resumed loop reads the
    # stored analyses back instead of evaluating again
    loop.choose_next(champion, scores)
    analyses = store.evaluations(loop.run_id, role="analysis")
    assert sorted((e["cycle_index"] or 0) for e in analyses) == [0, 0, 1, 1]
    again = world.make(["fake_good"], run_id=loop.run_id)
    champion2, scores2 = again.baseline()
    again.choose_next(champion2, scores2)
    assert len(store.evaluations(loop.run_id, role="analysis")) == 4
    capsys.readouterr()
    assert main(["show", "0", "--db", str(world.db)]) == 0
    assert "error profile from: the analysis subset, gqa_ru n=30 (10 images)" in (
        capsys.readouterr().out)
    # replaying the futility rule over the stored evaluations does not stop the accepted one
    (row,) = replay_run(store, loop.run_id, min_questions=4)
    assert row["status"] == "accepted" and row["replay"]["stopped"] is None


def test_a_setting_under_benchmark_is_measured_on_the_analysis_subset_and_spends_no_alpha(world):
    # under --objective benchmark a setting is tried only when its distillation can follow it
    loop = world.make(["fake_setting", "context_distill"])
    champion, _ = _cycle(loop)
    store = world.store
    (cycle,) = store.cycles(loop.run_id)
    assert cycle["status"] == "rejected" and cycle["dev"] == {}
    gqa = cycle["paired"]["gqa_ru"]
    assert gqa["k"] is None and gqa["subset"] == "analysis" and gqa["diff"] > 0
    assert gqa["decision"].startswith(SETTING_ONLY_REASON)
    ev = store.evaluation(cycle["eval_ids"]["gqa_ru"])
    assert ev["split"] == "analysis"
    assert _ids(store, ev["id"]) == {e["id"] for e in loop.bench.tune["gqa_ru"]}
    assert comparisons_made(loop.history) == 0
    # context distillation picks the setting from the analysis measurement
    ctx = loop.context(champion, {}, 100.0)
    entry, benchmarks = winning_setting(ctx)
    assert entry["index"] == 1 and benchmarks == ["gqa_ru"]


def test_under_deployment_a_setting_is_judged_on_dev(world):
    loop = world.make(["fake_setting"], objective="deployment")
    _cycle(loop)
    (cycle,) = world.store.cycles(loop.run_id)
    assert cycle["status"] == "accepted" and cycle["paired"]["gqa_ru"]["k"] == 1
    assert world.store.evaluation(cycle["eval_ids"]["gqa_ru"])["split"] == "dev"


def test_a_clearly_worse_candidate_stops_early_with_its_reason_stored_and_shown(world, capsys):
    loop = world.make(["fake_bad"])
    _cycle(loop)
    store = world.store
    (cycle,) = store.cycles(loop.run_id)
    assert cycle["status"] == "rejected"
    assert cycle["paired"]["gqa_ru"]["decision"].startswith("stopped for futility: ")
    assert cycle["paired"]["gqa_ru"]["k"] == 1 and cycle["paired"]["mmbench_ru"]["k"] == 2
    for b, eval_id in cycle["eval_ids"].items():
        ev = store.evaluation(eval_id)
        progress = ev["progress"]
        assert progress["stopped"] and "cannot" in progress["reason"]
        assert progress["n_done"] < progress["n_total"] == len(loop.bench.dev[b])
        assert progress["seconds"] < progress["full_s_est"]
    capsys.readouterr()
    assert main(["show", "1", "--db", str(world.db)]) == 0
    shown = capsys.readouterr().out
    assert "gqa_ru: stopped for futility after" in shown
    assert "rule: stopped for futility: cannot pass its α_k" in shown
    assert "error profile from: the analysis subset, gqa_ru n=30 (10 images)" in shown
    assert "judged on: the dev subset" in shown
