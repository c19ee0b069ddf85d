"""GPU profiles (``--gpu t4|a100|h100|cpu|auto``): how to load and train on the machine at hand.

A :class:`Profile` fixes every precision and memory choice in one place and keeps the reason
for each one, so a run's log says why it loaded a 4-bit base or used a grad scaler. The
T4 priors at the bottom give the loop's cost model figures for LLaVA-Saiga-8B before it has
measured anything; ``bench/train_speed.py`` prints their derivation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from core.exceptions import UserError

log = logging.getLogger(__name__)

PROFILES = ("auto", "t4", "a100", "h100", "cpu")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class GpuInfo:
    """What torch reports about CUDA device 0."""

    name: str
    """Device name, e.g. "Tesla T4"."""
    capability: tuple[int, int]
    """CUDA compute capability (major, minor); bf16 needs 8.0 or more."""
    memory_gb: float
    """Total device memory in GB (10^9 bytes)."""

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)


@dataclass(frozen=True)
class Profile:
    """Every precision and memory choice for one kind of machine."""

    name: str
    """t4 | a100 | h100 | cpu."""
    device: str
    """torch device the model lives on: "cuda" or "cpu"."""
    dtype: str
    """Weights of everything not quantized, and the compute dtype of the 4-bit layers."""
    load_in_4bit: bool
    """Load the language model as 4-bit NF4 with double quantization (bitsandbytes)."""
    autocast_dtype: str | None
    """dtype of ``torch.autocast`` during training; None trains without autocast."""
    grad_scaler: bool
    """Scale the loss (``torch.amp.GradScaler``): needed with fp16 autocast, whose small
    gradients underflow otherwise."""
    lora_dtype: str
    """dtype of the trainable LoRA (and projector) weights: fp32 so that updates are not lost
    and the scaler can unscale them."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass (with ``enable_input_require_grads``)."""
    attn_implementation: str
    """sdpa | eager | flash_attention_2."""
    optimizer: str
    """adamw | paged_adamw_8bit (bitsandbytes, CUDA only)."""
    micro_batch_size: int
    """Samples per forward pass in training; gradient accumulation makes up the batch."""
    eval_batch_size: int
    """Samples per generation batch in evaluation."""
    gpu: GpuInfo | None = None
    """The detected GPU, None on CPU."""
    reasons: tuple[str, ...] = field(default=(), compare=False)
    """Why each choice was made, in words, in the order they were made."""

    def load_options(self):
        """The :class:`core.model.LoadOptions` that put the base model in memory this way."""
        from core.model import LoadOptions

        return LoadOptions(device=self.device, dtype=self.dtype, load_in_4bit=self.load_in_4bit,
                           attn_implementation=self.attn_implementation)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        return out

    def log_reasons(self, *, training: bool = True) -> None:
        """Log why each choice was made; an evaluation (``training=False``) leaves out the
        choices that only concern training (optimizer, checkpointing, micro-batch, ...)."""
        for reason in self.reasons:
            if training or not is_training_reason(reason):
                log.info("profile %s: %s", self.name, reason)


TRAINING_ONLY = ("gradient checkpointing", "AdamW", "micro-batch", "LoRA weights")
"""Words that mark a reason as a training-only choice: an evaluation does not log those."""


def is_training_reason(reason: str) -> bool:
    return any(word in reason for word in TRAINING_ONLY)


def detect_gpu() -> GpuInfo | None:
    """CUDA device 0 as torch sees it, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(name=str(props.name), capability=(int(props.major), int(props.minor)),
                   memory_gb=round(props.total_memory / 1e9, 1))


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed (found, not imported: importing it takes seconds)."""
    from importlib.util import find_spec

    return find_spec("bitsandbytes") is not None


