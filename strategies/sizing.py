"""How many records a training gets: sized to the errors it targets, not to the time left.

One rule for every training of the loop (``answer_format_sft``, ``context_distill``, an HPO
trial), in :func:`size_training`:

    records = targeted points x records per point, within [floor, ceiling], at most what fits
              in the time cap; below the floor after the cap, the strategy declines.

- **targeted points**: the accuracy, in points summed over the benchmarks, that the champion
  loses to errors whose labels the strategy addresses (``Strategy.addresses`` weighting the
  champion's error counts on the analysis subset, ``ctx.profiles``): the same quantity the policy
  calls the expected gain. An adapter trained from the base (not continuing the champion's)
  must also learn again what the champion's adapter gained over the base (``relearn``); a
  continuation of the champion (``TrainConfig.init_from``) trains that delta only.
- **records per point**: how many records one point of accuracy took in this run: the accepted
  trained candidates' records over the points their paired tests measured (errors fixed =
  paired difference x n), pooled with the prior ``RECORDS_PER_POINT`` weighted as
  ``PRIOR_POINTS`` points. Rejected candidates do not count: their paired difference is not
  distinguishable from zero, so the errors they fixed are not measured (the policy already
  lowers a rejected strategy's score).
- **time cap**: the share of the time left that the strategy gives its training, so that later
  cycles still fit.

The sizing, its inputs and the result, is stored with the candidate (``details["sizing"]``) and
printed by ``loop show``. ``bench/learning_curve.py`` measures the demo's learning curve (dev
accuracy after 250/500/1,000/2,000 records, from the base and from a champion) that the
constants below are checked against.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from strategies.base import Context
from strategies.common import BATCH_SIZE, DATA_S_PER_RECORD, MIN_STEPS

RECORDS_PER_POINT = 30.0
"""Prior records per point of accuracy (summed over the benchmarks) that a training fixes, until
this run's accepted trainings measure their own. The demo's learning curve
(``bench/learning_curve.py``, seed 0, docs/training.md) gained 8.7, 22.0 and 49.9 points from
the base with 500, 1,000 and 2,000 answer_format_sft records (57, 45 and 40 records per point)
and 16.6, 35.0 and 77.6 points continuing a 500-record champion with 500, 1,000 and 2,000 (30,
29 and 26 per point); most trainings of a run continue the champion, so the prior is theirs."""
PRIOR_POINTS = 5.0
"""Weight of the prior, in points: once accepted candidates have fixed much more than this,
their measured ratio decides."""
FLOOR_RECORDS = 250
"""The fewest records worth a training (the learning curve's first point: +17.9 points
continuing a champion, p < 0.001 on GQA-ru; from the base +2.1, which a paired test cannot see:
a fresh LoRA needs about 30 steps before greedy answers change). A training that cannot get this
many in its time cap declines."""
CEILING_RECORDS = 2000
"""The most records one training gets (the learning curve's last point): on a T4 about 48
minutes packed, already more than a six-hour run can give each of six trained candidates; a
remedy whose errors ask for more gets it in a later cycle, continuing the champion."""
TRIAL_SHARE = 0.25
"""An HPO trial trains this share of what one sized training would: a cycle's up to four trials
together train about one training's worth (a search at low fidelity, as successive halving
does), and the best trial's adapter is the candidate."""
TRIAL_FLOOR = 160
"""The fewest records of an HPO trial (ten steps of 16)."""


@dataclass(frozen=True)
class Sizing:
    """The rule's inputs and result, as stored in ``details["sizing"]``."""

    targeted_errors: dict[str, dict]
    """benchmark -> {"errors": the addressed errors (label counts x ``addresses``), "n": the
    questions of the analysis subset they were counted on, "points": 100 x errors / n}."""
    targeted_points: float
    relearn_points: float
    """What the champion's adapter gained over the base (accepted cycles' paired gains), to be
    learnt again by an adapter from the base; 0 for a continuation."""
    records_per_point: float
    ratio_source: str
    time_cap_s: float
    time_cap_records: int
    floor: int
    ceiling: int
    records: int
    """0 when the strategy declines (``declined`` says why)."""
    steps: int
    batch_size: int
    seconds: float
    """Expected seconds of building the records and training on them once."""
    s_per_record: float
    continuation: bool
    declined: str | None = None
    past: list[dict] = field(default_factory=list)
    """The accepted trained cycles the ratio came from: index, records, points fixed."""

    def to_dict(self) -> dict:
        return asdict(self)


