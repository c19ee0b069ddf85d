"""saiga-tiny: LLaVA-Saiga-8B's structure at tiny width, saved as transformers 4.42 saved it.

The fast tests use an untrained model folder built in seconds; the slow ones the cached,
briefly trained world of ``--preset saiga-tiny``.
"""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from core.demo import saiga_tiny as st
from core.processor import IGNORE_INDEX, encode_conversation

EOT = "<|eot_id|>"
CORPUS = ["Какого цвета круг?", "Ответь одним словом.", "красный синий зелёный жёлтый",
          "Выбери правильный вариант ответа буквой.", "There are several options:", "A. B. C. D.",
          "слева справа посередине да нет", st.DEFAULT_SYSTEM] * 4


@pytest.fixture(scope="session")
def saiga_dir(tmp_path_factory):
    return st.save_random(tmp_path_factory.mktemp("saiga-tiny") / "model", CORPUS)


@pytest.fixture(scope="session")
def saiga_vlm(saiga_dir):
    from core.model import load_vlm

    return load_vlm(saiga_dir)


def _image(color=(200, 30, 30)):
    return Image.new("RGB", (336, 336), color)


# ---------------------------------------------------------------- the files

def test_files_are_what_transformers_4_42_wrote(saiga_dir):
    from safetensors import safe_open

    assert not (saiga_dir / "processor_config.json").exists()
    assert not (saiga_dir / "chat_template.jinja").exists()
    pre = json.loads((saiga_dir / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["crop_size"]["height"] == 336
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        text = (saiga_dir / name).read_text()
        assert "patch_size" not in text and "vision_feature_select_strategy" not in text
    assert "chat_template" in json.loads((saiga_dir / "tokenizer_config.json").read_text())
    config = json.loads((saiga_dir / "config.json").read_text())
    assert config["transformers_version"].startswith("4.42")
    assert config["image_token_index"] == 128256 and config["text_config"]["vocab_size"] == 128320
    assert config["text_config"]["eos_token_id"] == 128001
    assert config["vision_config"]["image_size"] == 336 and config["vision_config"]["patch_size"] == 14
    with safe_open(str(saiga_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        dtypes = {str(f.get_tensor(k).dtype) for k in keys}
    assert dtypes == {"torch.float16"}
    assert {k.split(".")[0] for k in keys} == {"language_model", "vision_tower",
                                                "multi_modal_projector"}
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert "multi_modal_projector.linear_2.weight" in keys


def test_special_tokens_sit_at_llama_3_ids(saiga_vlm):
    tok = saiga_vlm.tokenizer
    for token, i in st.SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == i
    assert saiga_vlm.model.config.text_config.vocab_size == 128320
    assert 128009 in saiga_vlm.stop_ids


# ---------------------------------------------------------------- what lmms-eval's llava_hf feeds

QUESTION = "Какого цвета круг?\nОтветь одним словом."


def test_tokenizer_adds_begin_of_text_like_llama_3(saiga_vlm):
    tok = saiga_vlm.tokenizer
    assert tok(QUESTION)["input_ids"][0] == 128000
    assert 128000 not in tok(QUESTION, add_special_tokens=False)["input_ids"]


def test_evaluation_feeds_llava_hf_ids_with_two_begin_of_text(saiga_vlm):
    from core.prefix import encode_rows
    from tests.lmms_reference.llava_hf import llava_hf_inputs

    prompt = saiga_vlm.chat_prompt(QUESTION)
    ours = saiga_vlm._inputs([prompt], [_image()])["input_ids"][0].tolist()
    theirs = llava_hf_inputs(saiga_vlm.tokenizer, saiga_vlm.processor, QUESTION,
                             [_image()])["input_ids"][0].tolist()
    assert ours == theirs
    # the chat template's <|begin_of_text|>, then the tokenizer's own: two, as llava_hf has
    assert ours[:3] == [128000, 128000, 128006] and ours.count(128000) == 2
    assert encode_rows(saiga_vlm, [prompt], [_image()])[0][0] == theirs  # the prefix-cache path
    # training keeps the template's single one
    train = encode_conversation(saiga_vlm.processor, _image(), [(QUESTION, "красный")])
    assert train.input_ids[:2] == [128000, 128006]


def test_generation_stops_on_the_tokenizers_eos_alone_as_llava_hf(saiga_vlm):
    # llava_hf: eos_token_id=self.tokenizer.eos_token_id, and the task's `until` is never used
    assert saiga_vlm.stop_ids == [saiga_vlm.tokenizer.eos_token_id] == [128009]


# ---------------------------------------------------------------- loading fixes

def test_legacy_keys_load_into_every_weight(saiga_dir, saiga_vlm):
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(saiga_dir / "model.safetensors"))
    lm_head = saiga_vlm.model.lm_head.weight
    assert torch.equal(lm_head.half(), saved["language_model.lm_head.weight"])
    proj = saiga_vlm.model.model.multi_modal_projector.linear_1.weight
    assert torch.equal(proj.half(), saved["multi_modal_projector.linear_1.weight"])


def test_576_image_tokens_per_image_after_processing(saiga_dir, caplog):
    from core.model import load_vlm

    with caplog.at_level(logging.INFO, logger="core.checkpoint"):
        vlm = load_vlm(saiga_dir)
    assert vlm.n_image_tokens == 576
    assert "patch_size 14" in caplog.text
    inputs = vlm._inputs([vlm.chat_prompt("Какого цвета круг?")] * 2, [_image(), _image()])
    assert int((inputs["input_ids"] == 128256).sum()) == 2 * 576
    assert vlm.generate(["Какого цвета круг?"], [_image()], max_new_tokens=2) is not None


def test_missing_pad_token_falls_back_to_pad_and_is_logged(saiga_dir, tmp_path, caplog):
    from core.model import load_vlm

    copy = tmp_path / "nopad"
    copy.mkdir()
    for item in saiga_dir.iterdir():
        data = json.loads(item.read_text()) if item.suffix == ".json" else None
        if item.name in ("tokenizer_config.json", "special_tokens_map.json"):
            data.pop("pad_token", None)
        if data is None:
            (copy / item.name).symlink_to(item)
        else:
            (copy / item.name).write_text(json.dumps(data, ensure_ascii=False))
    with caplog.at_level(logging.INFO, logger="core.checkpoint"):
        vlm = load_vlm(copy)
    assert vlm.tokenizer.pad_token == "<pad>" and vlm.tokenizer.pad_token_id == 128257
    assert "no pad token" in caplog.text
    answers = vlm.generate(["Какого цвета круг?", "Где круг?\nОтветь одним словом."],
                           [_image(), _image((30, 60, 220))], max_new_tokens=2)
    assert len(answers) == 2


def test_lora_lands_on_the_language_model_only(saiga_vlm):
    import copy

    from core.lora import adapted_modules, attach_lora, lora_config

    vlm = copy.deepcopy(saiga_vlm)
    attach_lora(vlm, "probe", lora_config(rank=4))
    modules = adapted_modules(vlm.model, "probe")
    assert modules and all("language_model" in m for m in modules)
    assert not any("vision_tower" in m or "projector" in m for m in modules)


# ---------------------------------------------------------------- prompts and scoring

def test_option_scoring_applies_the_lm_head_only_at_option_tokens(saiga_vlm):
    seen = []
    head = saiga_vlm.model.lm_head
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        options = [["красный", "синий", "зелёный"], ["да", "нет"]]
        scores = saiga_vlm.option_logprobs(["Какого цвета круг?", "Есть ли круг?"],
                                           [_image(), _image()], options)
    finally:
        handle.remove()
    n_option_tokens = sum(len(saiga_vlm.tokenizer(o + EOT, add_special_tokens=False)["input_ids"])
                          for opts in options for o in opts)
    assert [len(s) for s in scores] == [3, 2]
    positions = sum(shape[:-1].numel() for shape in seen)
    assert positions <= n_option_tokens, (seen, n_option_tokens)


def test_option_scores_equal_the_full_logits_computation(saiga_vlm):
    import torch

    vlm = saiga_vlm
    text, opts = "Какого цвета круг?", ["красный", "синий"]
    scores = vlm.option_logprobs([text], [_image()], [opts])[0]
    for opt, score in zip(opts, scores):
        inputs = vlm._inputs([vlm.chat_prompt(text) + opt + EOT], [_image()])
        n = len(vlm.tokenizer(opt + EOT, add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            logits = vlm.model(**inputs).logits[0, -n - 1:-1].float()
        target = inputs["input_ids"][0, -n:]
        expected = torch.log_softmax(logits, -1).gather(-1, target[:, None]).mean()
        assert score == pytest.approx(float(expected), abs=1e-4)


def test_system_prompt_template_labels_only_the_assistant(saiga_dir, tmp_path):
    from core.demo.saiga_tiny_files import with_chat_template
    from core.model import load_vlm

    vlm = load_vlm(with_chat_template(saiga_dir, tmp_path / "sys", st.SYSTEM_CHAT_TEMPLATE))
    prompt = vlm.chat_prompt("Какого цвета круг?")
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system")
    assert "<image>" in prompt and prompt.endswith("assistant<|end_header_id|>\n\n")
    turns = [("Какого цвета круг?", "Красный."), ("Где он?", "Слева.")]
    enc = encode_conversation(vlm.processor, _image(), turns)
    tok = vlm.tokenizer
    runs, current = [], []
    for t in enc.labels + [IGNORE_INDEX]:
        if t == IGNORE_INDEX:
            runs, current = runs + ([current] if current else []), []
        else:
            current.append(t)
    assert [tok.decode(r) for r in runs] == ["Красный." + EOT, "Слева." + EOT]
    whole = vlm.processor(text=tok.apply_chat_template(
        [{"role": "user", "content": "<image>\nКакого цвета круг?"},
         {"role": "assistant", "content": "Красный."},
         {"role": "user", "content": "Где он?"},
         {"role": "assistant", "content": "Слева."}], tokenize=False),
        images=_image(), add_special_tokens=False)["input_ids"][0]
    assert list(whole) == enc.input_ids
    assert tok.decode(enc.input_ids).count(st.DEFAULT_SYSTEM) == 1


# ---------------------------------------------------------------- the pretraining's packed rows

def test_a_packed_row_computes_each_question_as_its_own_prompt(saiga_vlm):
    import torch

    from core.demo.saiga_tiny_train import Encoder, collate_packed, pack
    from core.processor import collate

    vlm = saiga_vlm
    turns = [(QUESTION, "красный"), ("Где круг?\nОтветь одним словом.", "слева"),
             ("Есть ли на картинке синий круг?", "нет")]
    pixels = vlm.processor.image_processor([_image()], return_tensors="pt")["pixel_values"][0]
    for extra_bos in (False, True):
        row = pack(Encoder(vlm.processor, 2048), pixels, turns, extra_bos=extra_bos)
        assert row.input_ids.count(128256) == 576  # the image once, not once per question
        batch = collate_packed([row], vlm.tokenizer.pad_token_id)
        labels = batch.pop("labels")[0, 1:]
        with torch.inference_mode():
            packed = vlm.model(**batch).logits[0, :-1][labels != IGNORE_INDEX]
        alone = []
        for turn in turns:
            enc = encode_conversation(vlm.processor, _image(), [turn])
            if extra_bos:  # lmms-eval's llava_hf prompt: a second <|begin_of_text|>
                enc.input_ids, enc.labels = [128000] + enc.input_ids, [IGNORE_INDEX] + enc.labels
            single = collate([enc], vlm.processor)
            lab = single.pop("labels")[0, 1:]
            with torch.inference_mode():
                alone.append(vlm.model(**single).logits[0, :-1][lab != IGNORE_INDEX])
        alone = torch.cat(alone)
        assert packed.shape == alone.shape
        assert float((packed - alone).abs().max()) < 1e-4


def test_pretraining_pixels_equal_the_image_processors_on_the_upscaled_files(saiga_vlm):
    import random

    import torch

    from core.demo import scenes

    rng = random.Random(3)
    small = [scenes.render(scenes.random_scene(rng), rng) for _ in range(3)]
    big = [img.resize((336, 336), Image.NEAREST) for img in small]  # as upscale_images writes
    want = saiga_vlm.processor.image_processor(big, return_tensors="pt")["pixel_values"]
    assert torch.allclose(st.to_pixels(small), want, atol=1e-5)


# ---------------------------------------------------------------- the trained world

@pytest.fixture(scope="session")
def world():
    return st.ensure_saiga_tiny()


@pytest.mark.slow
def test_generation_stops_on_eot_without_assistant_text(world):
    import torch

    from core.model import load_vlm

    vlm = load_vlm(world.model_dir)
    texts = ["Какого цвета фигура слева?\nОтветь одним словом.", "Сколько фигур на картинке?"]
    images = [_image(), _image((30, 60, 220))]
    inputs = vlm._inputs([vlm.chat_prompt(t) for t in texts], images)
    with torch.inference_mode():
        out = vlm.model.generate(**inputs, max_new_tokens=16, do_sample=False,
                                 eos_token_id=vlm.stop_ids, pad_token_id=vlm.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert all(128009 in row.tolist() for row in new), new  # it stopped, on <|eot_id|>
    answers = vlm.generate(texts, images)
    assert all(a and "assistant" not in a and "<|" not in a for a in answers), answers


@pytest.mark.slow
def test_exact_protocol_answers_equal_llava_hfs_one_question_at_a_time(world):
    from core.data import load_gqa, load_image, load_mmbench
    from core.evaluate import LMMS_MAX_NEW_TOKENS, EvalConfig, build_prompt, evaluate
    from core.model import load_vlm
    from tests.lmms_reference.llava_hf import llava_hf_generate

    vlm = load_vlm(world.model_dir)
    gqa = load_gqa(str(world.data_dir / "GQA-ru"), "testdev")[:4]
    mmb = load_mmbench(str(world.data_dir / "MMBench-ru"))[:4]
    for examples in (gqa, mmb):
        ours = evaluate(vlm, examples, batch_size=1, progress=False, prefix_cache=False)
        for example, sample in zip(examples, ours.samples):
            limit = LMMS_MAX_NEW_TOKENS[example["benchmark"]]
            text, ids = llava_hf_generate(vlm.model, vlm.tokenizer, vlm.processor,
                                          build_prompt(example, EvalConfig()),
                                          [load_image(example)[0]], limit)
            assert sample["output"] == text.strip()  # mmbench_process_results strips
            assert ids[-1] == 128009 or len(ids) == limit  # stopped on <|eot_id|> alone


@pytest.mark.slow
def test_eval_cli_both_benchmarks_and_modes(world, capsys):
    from loop.cli import main

    for benchmark, mode in (("gqa_ru", "generate"), ("mmbench_ru", "generate"),
                            ("mmbench_ru", "likelihood")):
        rc = main(["-q", "eval", "--preset", "saiga-tiny", "--benchmark", benchmark, "--limit",
                   "16", "--batch-size", "8", "--mode", mode, "--gpu", "cpu", "--json",
                   "--db", ":memory:"])
        report = json.loads(capsys.readouterr().out)
        assert rc == 0 and report["n"] > 0 and 0 <= report["accuracy"] <= 1, report


@pytest.mark.slow
def test_nf4_loading_on_cpu(world):
    import bitsandbytes as bnb

    from core.device import resolve_profile
    from core.model import load_vlm

    vlm = load_vlm(world.model_dir,
                   options=resolve_profile("cpu", gpu=None, load_in_4bit=True).load_options())
    quantized = [n for n, m in vlm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    assert vlm.n_image_tokens == 576
    assert vlm.generate(["Какого цвета фигура слева?\nОтветь одним словом."], [_image()])
    scores = vlm.option_logprobs(["Какого цвета фигура?"], [_image()], [["красный", "синий"]])
    assert len(scores[0]) == 2


@pytest.mark.slow
def test_testdev_asks_gqa_many_questions_per_image_and_the_prefix_cache_agrees(world):
    from collections import Counter

    from core.data import load_gqa, load_image
    from core.evaluate import EvalConfig, build_prompt, evaluate
    from core.model import load_vlm

    testdev = load_gqa(str(world.data_dir / "GQA-ru"), "testdev")
    train = load_gqa(str(world.data_dir / "GQA-ru"), "train")
    per_image = Counter(q["imageId"] for q in testdev)
    # real testdev: 12,216 questions on 398 images; the demo's few per image stay in train
    assert 24 <= len(testdev) / len(per_image) <= 34
    assert len(train) / len({q["imageId"] for q in train}) < 5
    assert len({q["id"] for q in testdev}) == len(testdev)
    vlm = load_vlm(world.model_dir)
    some = [q for q in testdev if q["imageId"] in sorted(per_image)[:3]]
    cached = evaluate(vlm, some, batch_size=16, progress=False, prefix_cache=True)
    plain = evaluate(vlm, some, batch_size=16, progress=False, prefix_cache=False)
    assert [s["output"] for s in cached.samples] == [s["output"] for s in plain.samples]
    assert (plain.metrics["prefill_tokens_per_sample"]
            >= 5 * cached.metrics["prefill_tokens_per_sample"])
    # saiga-tiny answers few distinct words, so equal answers alone prove little: the first
    # token's logits must agree too, row by row
    rows = [q for q in testdev if q["imageId"] in sorted(per_image)[:2]][:24]
    texts = [build_prompt(q, EvalConfig()) for q in rows]
    images = [load_image(q)[0] for q in rows]
    with_cache, logits_cache = _first_token_logits(vlm, texts, images, prefix_cache=True)
    without, logits_plain = _first_token_logits(vlm, texts, images, prefix_cache=False)
    gap = float((logits_cache - logits_plain).abs().max())
    assert with_cache == without
    assert gap < 1e-3, f"first-token logits differ by up to {gap:.2e}"
    assert float(logits_plain.std(dim=0).max()) > 10 * gap  # rows differ far more than paths


def _first_token_logits(vlm, texts, images, *, prefix_cache):
    """``vlm.generate``'s answers and the raw logits of each row's first new token."""
    import torch

    captured = []
    original = vlm.model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        captured.append(out.logits[0].float())
        return out.sequences

    vlm.model.generate = spy
    try:
        answers = vlm.generate(texts, images, max_new_tokens=4, prefix_cache=prefix_cache)
    finally:
        del vlm.model.generate
    return answers, torch.cat(captured)


@pytest.mark.slow
def test_answers_depend_on_the_question_and_on_the_image(world):
    """The briefly pretrained model answers a colour question with a colour, a count question
    with a number, a yes/no question with yes or no; its answers to one question change with
    the image, and it beats the best constant answer on the same questions."""
    from collections import Counter, defaultdict

    from core.data import load_gqa
    from core.demo import scenes
    from core.evaluate import evaluate
    from core.model import load_vlm

    testdev = load_gqa(str(world.data_dir / "GQA-ru"), "testdev")
    images = set(sorted({q["imageId"] for q in testdev})[:40])
    rows = [q for q in testdev if q["imageId"] in images]
    samples = evaluate(load_vlm(world.model_dir), rows, batch_size=32, progress=False).samples
    said = [s["output"].strip().strip(".").lower() for s in samples]
    kinds = {"queryAttr": set(scenes.COLORS), "relAttr": set(scenes.COLORS),
             "count": set(scenes.COUNT_WORDS.values()),
             "queryShape": set(scenes.SHAPE_WORDS.values())}
    # not "Где находится фигура?" (1% of testdev): the v4 build answers it with a count word
    by_kind: dict[str, list[str]] = defaultdict(list)
    by_question: dict[str, set[str]] = defaultdict(set)
    for q, answer in zip(rows, said):
        kind = q["types"]["detailed"] if q["types"]["detailed"] in kinds else q["types"]["structural"]
        by_kind[kind].append(answer)
        by_question[q["question"]].add(answer)
    for kind, words in kinds.items():
        fitting = sum(a in words for a in by_kind[kind]) / len(by_kind[kind])
        assert fitting >= 0.8, (kind, Counter(by_kind[kind]).most_common(5))
    assert sum(a in ("да", "нет") for a in by_kind["verify"]) / len(by_kind["verify"]) >= 0.9
    colour_rows = [(q, a) for q, a in zip(rows, said) if q["types"]["detailed"] in kinds
                   and kinds[q["types"]["detailed"]] == set(scenes.COLORS)]
    assert len({a for _, a in colour_rows}) >= 4  # the colour asked about is read off the image
    right = sum(a == q["answer"] for q, a in colour_rows) / len(colour_rows)
    assert right >= 0.6, right  # the most frequent colour alone is right for about one in four
    changing = [q for q, answers in by_question.items() if len(answers) > 1]
    assert len(changing) >= 4, sorted(changing)  # the same words, other images, other answers
    accuracy = sum(s["correct"] for s in samples) / len(samples)
    constant = Counter(q["answer"] for q in rows).most_common(1)[0][1] / len(rows)
    assert accuracy >= constant + 0.08, (accuracy, constant)