def resolve_profile(name: str = "auto", *, dtype: str | None = None,
                    load_in_4bit: bool | None = None, micro_batch_size: int | None = None,
                    gpu: GpuInfo | None | str = "detect") -> Profile:
    """The profile for ``--gpu NAME`` on this machine, with optional overrides.

    Args:
        name: auto | t4 | a100 | h100 | cpu (the ``--gpu`` flag).
        dtype: ``--dtype`` override (float32 | float16 | bfloat16).
        load_in_4bit: ``--4bit`` / ``--no-4bit`` override.
        micro_batch_size: override of the training micro-batch.
        gpu: the GPU to plan for; by default the one torch reports.

    Raises:
        UserError: an unknown profile, a GPU profile without a GPU, bf16 on a GPU without it,
            fp16 on the CPU, or 4-bit without bitsandbytes. The message names the flag.
    """
    if name not in PROFILES:
        raise UserError(f"`--gpu` must be one of {', '.join(PROFILES)}, but got '{name}'.")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"`--dtype` must be one of {', '.join(DTYPES)}, but got '{dtype}'.")
    if gpu == "detect":
        gpu = detect_gpu()
    reasons: list[str] = []
    if name == "auto":
        name = _auto_name(gpu, reasons)
    if name == "cpu":
        profile = _cpu(reasons, gpu)
    else:
        if gpu is None:
            raise UserError(f"`--gpu {name}` needs a CUDA GPU, but torch sees none. "
                            "Use `--gpu cpu`, or `--gpu auto` to pick by what is there.")
        profile = _t4(gpu, reasons) if name == "t4" else _ampere(name, gpu, reasons)
    return _override(profile, dtype, load_in_4bit, micro_batch_size)


def _auto_name(gpu: GpuInfo | None, reasons: list[str]) -> str:
    if gpu is None:
        reasons.append("auto: no CUDA device visible to torch, so the cpu profile")
        return "cpu"
    if not gpu.bf16:
        reasons.append(f"auto: {gpu.name}, compute capability {gpu.capability[0]}."
                       f"{gpu.capability[1]} has no bf16, so the t4 profile (fp16 + 4-bit)")
        return "t4"
    pick = "h100" if gpu.capability >= (9, 0) else "a100"
    reasons.append(f"auto: {gpu.name}, compute capability {gpu.capability[0]}."
                   f"{gpu.capability[1]}, {gpu.memory_gb:.0f} GB, so the {pick} profile")
    return pick


def _cpu(reasons: list[str], gpu: GpuInfo | None) -> Profile:
    reasons.append("cpu: fp32 weights and compute (CPU kernels for fp16 are slow or missing)")
    reasons.append("cpu: no gradient checkpointing (small models; memory is not the limit)")
    reasons.append("cpu: torch AdamW (paged 8-bit AdamW needs CUDA)")
    if gpu is not None:
        reasons.append(f"cpu: chosen although {gpu.name} is present (`--gpu cpu`)")
    return Profile(name="cpu", device="cpu", dtype="float32", load_in_4bit=False,
                   autocast_dtype=None, grad_scaler=False, lora_dtype="float32",
                   gradient_checkpointing=False, attn_implementation="sdpa", optimizer="adamw",
                   micro_batch_size=4, eval_batch_size=8, gpu=None, reasons=tuple(reasons))


def _t4(gpu: GpuInfo, reasons: list[str]) -> Profile:
    cc = f"{gpu.capability[0]}.{gpu.capability[1]}"
    if gpu.name and "T4" not in gpu.name:
        reasons.append(f"t4: chosen on {gpu.name} (compute capability {cc}, "
                       f"{gpu.memory_gb:.0f} GB); its limits are the T4's")
    reasons.append(f"t4: compute capability {cc} has no bf16, so fp16 compute with fp16 "
                   "autocast and a grad scaler")
    reasons.append(f"t4: {gpu.memory_gb:.0f} GB, so the language model in 4-bit NF4 with "
                   "double quantization; vision tower, projector and lm_head stay fp16")
    reasons.append("t4: LoRA weights in fp32 (fp16 updates underflow; the scaler cannot "
                   "unscale fp16 gradients)")
    reasons.append("t4: gradient checkpointing with enable_input_require_grads (activations "
                   "of 576 image tokens do not fit otherwise)")
    reasons.append("t4: SDPA attention (FlashAttention-2 needs compute capability 8.0)")
    reasons.append("t4: paged 8-bit AdamW (optimizer state pages to CPU under pressure)")
    reasons.append("t4: micro-batch 2 with gradient accumulation")
    return Profile(name="t4", device="cuda", dtype="float16", load_in_4bit=True,
                   autocast_dtype="float16", grad_scaler=True, lora_dtype="float32",
                   gradient_checkpointing=True, attn_implementation="sdpa",
                   optimizer="paged_adamw_8bit", micro_batch_size=2, eval_batch_size=8,
                   gpu=gpu, reasons=tuple(reasons))


