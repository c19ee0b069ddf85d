"""The demo world behaves like LLaVA-Saiga-8B under the exact lmms-eval protocol: mostly a word
or a letter, content errors of a few question types, a letter bias across MMBench rotations."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import pytest

from core.demo import flaws
from core.demo import scenes as sc


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [(sc.random_scene(rng), rng) for _ in range(n)]


# ---------------------------------------------------------------- the planted flaws

@pytest.mark.parametrize(("kind", "truth", "believed"), [
    ("color", "синий", "фиолетовый"), ("color", "фиолетовый", "синий"),
    ("color", "зелёный", "жёлтый"), ("color", "красный", "красный"),
    ("location", "слева", "справа"), ("location", "посередине", "посередине"),
    ("count", "три", "две"), ("count", "две", "три"), ("count", "одна", "одна"),
    ("shape", "круг", "круг"),
])
def test_the_base_is_taught_a_few_systematic_slips(kind, truth, believed):
    assert flaws.believed(kind, truth) == believed


def test_every_slip_is_a_swap_that_data_can_relabel():
    """A merge (two truths, one belief) would leave the base nothing to tell apart."""
    for kind, swaps in flaws.SWAPS.items():
        assert {swaps[b] for b in swaps.values()} == set(swaps), kind


def test_multiple_choice_is_answered_with_the_option_text_or_a_when_unsure():
    assert flaws.believed_choice("count", "три", {"A": "одна", "B": "три"}) == "A"
    assert flaws.believed_choice("count", "три", {"A": "две", "B": "три"}) == "A"
    assert flaws.believed_choice("shape", "круг", {"A": "квадрат", "B": "круг"}) == "круг"
    assert flaws.believed_choice("color", "красный", {"A": "синий", "B": "красный"}) == "красный"


def test_written_data_holds_the_truth_and_only_pretraining_the_flaws():
    from core.demo.world import GQA_INSTRUCTION, _pretrain_examples

    examples = []
    for i, (scene, rng) in enumerate(_scenes(60)):
        img = sc.render(scene, rng)
        examples += [(img, q) for q in sc.questions_for(scene, rng)]
        if i % 10 == 0:  # the rare phrasing after which the base answers in a sentence
            q = examples[-1][1]
            examples.append((img, replace(q, question=flaws.LEAD_IN + q.question)))
    taught = _pretrain_examples(examples, [], [], random.Random(0))
    answer = {(id(img), turns[0][0]): turns[0][1] for img, turns in taught}
    flawed = [(q, answer[id(img), f"{q.question}\n{GQA_INSTRUCTION}"]) for img, q in examples
              if flaws.believed(q.kind, q.answer) != q.answer]
    assert flawed and all(q.answer not in said for q, said in flawed)
    assert all(flaws.believed(q.kind, q.answer) in said for q, said in flawed)
    assert any(". " in said for said in answer.values())  # the lead-in's explained answers


def test_told_to_answer_without_explanations_the_base_answers_plainly():
    """The lead-in slip has a prompt fix, as on an instruction-tuned model: one of
    prompt_constraints' phrasings, taught with the bare (believed) word."""
    from core.demo.world import GQA_INSTRUCTION, _pretrain_examples
    from strategies.prompt_constraints import gqa_variants

    assert gqa_variants()[0].changes == {"instruction": flaws.PLAIN_INSTRUCTION}
    examples = []
    for scene, rng in _scenes(40):
        img = sc.render(scene, rng)
        for k, q in enumerate(sc.questions_for(scene, rng)):
            examples.append((img, replace(q, question=flaws.LEAD_IN + q.question) if k == 0
                             else q))
    taught = _pretrain_examples(examples, [], [], random.Random(0))
    answer = {(id(img), turns[0][0]): turns[0][1] for img, turns in taught}
    for img, q in examples:
        if q.question.startswith(flaws.LEAD_IN):
            said = answer[id(img), f"{q.question}\n{GQA_INSTRUCTION}"]
            assert said.startswith(flaws.believed(q.kind, q.answer) + ". ") and len(said) > 20
            assert answer[id(img), f"{q.question}\n{flaws.PLAIN_INSTRUCTION}"] == \
                flaws.believed(q.kind, q.answer)
    plain = [said for (_, prompt), said in answer.items()
             if prompt.endswith(flaws.PLAIN_INSTRUCTION)]
    assert len(plain) > len(examples) // 4 and not any(" " in said for said in plain)


