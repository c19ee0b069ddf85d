"""Files of the saiga-tiny world: a model folder as transformers 4.42 wrote LLaVA-Saiga-8B, and
the demo data's images scaled to the real model's 336 px."""

from __future__ import annotations

import io
import json
from pathlib import Path

TRANSFORMERS_VERSION = "4.42.4"
# transformers 5 module paths -> the keys transformers 4.42 saved.
LEGACY_PREFIXES = (("model.language_model.", "language_model.model."),
                   ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower.vision_model."),
                   ("model.multi_modal_projector.", "multi_modal_projector."))


def legacy_key(key: str) -> str:
    for new, old in LEGACY_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    raise ValueError(f"unexpected LLaVA weight '{key}'")


def save_like_4_42(model, tokenizer, image_processor, out: Path, chat_template: str) -> None:
    """Write ``model`` and its tokenizer/image processor the way transformers 4.42 did."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {legacy_key(k): v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _dump(out / "config.json", _config_4_42(model.config))
    _dump(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": model.config.text_config.bos_token_id,
        "eos_token_id": model.config.text_config.eos_token_id,
        "transformers_version": TRANSFORMERS_VERSION})
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True}
             for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    _dump(out / "tokenizer_config.json", {
        "added_tokens_decoder": added, "bos_token": tokenizer.bos_token,
        "chat_template": chat_template, "clean_up_tokenization_spaces": True,
        "eos_token": tokenizer.eos_token, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": tokenizer.model_max_length, "pad_token": tokenizer.pad_token,
        "padding_side": "left", "processor_class": "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _dump(out / "special_tokens_map.json", {
        name: {"content": value, "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False}
        for name, value in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                            ("pad_token", tokenizer.pad_token))})
    ip = image_processor
    _dump(out / "preprocessor_config.json", {
        "crop_size": dict(ip.crop_size), "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(ip.image_mean), "image_processor_type": "CLIPImageProcessor",
        "image_std": list(ip.image_std), "processor_class": "LlavaProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": dict(ip.size)})


def _config_4_42(config) -> dict:
    text, vision = config.text_config, config.vision_config
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": config.image_token_index,
        "model_type": "llava",
        "projector_hidden_act": config.projector_hidden_act,
        "text_config": {
            "architectures": ["LlamaForCausalLM"], "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id, "hidden_act": text.hidden_act,
            "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
            "max_position_embeddings": text.max_position_embeddings, "model_type": "llama",
            "num_attention_heads": text.num_attention_heads,
            "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
            "rope_theta": _rope_theta(text), "torch_dtype": "float16",
            "vocab_size": text.vocab_size},
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": TRANSFORMERS_VERSION,
        "vision_config": {
            "hidden_size": vision.hidden_size, "image_size": vision.image_size,
            "intermediate_size": vision.intermediate_size, "model_type": "clip_vision_model",
            "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers, "patch_size": vision.patch_size,
            "projection_dim": vision.projection_dim, "vocab_size": 32000},
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }


def _rope_theta(text) -> float:
    params = getattr(text, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(text, "rope_theta", 500000.0))


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def with_chat_template(model_dir: Path, out: Path, chat_template: str) -> Path:
    """A copy of a 4.42-style model folder with another chat template (weights linked)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(model_dir).iterdir():
        target = out / item.name
        if item.name == "tokenizer_config.json":
            cfg = json.loads(item.read_text(encoding="utf-8"))
            _dump(target, {**cfg, "chat_template": chat_template})
        elif not target.exists():
            target.symlink_to(item.resolve())
    return out


def upscale_images(root: Path, size: int) -> None:
    """Scale every image of the data folders (parquet and COCO JPEGs) to ``size`` pixels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def big(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").resize((size, size), Image.NEAREST).save(buf, format="PNG")
            return buf.getvalue()

    for path in sorted((root / "data").rglob("*.parquet")):
        table = pq.read_table(path)
        if "image" not in table.column_names:
            continue
        col = table.column("image").combine_chunks()
        rows = [{"bytes": big(r["bytes"]) if r and r["bytes"] else None, "path": r and r["path"]}
                for r in col.to_pylist()]
        new = pa.array(rows, type=col.type)
        table = table.set_column(table.column_names.index("image"), "image", new)
        pq.write_table(table, path)
    for path in sorted((root / "coco").rglob("*.jpg")):
        with Image.open(path) as img:
            scaled = img.convert("RGB").resize((size, size), Image.NEAREST)
        scaled.save(path, quality=95)