def _ampere(name: str, gpu: GpuInfo, reasons: list[str]) -> Profile:
    cc = f"{gpu.capability[0]}.{gpu.capability[1]}"
    if not gpu.bf16:
        raise UserError(f"`--gpu {name}` trains in bf16, but {gpu.name} (compute capability "
                        f"{cc}) has no bf16. Use `--gpu t4` (fp16 with a grad scaler) or "
                        "`--gpu auto`.")
    big = gpu.memory_gb >= 60
    micro = (16 if name == "h100" else 8) if big else 4
    reasons.append(f"{name}: compute capability {cc} has bf16, so bf16 weights and autocast "
                   "(no grad scaler: bf16 has fp32's range)")
    reasons.append(f"{name}: {gpu.memory_gb:.0f} GB, so no quantization (an 8B model is 16 GB "
                   "in bf16)")
    reasons.append(f"{name}: LoRA weights in fp32 for exact optimizer updates")
    reasons.append(f"{name}: gradient checkpointing (long sequences with 576 image tokens)")
    reasons.append(f"{name}: SDPA attention (uses flash kernels when it can)")
    reasons.append(f"{name}: paged 8-bit AdamW")
    reasons.append(f"{name}: micro-batch {micro} for {gpu.memory_gb:.0f} GB")
    return Profile(name=name, device="cuda", dtype="bfloat16", load_in_4bit=False,
                   autocast_dtype="bfloat16", grad_scaler=False, lora_dtype="float32",
                   gradient_checkpointing=True, attn_implementation="sdpa",
                   optimizer="paged_adamw_8bit", micro_batch_size=micro,
                   eval_batch_size=32 if big else 16, gpu=gpu, reasons=tuple(reasons))


def _override(profile: Profile, dtype: str | None, load_in_4bit: bool | None,
              micro_batch_size: int | None) -> Profile:
    reasons = list(profile.reasons)
    changes: dict[str, Any] = {}
    if dtype is not None and dtype != profile.dtype:
        if dtype == "bfloat16" and profile.gpu is not None and not profile.gpu.bf16:
            raise UserError(f"`--dtype bfloat16` is not supported on {profile.gpu.name} "
                            f"(compute capability {profile.gpu.capability[0]}."
                            f"{profile.gpu.capability[1]}, `--gpu {profile.name}`): it has no "
                            "bf16. Use `--dtype float16` (with a grad scaler) or leave "
                            "`--dtype` out.")
        if dtype != "float32" and profile.device == "cpu":
            raise UserError(f"`--dtype {dtype}` is not supported with `--gpu cpu`: CPU training "
                            "runs in float32. Leave `--dtype` out.")
        autocast = None if dtype == "float32" else dtype
        changes.update(dtype=dtype, autocast_dtype=autocast, grad_scaler=dtype == "float16")
        reasons.append(f"`--dtype {dtype}`: weights {dtype}, autocast {autocast or 'off'}, "
                       f"grad scaler {'on' if dtype == 'float16' else 'off'}")
    if load_in_4bit is not None and load_in_4bit != profile.load_in_4bit:
        changes["load_in_4bit"] = load_in_4bit
        reasons.append("`--4bit`: language model in 4-bit NF4" if load_in_4bit else
                       "`--no-4bit`: no quantization")
    if micro_batch_size is not None and micro_batch_size != profile.micro_batch_size:
        if micro_batch_size < 1:
            raise UserError(f"the micro-batch must be a positive integer, but got "
                            f"{micro_batch_size}.")
        changes["micro_batch_size"] = micro_batch_size
        reasons.append(f"micro-batch {micro_batch_size} as asked")
    if changes.get("load_in_4bit", profile.load_in_4bit) and not bitsandbytes_available():
        flag = "`--4bit`" if load_in_4bit else f"`--gpu {profile.name}` (4-bit NF4 by default)"
        raise UserError(f"{flag} needs bitsandbytes, which cannot be imported here. Install it "
                        "(`pip install 'bitsandbytes>=0.45'`) or pass `--no-4bit`.")
    if profile.optimizer == "paged_adamw_8bit" and not bitsandbytes_available():
        changes["optimizer"] = "adamw"
        reasons.append("bitsandbytes is missing, so torch AdamW instead of paged 8-bit AdamW")
    return replace(profile, **changes, reasons=tuple(reasons))


