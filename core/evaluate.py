"""Evaluate a loaded VLM on GQA-ru or MMBench-ru, scored as the field scores them.

GQA-ru: lmms-eval's ``gqa-ru`` prompt, greedy, ``max_new_tokens=16``, exact match after
lowercasing and deleting ASCII punctuation (``accuracy``: comparable to the published 51.44),
plus a Russian-aware exact match (``accuracy_normalized``).

MMBench-ru: lmms-eval's ``mmbench_ru_dev`` prompt (a blank line before the instruction),
greedy, up to 1024 new tokens, the letter read by lmms-eval's own rule (``can_infer``, never a
judge); circular accuracy over the rotated copies is the headline (comparable to 56.65),
per-row and per-category accuracy beside it. Answers the rule cannot read are wrong and
counted (lmms-eval asks a GPT judge there); a lenient reading is reported beside, labelled. A second protocol, ``likelihood``, ranks the option *texts* by the
model's length-normalised log-likelihood and needs no generation; it is reported as its own
protocol.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from core.data import isna, load_image
from core.errors import classify
from core.metrics import (
    ROTATION_BASE,
    accuracy,
    circular_accuracy,
    clusters_of,
    extract_choice,
    gqa_match,
    lmms_choices,
    wilson_interval,
)
from core.oom import free_memory, is_oom

log = logging.getLogger(__name__)

GQA_INSTRUCTION = "Ответь одним словом."
MMB_OPTION_HEADER = " There are several options:"
MMB_INSTRUCTION = "Выбери правильный вариант ответа буквой."
MODES = ("generate", "likelihood")
LMMS_MAX_NEW_TOKENS = {"gqa_ru": 16, "mmbench_ru": 1024}
"""lmms-eval's ``generation_kwargs.max_new_tokens`` of ``gqa-ru`` and ``mmbench_ru_dev``."""
LMMS_STOP = {"gqa_ru": [], "mmbench_ru": ["ASSISTANT:"]}
"""The task yamls' ``generation_kwargs.until``, recorded with the results; lmms-eval's
``llava_hf`` never applies it (it stops on the tokenizer's eos only), so neither does this."""


