"""Strategies: a conformance suite every registered strategy passes, and one test group each.

Everything runs offline on synthetic data: GQA-ru-like train questions from the demo's scene
generator (in memory, loaders monkeypatched), a fake clock, and fake ``ctx.train`` /
``ctx.evaluate`` callbacks that record what they were asked and advance the clock.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

import strategies
from core import data as core_data
from core.data import DataSources
from core.demo import scenes as sc
from core.error_profile import BenchmarkOptimizer
from core.evaluate import EvalConfig, build_prompt
from core.exceptions import DataError
from core.metrics import extract_choice
from core.sft import validate_records
from core.train import TrainResult
from strategies.base import (
    BENCHMARKS,
    Candidate,
    Context,
    CostRates,
    Exhausted,
    ProposalFailed,
    base_candidate,
)
from strategies.guard import (
    LeakageError,
    check_records,
    normalize_question,
    protected_keys,
    template_questions,
)

TESTS = Path(__file__).parent

# ---------------------------------------------------------------- synthetic world


def gqa_examples(prefix: str, n_images: int, seed: int) -> list[dict]:
    """GQA-ru-like records (the loader's format) about rendered demo scenes."""
    rng = random.Random(seed)
    out = []
    for i in range(n_images):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        image_id = f"{prefix}{i:05d}"
        for j, q in enumerate(sc.questions_for(scene, rng)):
            out.append({"id": f"{image_id}{j}", "imageId": image_id, "question": q.question,
                        "answer": q.answer, "fullAnswer": q.full_answer,
                        "types": dict(zip(("structural", "semantic", "detailed"), q.types)),
                        "semantic": [{"operation": op, "argument": arg, "dependencies": []}
                                     for op, arg in q.semantic],
                        "benchmark": "gqa_ru", "_image": lambda im=img: im})
    return out


def mmbench_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        q = sc.questions_for(scene, rng)[0]
        opts = [q.answer, *[o for o in q.options if o != q.answer][:2]]
        out.append({"index": i, "id": str(i), "question": f"Вопрос {i}: {q.question}",
                    "hint": None, "options": dict(zip("ABC", opts)), "answer": "A",
                    "category": "attribute_recognition", "benchmark": "mmbench_ru",
                    "_image": lambda im=img: im})
    return out


@pytest.fixture(scope="module")
def world():
    train = gqa_examples("n", 40, seed=1)
    testdev = gqa_examples("t", 10, seed=2)
    testdev[0] = {**testdev[0], "question": "Что написано на табличке у входа?"}
    mmb = mmbench_examples(6, seed=3)
    return SimpleNamespace(train=train, testdev=testdev, mmbench=mmb,
                           protected=protected_keys(testdev + mmb, digests=True))


@pytest.fixture()
def fake_data(world, monkeypatch, tmp_path):
    """Loaders return the synthetic world; LLaVA-Instruct-ru has 12 conversations on disk."""
    coco = tmp_path / "coco"
    (coco / "train2017").mkdir(parents=True)
    rng = random.Random(4)
    rows = []
    for i in range(12):
        sc.render(sc.random_scene(rng), rng).save(coco / "train2017" / f"{i:012d}.jpg")
        rows.append({"type": "conv", "id": f"{i:06d}", "image": f"train2017/{i:012d}.jpg",
                     "conversations": [{"from": "human", "value": "<image>\nОпиши картинку."},
                                       {"from": "gpt", "value": f"Подробное описание {i}."}]})
    monkeypatch.setattr(core_data, "load_gqa", lambda source, split: list(world.train))
    monkeypatch.setattr(core_data, "load_llava_instruct",
                        lambda source, coco_dir=None, part="train": [dict(r) for r in rows])
    return DataSources(gqa="fake-gqa", instruct="fake-instruct", coco_dir=str(coco))


def make_profile(benchmark: str, labels_per_error: list[list[str]], n: int = 40):
    categories = {"color": "attr", "location": "rel", "counting": "obj"}
    samples = []
    for i in range(n):
        labels = labels_per_error[i] if i < len(labels_per_error) else []
        cat = next((categories[lb] for lb in labels if lb in categories), "attr")
        samples.append({"example": {"id": str(i), "question": "q", "answer": "a",
                                    "types": {"semantic": cat}, "category": cat},
                        "labels": labels})
    return BenchmarkOptimizer().profile(benchmark, samples)


def profiles(gqa_format: int = 20, mmb_format: int = 10, gqa_color: int = 6) -> dict:
    gqa = [["format_mismatch"]] * gqa_format + [["color"]] * gqa_color + [["location"]] * 2
    mmb = [["format_mismatch"]] * mmb_format + [["other"]] * 4
    return {"gqa_ru": make_profile("gqa_ru", gqa), "mmbench_ru": make_profile("mmbench_ru", mmb)}


@dataclass
class Fakes:
    """A fake clock and the callbacks; ``train`` spends all of its deadline when it must."""

    t: float = 1000.0
    train_s_per_sample: float = 0.2
    fail_training: bool = False
    train_calls: list = field(default_factory=list)
    eval_calls: list = field(default_factory=list)
    trained: dict = field(default_factory=dict)

    def clock(self) -> float:
        return self.t

    def train(self, records, config, *, name, deadline_s):
        validate_records(records)
        self.train_calls.append({"t": self.t, "deadline_s": deadline_s, "config": config,
                                 "records": records, "name": name})
        need = config.steps * config.batch_size * self.train_s_per_sample
        self.t += min(need, deadline_s)
        if self.fail_training:
            return None, TrainResult(status="failed_nan", adapter_name=name, error="loss is nan")
        path = self.workdir / "adapters" / name
        path.mkdir(parents=True, exist_ok=True)
        self.trained[str(path)] = config.to_dict()
        return str(path), TrainResult(status="finished" if need <= deadline_s else "deadline",
                                      adapter_name=name, adapter_path=str(path),
                                      steps=config.steps)

    def evaluate(self, benchmark, eval_config, *, adapter_path, examples=None):
        n = len(examples) if examples is not None else 40
        self.eval_calls.append({"benchmark": benchmark, "adapter_path": adapter_path,
                                "examples": examples, "config": eval_config})
        self.t += 0.5 * n
        cfg = self.trained.get(adapter_path) or {}
        lr_fit = -abs(math.log10(cfg.get("lr", 1e-5)) - math.log10(3e-4))
        key = json.dumps([benchmark, cfg.get("rank"), round(lr_fit, 6)], sort_keys=True)
        acc = 0.5 + 0.1 * lr_fit + int(hashlib.sha1(key.encode()).hexdigest()[:4], 16) / 65535 / 10
        k = max(0, min(n, round(acc * n)))
        return SimpleNamespace(accuracy=k / n, n=n, samples=[
            {"correct": i < k, "output": "да", "parsed": "A"} for i in range(n)])


def make_ctx(tmp_path: Path, data: DataSources, protected: dict, *, seed: int = 0,
             time_left: float = 600.0, history: list | None = None, champion: Candidate | None = None,
             profs: dict | None = None, storage: str | None = None, tune: dict | None = None,
             fakes: Fakes | None = None) -> tuple[Context, Fakes]:
    fakes = fakes or Fakes()
    workdir = tmp_path / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    fakes.workdir = workdir
    if tune is None:
        tune = {"gqa_ru": gqa_examples("d", 3, seed=9), "mmbench_ru": mmbench_examples(4, seed=8)}
    ctx = Context(cycle=len(history or []), seed=seed, champion=champion or base_candidate(),
                  profiles=profiles() if profs is None else profs, history=history or [],
                  time_left_s=time_left,
                  rates=CostRates({"gqa_ru": 0.5, "mmbench_ru": 0.5}, fakes.train_s_per_sample,
                                  load_s=1.0),
                  dev_sizes={"gqa_ru": 40, "mmbench_ru": 40}, data=data, protected=protected,
                  workdir=workdir, train=fakes.train, evaluate=fakes.evaluate,
                  tune_examples=tune, optuna_storage=storage, clock=fakes.clock)
    return ctx, fakes


def record_of(candidate: Candidate) -> dict:
    return {"strategy": candidate.strategy, "status": "rejected", "gain": 0.0,
            "candidate": candidate.to_dict()}


def winning_history(benchmark: str = "gqa_ru", gain: float = 0.05,
                    adapter_path: str | None = None) -> list[dict]:
    """One rejected cycle whose setting-only candidate won on dev (objective benchmark)."""
    cand = base_candidate()
    cand.strategy, cand.adapter_path = "generation_params", adapter_path
    cand.eval_configs[benchmark] = EvalConfig(max_new_tokens=8, stop_strings=["\n", "."])
    return [{"index": 1, "strategy": "generation_params", "status": "rejected", "gain": gain,
             "setting_only": True, "candidate": cand.to_dict(),
             "paired": {benchmark: {"diff": gain, "p_value": 0.01}}}]


def history_for(name: str) -> list[dict]:
    """An empty history, or one with a winning setting for strategies that wait for it."""
    return [] if strategies.get(name).waiting([]) is None else winning_history()


# ---------------------------------------------------------------- conformance suite

NAMES = strategies.names()


@pytest.mark.parametrize("name", NAMES)
def test_conformance_candidate_is_valid(name, tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, history=history_for(name))
    cand = strategies.get(name).propose(ctx)
    assert isinstance(cand, Candidate) and cand.strategy == name
    assert set(cand.eval_configs) == set(BENCHMARKS)
    assert all(isinstance(c, EvalConfig) for c in cand.eval_configs.values())
    assert cand.description and cand.details
    data = json.loads(json.dumps(cand.to_dict()))
    assert Candidate.from_dict(data).to_dict() == data
    if strategies.get(name).trains:
        assert cand.adapter_path and Path(cand.adapter_path).is_dir()
    else:
        assert cand.adapter_path == ctx.champion.adapter_path
        assert cand.eval_configs != ctx.champion.eval_configs


@pytest.mark.parametrize("name", NAMES)
def test_conformance_cost_is_positive_seconds(name, tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, history=history_for(name))
    strategy = strategies.get(name)
    cost = strategy.estimate_cost(ctx)
    assert isinstance(cost, float) and math.isfinite(cost) and cost > 0
    assert cost >= strategy.eval_cost(ctx) * 0.25


@pytest.mark.parametrize("name", NAMES)
def test_conformance_deterministic_under_seed(name, tmp_path, fake_data, world):
    def run(sub: str) -> str:
        ctx, _ = make_ctx(tmp_path / sub, fake_data, world.protected, seed=7,
                          history=history_for(name))
        text = json.dumps(strategies.get(name).propose(ctx).to_dict(), sort_keys=True)
        return text.replace(str(ctx.workdir.resolve()), "W").replace(str(ctx.workdir), "W")

    assert run("a") == run("b")


@pytest.mark.parametrize("time_left", [900.0, 120.0, 45.0, 5.0])
@pytest.mark.parametrize("name", NAMES)
def test_conformance_respects_the_time_given(name, time_left, tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, time_left=time_left,
                          history=history_for(name))
    start = fakes.t
    try:
        strategies.get(name).propose(ctx)
    except (ProposalFailed, Exhausted):
        pass
    for call in fakes.train_calls:
        assert call["deadline_s"] > 0
        assert call["t"] - start + call["deadline_s"] <= time_left + 1e-6
    assert fakes.t - start <= time_left + 1e-6


@pytest.mark.parametrize("name", [n for n in NAMES if not strategies.get(n).trains])
def test_conformance_exhausts_as_history_fills(name, tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected)
    seen = set()
    for _ in range(100):
        try:
            cand = strategies.get(name).propose(ctx)
        except Exhausted:
            break
        key = json.dumps(cand.to_dict()["eval_configs"], sort_keys=True)
        assert key not in seen, "a proposal was repeated"
        seen.add(key)
        ctx.history.append(record_of(cand))
    else:
        pytest.fail(f"{name} never raised Exhausted")
    assert len(seen) >= 3 and not fakes.train_calls


def test_every_registered_strategy_has_its_own_tests():
    names = set()
    for path in TESTS.glob("test_*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    missing = [s for s in strategies.names() if not any(n.startswith(f"test_{s}") for n in names)]
    assert not missing, f"registered strategies without a test_<name>* function: {missing}"


def test_registry_lists_the_valid_names_on_an_unknown_one():
    with pytest.raises(KeyError, match="valid: answer_format_sft, context_distill, generation_params"):
        strategies.get("nope")


# ---------------------------------------------------------------- prompt_constraints

from strategies.prompt_constraints import gqa_variants, mmbench_variants  # noqa: E402


def test_prompt_constraints_aims_at_the_larger_format_share(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected,
                      profs=profiles(gqa_format=2, mmb_format=30))
    cand = strategies.get("prompt_constraints").propose(ctx)
    assert cand.details["benchmark"] == "mmbench_ru"
    assert cand.eval_configs["gqa_ru"] == ctx.champion.eval_configs["gqa_ru"]
    mmb = cand.eval_configs["mmbench_ru"]
    assert mmb.option_header == " Варианты ответа:" and "только буквой" in mmb.instruction


def test_prompt_constraints_walks_every_untried_variant_then_exhausts(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    strategy = strategies.get("prompt_constraints")
    proposed = []
    while True:
        try:
            cand = strategy.propose(ctx)
        except Exhausted:
            break
        proposed.append((cand.details["benchmark"], cand.details["variant"]))
        ctx.history.append(record_of(cand))
    expected = {(v.benchmark, v.name) for v in gqa_variants() + mmbench_variants()}
    assert set(proposed) == expected and len(proposed) == len(expected)
    # a new champion adapter makes every variant untried again
    ctx.champion = ctx.champion.derive("answer_format_sft", "sft", adapter_path="/a/new")
    assert strategy.propose(ctx).adapter_path == "/a/new"


def test_prompt_constraints_skips_letter_prompts_under_likelihood(tmp_path, fake_data, world):
    champion = base_candidate()
    champion.eval_configs["mmbench_ru"] = EvalConfig(mode="likelihood")
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, champion=champion,
                      profs=profiles(gqa_format=1, mmb_format=30))
    assert all(v.benchmark == "gqa_ru" for v in strategies.get("prompt_constraints").variants(ctx))


def test_prompt_constraints_golden_prompts():
    gqa = {"benchmark": "gqa_ru", "question": "Какого цвета фигура слева?"}
    mmb = {"benchmark": "mmbench_ru", "question": "Какого цвета фигура?", "hint": None,
           "options": {"A": "синий", "B": "красный"}}
    assert build_prompt(gqa, EvalConfig(**gqa_variants()[0].changes)) == (
        "Какого цвета фигура слева?\nОтветь одним словом, без пояснений.")
    assert build_prompt(mmb, EvalConfig(**mmbench_variants()[0].changes)) == (
        "Какого цвета фигура? Варианты ответа:\nA. синий\nB. красный\n\n"
        "Ответь только буквой варианта (A, B, C или D).")
    assert build_prompt(mmb, EvalConfig(**mmbench_variants()[3].changes)) == (
        "Какого цвета фигура? Варианты ответа:\nA. синий\nB. красный\n\n"
        "Выбери правильный вариант ответа буквой.")


def test_prompt_constraints_cost_is_one_dev_evaluation(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    assert strategies.get("prompt_constraints").estimate_cost(ctx) == 0.5 * 40  # GQA-ru only


# ---------------------------------------------------------------- generation_params


def test_generation_params_mmbench_format_mismatch_tries_likelihood_first(tmp_path, fake_data,
                                                                          world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected,
                      profs=profiles(gqa_format=2, mmb_format=30))
    cand = strategies.get("generation_params").propose(ctx)
    assert cand.details["variant"] == "likelihood"
    assert cand.eval_configs["mmbench_ru"].mode == "likelihood"
    assert cand.eval_configs["gqa_ru"] == ctx.champion.eval_configs["gqa_ru"]


def test_generation_params_verbose_gqa_gets_short_stopped_answers(tmp_path, fake_data, world):
    champion = base_candidate()
    champion.eval_configs["gqa_ru"] = EvalConfig(instruction="Ответь одним словом, без пояснений.")
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, champion=champion,
                      profs=profiles(gqa_format=30, mmb_format=1))
    gqa = strategies.get("generation_params").propose(ctx).eval_configs["gqa_ru"]
    assert gqa.max_new_tokens == 8 and gqa.stop_strings == ["\n", "."]
    assert gqa.instruction == "Ответь одним словом, без пояснений."  # the champion's prompt kept
    assert champion.eval_configs["gqa_ru"].stop_strings == []


def test_generation_params_content_errors_try_beams_before_format_fixes(tmp_path, fake_data,
                                                                        world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected,
                      profs=profiles(gqa_format=0, mmb_format=0, gqa_color=10))
    names = [v.name for v in strategies.get("generation_params").variants(ctx)]
    assert names[:2] == ["beams3", "repetition_penalty"]


def test_generation_params_cost_follows_the_next_variant(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected,
                      profs=profiles(gqa_format=2, mmb_format=30))
    strategy = strategies.get("generation_params")
    assert strategy.estimate_cost(ctx) == 0.5 * 20  # likelihood on MMBench-ru, GQA-ru reused
    ctx.profiles = profiles(gqa_format=0, mmb_format=0)
    assert strategy.estimate_cost(ctx) == 3 * 20  # three beams on GQA-ru


def test_generation_params_likelihood_champion_leaves_mmbench_alone(tmp_path, fake_data, world):
    champion = base_candidate()
    champion.eval_configs["mmbench_ru"] = EvalConfig(mode="likelihood")
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, champion=champion)
    assert {v.benchmark for v in strategies.get("generation_params").variants(ctx)} == {"gqa_ru"}


# ---------------------------------------------------------------- answer_format_sft and the guard

from strategies.sft_data import Mix, SFTDataBuilder  # noqa: E402


def test_answer_format_sft_records_pass_the_schema_and_follow_the_mix(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    records, info = SFTDataBuilder(ctx).build(60, Mix(0.5, 0.3, 0.2), seed=0)
    validate_records(records)
    assert info["counts"] == {"choice": 18, "instruct": 12, "short": 30}
    assert {r["source"] for r in records} == {"gqa_train_short", "gqa_train_choice",
                                              "llava_instruct"}
    assert len({r["id"] for r in records}) == len(records)


def test_answer_format_sft_choice_records_look_like_mmbench(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    records, _ = SFTDataBuilder(ctx).build(40, Mix(0.0, 1.0, 0.0), seed=1)
    by_type: dict[str, set[str]] = {}
    for ex in world.train:
        by_type.setdefault(ex["types"]["detailed"], set()).add(ex["answer"])
    letters = set()
    for r in records:
        prompt, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        options = r["meta"]["options"]
        expected = build_prompt({"benchmark": "mmbench_ru", "question": r["meta"]["question"],
                                 "hint": None, "options": options}, EvalConfig())
        assert prompt == expected and prompt.endswith("\nВыбери правильный вариант ответа буквой.")
        assert " There are several options:\nA. " in prompt
        assert answer in options and 2 <= len(options) <= 4
        assert set(options.values()) <= by_type[r["meta"]["detailed_type"]]  # same answer type
        assert "да" not in options.values()
        letters.add(answer)
    assert len(letters) >= 3  # letters are shuffled


def test_choice_records_answer_the_way_the_champion_gets_mmbench_right(tmp_path, fake_data, world):
    """A champion right by the option's text (which lmms-eval's rules read as that option) is
    taught content in that form; a champion right by letters, or unknown, gets letters."""
    def mmb_profile(outputs):
        example = {"index": 3, "question": "Какой цвет?", "answer": "B", "A": "красный",
                   "B": "синий", "category": "attribute_recognition"}
        return BenchmarkOptimizer().profile("mmbench_ru", [
            {"example": example, "prediction": out, "output": out} for out in outputs])

    def build(profs):
        ctx, _ = make_ctx(tmp_path, fake_data, world.protected, profs=profs)
        return SFTDataBuilder(ctx).build(20, Mix(0.0, 1.0, 0.0), seed=2)

    gold = {str(ex["id"]): ex["answer"] for ex in world.train}
    text_champion = {"mmbench_ru": mmb_profile(["синий", "синий", "A", "красный"])}
    records, info = build(text_champion)
    assert info["choice_answer"] == "text" and records
    for r in records:
        answer, options = r["conversations"][1]["value"], r["meta"]["options"]
        assert answer == gold[r["meta"]["question_id"]] and answer in options.values()
        assert r["meta"]["answer_style"] == "text"
        assert extract_choice(answer, options) == next(k for k, v in options.items() if v == answer)
    for profs in ({"mmbench_ru": mmb_profile(["B", "B", "синий"])}, {}):
        records, info = build(profs)
        assert info["choice_answer"] == "letter"
        assert all(r["conversations"][1]["value"] in r["meta"]["options"] for r in records)


def test_answer_format_sft_weights_short_answers_toward_weak_types(tmp_path, fake_data, world):
    def color_share(profs):
        ctx, _ = make_ctx(tmp_path, fake_data, world.protected, profs=profs)
        records, _ = SFTDataBuilder(ctx).build(30, Mix(1.0, 0.0, 0.0), seed=3)
        return sum("color" in r["meta"]["labels"] for r in records) / len(records)

    neutral = color_share({})
    weak_color = color_share(profiles(gqa_format=0, gqa_color=30))
    assert weak_color > neutral + 0.1


def test_answer_format_sft_uses_the_champions_prompts(tmp_path, fake_data, world):
    champion = base_candidate()
    champion.eval_configs["gqa_ru"] = EvalConfig(instruction="Ответ — одно слово.")
    champion.eval_configs["mmbench_ru"] = EvalConfig(option_header=" Варианты ответа:")
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, champion=champion)
    records, _ = SFTDataBuilder(ctx).build(20, Mix(0.5, 0.5, 0.0), seed=0)
    prompts = [r["conversations"][0]["value"] for r in records]
    assert all(p.endswith("\nОтвет — одно слово.") or " Варианты ответа:\nA." in p
               for p in prompts)


def test_answer_format_sft_skips_protected_examples(tmp_path, fake_data, world, monkeypatch):
    planted = {**world.testdev[1], "id": "leak1"}  # a testdev image in the train pool
    unique_q = {**world.train[0], "id": "leak2", "question": world.testdev[0]["question"]}
    monkeypatch.setattr(core_data, "load_gqa",
                        lambda source, split: [planted, unique_q, *world.train])
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    records, info = SFTDataBuilder(ctx).build(400, Mix(0.6, 0.4, 0.0), seed=0)
    ids = {r["meta"].get("question_id") for r in records}
    assert "leak1" not in ids and "leak2" not in ids
    assert info["stats"]["protected_skipped"] >= 2
    # template questions shared with testdev are allowed: the image is what is checked
    assert any(normalize_question(r["meta"]["question"]) in world.protected["questions"]
               for r in records)


def _record(rid: str, question: str, image=None, image_id: str | None = None) -> dict:
    return {"id": rid, "image": image, "source": "test",
            "conversations": [{"from": "human", "value": f"{question}\nОтветь одним словом."},
                              {"from": "gpt", "value": "да"}],
            "meta": {"imageId": image_id} if image_id else {}}


def test_answer_format_sft_guard_refuses_planted_leaks(tmp_path, world):
    img_path = tmp_path / "copy_of_mmbench.png"
    core_data.load_image(world.mmbench[2])[0].save(img_path)
    ok = _record("ok", "Есть ли на картинке круг?", image_id="n00001")
    leaks = {
        "leak-image-id": _record("leak-image-id", "Есть ли тут круг?", image_id="t00003"),
        "leak-question": _record("leak-question", "что написано на табличке у входа"),
        "leak-pixels": _record("leak-pixels", "Есть ли тут круг?", image=str(img_path)),
        "leak-template": _record("leak-template", "Сколько фигур на картинке?"),
    }
    check_records([ok], world.protected)
    for rid, record in leaks.items():
        with pytest.raises(LeakageError, match=f"training record '{rid}'"):
            check_records([ok, record], world.protected)
    assert issubclass(LeakageError, DataError)
    templates = template_questions(world.train)
    assert normalize_question("Сколько фигур на картинке?") in templates
    check_records([leaks["leak-template"]], world.protected, allowed_questions=templates)
    with pytest.raises(LeakageError):  # a template exemption never excuses an image
        check_records([leaks["leak-image-id"]], world.protected, allowed_questions=templates)


def test_answer_format_sft_trains_an_adapter_sized_to_the_time(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, time_left=300.0)
    cand = strategies.get("answer_format_sft").propose(ctx)
    (call,) = fakes.train_calls
    config = call["config"]
    budget = 0.5 * (300 - 40) - 1
    assert config.steps * config.batch_size * ctx.rates.train_s_per_sample <= budget
    assert config.steps >= 0.5 * budget / (ctx.rates.train_s_per_sample + 0.01) / 16
    assert call["deadline_s"] <= budget
    assert cand.adapter_path == str(ctx.workdir / "adapters" / call["name"])
    assert cand.eval_configs == ctx.champion.eval_configs
    assert cand.train["config"]["steps"] == config.steps
    assert Path(cand.details["data_file"]).exists()
    assert cand.details["data"]["mix"]["instruct"] == 0.15


def test_answer_format_sft_more_choice_data_when_mmbench_is_unparseable(tmp_path, fake_data, world):
    from strategies.answer_format_sft import profile_mix

    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, profs=profiles(1, 30))
    high = profile_mix(ctx).choice
    ctx.profiles = profiles(30, 1)
    assert high > profile_mix(ctx).choice + 0.2


def test_answer_format_sft_failed_training_is_a_failed_proposal(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, fakes=Fakes(fail_training=True))
    with pytest.raises(ProposalFailed, match="failed_nan"):
        strategies.get("answer_format_sft").propose(ctx)


@pytest.mark.slow
def test_answer_format_sft_on_the_demo_world(tmp_path):
    """Real loaders on the demo world: records pass the schema and share nothing with eval."""
    from core.data import load_benchmark
    from core.demo.world import ensure_demo_world

    demo = ensure_demo_world()
    sources = DataSources.from_dir(demo.data_dir, demo.coco_dir)
    evaluation = load_benchmark("gqa_ru", sources) + load_benchmark("mmbench_ru", sources)
    protected = protected_keys(evaluation, digests=True)
    ctx, _ = make_ctx(tmp_path, sources, protected)
    records, info = SFTDataBuilder(ctx).build(300, Mix(0.5, 0.3, 0.2), seed=0)
    validate_records(records)
    check_records(records, protected, allowed_questions=template_questions(
        core_data.load_gqa(sources.gqa, "train")))
    assert info["counts"]["instruct"] == 60 and info["counts"]["choice"] == 90
    assert not {r["meta"].get("imageId") for r in records} & protected["images"]


# ---------------------------------------------------------------- optuna_hpo

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from loop.store import Store  # noqa: E402
from strategies.hpo_trial import score_trial  # noqa: E402
from strategies.optuna_hpo import study_name  # noqa: E402


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}