# ---------------------------------------------------------------- T4 priors for LLaVA-Saiga-8B

CHAT_HEADER_TOKENS = 20
"""Tokens of the chat template before the image (system/user headers), shared like the image."""
GQA_QUESTIONS_PER_IMAGE = 12216 / 398
"""GQA-ru testdev: 12,216 questions about 398 images (whole images go to dev and final)."""
GQA_TRAIN_QUESTIONS_PER_IMAGE = 40_000 / 27_519
"""GQA-ru train_balanced: about 40k questions on 27,519 images; training packed by image
(``TrainConfig.pack_by_image``) computes an image's 576 tokens once for its questions."""

T4 = {"fp16_tflops": 65.0, "bandwidth_gb_s": 320.0, "memory_gb": 15.0}
"""NVIDIA's published T4 figures (fp16 tensor-core peak, memory bandwidth) and usable memory."""

SAIGA = {"llm_params": 8.03e9, "embed_params": 128320 * 4096, "clip_params": 0.304e9,
         "projector_params": 1024 * 4096 + 4096 + 4096 * 4096 + 4096, "layers": 32,
         "hidden": 4096, "kv_dim": 1024, "vocab": 128320, "image_tokens": 576,
         "lora_params_r16": 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))}
"""Parameter counts of LLaVA-Saiga-8B (Llama-3 8B, CLIP ViT-L/14-336, 2-layer MLP projector)
and of rank-16 LoRA on q, k, v, o, gate, up, down of all 32 layers."""


