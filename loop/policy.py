"""Which remedy next: an explicit rule set scored by expected gain per second.

For every registered strategy the policy estimates the accuracy it could recover — the share
of the champion's dev errors whose labels the strategy addresses (``Strategy.addresses``),
times the error rate, summed over both benchmarks — scales it by what the strategy's family has done in this
run (each rejection multiplies it by 0.4, an accepted gain raises it), and divides by the estimated
seconds. The best score that fits in the time left wins; when nothing fits, the cycles end.

Under ``--objective benchmark`` only an adapter can change the headline: a prompt or decoding
setting is measured only when the context distillation that would turn it into an adapter fits
in the time left after it, and a setting that gained on dev is distilled in the next cycle.

Why rules and not a bandit: a run has a handful of cycles, too few for a bandit's exploration
to pay for itself, and the error profile is a strong prior (format errors are fixed by cheap
prompt and decoding changes first, content errors need training). Every choice is stored with
a rationale in words.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from dataclasses import dataclass, field

import strategies
from loop.budget import fmt_s

BENCH_NAMES = {"gqa_ru": "GQA-ru", "mmbench_ru": "MMBench-ru"}


@dataclass
class Choice:
    strategy: str
    est_cost_s: float
    score: float
    rationale: str
    ranking: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "est_cost_s": round(self.est_cost_s, 1),
                "score": self.score, "rationale": self.rationale, "ranking": self.ranking}


def expected_gain(addresses: dict[str, float], profiles: dict) -> float:
    """Accuracy (fraction) a strategy that ``addresses`` these labels could recover, summed
    over the benchmarks."""
    gain = 0.0
    for profile in profiles.values():
        if not profile.n:
            continue
        error_rate = profile.n_errors / profile.n
        addressed = sum(profile.shares.get(label, 0.0) * w for label, w in addresses.items())
        gain += error_rate * min(1.0, addressed)
    return gain


def history_factor(strategy: str, history: list[dict]) -> tuple[float, str]:
    """Past results of this strategy in the run, as a multiplier and in words."""
    mine = [h for h in history if h["strategy"] == strategy]
    if not mine:
        return 1.0, "has not been tried"
    accepted = [h for h in mine if h["status"] == "accepted"]
    rejected = len(mine) - len(accepted)
    factor = 0.4 ** rejected
    if accepted:
        factor *= 1.0 + 5.0 * max(0.0, sum(h.get("gain") or 0.0 for h in accepted) / len(accepted))
    words = f"tried {len(mine)}x ({len(accepted)} accepted, {rejected} rejected)"
    return factor, words


def choose(profiles: dict, history: list[dict], costs: dict[str, float], time_left_s: float,
           exhausted: set[str], catalog: dict | None = None, *,
           objective: str = "deployment", follow_up_s: float | None = None,
           ranking_out: list | None = None) -> Choice | None:
    """The strategy with the best expected gain per second that fits, or None.

    Args:
        profiles: benchmark -> ErrorProfile of the champion on dev.
        history: past cycles ({"strategy", "status", "gain", "setting_only"}).
        costs: strategy -> estimated seconds (proposal, training, evaluation); a strategy that
            cannot run in the time left estimates at least what it would need.
        time_left_s: seconds the cycles may still use.
        exhausted: strategies with nothing left to try (or blocked until a new champion).
        catalog: strategy -> its class (``addresses``, ``requires``, ``trains``); the
            registry's by default.
        objective: "benchmark" (only adapters can win: a remedy that trains nothing is tried
            only when the context distillation that turns a winning setting into an adapter
            fits after it, once per champion unless nothing that trains fits, and a setting
            that won is distilled in the very next cycle) or "deployment" (every remedy can
            win).
        follow_up_s: under "benchmark", the least seconds a context distillation needs after
            a setting; None when none can follow (not among the strategies, or blocked).
        ranking_out: a list that receives every strategy's row (with why it was skipped), so
            that a caller can say why nothing was chosen (``stop_reason``).
    """
    catalog = catalog or {name: type(strategies.get(name)) for name in costs}
    since_champion = history[max((i for i, h in enumerate(history) if h["status"] == "accepted"),
                                 default=-1) + 1:]
    setting_tried = objective == "benchmark" and any(h.get("setting_only")
                                                     for h in since_champion)
    ranking = []
    for name, cost in costs.items():
        gain = expected_gain(catalog[name].addresses, profiles)
        factor, words = history_factor(name, history)
        row = {"strategy": name, "expected_gain": round(gain, 4), "history": words,
               "factor": round(factor, 3), "est_cost_s": round(cost, 1),
               "score": gain * factor / max(cost, 1.0)}
        if name in exhausted:
            row["skipped"] = "nothing left to try"
        elif catalog[name].waiting(history):
            row["skipped"] = catalog[name].waiting(history)
        elif cost > time_left_s:
            row["skipped"] = f"needs ~{fmt_s(cost)}, {fmt_s(time_left_s)} left"
        elif objective == "benchmark" and not catalog[name].trains and (
                why := _no_distillation_after(cost, follow_up_s, time_left_s)):
            row["skipped"] = why
        elif gain * factor <= 0.002 and not _distils(name, since_champion):
            row["skipped"] = "addresses no remaining error"
        ranking.append(row)
    ranking.sort(key=lambda r: -r["score"])
    open_rows = [r for r in ranking if "skipped" not in r]
    note = ""
    if objective == "benchmark":
        distill = next((r for r in open_rows if _distils(r["strategy"], since_champion)), None)
        trains = [r for r in open_rows if catalog[r["strategy"]].trains]
        if distill is not None:
            open_rows = [distill]
            note = (f" It turns cycle {_winner(since_champion).get('index')}'s winning prompt/decoding "
                    "setting into an adapter, scheduled right after it: under --objective "
                    "benchmark only an adapter can change the headline.")
        elif setting_tried and trains:
            for r in open_rows:
                if not catalog[r["strategy"]].trains:
                    r["skipped"] = ("under --objective benchmark a prompt/decoding setting cannot "
                                    "win; one was already tried for this champion")
            open_rows = trains
        elif open_rows and not catalog[open_rows[0]["strategy"]].trains:
            note = (" Under --objective benchmark a prompt/decoding setting cannot win: it is "
                    "measured so that its gain can be distilled into an adapter, and the "
                    f"context distillation (~{fmt_s(follow_up_s or 0)}) fits after it"
                    + ("; nothing else that trains fits, so a setting is tried again"
                       if setting_tried else "") + ".")
    if ranking_out is not None:
        ranking_out.extend(ranking)
    if not open_rows:
        return None
    best = open_rows[0]
    return Choice(strategy=best["strategy"], est_cost_s=best["est_cost_s"], score=best["score"],
                  rationale=_rationale(best, open_rows[1:], profiles) + note, ranking=ranking)


def estimate_costs(ctx, names: list[str], objective: str, on_error=None) -> dict[str, float]:
    """Each strategy's estimated seconds for this cycle, as the run will spend them: under
    ``--objective benchmark`` a setting-only remedy is measured on the analysis subset, so it
    is priced there. ``on_error(name, exc)`` is told of a remedy that cannot estimate (it is
    left out); without it the error is raised."""
    costs = {}
    for name in names:
        strategy = strategies.get(name)
        here = ctx
        if objective == "benchmark" and not strategy.trains and ctx.analysis_sizes:
            here = dataclasses.replace(ctx, dev_sizes=dict(ctx.analysis_sizes))
        try:
            costs[name] = strategy.estimate_cost(here)
        except (KeyboardInterrupt, sqlite3.DatabaseError):
            raise
        except Exception as exc:  # a broken remedy is left out, the run goes on
            if on_error is None:
                raise
            on_error(name, exc)
    return costs


def next_choice(ctx, names: list[str], exhausted: set[str], *, objective: str,
                ranking_out: list | None = None, on_error=None) -> tuple[Choice | None, dict]:
    """The run's choice for the cycle ``ctx`` describes (``loop run`` and ``loop plan`` both
    call this): the costs of ``names``, the context distillation that could follow a setting,
    and ``choose`` under the run's objective. Returns (choice or None, costs)."""
    costs = estimate_costs(ctx, names, objective, on_error)
    distiller = DISTILLER in costs and DISTILLER not in exhausted
    choice = choose(ctx.profiles, ctx.history, costs, ctx.time_left_s, exhausted,
                    objective=objective, ranking_out=ranking_out,
                    follow_up_s=strategies.get(DISTILLER).least_seconds(ctx) if distiller else None)
    return choice, costs


