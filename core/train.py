"""LoRA SFT of a loaded VLM: time-boxed, crash-safe, guarded against NaN and out-of-memory.

``train_lora`` adds a named adapter to the loaded base (other adapters stay loaded and
frozen), trains it with a plain loop, and saves it in PEFT format with ``loop_adapter.json``::

    result = train_lora(vlm, records, TrainConfig(steps=200), "adapters/c3", deadline=t_end)
    if result.ok:
        vlm.set_adapter(result.adapter_name)       # already active after training

By default the records about one image are packed into one conversation (``core.packing``;
``TrainConfig.pack_by_image``), and a step's batch counts records, a pack the records it holds:
packing changes what a step costs (the image is read once per pack), not what it learns from.
The result counts the records, questions, sequences and image and text tokens trained.

Guards, in the order they act:

- deadline: before each step, stop if the step (by its measured duration) and the save would
  end after ``deadline``; the adapter trained so far is saved (status "deadline").
- NaN/inf: a non-finite loss stops the run at once; a non-finite gradient norm does too
  without a grad scaler, and after ``max_skipped_steps`` consecutive skipped steps with one.
  The adapter is removed from the model and never saved as good (status "failed_nan").
- out of memory: the step is retried with half the micro-batch and twice the accumulation,
  so the effective batch is unchanged; at micro-batch 1 the run fails ("failed_oom").
- checkpoints: every ``checkpoint_every`` steps or ``checkpoint_every_s`` seconds the adapter,
  optimizer and counters go to ``out_dir/checkpoint``; ``resume=True`` continues from there.
"""

from __future__ import annotations

import logging
import math
import pickle
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.exceptions import UserError
from core.lora import (
    LANGUAGE_MODEL_TARGETS,
    PROJECTOR,
    adapter_state,
    all_finite,
    attach_lora,
    check_adapter_name,
    load_adapter_state,
    lora_config,
    read_metadata,
    remove_adapter,
    save_adapter,
    trainable_parameters,
)
from core.loss import labelled_loss
from core.oom import free_memory, is_oom
from core.processor import LLaVADataProcessor, n_batches
from core.sft import data_fingerprint, validate_records

log = logging.getLogger(__name__)

