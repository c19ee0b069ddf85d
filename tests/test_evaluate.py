"""Evaluation: prompts as lmms-eval builds them, batching, scoring, missing images, the CLI."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from core.evaluate import EvalConfig, build_prompt, evaluate
from tests.lmms_reference.mmbench_ru import lmms_prompt


def _gqa(i: int, answer: str = "да", image=True) -> dict:
    img = Image.new("RGB", (48, 48), ["red", "blue", "green"][i % 3])
    return {"benchmark": "gqa_ru", "id": f"q{i}", "imageId": f"i{i}", "answer": answer,
            "question": "Есть ли на картинке круг?" + " очень" * (i % 4),
            "types": {"structural": "verify", "semantic": "obj", "detailed": "exist"},
            "_image": (lambda: img) if image else (lambda: None)}


def _mmb(index: int, options: dict[str, str], answer: str, hint=None) -> dict:
    img = Image.new("RGB", (48, 48), "red")
    return {"benchmark": "mmbench_ru", "id": str(index), "index": index, "hint": hint,
            "question": "Какого цвета фигура?", "options": options, "answer": answer,
            "category": "color", "_image": lambda: img}


# Golden prompts: a change here changes every number the tool reports. The expected strings
# are lmms-eval's, from EvolvingLMMs-Lab/lmms-eval at commit
# 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 (files last changed in c7eaef373f4b):
#   lmms_eval/tasks/gqa_ru/gqa_ru.yaml           post_prompt: "\nОтветь одним словом."
#   lmms_eval/tasks/gqa_ru/utils.py              f"{pre_prompt}{question}{post_prompt}"
#   lmms_eval/tasks/mmbench/_default_template_mmbench_ru_yaml
#                                                post_prompt: "\nВыбери правильный вариант ответа буквой."
#                                                until: ["ASSISTANT:"], max_new_tokens: 1024
#   lmms_eval/tasks/mmbench/mmbench.yaml         sys_prompt: "There are several options:"
#   lmms_eval/tasks/mmbench/ru_utils.py          f"{hint} {question} {options}" (no hint when
#                                                missing or "nan"), then f"{query}\n{post_prompt}"
#   lmms_eval/tasks/mmbench/mmbench_evals.py     create_options_prompt: f"{sys_prompt}\n" +
#                                                "A. ...\n" per option, rstrip("\n")
LMMS_GOLDEN = [
    (_gqa(0), "Есть ли на картинке круг?\nОтветь одним словом."),
    (_mmb(5, {"A": "красный", "B": "синий"}, "A"),
     "Какого цвета фигура? There are several options:\nA. красный\nB. синий\n\n"
     "Выбери правильный вариант ответа буквой."),
    (_mmb(7, {"A": "красный", "B": "синий", "C": "зелёный", "D": "жёлтый"}, "C",
          hint="На картинке одна фигура."),
     "На картинке одна фигура. Какого цвета фигура? There are several options:\nA. красный\n"
     "B. синий\nC. зелёный\nD. жёлтый\n\nВыбери правильный вариант ответа буквой."),
    (_mmb(8, {"A": "красный", "B": "синий", "C": "зелёный"}, "B", hint="nan"),
     "Какого цвета фигура? There are several options:\nA. красный\nB. синий\nC. зелёный\n\n"
     "Выбери правильный вариант ответа буквой."),
]


@pytest.mark.parametrize(("example", "expected"), LMMS_GOLDEN)
def test_prompts_are_lmms_evals_byte_for_byte(example, expected):
    assert build_prompt(example, EvalConfig()) == expected


@pytest.mark.parametrize("hint", [None, "nan", "Подсказка: фигура одна."])
@pytest.mark.parametrize("n_options", [2, 3, 4])
def test_mmbench_prompt_matches_lmms_evals_function(hint, n_options):
    options = dict(zip("ABCD", ["красный", "синий", "зелёный", "жёлтый"][:n_options]))
    doc = {"index": 3, "question": "Какого цвета фигура?", "hint": hint, "answer": "A",
           "category": "color", "l2-category": "x", "source": "t", "split": "dev", **options}
    assert build_prompt(_mmb(3, options, "A", hint=hint), EvalConfig()) == lmms_prompt(doc)


def test_lmms_protocol_is_named_and_changes_are_not():
    config = EvalConfig()
    assert config.is_lmms("gqa_ru") and config.is_lmms("mmbench_ru")
    assert EvalConfig(max_new_tokens=1024).is_lmms("mmbench_ru")
    assert not EvalConfig(max_new_tokens=64).is_lmms("mmbench_ru")
    assert not EvalConfig(mode="likelihood").is_lmms("mmbench_ru")
    assert not EvalConfig(stop_strings=["\n"]).is_lmms("gqa_ru")
    assert not EvalConfig(instruction="Ответь буквой.").is_lmms("mmbench_ru")
    assert "its own protocol" in EvalConfig(mode="likelihood").protocol("mmbench_ru")
    assert "lmms-eval prompt and decoding" in config.protocol("mmbench_ru")


def test_mmbench_generation_uses_lmms_evals_limit_and_no_stop_string(tiny_vlm, monkeypatch):
    seen = {}

    def fake_generate(prompts, images, **kwargs):
        seen.update(kwargs)
        return ["B ASSISTANT: A"] * len(prompts)

    monkeypatch.setattr(tiny_vlm, "generate", fake_generate)
    ex = _mmb(1, {"A": "красный", "B": "синий"}, "B")
    result = evaluate(tiny_vlm, [ex], progress=False)
    # the yaml's until ("ASSISTANT:") is not applied: lmms-eval's llava_hf never applies it
    assert seen["max_new_tokens"] == 1024 and seen["stop_strings"] is None
    assert result.samples[0]["cluster"] == 1
    gqa = evaluate(tiny_vlm, [_gqa(2)], progress=False)
    assert seen["max_new_tokens"] == 16 and not seen["stop_strings"]
    assert gqa.samples[0]["cluster"] == "i2"


def test_config_validation_reports_every_problem():
    with pytest.raises(ValueError) as err:
        EvalConfig(mode="judge", num_beams=0)
    assert "mode" in str(err.value) and "num_beams" in str(err.value)


def test_batched_equals_one_by_one_and_missing_images_are_counted(tiny_vlm):
    examples = [_gqa(i) for i in range(6)] + [_gqa(6, image=False)]
    batched = evaluate(tiny_vlm, examples, batch_size=4, progress=False)
    single = [evaluate(tiny_vlm, [e], batch_size=1, progress=False).samples[0] for e in examples]
    assert [s["output"] for s in batched.samples] == [s["output"] for s in single]
    assert batched.metrics["images_missing"] == 1
    missing = batched.samples[-1]
    assert missing["image_ok"] is False
    assert missing["correct"] or missing["labels"] == ["missing_image"]
    m = batched.metrics
    assert m["n"] == 7 and 0 <= m["ci"][0] <= m["accuracy"] <= m["ci"][1] <= 1
    assert {"sample_id", "prompt", "output", "parsed", "correct", "image_ok", "seconds"} <= set(
        batched.samples[0])
    assert batched.metrics["samples_per_s"] > 0


def test_likelihood_mode_agrees_across_rotations(tiny_vlm):
    opts = ["красный", "синий", "зелёный"]
    rows = []
    for r in range(3):
        rot = opts[r:] + opts[:r]
        letters = dict(zip("ABC", rot))
        rows.append(_mmb(7 + r * 1_000_000, letters, "ABC"[rot.index("синий")]))
    result = evaluate(tiny_vlm, rows, EvalConfig(mode="likelihood"), progress=False)
    chosen = {s["output"] for s in result.samples}
    assert len(chosen) == 1  # the same option text wins in every rotation
    assert result.metrics["accuracy"] in (0.0, 1.0) and result.metrics["n"] == 1
    assert "likelihood" in result.protocol


def test_mmbench_circular_scoring_counts_a_group_only_when_all_rotations_are_right(tiny_vlm,
                                                                                  monkeypatch):
    rows = [_mmb(1, {"A": "красный", "B": "синий"}, "A"),
            _mmb(1_000_001, {"A": "синий", "B": "красный"}, "B"),
            _mmb(2, {"A": "красный", "B": "синий"}, "A"),
            _mmb(1_000_002, {"A": "синий", "B": "красный"}, "B")]
    answers = {"1": "A", "1000001": "Ответ: B", "2": "A", "1000002": "Ответ: A"}
    order = []

    def fake_generate(texts, images, **kw):
        idx = [next(r["id"] for r in rows if build_prompt(r, EvalConfig()) == t and r["id"] not in order)
               for t in texts]
        order.extend(idx)
        return [answers[i] for i in idx]

    monkeypatch.setattr(tiny_vlm, "generate", fake_generate)
    result = evaluate(tiny_vlm, rows, batch_size=1, progress=False)
    assert result.metrics["accuracy"] == 0.5 and result.metrics["n"] == 2
    assert result.metrics["per_row"] == 0.75 and result.metrics["n_rows"] == 4


@pytest.mark.slow
def test_eval_cli_json_on_the_demo(capsys):
    from loop.cli import main

    assert main(["-q", "eval", "--preset", "demo", "--benchmark", "gqa_ru", "--limit", "40",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"accuracy", "n", "samples_per_s", "ci", "accuracy_normalized", "protocol"} <= set(out)
    assert 30 <= out["n"] <= 50
    assert main(["-q", "eval", "--preset", "demo", "--benchmark", "mmbench_ru", "--limit", "30"]) == 0
    table = capsys.readouterr().out
    assert "circular accuracy" in table and "samples/s" in table


def test_eval_cli_rejects_bad_flags(capsys):
    from loop.cli import main

    assert main(["eval", "--benchmark", "gqa_ru", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "gqa_ru", "--mode", "likelihood"]) == 2


def test_saiga_preset_offline_fails_with_one_clear_message(capsys):
    from loop.cli import main

    assert main(["eval", "--benchmark", "gqa_ru", "--preset", "saiga", "--gpu", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "deepvk/" in err and ("--model" in err or "--data-dir" in err)


def test_mmbench_per_row_interval_counts_question_groups_not_rows():
    # 20 questions, 4 rotations each, rotations succeed or fail together: the per-row accuracy
    # rests on 20 independent outcomes, not 80, and its interval must say so.
    from core.evaluate import summarize
    from core.metrics import wilson_interval

    samples = [{"correct": g < 10, "parsed": "A", "image_ok": True, "category": "c",
                "index": g + r * 1_000_000, "cluster": g, "sample_id": str(g + r * 1_000_000)}
               for g in range(20) for r in range(4)]
    m = summarize("mmbench_ru", samples)
    assert m["per_row"] == 0.5 and m["n_rows"] == 80
    low, high = m["ci_per_row"]
    w_low, w_high = wilson_interval(40, 80)
    assert high - low > 1.5 * (w_high - w_low)


def test_mmbench_answers_are_not_cut_at_assistant_as_llava_hf_applies_no_until():
    from core.model import _cut

    class Stub:  # a model that runs on past its answer, as far as the stop strings allow
        prefill_positions = 0

        def generate(self, texts, images, *, stop_strings=None, **kwargs):
            return [_cut("B\nASSISTANT: C", stop_strings) if stop_strings else "B\nASSISTANT: C"
                    for _ in texts]

    example = _mmb(5, {"A": "красный", "B": "синий", "C": "зелёный"}, "B")
    [sample] = evaluate(Stub(), [example], progress=False, prefix_cache=False).samples
    assert sample["output"] == "B\nASSISTANT: C"
    assert sample["parsed"] is None  # two bare letters: lmms-eval would ask its judge


def test_the_headline_reads_answers_by_lmms_evals_rule_and_the_lenient_reading_is_beside():
    class Stub:
        prefill_positions = 0

        def generate(self, texts, images, **kwargs):
            return ["**B**" for _ in texts]

    examples = [_mmb(5, {"A": "красный", "B": "синий"}, "B"),
                _mmb(1_000_005, {"A": "синий", "B": "красный"}, "A")]
    result = evaluate(Stub(), examples, progress=False, prefix_cache=False)
    assert [s["parsed"] for s in result.samples] == [None, None]  # lmms-eval: ask the judge
    assert [s["parsed_lenient"] for s in result.samples] == ["B", "B"]
    m = result.metrics
    assert m["accuracy"] == 0.0 and m["unparseable"] == 2
    assert m["per_row_lenient"] == 0.5 and m["accuracy_lenient"] == 0.0
    assert m["unparseable_lenient"] == 0