def test_optuna_hpo_shares_the_experiments_db_with_the_store(tmp_path, fake_data, world):
    db = tmp_path / "experiments.db"
    store = Store(db)
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, storage=store.optuna_storage_url())
    ctx.run_id = 3
    cand = strategies.get("optuna_hpo").propose(ctx)
    store.close()
    tables = _tables(db)
    assert {"loop_runs", "loop_predictions", "studies", "trials"} <= tables
    study = optuna.load_study(study_name="loop-hpo-run3", storage=f"sqlite:///{db}")
    assert cand.details["study"] == "loop-hpo-run3" == study_name(ctx)
    assert study.trials[cand.details["trial_number"]].state == TrialState.COMPLETE
    assert Store.open_existing(db).runs() == []  # the store still reads its own tables


def test_optuna_hpo_resumes_after_an_interrupted_trial(tmp_path, fake_data, world):
    storage = f"sqlite:///{tmp_path / 'experiments.db'}"
    Store(tmp_path / "experiments.db").close()
    killed = optuna.create_study(storage=storage, study_name="loop-hpo-0", direction="maximize")
    killed.ask()  # a process died here: trial 0 is left RUNNING
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, storage=storage)
    first = strategies.get("optuna_hpo").propose(ctx)
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    assert study.trials[0].state == TrialState.FAIL
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert first.details["stale_trials_failed"] == [0]
    n_before = len(study.trials)
    ctx.history.append(record_of(first))
    ctx.cycle += 1
    second = strategies.get("optuna_hpo").propose(ctx)  # next cycle resumes the same study
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    assert len(study.trials) > n_before and second.details["n_trials_total"] == len(study.trials)
    assert second.details["trial_number"] != first.details["trial_number"]