STATUSES = ("finished", "deadline", "stopped", "failed_nan", "failed_oom", "failed_data")
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters of one LoRA SFT run; saved with the adapter."""

    steps: int | None = None
    """Optimizer steps to run; None trains for ``epochs``."""
    epochs: float | None = None
    """Passes over the data when ``steps`` is None (1 when both are None)."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after warm-up, then cosine decay to zero."""
    rank: int = 16
    """LoRA rank r."""
    alpha: int | None = None
    """LoRA alpha; None means 2 x rank."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str = LANGUAGE_MODEL_TARGETS
    """Regex over full module names; must match language-model modules only."""
    train_projector: bool = False
    """Also train the multi-modal projector (saved with the adapter as modules_to_save)."""
    batch_size: int = 16
    """Records per optimizer step (the effective batch); a sequence packed by image counts the
    records it holds, so packing changes the cost of a step, not what it learns from."""
    micro_batch_size: int | None = None
    """Samples per forward pass; None takes the GPU profile's. Halved on out-of-memory."""
    max_length: int = 1024
    """Longest sequence in tokens, image tokens included; capped by the model's positions."""
    warmup_ratio: float = 0.05
    """Share of the steps with a linear learning-rate warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in backward; None takes the GPU profile's choice."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (0: never by count)."""
    checkpoint_every_s: float = 600.0
    """... or when this many seconds passed since the last one (0: never by time)."""
    max_skipped_steps: int = 10
    """With a grad scaler: consecutive steps with non-finite gradients before giving up."""
    seed: int = 0
    """Seed for data order, LoRA initialisation and dropout."""
    pack_by_image: bool = True
    """Merge the records about one image into multi-turn conversations (``core.packing``), so
    the image's tokens are read once per pack rather than once per question. On by default;
    ``--no-packing`` (``loop run``, ``loop train``, ``loop worker``) turns it off."""
    init_from: str | None = None
    """A LoRA adapter folder (PEFT format) to continue training: the new adapter starts from
    its weights and takes its rank, alpha, target modules and projector setting. None starts a
    fresh adapter on the base model."""

    def __post_init__(self):
        problems = []
        if self.steps is not None and self.epochs is not None:
            problems.append(f"give `steps` or `epochs`, not both (got steps={self.steps}, "
                            f"epochs={self.epochs})")
        if self.steps is None and self.epochs is None:
            self.epochs = 1.0
        for name in ("steps", "rank", "batch_size", "micro_batch_size", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"`{name}` must be a positive integer, but got {value!r}")
        for name in ("epochs", "lr", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0
                                          and math.isfinite(value)):
                problems.append(f"`{name}` must be a positive number, but got {value!r}")
        if self.alpha is not None and (not isinstance(self.alpha, int) or self.alpha < 1):
            problems.append(f"`alpha` must be a positive integer or None, but got {self.alpha!r}")
        for name, hi in (("dropout", 1.0), ("warmup_ratio", 1.0)):
            value = getattr(self, name)
            if not 0 <= value < hi:
                problems.append(f"`{name}` must be in [0, {hi}), but got {value!r}")
        for name in ("weight_decay", "checkpoint_every", "checkpoint_every_s",
                     "max_skipped_steps"):
            if getattr(self, name) < 0:
                problems.append(f"`{name}` must be >= 0, but got {getattr(self, name)!r}")
        if (self.micro_batch_size is not None and isinstance(self.batch_size, int)
                and isinstance(self.micro_batch_size, int)
                and self.micro_batch_size > self.batch_size):
            problems.append(f"`micro_batch_size` ({self.micro_batch_size}) must not exceed "
                            f"`batch_size` ({self.batch_size})")
        if "vision" in self.target_modules:
            problems.append(f"`target_modules` must not name the vision tower, but got "
                            f"{self.target_modules!r}")
        if problems:
            raise UserError(f"TrainConfig has {len(problems)} problem(s):\n  - "
                            + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    """What a run did; ``to_dict()`` goes into ``loop_adapter.json`` and the experiment record."""

    status: str
    """finished | deadline | stopped (by ``TrainHooks.evaluate``; nothing saved) | failed_nan |
    failed_oom | failed_data."""
    adapter_name: str
    adapter_path: str | None = None
    """The saved adapter folder; None unless status is finished or deadline."""
    steps: int = 0
    """Optimizer steps done (including those before a resume)."""
    samples: int = 0
    """Records trained, each time one was seen (a packed sequence counts the records it holds)."""
    questions: int = 0
    """Question-answer turns trained (each one has a labelled answer), each time one was seen."""
    sequences: int = 0
    """Sequences the model read: packs by image, or one per record without packing."""
    tokens: int = 0
    """Input tokens processed (image tokens included, padding not)."""
    image_tokens: int = 0
    """Of ``tokens``, the image's (one image per sequence that has one)."""
    text_tokens: int = 0
    """Of ``tokens``, the text's: template, questions and answers."""
    target_tokens: int = 0
    """Tokens the loss was computed on (assistant answers)."""
    loss_curve: list[float] = field(default_factory=list)
    """Mean loss per optimizer step."""
    tokens_per_s: float = 0.0
    samples_per_s: float = 0.0
    step_seconds: float = 0.0
    """Mean seconds per optimizer step."""
    peak_memory_gb: float = 0.0
    memory_kind: str = ""
    """cuda_max_allocated, or cpu_max_rss (peak of the whole process)."""
    seconds: float = 0.0
    """Wall time of the whole call (encoding and saving included)."""
    micro_batch_size: int = 0
    """The micro-batch at the end (smaller than asked after out-of-memory backoff)."""
    oom_retries: int = 0
    n_examples: int = 0
    """Sequences that were encoded (packs when packing); the rest are in ``skipped``."""
    n_records: int = 0
    """Records in the encoded sequences (one epoch's worth of ``samples``)."""
    n_questions: int = 0
    """Question-answer turns in the encoded sequences."""
    packed: bool = False
    """Whether the records were packed by image."""
    skipped: dict[str, int] = field(default_factory=dict)
    resumed_from_step: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("finished", "deadline") and self.adapter_path is not None

    @property
    def final_loss(self) -> float | None:
        tail = self.loss_curve[-10:]
        return sum(tail) / len(tail) if tail else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepEvent:
    """Passed to ``TrainHooks.before_micro_step``."""

    step: int
    micro_batch_size: int
    model: Any


@dataclass
class TrainHooks:
    """Callbacks into the loop; tests use ``before_micro_step`` to inject faults."""

    before_micro_step: Callable[[StepEvent], None] | None = None
    """Called before each forward pass; may raise (e.g. ``torch.OutOfMemoryError``)."""
    after_step: Callable[[int, float], None] | None = None
    """Called with (step, loss) after each optimizer step."""
    evaluate_at: tuple[float, ...] = ()
    """Shares of the planned steps (between 0 and 1) after which ``evaluate`` is called."""
    evaluate: Callable[[int, int], bool] | None = None
    """Called with (step, planned steps) at ``evaluate_at``, with the adapter trained so far
    active, in eval mode, without gradient checkpointing, under the training's autocast.
    Training then goes on as it was (train mode, checkpointing, random state; the optimizer is
    not touched). Returning True stops training: status "stopped", nothing saved."""


class _NonFinite(Exception):
    pass


@dataclass
class _State:
    step: int = 0
    samples: int = 0
    questions: int = 0
    sequences: int = 0
    tokens: int = 0
    image_tokens: int = 0
    target_tokens: int = 0
    loss_curve: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    micro_batch_size: int = 1
    oom_retries: int = 0
    skipped_in_a_row: int = 0


def train_lora(vlm, records: list[dict], config: TrainConfig, out_dir: str | Path, *,
               deadline: float | None = None, profile=None, adapter_name: str | None = None,
               resume: bool = False, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a new LoRA adapter on SFT records and save it in ``out_dir``.

    Args:
        vlm: a loaded ``core.model.VLM``; it keeps the new adapter, active, in ``vlm.adapters``.
        records: SFT records (``core.sft``); images as paths or PIL images.
        config: hyper-parameters.
        out_dir: adapter folder (PEFT files, ``loop_adapter.json``, ``checkpoint/``).
        deadline: absolute ``time.time()`` by which training has stopped and the adapter is
            saved; None for no limit.
        profile: a ``core.device.Profile``; by default the one for the model's device.
        adapter_name: name in ``vlm.adapters``; defaults to the folder name.
        resume: continue from ``out_dir/checkpoint`` if there is one (same config and data),
            or return the finished adapter if ``out_dir`` holds one.
        hooks: callbacks (fault injection in tests, progress in the loop).
    """
    import torch

    t0 = time.time()
    out_dir = Path(out_dir)
    name = adapter_name or _default_name(out_dir)
    check_adapter_name(name)
    hooks = hooks or TrainHooks()
    profile = profile or _default_profile(vlm)
    validate_records(records)
    fingerprint = data_fingerprint(records)
    if resume:
        done = _finished(vlm, out_dir, name, config, fingerprint)
        if done is not None:
            return done

    max_length = min(config.max_length, _positions(vlm))
    sequences = _packed(vlm, records, max_length) if config.pack_by_image else records
    data = LLaVADataProcessor(vlm.processor, max_length=max_length)
    encoded = data.encode_all(sequences, progress=True)
    skipped = data.stats.to_dict()
    result = TrainResult(status="failed_data", adapter_name=name, n_examples=len(encoded),
                         n_records=sum(e.records for e in encoded),
                         n_questions=sum(e.turns for e in encoded), packed=config.pack_by_image,
                         skipped=skipped)
    if not encoded:
        result.error = f"no usable training example among {len(records)} (skipped: {skipped})"
        result.seconds = time.time() - t0
        return result

    lora = _lora_config(vlm, config)
    torch.manual_seed(config.seed)
    model = attach_lora(vlm, name, lora, dtype=profile.lora_dtype)
    if config.init_from:
        try:
            _init_from_parent(model, name, config)
        except BaseException:
            remove_adapter(vlm, name)
            raise
    params = trainable_parameters(model)
    plan = _Plan(encoded, config)
    opt = _optimizer(params, config, profile)
    warmup = math.ceil(config.warmup_ratio * plan.total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup,
                                                                      plan.total_steps))
    device = vlm.device
    if device.type == "cpu":
        # Small LoRA updates and Adam states drift into subnormal floats, which x86 CPUs
        # process 10-100x slower; flush them to zero (CUDA kernels already do).
        torch.set_flush_denormal(True)
    scaler = torch.amp.GradScaler(device.type, enabled=profile.grad_scaler)
    state = _State(micro_batch_size=min(config.micro_batch_size or profile.micro_batch_size,
                                        config.batch_size))
    ckpt_dir = out_dir / CHECKPOINT_DIR
    ctx = _Ctx(vlm, model, name, params, opt, sched, scaler, config, profile, hooks, data, device)
    try:
        if resume and (ckpt_dir / STATE_FILE).exists():
            _restore(ckpt_dir, model, name, opt, sched, scaler, state, config, fingerprint)
            result.resumed_from_step = state.step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        log.info("training adapter '%s': %d examples, %d steps of %d samples (micro-batch %d), "
                 "%d trainable parameters, profile %s", name, len(encoded), plan.total_steps,
                 config.batch_size, state.micro_batch_size, sum(p.numel() for p in params),
                 profile.name)
        status, error = _steps(ctx, plan, state, ckpt_dir, fingerprint, deadline)
    except BaseException:  # interrupted or a bug: leave the model as it was, then re-raise
        remove_adapter(vlm, name)
        raise

    _fill(result, state, device, status, error)
    if status in ("finished", "deadline") and state.step > 0:
        _restore_saved_dtypes(vlm, model, name)
        if all_finite(adapter_state(model, name)):
            result.adapter_path = str(out_dir)
            result.seconds = time.time() - t0
            save_adapter(model, name, out_dir, _metadata(vlm, records, encoded, fingerprint,
                                                         config, profile, result))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            vlm.adapters[name] = str(out_dir)
            vlm.set_adapter(name)
            for p in params:
                p.requires_grad_(False)
        else:
            result.status, result.error = "failed_nan", "adapter weights are not finite"
    if result.adapter_path is None:
        remove_adapter(vlm, name)
        if status == "stopped":  # never resumed
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        if result.status.startswith("failed"):
            log.warning("training adapter '%s' failed (%s): %s", name, result.status,
                        result.error)
    result.seconds = time.time() - t0
    return result


# ---------------------------------------------------------------- one optimizer step

@dataclass
class _Ctx:
    vlm: Any
    model: Any
    name: str
    params: list
    opt: Any
    sched: Any
    scaler: Any
    config: TrainConfig
    profile: Any
    hooks: TrainHooks
    data: LLaVADataProcessor
    device: Any


class _OutOfMemory(Exception):
    pass


def _steps(ctx: _Ctx, plan: _Plan, state: _State, ckpt_dir: Path, fingerprint: str,
           deadline: float | None) -> tuple[str, str | None]:
    """Optimizer steps until done, the deadline, or a failure; returns (status, error)."""
    from tqdm.auto import tqdm

    config, name = ctx.config, ctx.name
    checkpointing = (ctx.profile.gradient_checkpointing if config.gradient_checkpointing is None
                     else config.gradient_checkpointing)
    status, error = "finished", None
    last_ckpt, save_s, step_s = time.time(), 1.0, None
    bar = tqdm(total=plan.total_steps, initial=state.step, desc=f"train {name}", unit="step",
               dynamic_ncols=True)
    marks = _evaluation_steps(ctx.hooks, plan.total_steps)
    with _training_mode(ctx.model, checkpointing):
        while state.step < plan.total_steps:
            if deadline is not None and time.time() + (step_s or 0.0) * 1.2 + save_s > deadline:
                status = "deadline"
                log.info("stopping adapter '%s' at step %d/%d: the deadline is near", name,
                         state.step, plan.total_steps)
                break
            t_step = time.time()
            try:
                loss = _run_step(ctx, plan.batch(state.step), state)
            except _NonFinite as exc:
                status, error = "failed_nan", str(exc)
                break
            except _OutOfMemory as exc:
                status, error = "failed_oom", str(exc)
                break
            step_s = time.time() - t_step
            state.train_seconds += step_s
            state.step += 1
            state.loss_curve.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", mb=state.micro_batch_size,
                            tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
            if ctx.hooks.after_step:
                ctx.hooks.after_step(state.step, loss)
            if state.step in marks and _evaluate(ctx, state.step, plan.total_steps,
                                                 checkpointing):
                status = "stopped"
                log.info("stopping adapter '%s' at step %d/%d: its evaluation said so", name,
                         state.step, plan.total_steps)
                break
            due = (config.checkpoint_every and state.step % config.checkpoint_every == 0) or (
                config.checkpoint_every_s and time.time() - last_ckpt > config.checkpoint_every_s)
            if due and state.step < plan.total_steps:
                t_save = time.time()
                if not _checkpoint(ctx, ckpt_dir, state, fingerprint):
                    status, error = "failed_nan", f"adapter weights not finite at step {state.step}"
                    break
                last_ckpt, save_s = time.time(), max(1.0, 2 * (time.time() - t_save))
    bar.close()
    return status, error


def _evaluation_steps(hooks: TrainHooks, total: int) -> set[int]:
    """The steps after which ``hooks.evaluate`` runs (never after the last: the caller
    evaluates the saved adapter)."""
    if hooks.evaluate is None:
        return set()
    return {k for f in hooks.evaluate_at if 0 < (k := max(1, round(f * total))) < total}


def _evaluate(ctx: _Ctx, step: int, total: int, checkpointing: bool) -> bool:
    """``hooks.evaluate`` between two steps; True to stop training."""
    import torch

    rng = (random.getstate(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if ctx.device.type == "cuda" else None)
    autocast = ctx.profile.autocast_dtype
    _leave_training(ctx.model, checkpointing)
    try:
        with torch.autocast(ctx.device.type, dtype=getattr(torch, autocast or "float32"),
                            enabled=autocast is not None):
            return bool(ctx.hooks.evaluate(step, total))
    finally:
        _enter_training(ctx.model, checkpointing)
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        if rng[2] is not None:
            torch.cuda.set_rng_state_all(rng[2])


def _run_step(ctx: _Ctx, batch: list, state: _State) -> float:
    """One optimizer step over ``batch``, retried with a smaller micro-batch on OOM."""
    while True:
        try:
            return _accumulate(ctx, batch, state)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not is_oom(exc):
                raise
            message = str(exc).splitlines()[0][:200]
        ctx.opt.zero_grad(set_to_none=True)
        free_memory(ctx.device)
        if state.micro_batch_size == 1:
            raise _OutOfMemory(f"out of memory at micro-batch 1 ({message}); shorten "
                               "`max_length` or use a smaller profile")
        state.micro_batch_size //= 2
        state.oom_retries += 1
        log.warning("out of memory (%s): retrying step %d with micro-batch %d and %d-fold "
                    "accumulation", message, state.step + 1, state.micro_batch_size,
                    math.ceil(len(batch) / state.micro_batch_size))


def _accumulate(ctx: _Ctx, batch: list, state: _State) -> float:
    import torch

    micro = state.micro_batch_size
    batch = sorted(batch, key=len)
    n_targets = sum(e.n_targets for e in batch)
    autocast = ctx.profile.autocast_dtype
    ctx.opt.zero_grad(set_to_none=True)
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(batch), micro):
        chunk = batch[i:i + micro]
        chunk_targets = sum(e.n_targets for e in chunk)
        if ctx.hooks.before_micro_step:
            ctx.hooks.before_micro_step(StepEvent(state.step, micro, ctx.model))
        inputs = {k: v.to(ctx.device) for k, v in ctx.data.collate(chunk).items()}
        with torch.autocast(ctx.device.type, dtype=getattr(torch, autocast or "float32"),
                            enabled=autocast is not None):
            loss = labelled_loss(ctx.model, inputs)
        loss = loss * (chunk_targets / n_targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _NonFinite(f"loss is {value} at step {state.step + 1}: the run diverged. "
                             "Try a lower `lr`, or fp32 LoRA weights if they are not.")
        ctx.scaler.scale(loss).backward()
        loss_sum += value
        tokens += int(inputs["attention_mask"].sum())
        del loss, inputs
    ctx.scaler.unscale_(ctx.opt)
    norm = float(torch.nn.utils.clip_grad_norm_(ctx.params, ctx.config.max_grad_norm))
    if not math.isfinite(norm):
        state.skipped_in_a_row += 1
        if not ctx.scaler.is_enabled() or state.skipped_in_a_row > ctx.config.max_skipped_steps:
            raise _NonFinite(f"gradient norm is {norm} at step {state.step + 1}"
                             + (f" ({state.skipped_in_a_row} steps in a row)"
                                if ctx.scaler.is_enabled() else "")
                             + ": the run diverged. Try a lower `lr`.")
    else:
        state.skipped_in_a_row = 0
    ctx.scaler.step(ctx.opt)  # skips the update when the scaler found inf gradients
    ctx.scaler.update()
    ctx.sched.step()
    state.samples += sum(e.records for e in batch)
    state.questions += sum(e.turns for e in batch)
    state.sequences += len(batch)
    state.tokens += tokens
    state.image_tokens += sum(e.image_tokens for e in batch)
    state.target_tokens += n_targets
    return loss_sum


def _packed(vlm, records: list[dict], max_length: int) -> list[dict]:
    from core.packing import image_tokens_per_question, pack_by_image

    tok = vlm.tokenizer
    packed = pack_by_image(  # ~8 template tokens per turn: headers and <|eot_id|>
        records, max_tokens=max_length - vlm.n_image_tokens - 16,
        count_tokens=lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) + 8)
    log.info("packed %d records into %d by image: %.0f -> %.0f image tokens per question",
             len(records), len(packed), image_tokens_per_question(records, vlm.n_image_tokens),
             image_tokens_per_question(packed, vlm.n_image_tokens))
    return packed


# ---------------------------------------------------------------- set-up helpers

class _Plan:
    """Which samples each optimizer step sees: a pure function of the seed and the step."""

    def __init__(self, encoded: list, config: TrainConfig):
        self.encoded = encoded
        self.config = config
        self.steps_per_epoch = n_batches(encoded, config.batch_size)
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self._epoch, self._order = -1, []

    def batch(self, step: int) -> list:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = random.Random(self.config.seed * 1_000_003 + epoch)
            self._order = LLaVADataProcessor.batches(self.encoded, self.config.batch_size, rng)
            self._epoch = epoch
        return [self.encoded[i] for i in self._order[pos]]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(params: list, config: TrainConfig, profile):
    import torch

    if profile.optimizer == "paged_adamw_8bit" and profile.device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lora_config(vlm, config: TrainConfig):
    if config.init_from:
        return _parent_lora_config(config)
    return lora_config(rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                       target_modules=config.target_modules,
                       train_projector=config.train_projector, base_model=vlm.source,
                       revision=_revision(vlm))


def _parent_lora_config(config: TrainConfig):
    """The LoRA config of the adapter ``config.init_from`` (with this run's dropout)."""
    from peft import LoraConfig

    path = Path(config.init_from)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"`init_from` must be a LoRA adapter folder with adapter_config.json, "
                        f"but got '{path}'. Point it at a trained adapter, or set it to None to "
                        "start from the base model.")
    parent = LoraConfig.from_pretrained(str(path))
    parent.lora_dropout, parent.inference_mode = config.dropout, False
    if parent.r != config.rank:
        log.info("continuing adapter %s: its rank %d replaces the configured rank %d",
                 path, parent.r, config.rank)
    return parent


def _init_from_parent(model, name: str, config: TrainConfig) -> None:
    """Copy the weights of the adapter ``config.init_from`` into the new adapter ``name``."""
    from peft.utils import load_peft_weights

    load_adapter_state(model, name, load_peft_weights(config.init_from, device="cpu"))
    log.info("adapter '%s' starts from the weights of %s", name, config.init_from)


@contextmanager
def _training_mode(model, checkpointing: bool):
    """train() plus gradient checkpointing with input grads; undone on exit."""
    _enter_training(model, checkpointing)
    try:
        yield
    finally:
        _leave_training(model, checkpointing)


def _enter_training(model, checkpointing: bool) -> None:
    base = model.get_base_model()
    if checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not getattr(base, "_require_grads_hooks", None):
            # Frozen embeddings give inputs without grad; checkpointed layers then pass no
            # gradient to the LoRA weights inside them.
            base.enable_input_require_grads()
    model.train()


def _leave_training(model, checkpointing: bool) -> None:
    base = model.get_base_model()
    model.eval()
    if checkpointing:
        disable = getattr(base, "activation_checkpointing_disable", None)
        (disable or base.gradient_checkpointing_disable)()
        base.disable_input_require_grads()


def _restore_saved_dtypes(vlm, model, name: str) -> None:
    """Projector copies trained in fp32 go back to the base dtype so inference runs unchanged."""
    base_dtype = next(p.dtype for n, p in model.named_parameters()
                      if "vision_tower" in n and p.is_floating_point())
    for pname, p in model.named_parameters():
        if f"modules_to_save.{name}." in pname and PROJECTOR in pname:
            p.data = p.data.to(base_dtype)


def _default_profile(vlm):
    from core.device import resolve_profile

    return resolve_profile("cpu" if vlm.device.type == "cpu" else "auto")


def _default_name(out_dir: Path) -> str:
    import re

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", out_dir.resolve().name).strip("-_")[:56]
    return name if name and name not in "lora_" else f"adapter-{name}".strip("-")


def _positions(vlm) -> int:
    config = vlm.model.config
    text = getattr(config, "text_config", config)
    return int(getattr(text, "max_position_embeddings", 1 << 30))


def _revision(vlm) -> str | None:
    return getattr(vlm.model.config, "_commit_hash", None)


def _fill(result: TrainResult, state: _State, device, status: str, error: str | None) -> None:
    result.status, result.error = status, error
    result.steps, result.samples = state.step, state.samples
    result.questions, result.sequences = state.questions, state.sequences
    result.tokens, result.target_tokens = state.tokens, state.target_tokens
    result.image_tokens, result.text_tokens = state.image_tokens, state.tokens - state.image_tokens
    result.loss_curve = [round(x, 5) for x in state.loss_curve]
    t = max(state.train_seconds, 1e-9)
    result.tokens_per_s = round(state.tokens / t, 1)
    result.samples_per_s = round(state.samples / t, 3)
    result.step_seconds = round(state.train_seconds / state.step, 4) if state.step else 0.0
    result.micro_batch_size, result.oom_retries = state.micro_batch_size, state.oom_retries
    result.peak_memory_gb, result.memory_kind = _peak_memory(device)


def _peak_memory(device) -> tuple[float, str]:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3), "cuda_max_allocated"
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3), "cpu_max_rss"


