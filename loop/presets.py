"""What each preset means beyond its model and data sources (``loop.sources``): the values a
command would otherwise write down again for itself."""

from __future__ import annotations

TRAIN_LR = {"saiga": 2e-4, "demo": 2e-3, "saiga-tiny": 1e-3}
"""The usual LoRA learning rate of each preset's base model: 2e-4 for an 8B model (the usual
LoRA SFT value); the tiny models, whose hidden sizes are far smaller, need larger steps. The loop
(strategies may search around it) and ``loop train`` both start from it."""


def train_lr(preset: str) -> float:
    """The learning rate for ``preset``; the 8B model's for a preset without its own."""
    return TRAIN_LR.get(preset, TRAIN_LR["saiga"])