def addressed(ctx: Context, addresses: dict[str, float]) -> dict[str, dict]:
    """Per benchmark, the champion's errors on the analysis subset that ``addresses`` targets."""
    out = {}
    for b, profile in ctx.profiles.items():
        if not profile.n:
            continue
        share = min(1.0, sum(profile.shares.get(label, 0.0) * w for label, w in addresses.items()))
        errors = profile.n_errors * share
        out[b] = {"errors": round(errors, 1), "n": profile.n,
                  "points": round(100 * errors / profile.n, 2)}
    return out


def trained_records(entry: dict) -> int:
    """Records a past cycle's candidate trained on (its sizing, else steps x batch)."""
    cand = entry.get("candidate") or {}
    sizing = (cand.get("details") or {}).get("sizing") or {}
    if sizing.get("records"):
        return int(sizing["records"])
    config = (cand.get("train") or {}).get("config") or {}
    return int(config.get("steps") or 0) * int(config.get("batch_size") or 0)


def points_fixed(entry: dict) -> float:
    """Accuracy points a cycle's paired tests measured, summed over the benchmarks (>= 0)."""
    return max(0.0, 100 * sum((p or {}).get("diff", 0.0) for p in (entry.get("paired") or {}).values()))


def records_per_point(history: list[dict]) -> tuple[float, str, list[dict]]:
    """The run's records per point so far, pooled with the prior; (ratio, source, past)."""
    past = [{"cycle": h.get("index"), "records": trained_records(h), "points": round(points_fixed(h), 2)}
            for h in history if h.get("status") == "accepted" and not h.get("setting_only")]
    past = [p for p in past if p["records"]]
    records = sum(p["records"] for p in past)
    points = sum(p["points"] for p in past)
    ratio = (RECORDS_PER_POINT * PRIOR_POINTS + records) / (PRIOR_POINTS + points)
    if not past:
        return ratio, f"prior RECORDS_PER_POINT={RECORDS_PER_POINT:g} (no accepted training yet)", past
    cycles = ", ".join(str(p["cycle"]) for p in past)
    return ratio, (f"cycles {cycles}: {records} records fixed {points:.1f} points, pooled with the "
                   f"prior {RECORDS_PER_POINT:g}/point weighted as {PRIOR_POINTS:g} points"), past


def relearn_points(history: list[dict]) -> float:
    """What the accepted cycles gained over the base, in points (what the champion knows)."""
    return sum(points_fixed(h) for h in history if h.get("status") == "accepted")