def _metadata(vlm, records, encoded, fingerprint, config, profile, result) -> dict:
    import peft
    import torch
    import transformers

    return {"format": 1, "adapter_name": result.adapter_name,
            "base_model": {"id": vlm.source, "revision": _revision(vlm)},
            "data": {"fingerprint": fingerprint, "n_records": len(records),
                     "n_examples": len(encoded), "packed_by_image": config.pack_by_image,
                     "n_questions": result.n_questions,
                     "sources": dict(Counter(r["source"] for r in records)),
                     "skipped": result.skipped},
            "config": config.to_dict(), "parent": config.init_from,
            "profile": profile.to_dict(),
            "metrics": result.to_dict(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__}}


# ---------------------------------------------------------------- checkpoints and resume

def _checkpoint(ctx: _Ctx, ckpt_dir: Path, state: _State, fingerprint: str) -> bool:
    """Save a resumable checkpoint; False (nothing saved) when the weights are not finite."""
    import torch

    if not all_finite(adapter_state(ctx.model, ctx.name)):
        return False
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(ctx.model, ctx.name, tmp, None)
    torch.save({"state": asdict(state), "optimizer": ctx.opt.state_dict(),
                "scheduler": ctx.sched.state_dict(), "scaler": ctx.scaler.state_dict(),
                "config": ctx.config.to_dict(), "fingerprint": fingerprint,
                "rng": torch.get_rng_state()}, tmp / STATE_FILE)
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        ckpt_dir.rename(old)
    tmp.rename(ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint of adapter '%s' at step %d in %s", ctx.name, state.step, ckpt_dir)
    return True


def _restore(ckpt_dir: Path, model, name: str, opt, sched, scaler, state: _State,
             config: TrainConfig, fingerprint: str) -> None:
    import torch
    from safetensors.torch import load_file

    try:
        # Tensors, numbers, strings and containers only: a pickle that runs code (anyone who
        # can write to a shared --workdir could plant one) is refused, not executed.
        saved = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"cannot resume from {ckpt_dir / STATE_FILE}: it is not a checkpoint "
                        f"this tool wrote ({str(exc).splitlines()[0]}). Delete the "
                        "checkpoint folder to train from the start.") from None
    _check_same_run(saved["config"], saved["fingerprint"], config, fingerprint, ckpt_dir)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    weights = load_file(str(ckpt_dir / "adapter_model.safetensors"), device=str(device))
    load_adapter_state(model, name, weights)
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    micro = state.micro_batch_size
    for key, value in saved["state"].items():
        setattr(state, key, value)
    state.micro_batch_size = min(micro, state.micro_batch_size)
    log.info("resuming adapter '%s' from step %d (%s)", name, state.step, ckpt_dir)