@dataclass
class EvalConfig:
    """Prompt and decoding of one benchmark: the things prompt and generation remedies change."""

    instruction: str | None = None
    """The line after the question; None means the lmms-eval instruction of the benchmark."""
    option_header: str = MMB_OPTION_HEADER
    """MMBench-ru: the text between the question and the options (lmms-eval's is English)."""
    max_new_tokens: int | None = None
    """None: lmms-eval's, 16 for GQA-ru and 1024 for MMBench-ru."""
    num_beams: int = 1
    repetition_penalty: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    """Cut the answer at the first of these strings (e.g. "\\n", "."); lmms-eval cuts at none."""
    mode: str = "generate"
    """generate | likelihood (MMBench-ru only: rank option texts, no generation)."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, but got '{self.mode}'")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, but got {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, but got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, but got {self.repetition_penalty}")
        if problems:
            raise ValueError("invalid EvalConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    def is_lmms(self, benchmark: str) -> bool:
        """Whether this is the exact lmms-eval protocol of ``benchmark``: its prompt, greedy
        decoding, its token limit and stop strings, generated answers scored by rules."""
        return (self.mode == "generate" and self.instruction is None and self.num_beams == 1
                and self.repetition_penalty == 1.0 and not self.stop_strings
                and self.max_new_tokens in (None, LMMS_MAX_NEW_TOKENS[benchmark])
                and (benchmark == "gqa_ru" or self.option_header == MMB_OPTION_HEADER))

    def protocol(self, benchmark: str) -> str:
        """A short name of the scoring protocol, shown next to every number."""
        if benchmark == "mmbench_ru" and self.mode == "likelihood":
            return "mmbench-ru option-text likelihood (its own protocol, not lmms-eval's)"
        name = ("gqa-ru exact match" if benchmark == "gqa_ru"
                else "mmbench-ru circular, letter by lmms-eval's rule")
        lmms = self.is_lmms(benchmark)
        return f"{name} ({'lmms-eval prompt and decoding' if lmms else 'changed prompt/decoding'})"


def lmms_config() -> EvalConfig:
    """The exact lmms-eval protocol (the same for both benchmarks): every default."""
    return EvalConfig()


def _default_max(benchmark: str) -> int:
    return LMMS_MAX_NEW_TOKENS[benchmark]


def build_prompt(example: dict, config: EvalConfig) -> str:
    """The user text for one example (the chat template and image part are added by the VLM).

    With the default config this is lmms-eval's text byte for byte: GQA-ru
    ``f"{question}{post_prompt}"`` with post_prompt "\\nОтветь одним словом."; MMBench-ru
    ``mmbench_doc_to_text``: ``f"{hint} {question} {options}"`` from the raw fields (no hint
    when it is None, NaN or "nan"; an empty hint still gives its space), ``{options}`` being
    "There are several options:" and a line per shown option, trailing newlines stripped;
    then "\\n" and the post_prompt "\\nВыбери правильный вариант ответа буквой.", so a blank
    line precedes the instruction. A changed ``instruction`` takes the post_prompt's place.
    """
    if example["benchmark"] == "gqa_ru":
        return f"{example['question']}\n{config.instruction or GQA_INSTRUCTION}"
    hint = example.get("hint")
    has_hint = not isna(hint) and hint != "nan"  # an empty hint is kept: " {question}"
    head = f"{hint} {example['question']}" if has_hint else example["question"]
    if config.mode == "likelihood":
        return f"{head}\n{config.instruction or GQA_INSTRUCTION}"
    lines = "".join(f"{k}. {v}\n" for k, v in sorted(example["options"].items()))
    options = f"{config.option_header}\n{lines}".rstrip("\n")  # create_options_prompt's rstrip
    return f"{head}{options}\n\n{config.instruction or MMB_INSTRUCTION}"


@dataclass
class EvalResult:
    benchmark: str
    protocol: str
    config: dict
    metrics: dict
    samples: list[dict]
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    @property
    def n(self) -> int:
        return self.metrics["n"]

    def correct(self) -> list[bool]:
        return [s["correct"] for s in self.samples]

    def to_dict(self, with_samples: bool = False) -> dict:
        out = {"benchmark": self.benchmark, "protocol": self.protocol, "config": self.config,
               **self.metrics, "seconds": round(self.seconds, 3)}
        if with_samples:
            out["samples"] = self.samples
        return out


def evaluate(vlm, examples: list[dict], config: EvalConfig | None = None, *,
             batch_size: int = 16, progress: bool = True, prefix_cache: bool = True) -> EvalResult:
    """Answer every example in batches and score the answers.

    With ``prefix_cache`` (the default), batches hold the questions of one image where possible
    and each image's prompt prefix is computed once (``core.prefix``); without it, batches are
    grouped by prompt length. The answers are the same either way.
    """
    from tqdm.auto import tqdm

    config = config or EvalConfig()
    if not examples:
        raise ValueError("nothing to evaluate: the example list is empty")
    benchmark = examples[0]["benchmark"]
    if config.mode == "likelihood" and benchmark != "mmbench_ru":
        raise ValueError("mode='likelihood' is a MMBench-ru protocol; GQA-ru answers are open")
    max_new = config.max_new_tokens or _default_max(benchmark)
    stops = list(config.stop_strings)  # lmms-eval's llava_hf applies no stop string
    prompts = [build_prompt(ex, config) for ex in examples]
    if prefix_cache:
        order = sorted(range(len(examples)), key=lambda i: (image_group(examples[i]), len(prompts[i])))
    else:
        order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    positions0 = vlm.prefill_positions
    samples: list[dict | None] = [None] * len(examples)
    t0 = time.perf_counter()
    bar = tqdm(total=len(examples), desc=f"eval {benchmark}", unit="q", disable=not progress,
               leave=False)
    start, size = 0, batch_size
    while start < len(order):
        idx = order[start:start + size]
        images, oks, decoded = [], [], {}
        for i in idx:  # rows that share an image loader share one decoded image
            key = id(examples[i].get("_image"))
            if key not in decoded:
                decoded[key] = load_image(examples[i])
            img, ok = decoded[key]
            images.append(img if ok else _blank(vlm))
            oks.append(ok)
        tb = time.perf_counter()
        try:
            outputs, letters = _answer(vlm, config, examples, prompts, idx, images, max_new, stops,
                                       prefix_cache)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(exc) or size == 1:
                raise
            free_memory(vlm.device)
            size //= 2
            log.warning("out of memory at evaluation batch %d (%s): retrying with batch %d",
                        2 * size, str(exc).splitlines()[0][:120] if str(exc) else "", size)
            continue
        start += len(idx)
        per = (time.perf_counter() - tb) / len(idx)
        for i, out, letter, ok in zip(idx, outputs, letters, oks):
            samples[i] = _score(examples[i], prompts[i], out, letter, ok, per)
        bar.update(len(idx))
    bar.close()
    seconds = time.perf_counter() - t0
    done = [s for s in samples if s is not None]
    metrics = summarize(benchmark, done)
    metrics["samples_per_s"] = round(len(done) / seconds, 3) if seconds > 0 else None
    metrics["prefill_tokens_per_sample"] = round((vlm.prefill_positions - positions0) / len(done), 1)
    return EvalResult(benchmark=benchmark, protocol=config.protocol(benchmark),
                      config=config.to_dict(), metrics=metrics, samples=done, seconds=seconds)


def image_group(example: dict) -> str:
    """Which rows show the same picture: a GQA-ru image, or a MMBench-ru question's rotations."""
    if example["benchmark"] == "gqa_ru":
        return f"gqa:{example['imageId']}"
    return f"mmb:{int(example['index']) % ROTATION_BASE:09d}"


