"""Shared-prefix evaluation gives the answers of plain batched generation, with less prefill."""

from __future__ import annotations

import pytest
from PIL import Image

from core.evaluate import EvalConfig, evaluate
from core.prefix import split_point

COLOURS = ["red", "blue", "green", "yellow", "purple"]
QUESTIONS = ["Есть ли на картинке круг?", "Какого цвета фигура слева?", "Сколько фигур?",
             "Где находится синий квадрат на этой картинке?", "Что это?"]


def _image(i: int) -> Image.Image:
    img = Image.new("RGB", (48, 48), COLOURS[i % len(COLOURS)])
    img.putpixel((i % 48, 3), (i * 7 % 256, 0, 0))  # no two images alike
    return img


def _gqa_set(per_image: list[int], missing: int | None = None) -> list[dict]:
    """Questions of mixed lengths about several images; ``per_image[k]`` questions on image k."""
    examples = []
    for k, count in enumerate(per_image):
        img = _image(k)
        for j in range(count):
            examples.append({
                "benchmark": "gqa_ru", "id": f"q{k}-{j}", "imageId": f"img{k}", "answer": "да",
                "question": QUESTIONS[(k + j) % len(QUESTIONS)] + " очень" * (j % 3),
                "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"},
                "_image": (lambda: None) if k == missing else (lambda img=img: img)})
    return examples


def _mmb_set(groups: int) -> list[dict]:
    """Question groups with rotated copies sharing one image, hints on some."""
    options = ["красный", "синий", "зелёный", "жёлтый"]
    examples = []
    for g in range(groups):
        img = _image(g)
        n = 2 + g % 3
        for r in range(n):
            opts = options[r:n] + options[:r]
            examples.append({
                "benchmark": "mmbench_ru", "id": str(g + r * 1_000_000),
                "index": g + r * 1_000_000, "hint": "Посмотри внимательно." if g % 2 else None,
                "question": "Какого цвета фигура" + " на картинке" * (g % 2) + "?",
                "options": dict(zip("ABCD", opts)), "answer": "ABCD"[(n - r) % n],
                "category": "color", "_image": lambda img=img: img})
    return examples


def _outputs(vlm, examples, config=None, **kw):
    result = evaluate(vlm, examples, config or EvalConfig(), progress=False, **kw)
    return {s["sample_id"]: s["output"] for s in result.samples}, result.metrics


@pytest.mark.parametrize("batch_size", [3, 16])
def test_gqa_answers_identical_with_and_without_the_prefix_cache(tiny_vlm, batch_size):
    # Mixed suffix lengths, batches spanning several images, an image with a single
    # question, and a missing image (its blank stand-in is shared like any picture).
    examples = _gqa_set([5, 1, 4, 3], missing=3)
    cached, m_cached = _outputs(tiny_vlm, examples, batch_size=batch_size, prefix_cache=True)
    plain, m_plain = _outputs(tiny_vlm, examples, batch_size=batch_size, prefix_cache=False)
    assert cached == plain
    assert m_cached["prefill_tokens_per_sample"] < m_plain["prefill_tokens_per_sample"]


def test_mmbench_rotations_identical_with_and_without_the_prefix_cache(tiny_vlm):
    examples = _mmb_set(5)
    cached, _ = _outputs(tiny_vlm, examples, batch_size=4, prefix_cache=True)
    plain, _ = _outputs(tiny_vlm, examples, batch_size=4, prefix_cache=False)
    assert cached == plain


@pytest.mark.parametrize("batch_size", [3, 8])
def test_mmbench_likelihood_identical_with_and_without_the_prefix_cache(tiny_vlm, batch_size):
    # Rotations of 2, 3 and 4 options, hints on some, batches cutting groups apart.
    examples = _mmb_set(6)
    config = EvalConfig(mode="likelihood")
    cached, m_cached = _outputs(tiny_vlm, examples, config, batch_size=batch_size, prefix_cache=True)
    plain, m_plain = _outputs(tiny_vlm, examples, config, batch_size=batch_size, prefix_cache=False)
    assert cached == plain
    assert m_cached["prefill_tokens_per_sample"] < m_plain["prefill_tokens_per_sample"] / 2