def test_optuna_hpo_never_leaves_a_trial_running_on_an_exception(tmp_path, fake_data, world):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, storage=storage)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    ctx.train = crash
    with pytest.raises(KeyboardInterrupt):
        strategies.get("optuna_hpo").propose(ctx)
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    assert {t.state for t in study.trials} == {TrialState.FAIL}  # the slots nobody took too
    assert study.trials[0].user_attrs["worker"]["name"] == "loop"


def test_optuna_hpo_scores_on_tune_examples_only_report_slice_first(tmp_path, fake_data, world):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, storage=storage)
    strategies.get("optuna_hpo").propose(ctx)
    tune_ids = {ex["id"] for exs in ctx.tune_examples.values() for ex in exs}
    assert fakes.eval_calls
    for call in fakes.eval_calls:
        assert call["examples"] is not None and {ex["id"] for ex in call["examples"]} <= tune_ids
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        assert set(trial.intermediate_values) == {100}  # no live scoring: after training only
    mmb_halves = [c["examples"] for c in fakes.eval_calls if c["benchmark"] == "mmbench_ru"][:2]
    groups = [{int(ex["index"]) % 1_000_000 for ex in half} for half in mmb_halves]
    assert not groups[0] & groups[1]


def test_optuna_hpo_pruned_trial_skips_the_rest_of_the_tune_set(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected)
    trial = SimpleNamespace(report=lambda value, step: None, should_prune=lambda: True)
    assert score_trial(ctx, trial, "/adapter") is None
    assert len(fakes.eval_calls) == 2  # the report slice of each benchmark only


