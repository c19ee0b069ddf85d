"""LoRA on the language model of a LLaVA, several named adapters on one loaded base.

The target regex names the language model's projections by full path: a plain list such as
``["q_proj", "v_proj"]`` also hits the CLIP tower, whose attention layers share those names.
The projector can be trained too (``modules_to_save``); its weights are then saved with the
adapter. Adapters are saved in PEFT format plus ``loop_adapter.json`` (base model, data
fingerprint, config, metrics); that file is written last, so its presence means a complete
adapter.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from core.exceptions import UserError

log = logging.getLogger(__name__)

LANGUAGE_MODEL_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"
                          r"|down_proj)")
PROJECTOR = "multi_modal_projector"
VISION_MARKERS = ("vision_tower", "vision_model")
METADATA_FILE = "loop_adapter.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def lora_config(*, rank: int = 16, alpha: int | None = None, dropout: float = 0.05,
                target_modules: str = LANGUAGE_MODEL_TARGETS, train_projector: bool = False,
                base_model: str | None = None, revision: str | None = None):
    """A peft LoraConfig for causal-LM SFT on the language model (alpha defaults to 2 x rank)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout,
                      target_modules=target_modules, bias="none",
                      modules_to_save=[PROJECTOR] if train_projector else None,
                      base_model_name_or_path=base_model, revision=revision)


def check_adapter_name(name: str) -> None:
    if not _NAME.match(name) or name in "lora_":
        raise UserError(f"an adapter name must be 1-64 letters, digits, '-' or '_' (no dots), "
                        f"start with a letter or digit and not be part of 'lora_' (peft "
                        f"reserves it), but got '{name}'.")


def attach_lora(vlm, name: str, config, *, dtype: str = "float32"):
    """Add a new adapter ``name`` to ``vlm.model`` and make it the only trainable weights.

    A bare model is wrapped in a PeftModel; a PeftModel gets one more adapter, and the
    adapters already there stay loaded and frozen. Trainable weights are cast to ``dtype``.

    Raises:
        UserError: the name is taken or invalid, the regex matches nothing, or it matches a
            vision-tower module.
    """
    import torch
    from peft import PeftModel, get_peft_model

    check_adapter_name(name)
    if name in vlm.adapters:
        raise UserError(f"an adapter named '{name}' is already loaded ({vlm.adapters[name]}); "
                        "pick another name or delete it first.")
    with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        if isinstance(vlm.model, PeftModel):
            vlm.model.add_adapter(name, config)
        else:
            for p in vlm.model.parameters():
                p.requires_grad_(False)
            try:
                vlm.model = get_peft_model(vlm.model, config, adapter_name=name)
            except ValueError as exc:
                raise UserError(f"LoRA target modules {config.target_modules!r} not found in "
                                f"the base model ({exc}). Please check the target modules and "
                                "try again.") from None
    model = vlm.model
    model.base_model.enable_adapter_layers()
    model.set_adapter(name)
    check_targets(model, name)
    target = getattr(torch, dtype)
    for pname, p in model.named_parameters():
        mine = _owned_by(pname, name)
        p.requires_grad_(mine)
        if mine and p.dtype != target:
            p.data = p.data.to(target)
    return model


def _owned_by(param_name: str, adapter: str) -> bool:
    return f".{adapter}." in param_name and ("lora_" in param_name or "modules_to_save" in
                                               param_name)


def adapted_modules(model, name: str) -> list[str]:
    """Names of the base modules that carry adapter ``name`` (LoRA layers and saved copies)."""
    out = []
    for mname, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        saved = getattr(module, "modules_to_save", None)
        if (lora_a is not None and name in lora_a) or (saved is not None and name in saved):
            out.append(mname)
    return out


def check_targets(model, name: str) -> None:
    modules = adapted_modules(model, name)
    if not modules:
        raise UserError(f"LoRA adapter '{name}' matched no module. Please check the target "
                        "modules and try again.")
    vision = [m for m in modules if any(v in m for v in VISION_MARKERS)]
    if vision:
        raise UserError(f"LoRA adapter '{name}' would adapt the vision tower ({vision[0]}, ...); "
                        f"target the language model only, e.g. {LANGUAGE_MODEL_TARGETS!r}.")


def trainable_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state(model, name: str) -> dict:
    """The adapter's weights as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def load_adapter_state(model, name: str, state: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=name)
    if result.unexpected_keys:
        raise UserError(f"checkpoint for adapter '{name}' does not fit it: unexpected "
                        f"{result.unexpected_keys[:3]}")


def all_finite(state: dict) -> bool:
    import torch

    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def save_adapter(model, name: str, out_dir: str | Path, metadata: dict[str, Any] | None) -> Path:
    """Write adapter ``name`` in PEFT format into ``out_dir``, then ``loop_adapter.json``.

    Files are written to a temporary folder and moved in, so a crash leaves either the old
    adapter or the new one. Pass ``metadata=None`` for a checkpoint without the metadata file.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".save-") as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        src = Path(tmp) if name == "default" else Path(tmp) / name
        (out_dir / METADATA_FILE).unlink(missing_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.move(str(f), out_dir / f.name)
    if metadata is not None:
        tmp_meta = out_dir / f".{METADATA_FILE}.tmp"
        tmp_meta.write_text(json.dumps(metadata, ensure_ascii=False, indent=2, default=str),
                            encoding="utf-8")
        tmp_meta.replace(out_dir / METADATA_FILE)
    return out_dir


def read_metadata(path: str | Path) -> dict | None:
    """``loop_adapter.json`` of an adapter folder, or None when it has none."""
    f = Path(path) / METADATA_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def remove_adapter(vlm, name: str) -> None:
    """Drop adapter ``name`` from the model (e.g. after a failed run); the base is untouched."""
    from peft import PeftModel

    model = vlm.model
    if not isinstance(model, PeftModel) or name not in model.peft_config:
        return
    vlm.adapters.pop(name, None)
    others = [a for a in model.peft_config if a != name]
    if others:
        model.set_adapter(others[0])
        model.delete_adapter(name)
        keep = vlm.active_adapter if vlm.active_adapter in vlm.adapters else None
        vlm.set_adapter(keep)
    else:
        vlm.model = model.unload()
        vlm.active_adapter = None