def _check_same_run(saved_config: dict, saved_fp: str, config: TrainConfig, fingerprint: str,
                    where: Path) -> None:
    ignore = {"checkpoint_every", "checkpoint_every_s", "micro_batch_size"}
    mine = {k: v for k, v in config.to_dict().items() if k not in ignore}
    theirs = {k: v for k, v in saved_config.items() if k not in ignore}
    if mine != theirs or saved_fp != fingerprint:
        diff = sorted(k for k in mine if mine.get(k) != theirs.get(k))
        what = f"config differs in {diff}" if diff else "the training data differ"
        raise UserError(f"cannot resume from {where}: {what}. Resume with the same config and "
                        "data, or train into a new folder.")


def _finished(vlm, out_dir: Path, name: str, config: TrainConfig,
              fingerprint: str) -> TrainResult | None:
    """The result of a finished run in ``out_dir`` (adapter loaded into ``vlm``), if any."""
    meta = read_metadata(out_dir)
    if meta is None:
        return None
    _check_same_run(meta["config"], meta["data"]["fingerprint"], config, fingerprint, out_dir)
    vlm.load_adapter(out_dir, name)
    known = {f.name for f in fields(TrainResult)}
    result = TrainResult(**{k: v for k, v in meta["metrics"].items() if k in known})
    result.adapter_name, result.adapter_path = name, str(out_dir)
    log.info("adapter '%s' already trained in %s; loaded it", name, out_dir)
    return result