def test_optuna_hpo_fits_the_number_of_trials_to_the_time(tmp_path, fake_data, world):
    def trials(time_left, sub):
        ctx, fakes = make_ctx(tmp_path / sub, fake_data, world.protected, time_left=time_left)
        strategies.get("optuna_hpo").propose(ctx)
        return len(fakes.train_calls)

    assert trials(2000.0, "long") == 4
    assert trials(200.0, "short") == 2  # 0.6 x 159 s after the dev evaluation, 42 s a trial
    # the smallest trial: its tune evaluation and 160 records built and trained once
    with pytest.raises(ProposalFailed, match="needs about 109 s"):
        trials(60.0, "none")


def test_hpo_searches_whether_to_continue_the_champions_adapter():
    from strategies.hpo_trial import suggest

    common = {"lr": 1e-4, "dropout": 0.1, "steps_frac": 0.5, "choice_share": 0.2,
              "instruct_share": 0.1}
    params, _ = suggest(optuna.trial.FixedTrial({**common, "init": "champion"}), 1e-4, "/champ")
    assert params["init_from"] == "/champ" and "rank" not in params  # the champion's rank
    params, _ = suggest(optuna.trial.FixedTrial({**common, "init": "base", "rank": 8,
                                                 "alpha_mult": 4}), 1e-4, "/champ")
    assert "init_from" not in params and (params["rank"], params["alpha"]) == (8, 32)
    # without a champion's adapter there is nothing to continue: "init" is not searched
    trial = optuna.trial.FixedTrial({**common, "rank": 8, "alpha_mult": 1})
    params, _ = suggest(trial, 1e-4, None)
    assert "init_from" not in params and "init" not in trial.params


