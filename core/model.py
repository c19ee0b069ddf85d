"""Load a LLaVA model for evaluation and training, generate answers, score options.

The real model is ``deepvk/llava-saiga-8b``: a plain ``LlavaForConditionalGeneration`` (no
remote code) whose chat template is the tokenizer's Llama-3 template.

Inputs and stopping are what lmms-eval's ``llava_hf`` (``lmms_eval/models/simple/llava_hf.py``
and ``chat/llava_hf.py`` at commit 75571cfe) gives the model: the processor's default
``add_special_tokens`` (``core.processor.EVAL_ADD_SPECIAL_TOKENS``: a second
``<|begin_of_text|>`` from a Llama-3 tokenizer), and generation stopped by the tokenizer's
``eos_token_id`` alone (``<|eot_id|>`` in Saiga's tokenizer), the task yaml's ``until`` never
applied. One difference: when a tokenizer's eos is not ``<|eot_id|>``, generation stops on
``<|eot_id|>`` too, because the config's text eos ``<|end_of_text|>`` comes after it and an
answer running on past its turn would carry the next "assistant" header's text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.exceptions import UserError
from core.processor import (
    EVAL_ADD_SPECIAL_TOKENS,
    IMAGE_PLACEHOLDER,
    image_token_count,
    user_message,
)

log = logging.getLogger(__name__)

SAIGA_MODEL_ID = "deepvk/llava-saiga-8b"
EOT_TOKEN = "<|eot_id|>"


@dataclass
class LoadOptions:
    """How to put the base model in memory (set by the GPU profile)."""

    device: str = "cpu"
    """torch device for the model ("cpu", "cuda")."""
    dtype: str = "float32"
    """float32 | float16 | bfloat16: weights of everything not quantized."""
    load_in_4bit: bool = False
    """NF4 4-bit language model (bitsandbytes), vision tower and projector left unquantized."""
    attn_implementation: str = "sdpa"
    """sdpa | eager | flash_attention_2."""
    extra: dict[str, Any] = field(default_factory=dict)


class VLM:
    """A loaded LLaVA with its processor; adapters can be attached and switched in place."""

    def __init__(self, model, processor, source: str):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.source = source
        self.adapters: dict[str, str] = {}
        self.active_adapter: str | None = None
        self.tokenizer.padding_side = "left"
        ids = (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(EOT_TOKEN))
        self.stop_ids = list(dict.fromkeys(
            i for i in ids if i is not None and i != self.tokenizer.unk_token_id))
        self.n_image_tokens = image_token_count(processor)
        self.prefill_positions = 0
        """Token positions run through the model in prefill so far (padding included)."""

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ prompts

    def chat_prompt(self, text: str, *, with_image: bool = True) -> str:
        """The model's own chat template around one user turn, image part first."""
        return self.tokenizer.apply_chat_template(
            [user_message(text, with_image)], tokenize=False, add_generation_prompt=True)

    def _inputs(self, prompts: list[str], images: list) -> dict:
        out = self.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                             add_special_tokens=EVAL_ADD_SPECIAL_TOKENS)
        return {k: v.to(self.device) for k, v in out.items()}

    # ------------------------------------------------------------ generation

    def generate(self, texts: list[str], images: list, *, max_new_tokens: int = 16,
                 num_beams: int = 1, repetition_penalty: float = 1.0,
                 stop_strings: list[str] | None = None, prefix_cache: bool = False) -> list[str]:
        """Greedy (or beam) answers for a batch of user texts, one image each.

        With ``prefix_cache`` (greedy only), the prompt prefix each image's rows share is run
        once per image (``core.prefix``); the answers are the same.
        """
        import torch

        shared = None
        if prefix_cache and num_beams == 1:
            from core.prefix import generate_shared

            shared = generate_shared(self, texts, images, max_new_tokens=max_new_tokens,
                                     repetition_penalty=repetition_penalty)
        if shared is not None:
            answers, positions = shared
        else:
            prompts = [self.chat_prompt(t) for t in texts]
            inputs = self._inputs(prompts, images)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False,
                    num_beams=num_beams, repetition_penalty=repetition_penalty,
                    eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, inputs["input_ids"].shape[1]:]
            answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            positions = inputs["input_ids"].numel()
        self.prefill_positions += positions
        if stop_strings:
            answers = [_cut(a, stop_strings) for a in answers]
        return [a.strip() for a in answers]

    def option_logprobs(self, texts: list[str], images: list, options: list[list[str]], *,
                        prefix_cache: bool = False) -> list[list[float]]:
        """Mean log-probability per token of each option text as the assistant's answer.

        One forward pass over every (prompt, option) pair of the batch; options end with
        ``<|eot_id|>`` so that "синий" is not rewarded as a prefix of a longer answer. With
        ``prefix_cache``, each image's shared prompt prefix runs once (``core.prefix``).
        """
        import torch

        if prefix_cache:
            from core.prefix import option_logprobs_shared

            shared = option_logprobs_shared(self, texts, images, options)
            if shared is not None:
                self.prefill_positions += shared[1]
                return shared[0]

        full, pair_images, owners, cont_lens = option_pairs(self, texts, images, options)
        inputs = self._inputs(full, pair_images)
        self.prefill_positions += inputs["input_ids"].numel()
        # The LM head runs only at the option tokens, one row at a time: with a 128k vocabulary,
        # [rows, seq, vocab] logits would not fit (rows are left-padded, so options end last).
        base = self._base()
        ids = inputs["input_ids"]
        width = ids.shape[1]
        scores: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            hidden = base.model(**inputs).last_hidden_state
            for row, (owner, n) in enumerate(zip(owners, cont_lens)):
                scores[owner].append(mean_logprob(base.lm_head, hidden[row, width - 1 - n:width - 1],
                                                  ids[row, width - n:]))
        return scores

    def _base(self):
        """The LlavaForConditionalGeneration under any PEFT wrapper (adapters stay in effect)."""
        unwrap = getattr(self.model, "get_base_model", None)  # PeftModel
        return unwrap() if unwrap is not None else self.model

    # ------------------------------------------------------------ adapters

    def load_adapter(self, path: str | Path, name: str) -> None:
        """Attach a LoRA adapter saved in PEFT format, without reloading the base."""
        from peft import PeftModel

        path = str(path)
        if not (Path(path) / "adapter_config.json").exists():
            raise UserError(f"no PEFT adapter at '{path}' (adapter_config.json is missing)")
        if name in self.adapters:
            return
        _check_adapter_config(Path(path) / "adapter_config.json")
        try:
            if not self.adapters:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        except Exception as exc:  # truncated or foreign weights, shapes of another model
            raise UserError(f"cannot load the adapter at '{path}': {type(exc).__name__}: "
                            f"{str(exc)[:300]}. Is it a LoRA adapter trained on this base "
                            "model? Train it again or pick another one.") from None
        self.adapters[name] = path
        self.set_adapter(name)

    def set_adapter(self, name: str | None) -> None:
        """Switch to adapter ``name``, or to the bare base model with None."""
        if name is None:
            if self.adapters:
                self.model.base_model.disable_adapter_layers()
        else:
            if name not in self.adapters:
                raise UserError(f"unknown adapter '{name}'; loaded: {sorted(self.adapters)}")
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Unload adapter ``name`` (never the active one) to free its memory.

        PEFT cannot hold zero adapters, so the last one stays loaded (disabled while the base
        model is active). PEFT's own active adapter is moved off ``name`` before deleting it.
        """
        if name not in self.adapters or name == self.active_adapter:
            return
        remaining = [a for a in self.adapters if a != name]
        if not remaining:
            return
        self.model.set_adapter(self.active_adapter or remaining[0])
        self.model.delete_adapter(name)
        del self.adapters[name]
        self.set_adapter(self.active_adapter)


def option_pairs(vlm: VLM, texts: list[str], images: list, options: list[list[str]]):
    """The (prompt, option) pairs of a batch: ``(texts, images, owners, option_lengths)``.

    Each text is the chat prompt followed by the option and ``<|eot_id|>``; ``owners[k]`` is
    the question a pair belongs to and ``option_lengths[k]`` its option's token count.
    """
    full, pair_images, owners, conts = [], [], [], []
    for i, (text, opts) in enumerate(zip(texts, options)):
        prompt = vlm.chat_prompt(text)
        for opt in opts:
            full.append(prompt + opt + EOT_TOKEN)
            conts.append(opt + EOT_TOKEN)
            pair_images.append(images[i])
            owners.append(i)
    lengths = [len(ids) for ids in vlm.tokenizer(conts, add_special_tokens=False)["input_ids"]]
    return full, pair_images, owners, lengths


def mean_logprob(lm_head, hidden, target) -> float:
    """Mean log-probability of the ``target`` tokens under the hidden states predicting them."""
    import torch

    logp = torch.log_softmax(lm_head(hidden).float(), dim=-1)
    return float(logp.gather(-1, target[:, None]).mean())


def _cut(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def load_vlm(source: str | Path, *, options: LoadOptions | None = None,
             adapter: str | Path | None = None) -> VLM:
    """Load a LLaVA (hub id or local folder) and its processor; optionally attach an adapter."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from core.checkpoint import ensure_pad_token, fill_processor_fields

    options = options or LoadOptions()
    source = str(source)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, options.dtype),
                              "attn_implementation": options.attn_implementation,
                              "trust_remote_code": False, **options.extra}
    if options.load_in_4bit:
        kwargs["quantization_config"] = nf4_config(options.dtype)
        if options.device != "cpu":
            kwargs["device_map"] = {"": options.device}
    folder = Path(source)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"the model folder '{source}' has no tokenizer (none of "
                        f"{', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
                        "model into it, or point --model at the complete download.")
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=False)
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UserError(_not_found(source, exc)) from None
    except (ValueError, TypeError, KeyError) as exc:
        if not folder.is_dir():
            raise
        raise UserError(f"'{source}' is not a complete LLaVA model folder: "
                        f"{type(exc).__name__}: {str(exc)[:300]}") from None
    fill_processor_fields(processor, model.config)
    ensure_pad_token(processor.tokenizer, model.config)
    skip_ignored_bpe_cleanup(processor.tokenizer)
    if not options.load_in_4bit:
        model.to(options.device)
    model.eval()
    log.info("loaded %s (%s, %s%s) on %s", source, type(model).__name__, options.dtype,
             ", 4-bit NF4" if options.load_in_4bit else "", options.device)
    vlm = VLM(model, processor, source)
    if adapter is not None:
        vlm.load_adapter(adapter, "adapter")
    return vlm


