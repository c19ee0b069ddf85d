"""HPO trials as ``loop show`` and ``loop log`` present them: read from the records
``optuna_hpo`` keeps per cycle (``hpo-trial-<study>-<number>`` proposals)."""

from __future__ import annotations

from typing import Any

PREFIX = "hpo-trial-"


def trials_of(proposals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trial records among a run's (or a cycle's) proposals, by cycle and number."""
    trials = [p["payload"] for p in proposals if p["name"].startswith(PREFIX)]
    return sorted(trials, key=lambda t: (t.get("cycle") or 0, t.get("number") or 0))


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """How many trials ended how, and the seconds pruning saved."""
    states = [t["state"] for t in trials]
    saved = sum((t.get("pruned") or {}).get("saved_s") or 0.0 for t in trials)
    return {"n": len(trials), "complete": states.count("COMPLETE"),
            "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "saved_s": round(saved, 2)}


def summary_line(s: dict[str, Any], duration) -> str:
    saved = f", pruning saved {duration(s['saved_s'])}" if s["pruned"] else ""
    return (f"{s['n']} HPO trials: {s['complete']} complete, {s['pruned']} pruned, "
            f"{s['failed']} failed{saved}")


def rows(trials: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per trial: number, state, tune value, its reports, who ran it, why it ended."""
    out = []
    for t in trials:
        reports = " ".join(f"{r['at']}%:{r['value']:.3f}" for r in t.get("reports") or [])
        value = f"{t['value']:.3f}" if t.get("value") is not None else "-"
        out.append([t["number"], t["state"], value, reports or "-",
                    (t.get("worker") or {}).get("name") or "-", t.get("note") or ""])
    return out


HEADERS = ["trial", "state", "tune", "reports (% of its steps: slice accuracy)", "worker", "note"]