def size_training(ctx: Context, addresses: dict[str, float], *, continuation: bool,
                  time_cap_s: float, s_per_record: float | None = None, share: float = 1.0,
                  floor: int = FLOOR_RECORDS, targeted: dict[str, dict] | None = None) -> Sizing:
    """Records and steps of one training (the module docstring states the rule).

    Args:
        addresses: error label -> the share of such errors the training can fix.
        continuation: the adapter continues the champion's (trains the delta only).
        time_cap_s: seconds the training (building its records included) may take.
        s_per_record: seconds per record; by default building it and one training pass.
        share: scales the records (an HPO trial's ``TRIAL_SHARE`` x its ``steps_frac``).
        floor: the fewest records worth training.
        targeted: what it targets when that is not the profile's addressed errors (a
            distillation targets its setting's measured gain), in ``addressed``'s form.
    """
    per = s_per_record if s_per_record is not None else (ctx.rates.train_s_per_sample
                                                         + DATA_S_PER_RECORD)
    targeted = targeted if targeted is not None else addressed(ctx, addresses)
    points = sum(t["points"] for t in targeted.values())
    relearn = 0.0 if continuation else relearn_points(ctx.history)
    ratio, source, past = records_per_point(ctx.history)
    wanted = math.ceil(share * (points + relearn) * ratio)
    ceiling = max(floor, math.ceil(share * CEILING_RECORDS))
    cap_records = int(max(0.0, time_cap_s) / per) if math.isfinite(time_cap_s) else ceiling
    records = min(max(floor, min(ceiling, wanted)), cap_records)
    declined = None
    if records < floor:
        declined = (f"{floor} records (the floor) need ~{floor * per:.0f} s, the time cap is "
                    f"{max(0.0, time_cap_s):.0f} s")
        records = 0
    batch = BATCH_SIZE if records >= BATCH_SIZE * MIN_STEPS else max(1, records // MIN_STEPS)
    steps = math.ceil(records / batch) if records else 0
    return Sizing(targeted_errors=targeted, targeted_points=round(points, 2),
                  relearn_points=round(relearn, 2), records_per_point=round(ratio, 2),
                  ratio_source=source, time_cap_s=round(time_cap_s, 1),
                  time_cap_records=cap_records, floor=floor, ceiling=ceiling, records=records,
                  steps=steps, batch_size=batch, seconds=round(records * per, 1), s_per_record=per,
                  continuation=continuation, declined=declined, past=past)


@dataclass(frozen=True)
class TrainPlan:
    """An HPO trial's training as ``strategies.hpo_trial`` runs it."""

    steps: int
    batch_size: int
    n_records: int
    sizing: Sizing


def trial_sizing(ctx: Context, seconds: float, steps_frac: float = 1.0,
                 continuation: bool = False) -> Sizing:
    """An HPO trial's records: ``TRIAL_SHARE`` x ``steps_frac`` of what one sized training of
    ``optuna_hpo`` would train, at least ``TRIAL_FLOOR``, within ``seconds``."""
    from strategies.optuna_hpo import OptunaHPO

    return size_training(ctx, OptunaHPO.addresses, continuation=continuation, time_cap_s=seconds,
                         share=TRIAL_SHARE * steps_frac, floor=TRIAL_FLOOR)


def trial_plan(ctx: Context, seconds: float, steps_frac: float = 1.0,
               continuation: bool = False) -> TrainPlan | None:
    """``trial_sizing`` as the trial runs it; None when the floor does not fit."""
    s = trial_sizing(ctx, seconds, steps_frac, continuation)
    return None if s.declined else TrainPlan(s.steps, s.batch_size, s.records, s)


def describe(sizing: dict) -> str:
    """One line for ``loop show``: what the training targeted and how its size followed."""
    if not sizing:
        return ""
    if sizing.get("declined"):
        return f"sizing: declined: {sizing['declined']}"
    errors = ", ".join(f"{b} {t['errors']:g}/{t['n']} ({t['points']:g} pts)"
                       for b, t in (sizing.get("targeted_errors") or {}).items())
    start = "continues the champion" if sizing.get("continuation") else "from the base"
    relearn = (f" + {sizing['relearn_points']:g} pts the champion gained"
               if sizing.get("relearn_points") else "")
    return (f"sizing: {sizing['records']} records, {sizing['steps']} steps x "
            f"{sizing['batch_size']} ({start}): targets {errors}{relearn} x "
            f"{sizing['records_per_point']:g} records/point ({sizing['ratio_source']}); "
            f"floor {sizing['floor']}, ceiling {sizing['ceiling']}, time cap "
            f"{sizing['time_cap_s']:g} s = {sizing['time_cap_records']} records")


def share_of_time_left(ctx: Context, eval_s: float, share: float) -> float:
    """Seconds a strategy that gives its data and training ``share`` of what its candidate's
    dev evaluation (``eval_s``) leaves of ``ctx.time_left_s`` may spend, the model load aside."""
    return share * (ctx.time_left_s - eval_s) - ctx.rates.load_s


def time_left_for_floor(ctx: Context, eval_s: float, sizing: Sizing, share: float) -> float:
    """The least ``ctx.time_left_s`` whose ``share_of_time_left`` holds ``sizing``'s floor."""
    return eval_s + (ctx.rates.load_s + sizing.floor * sizing.s_per_record) / share