def skip_ignored_bpe_cleanup(tokenizer) -> None:
    """Turn off ``clean_up_tokenization_spaces`` where transformers ignores it anyway.

    Llama-3's tokenizer files (LLaVA-Saiga-8B's, and saiga-tiny's, saved the same way) set it,
    but the cleanup (deleting the space before punctuation) is meant for WordPiece, and
    transformers skips it for a BPE tokenizer, logging "Ignoring
    clean_up_tokenization_spaces=True ... destructive for BPE" on the first decode of every
    command. Turning it off there decodes exactly the same text, without the warning.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (getattr(tokenizer, "clean_up_tokenization_spaces", False) and backend is not None
            and type(backend.model).__name__ == "BPE" and not getattr(
                tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                False)):
        tokenizer.clean_up_tokenization_spaces = False


def nf4_config(compute_dtype: str):
    """4-bit NF4 with double quantization; vision tower, projector and lm_head stay unquantized.

    transformers 5 matches skip names from the start of the full module path (or as a suffix),
    so the nested ``model.vision_tower`` needs the ``.*`` patterns; the plain names are what
    transformers 4 matched as substrings.
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        llm_int8_skip_modules=[".*vision_tower", ".*multi_modal_projector", "lm_head",
                               "vision_tower", "multi_modal_projector"])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _check_adapter_config(path: Path) -> None:
    """A clear error for an adapter_config.json that is not a PEFT LoRA config."""
    import json

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): the adapter folder is damaged; "
                        "train the adapter again or pick another one.") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{path}: field 'peft_type' is missing: not a PEFT adapter config; "
                        "train the adapter again or pick another one.")


def _not_found(source: str, exc: Exception) -> str:
    if Path(source).exists():
        return f"'{source}' is not a LLaVA model folder ({exc})."
    return (f"cannot load the model '{source}': it is not a local folder and the hub is not "
            f"reachable from here. Download it where there is network "
            f"(`huggingface-cli download {source} --local-dir DIR`) and pass `--model DIR`.")


def blank_image(vlm: VLM):
    """The stand-in for an absent or unreadable image (mid-grey, the processor's size)."""
    from PIL import Image

    from core.processor import _image_size

    size = _image_size(vlm.processor)
    return Image.new("RGB", (size, size), (128, 128, 128))


__all__ = ["VLM", "LoadOptions", "load_vlm", "nf4_config", "blank_image", "SAIGA_MODEL_ID",
           "IMAGE_PLACEHOLDER"]