def t4_estimate(*, text_tokens: int = 64, answer_tokens: int = 16, train_text_tokens: int = 80,
                eval_batch: int = 8, micro_batch: int = 2, mfu: float = 0.25,
                decode_bandwidth_efficiency: float = 0.35,
                questions_per_image: float = 1.0, packing: bool = True,
                train_questions_per_image: float = GQA_TRAIN_QUESTIONS_PER_IMAGE,
                ) -> tuple[dict[str, float], list[str]]:
    """Seconds and memory per sample for LLaVA-Saiga-8B on a T4 with the t4 profile.

    ``questions_per_image`` > 1 prices shared-prefix evaluation (``core.prefix``): the image's
    tokens, the chat header and CLIP are computed once per image, not once per question.
    ``packing`` prices training packed by image: the image's tokens and CLIP once for its
    ``train_questions_per_image`` questions (GQA-ru train's ~1.45), each question's ~80 text
    tokens its own; ``train_s_per_sample`` is then per trained question.
    Returns the figures and the derivation, one line per step, for the bench to print.
    """
    s, t = SAIGA, T4
    lines: list[str] = []
    peak = t["fp16_tflops"] * 1e12 * mfu
    clip_flops = 2 * s["clip_params"] * (s["image_tokens"] + 1)
    seq_eval = s["image_tokens"] + text_tokens
    shared = s["image_tokens"] + CHAT_HEADER_TOKENS
    prefill_tokens = shared / questions_per_image + (seq_eval - shared)
    prefill = 2 * s["llm_params"] * prefill_tokens + clip_flops / questions_per_image
    lines.append(f"eval prefill: 2 x {s['llm_params']:.2e} params x {prefill_tokens:.0f} tokens "
                 f"+ CLIP {clip_flops / questions_per_image / 1e12:.2f} TFLOP"
                 + (f" (image and header shared by {questions_per_image:.1f} questions)"
                    if questions_per_image > 1 else "")
                 + f" = {prefill / 1e12:.1f} TFLOP; at {mfu:.0%} of "
                 f"{t['fp16_tflops']:.0f} TFLOPS -> {prefill / peak:.2f} s")
    quant_params = s["llm_params"] - 2 * s["embed_params"]
    weight_bytes = quant_params * 0.5 * 1.03 + s["embed_params"] * 2  # lm_head read, embed not
    per_token = weight_bytes / (t["bandwidth_gb_s"] * 1e9 * decode_bandwidth_efficiency)
    decode = per_token * answer_tokens / eval_batch
    lines.append(f"eval decode: reads {weight_bytes / 1e9:.1f} GB of weights per token (4-bit "
                 f"layers + fp16 lm_head) at {decode_bandwidth_efficiency:.0%} of "
                 f"{t['bandwidth_gb_s']:.0f} GB/s -> {per_token * 1e3:.0f} ms/token per batch; "
                 f"{answer_tokens} tokens / batch {eval_batch} -> {decode:.2f} s/sample")
    eval_s = prefill / peak + decode
    share = train_questions_per_image if packing else 1.0
    seq_train = s["image_tokens"] + train_text_tokens
    tokens_per_question = s["image_tokens"] / share + train_text_tokens
    train_flops = 6 * s["llm_params"] * tokens_per_question + clip_flops / share
    lines.append(f"train: LoRA with a frozen base and checkpointing costs 6 x params per token "
                 f"(2 forward, 2 recompute, 2 input-gradient; no weight gradients): 6 x "
                 f"{s['llm_params']:.2e} x {tokens_per_question:.0f} tokens per question"
                 + (f" (packed by image: {s['image_tokens']} image tokens and CLIP shared by "
                    f"{share:.2f} questions)" if packing else " (unpacked)")
                 + f" + CLIP = {train_flops / 1e12:.1f} TFLOP "
                 f"-> {train_flops / peak:.2f} s/sample at {mfu:.0%} MFU "
                 f"({train_flops / (t['fp16_tflops'] * 1e12 * 0.35):.2f}-"
                 f"{train_flops / (t['fp16_tflops'] * 1e12 * 0.20):.2f} s at 35-20%)")
    weights = (quant_params * 0.5 * 1.03 + 2 * s["embed_params"] * 2
               + (s["clip_params"] + s["projector_params"]) * 2) / 1e9
    lora = s["lora_params_r16"] * (4 + 4 + 2) / 1e9  # fp32 weight + fp32 grad + 8-bit Adam
    tokens = micro_batch * seq_train
    acts = (s["layers"] * tokens * s["hidden"] * 2          # checkpointed layer inputs, fp16
            + tokens * s["hidden"] * 34 * 2                 # one layer recomputed
            + tokens * s["vocab"] * (2 + 4 + 4)) / 1e9      # logits fp16, fp32 loss, grad
    overhead = 1.0  # CUDA context, allocator fragmentation
    train_mem = weights + lora + acts + overhead
    lines.append(f"train memory: weights {weights:.1f} GB (4-bit LLM incl. fp16 embed/lm_head, "
                 f"fp16 CLIP + projector) + LoRA r16 {s['lora_params_r16'] / 1e6:.0f}M params "
                 f"{lora:.2f} GB + activations at micro-batch {micro_batch} {acts:.1f} GB + "
                 f"{overhead:.0f} GB overhead = {train_mem:.1f} GB of {t['memory_gb']:.0f}")
    kv = eval_batch * (seq_eval + 16) * s["layers"] * 2 * s["kv_dim"] * 2 / 1e9
    eval_mem = weights + kv + overhead
    lines.append(f"eval memory: weights {weights:.1f} GB + KV cache at batch {eval_batch} "
                 f"{kv:.2f} GB + overhead = {eval_mem:.1f} GB")
    figures = {"eval_s_per_sample": round(eval_s, 2),
               "train_s_per_sample": round(train_flops / peak, 2),
               "train_memory_gb": round(train_mem, 1), "eval_memory_gb": round(eval_mem, 1),
               "load_s": 240.0, "train_tokens_per_sample": round(tokens_per_question, 1),
               "eval_tokens_per_sample": seq_eval,
               "prefill_tokens_per_sample": round(prefill_tokens, 1), "mfu": mfu}
    lines.append("load: reading 16 GB of fp16 safetensors and quantizing on the fly, about "
                 "3-5 minutes on a Colab-class machine (a guess, not derived)")
    return figures, lines


def t4_priors(questions_per_image: float = 1.0, packing: bool = True) -> dict[str, float]:
    """Cost-model priors for LLaVA-Saiga-8B on a T4 with the t4 profile (see t4_estimate).

    Derived, not yet measured: ``bench/full_scale.py`` measures them on a lent GPU (the full
    architecture with random weights, the t4 profile capped to a T4's memory) and writes JSON.

    Keys: eval_s_per_sample, train_s_per_sample, train_memory_gb, eval_memory_gb, load_s,
    train_tokens_per_sample, eval_tokens_per_sample, mfu.
    """
    return t4_estimate(questions_per_image=questions_per_image, packing=packing)[0]
