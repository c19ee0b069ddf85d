"""Remedies, one module each, behind one interface (``strategies.base.Strategy``).

``REGISTRY`` is the one place strategies are listed. Names are stored in SQLite, so they are
lower case and unique; ``get`` on an unknown name lists the valid ones.
"""

from __future__ import annotations

import importlib
import re

from strategies.base import Strategy

# name -> "module:Class"; imported on first use so that listing names loads no model code.
REGISTRY: dict[str, str] = {}


def register(name: str, target: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"strategy name must be lower case letters, digits and _, got '{name}'")
    if name in REGISTRY:
        raise ValueError(f"strategy '{name}' is registered twice")
    REGISTRY[name] = target


def get(name: str) -> Strategy:
    """A fresh instance of the strategy called ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"unknown strategy '{name}'; valid: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    strategy = getattr(importlib.import_module(module), cls)()
    assert strategy.name == name, f"{REGISTRY[name]} declares name '{strategy.name}'"
    return strategy


def names() -> list[str]:
    return list(REGISTRY)


def remedies() -> dict[str, tuple[tuple[str, str], ...]]:
    """Error label -> the registered strategies that address it, as ``(name, summary)``, in the
    order to try them: those that train nothing first, then by the share of the label's errors
    each says it can fix (``Strategy.addresses``), then in registry order. What
    ``core.error_profile.BenchmarkOptimizer`` recommends; core itself names no strategy."""
    found: dict[str, list[tuple[tuple, str, str]]] = {}
    for order, name in enumerate(REGISTRY):
        strategy = get(name)
        for label, share in strategy.addresses.items():
            if share > 0:
                found.setdefault(label, []).append(
                    ((strategy.trains, -share, order), name, strategy.summary))
    return {label: tuple((name, text) for _, name, text in sorted(entries))
            for label, entries in found.items()}


register("prompt_constraints", "strategies.prompt_constraints:PromptConstraints")
register("generation_params", "strategies.generation_params:GenerationParams")
register("answer_format_sft", "strategies.answer_format_sft:AnswerFormatSFT")
register("optuna_hpo", "strategies.optuna_hpo:OptunaHPO")
register("context_distill", "strategies.context_distill:ContextDistill")