def test_optuna_hpo_first_slot_of_a_cycle_continues_the_champion(tmp_path, fake_data, world):
    champ = tmp_path / "champ"
    champ.mkdir()
    champion = base_candidate()
    champion.adapter_path = str(champ)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, storage=storage,
                          champion=champion)
    cand = strategies.get("optuna_hpo").propose(ctx)
    first = fakes.train_calls[0]["config"]
    assert first.init_from == str(champ) and first.lr == ctx.train_lr
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    assert study.trials[0].params["init"] == "champion"
    for t in study.get_trials(states=(TrialState.COMPLETE,)):  # the lineage is recorded
        continued = t.user_attrs["train"]["config"]["init_from"] == str(champ)
        assert continued == (t.params["init"] == "champion")
    assert cand.train["config"]["init_from"] == (
        str(champ) if cand.details["params"]["init"] == "champion" else None)
    # a `loop worker` rebuilds the same champion from the cycle's spec
    from loop.worker import WorkerBench
    from strategies.optuna_hpo import cycle_spec

    spec = json.loads(json.dumps(cycle_spec(ctx, 60.0, 0.0, 2)))
    fake_worker = SimpleNamespace(sources=SimpleNamespace(data=fake_data), protected={}, tune={})
    assert WorkerBench.context(fake_worker, spec, {}, "w").champion.adapter_path == str(champ)


