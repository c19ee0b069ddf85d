# ruff: noqa
"""What lmms-eval's ``llava_hf`` feeds a LLaVA model and how it stops: the reference the
saiga-tiny tests compare ``core.model.VLM`` against.

Source: EvolvingLMMs-Lab/lmms-eval at commit 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3
(lmms-eval 0.7.2), ``lmms_eval/models/simple/llava_hf.py``, ``LlavaHf.generate_until``
(``chat/llava_hf.py`` calls the processor and ``generate`` the same way). Copyright (c) 2025
LMMs-Lab, Apache License 2.0 (http://www.apache.org/licenses/LICENSE-2.0).

The statements marked "verbatim" are copied unchanged from ``generate_until`` (``self.``
replaced by the arguments, the accelerator, batching and video branches left out); the rest
is glue. Facts it relies on, from the same file: ``eot_token_id`` is
``self.tokenizer.eos_token_id``; ``until`` is popped from the task's ``gen_kwargs`` and never
used; ``batch_size_per_gpu`` must be 1 (one question at a time, no padding); the task's
``temperature: 0`` means ``do_sample=False`` and ``top_p: 1.0`` is passed through.
Test-only: nothing outside ``tests/`` imports it.
"""

DEFAULT_IMAGE_TOKEN = "<image>"


def llava_hf_inputs(tokenizer, image_processor, context, visuals):
    task_type = "image"
    # verbatim from here
    if DEFAULT_IMAGE_TOKEN not in context:
        if task_type == "image":
            image_tokens = " ".join([DEFAULT_IMAGE_TOKEN] * len(visuals))
            context = f"{image_tokens}\n{context}"
    # Apply chat template
    messages = [{"role": "user", "content": context}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = image_processor(images=visuals, text=text, return_tensors="pt")
    # verbatim up to here
    return inputs


def llava_hf_generate(model, tokenizer, image_processor, context, visuals, max_new_tokens):
    """One question's answer as ``generate_until`` returns it (before the task strips it)."""
    import torch

    inputs = llava_hf_inputs(tokenizer, image_processor, context, visuals).to(model.device)
    eot_token_id = tokenizer.eos_token_id
    with torch.inference_mode():
        # verbatim from here, with the task's generation_kwargs filled in
        cont = model.generate(
            **inputs,
            do_sample=False,
            temperature=None,
            top_p=1.0,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            pad_token_id=eot_token_id,
            eos_token_id=eot_token_id,
        )
        cont = cont[:, inputs["input_ids"].shape[-1] :]
    text_outputs = tokenizer.batch_decode(cont, skip_special_tokens=True)[0]
    # verbatim up to here
    return text_outputs, cont[0].tolist()
