"""What checkpoints saved by older transformers lack, filled in from the model itself.

LLaVA-Saiga-8B was saved with transformers 4.42: its processor files carry no ``patch_size``,
``vision_feature_select_strategy`` or ``num_additional_image_tokens``, so a transformers 5
processor cannot expand ``<image>`` into the 576 tokens the model produces. A tokenizer may also
come without a pad token. Each fix is logged with its reason.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>")
# Vision towers whose output starts with a CLS token (one more feature than patches).
WITH_CLS = ("clip_vision_model",)


def fill_processor_fields(processor, config) -> list[str]:
    """Set the processor fields a 4.42-era checkpoint does not store from the model config.

    Returns the reasons, one per field filled (also logged).
    """
    vision = config.vision_config
    reasons = []
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = vision.patch_size
        reasons.append(f"patch_size {vision.patch_size} from the model's vision config")
        # The three fields arrived together in transformers: when one is absent, all are.
        extra = 1 if vision.model_type in WITH_CLS else 0
        if getattr(processor, "num_additional_image_tokens", 0) != extra:
            processor.num_additional_image_tokens = extra
            reasons.append(f"num_additional_image_tokens {extra} ({vision.model_type}"
                           f"{' has a CLS token' if extra else ' has no CLS token'})")
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        strategy = config.vision_feature_select_strategy
        processor.vision_feature_select_strategy = strategy
        reasons.append(f"vision_feature_select_strategy '{strategy}' from the model config")
    for reason in reasons:
        log.info("the processor files do not set it (saved by an older transformers): %s", reason)
    return reasons


def ensure_pad_token(tokenizer, config) -> str | None:
    """Give a tokenizer without a pad token one; returns the reason (logged) or None."""
    if tokenizer.pad_token is not None:
        return None
    vocab = tokenizer.get_vocab()
    token = next((t for t in PAD_CANDIDATES if t in vocab), None)
    if token is not None:
        reason = f"'{token}', the vocabulary's padding token"
    else:
        text = getattr(config, "text_config", config)
        pad_id = getattr(config, "pad_token_id", None) or getattr(text, "pad_token_id", None)
        if pad_id is not None and pad_id < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(int(pad_id))
            reason = f"'{token}', the model config's pad_token_id {pad_id}"
        else:
            token = tokenizer.eos_token
            reason = f"the eos token '{token}' (no padding token in the vocabulary or config)"
    tokenizer.pad_token = token
    log.info("the tokenizer has no pad token; padding with %s (masked by the attention mask)",
             reason)
    return reason