def test_optuna_hpo_without_tune_examples_fails_clearly(tmp_path, fake_data, world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected, tune={})
    with pytest.raises(ProposalFailed, match="tune_examples"):
        strategies.get("optuna_hpo").propose(ctx)


def test_answer_format_sft_guard_reads_the_controllers_protected_forms():
    """Question ids as given, texts with a ``mmbench:`` prefix in any spelling."""
    protected = {"images": {"t00003"},
                 "questions": {"t000031", "mmbench:Что написано на табличке у входа?"}}
    by_id = {**_record("by-id", "Есть ли тут круг?"), "meta": {"question_id": "t000031"}}
    by_text = _record("by-text", "ЧТО написано на табличке у входа")
    for record in (by_id, by_text):
        with pytest.raises(LeakageError, match=record["id"]):
            check_records([record], protected)
    check_records([_record("fine", "Есть ли тут круг?")], protected)


def test_generation_params_equally_broken_benchmarks_get_likelihood_first(tmp_path, fake_data,
                                                                          world):
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected,
                      profs=profiles(gqa_format=20, mmb_format=10))  # both 71% format errors
    names = [(v.benchmark, v.name) for v in strategies.get("generation_params").variants(ctx)]
    assert names[:2] == [("mmbench_ru", "likelihood"), ("gqa_ru", "short_stop_period")]