def test_option_scores_match_the_full_prompt_scores(tiny_vlm):
    # Not only the argmax: every option's mean log-probability, including options that share
    # their first tokens ("красный" / "красный круг") and a question with one image alone.
    texts = ["Какого цвета фигура?\nA. красный\nB. красный круг", "Что это?\nA. круг\nB. квадрат",
             "Что это? Ответь буквой.\nA. квадрат\nB. круг"]
    images = [_image(0), _image(1), _image(1)]
    options = [["красный", "красный круг"], ["круг", "квадрат"], ["квадрат", "круг", "ничего"]]
    plain = tiny_vlm.option_logprobs(texts, images, options)
    cached = tiny_vlm.option_logprobs(texts, images, options, prefix_cache=True)
    assert [len(c) for c in cached] == [2, 2, 3]
    for got, want in zip(cached, plain):
        assert got == pytest.approx(want, abs=1e-4)


def test_changed_decoding_settings_also_match(tiny_vlm):
    config = EvalConfig(max_new_tokens=6, repetition_penalty=1.3, stop_strings=["."])
    examples = _gqa_set([3, 2])
    assert (_outputs(tiny_vlm, examples, config, batch_size=8, prefix_cache=True)[0]
            == _outputs(tiny_vlm, examples, config, batch_size=8, prefix_cache=False)[0])


def test_split_point_covers_the_image_and_leaves_every_row_a_token():
    image = 9
    rows = [[1, 9, 9, 5, 6, 7], [1, 9, 9, 5, 6, 8, 8], [2, 9, 9, 3]]
    owners = [0, 0, 1]
    # rows of image 0 share 5 tokens, the single row of image 1 keeps its last token
    assert split_point(rows, owners, image) == 3
    assert split_point([[1, 9, 4], [1, 9, 5]], [0, 0], image) == 2
    # a prefix that would end before the last image token is refused
    assert split_point([[9, 1, 9, 2], [9, 2, 9, 2]], [0, 0], image) is None


@pytest.mark.slow
def test_prefix_is_recomputed_per_adapter(tiny_vlm_factory):
    import torch

    from core.lora import attach_lora, lora_config

    vlm = tiny_vlm_factory()
    examples = _gqa_set([4, 2])
    base_cached, _ = _outputs(vlm, examples, batch_size=8, prefix_cache=True)
    attach_lora(vlm, "noisy", lora_config(rank=4))
    vlm.adapters["noisy"] = "(in memory)"
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in vlm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    vlm.set_adapter("noisy")
    vlm.model.eval()  # no LoRA dropout while evaluating
    tuned_cached, _ = _outputs(vlm, examples, batch_size=8, prefix_cache=True)
    tuned_plain, _ = _outputs(vlm, examples, batch_size=8, prefix_cache=False)
    assert tuned_cached == tuned_plain
    assert tuned_cached != base_cached  # the adapter changed the answers, through the prefix too
    vlm.set_adapter(None)
    assert _outputs(vlm, examples, batch_size=8, prefix_cache=True)[0] == base_cached


def test_the_t4_plan_buys_more_trained_candidates_with_the_prefix_cache():
    from core.device import GQA_QUESTIONS_PER_IMAGE, t4_estimate
    from loop.planning import make_plan

    plain, shared = t4_estimate()[0], t4_estimate(questions_per_image=GQA_QUESTIONS_PER_IMAGE)[0]
    assert plain["prefill_tokens_per_sample"] >= 5 * shared["prefill_tokens_per_sample"]
    assert shared["eval_s_per_sample"] < plain["eval_s_per_sample"] / 2
    before = make_plan(6 * 3600, "saiga", "t4", prefix_cache=False)
    after = make_plan(6 * 3600, "saiga", "t4")
    # at least 100 images judge either way (the dev floor); the cache makes them ~5x cheaper,
    # which buys the plan more trained candidates
    gqa_before, gqa_after = before["benchmarks"]["gqa_ru"], after["benchmarks"]["gqa_ru"]
    assert gqa_after["dev_units"] >= gqa_before["dev_units"] >= 100
    assert (4 * gqa_after["dev_subset"] * gqa_after["s_per_question"]
            <= gqa_before["dev_subset"] * gqa_before["s_per_question"])
    assert after["trained_candidates"] > before["trained_candidates"]
    assert len(after["schedule"]) >= len(before["schedule"])