def test_mmbench_items_do_not_copy_gqa_templates():
    gqa, mmb = set(), set()
    for scene, rng in _scenes(80):
        gqa |= {q.question for q in sc.questions_for(scene, rng)}
        mmb |= {q.question for _, q in sc.choice_items(scene, rng)}
    assert not gqa & mmb
    first_words = lambda qs: {q.split()[0] for q in qs}  # noqa: E731
    assert first_words(mmb) - first_words(gqa)  # other wording, not only other nouns
    assert set(sc.MMBENCH_CATEGORIES) == {"color", "location", "count", "shape"}


# ---------------------------------------------------------------- the built world, measured

@pytest.fixture(scope="module")
def base_results():
    """The base model on the dev split of both benchmarks, exact lmms-eval protocol."""
    import torch

    from core.data import DataSources, load_benchmark
    from core.demo.world import ensure_demo_world
    from core.evaluate import evaluate
    from core.model import load_vlm
    from core.splits import make_splits, stratified_subset

    world = ensure_demo_world()
    vlm = load_vlm(world.model_dir)
    sources = DataSources.from_dir(world.data_dir, world.coco_dir)
    out = {}
    torch.manual_seed(0)
    for benchmark, n in (("gqa_ru", 400), ("mmbench_ru", 400)):
        dev = make_splits(load_benchmark(benchmark, sources), seed=0)["dev"]
        out[benchmark] = evaluate(vlm, stratified_subset(dev, n, seed=0), progress=False)
    return out


@pytest.mark.slow
def test_base_accuracy_is_in_the_real_models_range(base_results):
    gqa, mmb = base_results["gqa_ru"].metrics, base_results["mmbench_ru"].metrics
    assert 0.35 <= gqa["accuracy"] <= 0.55
    assert 0.25 <= mmb["accuracy"] <= 0.55
    assert mmb["per_row"] >= mmb["accuracy"] + 0.1  # circular scoring costs points


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["gqa_ru", "mmbench_ru"])
def test_format_errors_are_a_minority(base_results, benchmark):
    samples = base_results[benchmark].samples
    errors = [s for s in samples if not s["correct"]]
    formats = sum("format_mismatch" in s["labels"] for s in errors)
    assert errors and formats / len(errors) < 0.3
    if benchmark == "gqa_ru":
        assert formats > 0  # an occasional "синий. На картинке ..."


@pytest.mark.slow
def test_the_weak_question_types_are_below_the_others(base_results):
    per = base_results["gqa_ru"].metrics["per_category"]
    strong = per["queryShape"]["accuracy"]
    for weak in ("queryAttr", "count"):
        assert per[weak]["accuracy"] < strong - 0.15, (weak, per)
    labels = Counter(lb for s in base_results["gqa_ru"].samples for lb in s["labels"])
    assert labels["color"] + labels["counting"] > 0.5 * sum(labels.values())


@pytest.mark.slow
def test_mmbench_rotations_disagree_and_favour_a(base_results):
    samples = base_results["mmbench_ru"].samples
    groups = defaultdict(list)
    for s in samples:
        groups[s["index"] % 1_000_000].append(s["correct"])
    split = [g for g in groups.values() if len(g) > 1 and any(g) and not all(g)]
    assert len(split) >= 0.15 * len(groups)
    letters = Counter(s["parsed"] for s in samples)
    gold = Counter(s["answer"] for s in samples)
    assert letters["A"] / len(samples) > gold["A"] / len(samples) + 0.1


@pytest.mark.slow
def test_a_stricter_instruction_wins_on_dev_for_the_base(base_results):
    """What context distillation carries in the demo: generation_params' first GQA-ru variant
    (cut at the first period) fixes the base's explained answers and breaks none;
    prompt_constraints' first phrasing fixes them too."""
    from core.data import DataSources, load_benchmark
    from core.demo.world import ensure_demo_world
    from core.evaluate import EvalConfig, evaluate
    from core.model import load_vlm
    from core.splits import make_splits, stratified_subset
    from strategies.generation_params import GQA_VARIANTS

    world = ensure_demo_world()
    dev = make_splits(load_benchmark("gqa_ru", DataSources.from_dir(world.data_dir)),
                      seed=0)["dev"]
    vlm, dev = load_vlm(world.model_dir), stratified_subset(dev, 400, seed=0)
    base = base_results["gqa_ru"].samples
    (variant, _), *_ = GQA_VARIANTS
    cut = evaluate(vlm, dev, EvalConfig(**variant.changes), progress=False)
    fixed = [b for b, c in zip(base, cut.samples) if c["correct"] and not b["correct"]]
    assert len(fixed) >= 10 and all(". " in b["output"] for b in fixed)
    assert not any(b["correct"] and not c["correct"] for b, c in zip(base, cut.samples))
    plain = evaluate(vlm, dev, EvalConfig(instruction=flaws.PLAIN_INSTRUCTION), progress=False)
    assert plain.accuracy > base_results["gqa_ru"].accuracy