def test_answer_format_sft_with_only_protected_data_fails_the_cycle(tmp_path, fake_data, world,
                                                                   monkeypatch):
    monkeypatch.setattr(core_data, "load_gqa", lambda source, split: list(world.testdev))
    ctx, fakes = make_ctx(tmp_path, DataSources(gqa="fake-gqa"), world.protected)
    with pytest.raises(ProposalFailed, match="no training records"):
        strategies.get("answer_format_sft").propose(ctx)
    assert not fakes.train_calls


def test_answer_format_sft_drops_multiple_choice_once_it_hurt_mmbench():
    from types import SimpleNamespace

    from strategies.answer_format_sft import choice_hurt_mmbench, profile_mix

    def cycle(index, status, choice, mmb_diff, mmb_p, gqa_diff=0.1, gqa_p=0.01):
        return {"index": index, "strategy": "answer_format_sft", "status": status,
                "candidate": {"details": {"data": {"counts": {"short": 90, "choice": choice}}}},
                "paired": {"mmbench_ru": {"diff": mmb_diff, "p_value": mmb_p},
                           "gqa_ru": {"diff": gqa_diff, "p_value": gqa_p}}}

    ctx = SimpleNamespace(profiles={}, history=[])
    assert profile_mix(ctx).to_dict()["choice"] > 0
    ctx.history = [cycle(1, "rejected", 30, -0.4, 1e-6)]
    assert choice_hurt_mmbench(ctx) == 1 and profile_mix(ctx).to_dict()["choice"] == 0
    # not significant, or trained without multiple choice: the mix stays
    ctx.history = [cycle(1, "rejected", 30, -0.05, 0.3), cycle(2, "rejected", 0, -0.4, 1e-6)]
    assert choice_hurt_mmbench(ctx) is None and profile_mix(ctx).to_dict()["choice"] > 0
    # a new champion starts afresh
    ctx.history = [cycle(1, "rejected", 30, -0.4, 1e-6), cycle(2, "accepted", 0, 0.0, 1.0)]
    assert choice_hurt_mmbench(ctx) is None
    # a candidate significantly worse on GQA-ru too (a poor HPO trial) says nothing about
    # multiple choice in particular: the mix stays
    ctx.history = [cycle(1, "rejected", 30, -0.13, 0.02, gqa_diff=-0.25, gqa_p=1e-5)]
    assert choice_hurt_mmbench(ctx) is None and profile_mix(ctx).to_dict()["choice"] > 0


def test_a_training_cut_before_its_first_step_says_so():
    from types import SimpleNamespace

    from strategies.base import ProposalFailed
    from strategies.common import train_adapter

    ctx = SimpleNamespace(train=lambda records, config, name, deadline_s: (
        None, SimpleNamespace(status="deadline", error=None)))
    with pytest.raises(ProposalFailed) as info:
        train_adapter(ctx, [], None, name="c1", deadline_s=1.0, what="answer-format")
    assert "time box ended before the first optimizer step" in str(info.value)
    assert "None" not in str(info.value)