def stop_reason(ranking: list[dict], time_left_s: float) -> str:
    """Why ``choose`` chose nothing, in words: each strategy and why it was left out."""
    return (f"no strategy fits in the {fmt_s(time_left_s)} left before the reserve: "
            + "; ".join(f"{r['strategy']}: {r.get('skipped', 'not chosen')}" for r in ranking))


DISTILLER = "context_distill"
"""The strategy that turns a winning setting into an adapter."""


def _no_distillation_after(cost: float, follow_up_s: float | None, time_left_s: float) -> str:
    """Why a setting is not worth measuring under --objective benchmark ("" when it is)."""
    if follow_up_s is None:
        return ("under --objective benchmark a prompt/decoding setting cannot change the "
                f"headline, and no {DISTILLER} can follow it to turn it into an adapter")
    if cost + follow_up_s > time_left_s:
        return (f"under --objective benchmark only the {DISTILLER} after it could change the "
                f"headline: both need ~{fmt_s(cost + follow_up_s)}, {fmt_s(time_left_s)} left")
    return ""


def _winner(since_champion: list[dict]) -> dict | None:
    """The latest setting-only cycle since the champion that gained on dev and that no
    context distillation has followed yet."""
    for h in reversed(since_champion):
        if h["strategy"] == DISTILLER:
            return None
        if h.get("setting_only") and (h.get("gain") or 0.0) > 0:
            return h
    return None


def _distils(name: str, since_champion: list[dict]) -> bool:
    return name == DISTILLER and _winner(since_champion) is not None


def _rationale(best: dict, others: list[dict], profiles: dict) -> str:
    parts = []
    for bench, profile in profiles.items():
        if profile.n_errors:
            cause = profile.main_cause
            parts.append(f"{cause} is {profile.shares[cause]:.0%} of {BENCH_NAMES.get(bench, bench)} "
                         f"errors ({profile.n_errors}/{profile.n} wrong)")
    text = "; ".join(parts) + "; " if parts else ""
    text += (f"{best['strategy']} costs ~{fmt_s(best['est_cost_s'])} and {best['history']}; "
             f"it could recover ~{100 * best['expected_gain'] * best['factor']:.0f} points "
             f"summed over the benchmarks, the best gain per second")
    if others:
        text += " (next: " + ", ".join(
            f"{r['strategy']} {r['score'] * 360000:.1f} pts/h" for r in others[:2]) + ")"
    return text + "."
