"""The wall-clock budget and the cost model that decides what still fits in it.

The budget counts from the start of the run, everything included (loading, evaluation,
training, the final evaluation and the report). A reserve for the final evaluation and the
report is set aside from the start. Before any step, its cost is estimated from priors per
preset and GPU profile, then from what this run has measured; a step that does not fit is not
started, and training gets a deadline.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field

from core.exceptions import UserError
from strategies.base import CostRates

log = logging.getLogger(__name__)

DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*$")


def parse_duration(text: str) -> float:
    """'6h', '90m', '1h30m', '45s' or a number of seconds -> seconds."""
    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        m = DURATION_RE.match(text)
        if not text or not m or not any(m.groups()):
            raise UserError(f"`--budget` must be a positive duration such as 6h, 90m or 1h30m, "
                            f"but got '{text}'")
        h, mnt, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mnt * 60 + s
    if seconds <= 0:
        raise UserError(f"`--budget` must be a positive duration such as 6h or 90m, but got '{text}'")
    return seconds


DEFAULT_RESERVE = 0.2
"""Share of the budget kept from the start for the final evaluation and the report."""


def priors(preset: str, profile: str, prefix_cache: bool = True,
           packing: bool = True) -> CostRates:
    """Seconds per unit of work before anything is measured.

    demo/cpu: measured on 2 CPU cores with the tiny model (bench/eval_speed.py,
    bench/train_speed.py). saiga/t4: the estimate of ``core.device.t4_priors`` from parameter
    counts and the T4's fp16 rate; a100/h100 scale it by their throughput relative to a T4.
    With ``prefix_cache``, GQA-ru questions share their image's prefix (about 31 per image);
    MMBench-ru is priced without sharing (its rotations share less). With ``packing`` (the
    default), training is priced per question packed by image (GQA-ru train's ~1.45 questions
    per image share the image's tokens). Measured rates take over from the first evaluation
    and training either way.
    """
    if preset == "demo":
        return CostRates(eval_s_per_sample={"gqa_ru": 0.02, "mmbench_ru": 0.03},
                         train_s_per_sample=0.02, load_s=3.0)
    if preset == "saiga-tiny":  # 576 image tokens and a 128k vocabulary on 2 CPU cores
        return CostRates(eval_s_per_sample={"gqa_ru": 0.1, "mmbench_ru": 0.12},
                         train_s_per_sample=0.1, load_s=3.0)
    from core.device import GQA_QUESTIONS_PER_IMAGE, t4_priors

    t4 = t4_priors(packing=packing)
    gqa = t4_priors(GQA_QUESTIONS_PER_IMAGE, packing=packing) if prefix_cache else t4
    speedup = {"t4": 1.0, "cpu": 1 / 40, "a100": 6.0, "h100": 10.0, "auto": 1.0}[profile]
    ev, tr = t4["eval_s_per_sample"] / speedup, t4["train_s_per_sample"] / speedup
    # MMBench prompts carry a hint and up to four options: about 1.2x the GQA prompt.
    return CostRates(eval_s_per_sample={"gqa_ru": gqa["eval_s_per_sample"] / speedup,
                                        "mmbench_ru": 1.2 * ev},
                     train_s_per_sample=tr, load_s=t4["load_s"] / min(speedup, 3.0),
                     train_tokens_per_record=t4["train_tokens_per_sample"])


@dataclass
class CostModel:
    """Priors calibrated by measurements: a running ratio, priors weighted as a few samples."""

    rates: CostRates
    prior_weight: float = 20.0
    _measured: dict[str, list[float]] = field(default_factory=dict)

    def observe_eval(self, benchmark: str, n: int, seconds: float, mode: str = "generate") -> None:
        key = f"eval:{benchmark}:{mode}"
        self._observe(key, n, seconds)
        if mode == "generate":
            self.rates.eval_s_per_sample[benchmark] = self._rate(
                key, self.rates.eval_s_per_sample[benchmark])

    def observe_train(self, samples: int, seconds: float) -> None:
        self._observe("train", samples, seconds)
        self.rates.train_s_per_sample = self._rate("train", self.rates.train_s_per_sample)

    def _observe(self, key: str, n: int, seconds: float) -> None:
        if n > 0 and seconds > 0:
            total = self._measured.setdefault(key, [0.0, 0.0])
            total[0] += n
            total[1] += seconds

    def _rate(self, key: str, prior: float) -> float:
        n, s = self._measured.get(key, [0.0, 0.0])
        return (s + prior * self.prior_weight) / (n + self.prior_weight)

    def eval_seconds(self, benchmark: str, n: int) -> float:
        return self.rates.eval_s_per_sample[benchmark] * n

    def to_dict(self) -> dict:
        return {"rates": asdict(self.rates), "measured": self._measured}


class Budget:
    """Wall-clock accounting: spent so far, the reserve, and whether a step still fits."""

    def __init__(self, total_s: float, reserve_fraction: float = DEFAULT_RESERVE, *, spent_before: float = 0.0,
                 clock=time.monotonic):
        self.total_s = total_s
        self.reserve_s = total_s * reserve_fraction
        self._clock = clock
        self._start = clock() - spent_before

    def spent(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return self.total_s - self.spent()

    def left_for_cycles(self) -> float:
        """What the cycles may still use: everything but the reserve."""
        return self.left() - self.reserve_s

    def fits(self, cost_s: float) -> bool:
        return cost_s <= self.left_for_cycles()

    def deadline(self, within_s: float) -> float:
        """An absolute ``time.time()`` deadline ``within_s`` from now, capped by the cycles' share."""
        return time.time() + max(0.0, min(within_s, self.left_for_cycles()))


DEV_SHARE = 0.045
"""Share of the time for cycles that one candidate's dev evaluation (both benchmarks) takes:
room for about six trained candidates with their evaluations and trainings."""
DEV_FLOOR = 100
"""The fewest dev questions per benchmark: a paired test on fewer cannot see a 10-point change."""
DEV_MIN_UNITS = 100
"""The fewest units (GQA-ru images, MMBench-ru question groups) per dev evaluation: the paired
test's units; more questions about one image add less than another image."""
DEV_CAP = 0.77
"""At most this share of the dev split decides, so that searching strategies have questions of
their own (the analysis subset) and never select on the paired test's questions. On the real
GQA-ru testdev (132 dev images) 0.77 lets 100 images judge and keeps 32 for analysis."""


def dev_subset_size(rate_s: float, cycles_s: float, available: int, *, floor: int = DEV_FLOOR,
                    share: float = DEV_SHARE, min_units: int = 0,
                    questions_per_unit: float = 1.0) -> int:
    """Questions per benchmark for each dev evaluation.

    One candidate's evaluation (both benchmarks) should take about ``share`` of the time for
    cycles; never fewer than ``floor`` questions or ``min_units`` units (GQA-ru images) of
    ``questions_per_unit``, never more than ``available``.
    """
    n = int(share * cycles_s / max(rate_s, 1e-9) / 2)
    least = max(floor, math.ceil(min_units * questions_per_unit))
    return max(min(least, available), min(available, n))


def final_subset_size(rate_s: float, reserve_s: float, available: int, fixed_s: float = 0.0) -> int:
    """Questions per benchmark of ``final`` that fit twice (baseline and champion) in the reserve."""
    n = int((reserve_s - fixed_s) / max(rate_s, 1e-9) / 4)
    return max(min(50, available), min(available, n))


def subset_sizes(rate_s: float, cycles_s: float, reserve_s: float, n_dev: int, n_final: int, *,
                 dev_size: int | None = None, final_size: int | None = None,
                 min_units: int = DEV_MIN_UNITS, questions_per_unit: float = 1.0) -> dict[str, int]:
    """The run's subset sizes for one benchmark, the one computation ``loop run`` and ``loop
    plan`` share: the dev subset that judges (at most ``DEV_CAP`` of the dev split), the
    analysis subset beside it (half the dev subset, from the rest of the dev split) and the
    final subset (what fits twice in the reserve); ``dev_size``/``final_size`` override."""
    dev = dev_size or dev_subset_size(rate_s, cycles_s, int(DEV_CAP * n_dev),
                                      min_units=min_units, questions_per_unit=questions_per_unit)
    final = final_size or final_subset_size(rate_s, reserve_s, n_final)
    return {"dev_subset": dev, "tune_subset": max(1, min(dev // 2, n_dev - dev)),
            "final_subset": final}


def fmt_s(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.0f} min"
    return f"{math.ceil(seconds)} s"
