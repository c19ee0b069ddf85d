"""Load the model the way the chosen GPU profile says (shared by eval, train and run)."""

from __future__ import annotations

import logging

from core.model import VLM, LoadOptions, load_vlm

log = logging.getLogger(__name__)


def load_options(gpu: str) -> LoadOptions:
    """LoadOptions for a ``--gpu`` profile, to evaluate (``core.device`` logs the reason for
    each choice that concerns loading and evaluating; training's are left out)."""
    from dataclasses import replace

    from core.device import resolve_profile
    from core.distributed import device_for

    profile = resolve_profile(gpu)
    profile.log_reasons(training=False)
    options = profile.load_options()
    return replace(options, device=device_for(options.device))


def load_model_for(model: str, gpu: str = "auto", adapter: str | None = None) -> VLM:
    return load_vlm(model, options=load_options(gpu), adapter=adapter)