def _answer(vlm, config: EvalConfig, examples, prompts, idx, images, max_new, stops,
            prefix_cache):
    """Outputs (and, in likelihood mode, the chosen letters) for one batch."""
    if config.mode == "likelihood":
        opts = [[v.strip() for v in examples[i]["options"].values()] for i in idx]
        scores = vlm.option_logprobs([prompts[i] for i in idx], images, opts,
                                     prefix_cache=prefix_cache)
        letters = [list(examples[i]["options"])[max(range(len(s)), key=s.__getitem__)]
                   for i, s in zip(idx, scores)]
        return [examples[i]["options"][letter] for i, letter in zip(idx, letters)], letters
    outputs = vlm.generate([prompts[i] for i in idx], images, max_new_tokens=max_new,
                           num_beams=config.num_beams,
                           repetition_penalty=config.repetition_penalty,
                           stop_strings=stops or None, prefix_cache=prefix_cache)
    return outputs, [None] * len(idx)


def _blank(vlm):
    from core.model import blank_image

    return blank_image(vlm)


def _score(example: dict, prompt: str, output: str, letter: str | None, image_ok: bool,
           seconds: float) -> dict:
    if example["benchmark"] == "gqa_ru":
        parsed = output
        correct = gqa_match(output, example["answer"], mode="lmms")
        extra = {"correct_normalized": gqa_match(output, example["answer"], mode="normalized"),
                 "category": (example.get("types") or {}).get("detailed"),
                 "cluster": example.get("imageId")}
    else:
        # the headline reads the answer with lmms-eval's rule; the lenient reading goes beside it
        parsed = letter or extract_choice(output, lmms_choices(example), mode="lmms")
        correct = parsed == example["answer"]
        lenient = letter or extract_choice(output, example["options"], mode="lenient")
        extra = {"parsed_lenient": lenient, "correct_lenient": lenient == example["answer"],
                 "index": int(example["index"]), "n_options": len(example["options"]),
                 "category": example.get("category"),
                 "cluster": int(example["index"]) % ROTATION_BASE}
    prediction = output if letter is None else letter
    labels = sorted(classify(example["benchmark"], _public(example), prediction,
                             image_ok=image_ok)) if not correct else []
    return {"sample_id": example["id"], "question": example["question"],
            "answer": example["answer"], "prompt": prompt, "output": output, "parsed": parsed,
            "correct": bool(correct), "image_ok": image_ok, "seconds": round(seconds, 5),
            "labels": labels, **extra}


