"""Data-parallel evaluation over the processes that ``torchrun`` or ``accelerate launch`` start.

Both launchers tell each process who it is through ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
(and where to meet through ``MASTER_ADDR``/``MASTER_PORT``). Each process answers a shard of
the questions: whole image groups (``core.evaluate.image_group``: a GQA-ru image's questions, a
MMBench-ru question's rotations), balanced by question count, the same split on every process.
The shards are gathered into one ``EvalResult``: the samples in the input order, the metrics
computed over all of them, so the result is the one a single process gives (only timings
differ). Without the launchers' variables (or with ``WORLD_SIZE=1``) :func:`evaluate` is
``core.evaluate.evaluate``.

Collectives: gloo on CPU, nccl with CUDA (each process on ``cuda:LOCAL_RANK``); the control
messages of :func:`broadcast` always travel through a gloo group, so a process that waits for
work does not hold a GPU kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta

from core.evaluate import EvalConfig, EvalResult, image_group, summarize
from core.evaluate import evaluate as evaluate_one
from core.exceptions import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 6 * 3600
"""How long a collective waits for the slowest process (a whole evaluation may run hours)."""

_control = None  # the gloo group of broadcast(), once set up


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the database, reports and adapters."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun and accelerate set them."""
    raw = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        size = int(raw["WORLD_SIZE"] or 1)
        rank = int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] or rank)
    except ValueError:
        raise UserError(f"RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers, but got {raw}; "
                        "start the processes with `torchrun --nproc-per-node N -m loop ...`") from None
    if size > 1 and raw["RANK"] is None:
        raise UserError(f"WORLD_SIZE is {size} but RANK is not set: start the processes with "
                        "`torchrun --nproc-per-node N -m loop ...` (or `accelerate launch`)")
    if not 0 <= rank < max(size, 1):
        raise UserError(f"RANK must be in [0, WORLD_SIZE), but got RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, world_size=max(size, 1), local_rank=local)


def setup(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group once (nothing to do in a single process) and pick the device."""
    global _control
    w = world()
    if not w.parallel:
        return w
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(w.local_rank)
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) \
            if backend != "gloo" else dist.group.WORLD
        log.info("data-parallel: process %d of %d (%s%s)", w.rank, w.world_size, backend,
                 f", cuda:{w.local_rank}" if cuda else "")
    return w


def teardown() -> None:
    """Leave the process group (if this process joined one)."""
    global _control
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def active() -> bool:
    """Whether evaluations are spread over processes: launched by N > 1 and set up."""
    if not world().parallel:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def device_for(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` when spread over processes; others unchanged."""
    if device == "cuda" and world().parallel:
        return f"cuda:{world().local_rank}"
    return device


def broadcast(obj=None):
    """Rank 0's ``obj``, on every process (through the gloo group: waiting costs no GPU)."""
    import torch.distributed as dist

    box = [obj]
    with _peers():
        dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


@contextlib.contextmanager
def _peers():
    """A collective that fails because another process stopped: one line, not a traceback
    (the launcher stops every process when one fails; the first error is the one to read)."""
    try:
        yield
    except RuntimeError as exc:  # gloo and nccl report a lost peer as RuntimeError
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"process {world().rank} of {world().world_size} lost contact with the "
                        f"others ({first}): another process stopped; its error is above") from None


def shard(examples: list[dict], world_size: int) -> list[list[int]]:
    """Indices of ``examples`` per process: whole image groups, balanced by question count.

    Largest groups first, each to the process with the fewest questions so far (the lower rank
    on a tie); every process computes the same split. Indices stay in input order.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[image_group(ex)].append(i)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        r = min(range(world_size), key=lambda k: (loads[k], k))
        shards[r].extend(members)
        loads[r] += len(members)
    return [sorted(s) for s in shards]


def evaluate(vlm, examples: list[dict], config: EvalConfig | None = None, **kwargs) -> EvalResult:
    """``core.evaluate.evaluate`` over this process's shard, gathered into the whole result.

    Every process must call it with the same examples (checked). In a single process it is
    ``core.evaluate.evaluate``. Keyword arguments go to it; the progress bar shows on rank 0.
    """
    if not active():
        return evaluate_one(vlm, examples, config, **kwargs)
    w = world()
    config = config or EvalConfig()
    if not examples:
        raise ValueError("nothing to evaluate: the example list is empty")
    mine = shard(examples, w.world_size)[w.rank]
    kwargs["progress"] = kwargs.get("progress", True) and w.is_main
    t0 = time.perf_counter()
    positions0 = vlm.prefill_positions
    error = None
    try:
        part = evaluate_one(vlm, [examples[i] for i in mine], config, **kwargs) if mine else None
        payload = {"ok": True, "idx": mine, "samples": part.samples if part else [],
                   "prefill": vlm.prefill_positions - positions0}
    except Exception as exc:  # noqa: BLE001 - reported to every process, raised below
        error = exc
        payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    payload["questions"] = _fingerprint(examples)
    try:
        parts = _gather(payload)
    except RuntimeError:
        if error is not None:  # this process's own failure, as it was raised
            raise error from None
        raise
    return _merge(examples, config, parts, time.perf_counter() - t0)


def join_failed(message: str) -> None:
    """Take part in an evaluation this process could not prepare: rank 0 raises ``message``."""
    try:
        _gather({"ok": False, "error": message, "questions": None})
    except RuntimeError:
        pass  # the failure is rank 0's to report


def _gather(payload: dict) -> list[dict]:
    """Every process's payload; raises when any failed or they were given different questions."""
    import torch.distributed as dist

    parts: list[dict | None] = [None] * world().world_size
    with _peers():
        dist.all_gather_object(parts, payload)
    failed = [(r, p["error"]) for r, p in enumerate(parts) if not p["ok"]]
    if failed:
        raise RuntimeError("data-parallel evaluation failed on "
                           + "; ".join(f"process {r}: {msg}" for r, msg in failed))
    if len({p["questions"] for p in parts}) > 1:
        raise UserError("the processes of a data-parallel evaluation were given different "
                        "questions: give every process the same data, --split, --limit and "
                        "--seed (and the same data folder on every machine)")
    return parts


def _merge(examples: list[dict], config: EvalConfig, parts: list[dict],
           seconds: float) -> EvalResult:
    samples: list[dict | None] = [None] * len(examples)
    for p in parts:
        for i, s in zip(p["idx"], p["samples"]):
            samples[i] = s
    done = [s for s in samples if s is not None]
    benchmark = examples[0]["benchmark"]
    metrics = summarize(benchmark, done)
    metrics["samples_per_s"] = round(len(done) / seconds, 3) if seconds > 0 else None
    metrics["prefill_tokens_per_sample"] = round(sum(p["prefill"] for p in parts) / len(done), 1)
    return EvalResult(benchmark=benchmark, protocol=config.protocol(benchmark),
                      config=config.to_dict(), metrics=metrics, samples=done, seconds=seconds)


def _fingerprint(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex['benchmark']}:{ex['id']}\n".encode())
    return h.hexdigest()[:16]