def _public(example: dict) -> dict:
    return {k: v for k, v in example.items() if not k.startswith("_")}


def summarize(benchmark: str, samples: list[dict]) -> dict:
    """Headline ``accuracy`` with n and a 95% interval, plus the breakdowns.

    GQA-ru's interval is a cluster bootstrap over images (questions about one image are not
    independent); MMBench-ru's circular accuracy already counts one outcome per question
    group, with a Wilson interval. MMBench-ru's answers are read by lmms-eval's rule;
    ``unparseable`` counts the answers it reads no letter from (lmms-eval's judge would read
    them; here they are wrong), and ``accuracy_lenient`` / ``per_row_lenient`` /
    ``unparseable_lenient`` give the same outputs under the lenient reading, for comparison.
    """
    n_missing = sum(not s["image_ok"] for s in samples)
    if benchmark == "gqa_ru":
        clusters = clusters_of(samples)
        head = accuracy([s["correct"] for s in samples], clusters)
        norm = accuracy([s["correct_normalized"] for s in samples], clusters)
        n_images = len(set(clusters))
        return {"accuracy": head.value, "n": head.n, "n_clusters": n_images, "ci": [head.low, head.high],
                "accuracy_normalized": norm.value, "ci_normalized": [norm.low, norm.high],
                "per_category": _per_category(samples), "images_missing": n_missing}
    circ = circular_accuracy(samples)
    k = round(circ["circular"] * circ["n_groups"])
    low, high = wilson_interval(k, circ["n_groups"])
    # rotations of one question are not independent: the per-row interval resamples groups
    row = accuracy([s["correct"] for s in samples],
                   [int(s["index"]) % ROTATION_BASE for s in samples])
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        groups[s["category"]].append(s)
    per_cat = {c: {"circular": circular_accuracy(rows)["circular"],
                   "per_row": sum(r["correct"] for r in rows) / len(rows),
                   "n_groups": circular_accuracy(rows)["n_groups"], "n_rows": len(rows)}
               for c, rows in sorted(groups.items())}
    return {"accuracy": circ["circular"], "n": circ["n_groups"], "ci": [low, high],
            "per_row": row.value, "n_rows": row.n, "ci_per_row": [row.low, row.high],
            "unparseable": sum(s["parsed"] is None for s in samples),
            "incomplete_groups": circ["incomplete_groups"], "per_category": per_cat,
            "images_missing": n_missing, **_lenient(samples)}


def _lenient(samples: list[dict]) -> dict:
    """MMBench-ru under the lenient reading (``extract_choice(mode="lenient")``), labelled: not
    lmms-eval's rule, so never the headline; empty when the samples do not carry it."""
    if not samples or not all("correct_lenient" in s for s in samples):
        return {}
    circ = circular_accuracy([{**s, "correct": s["correct_lenient"]} for s in samples])
    return {"accuracy_lenient": circ["circular"], "per_row_lenient": circ["per_row"],
            "unparseable_lenient": sum(s.get("parsed_lenient") is None for s in samples)}


def _per_category(samples: list[dict]) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        groups[str(s.get("category"))].append(s["correct"])
    return {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(groups.items())}
