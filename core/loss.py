"""The training loss, computed only where there are labels."""

from __future__ import annotations

from core.processor import IGNORE_INDEX


def labelled_loss(model, inputs: dict):
    """Mean next-token cross-entropy over the labelled positions (the answers), in fp32.

    The LM head is applied only where a label follows (``logits_to_keep`` as a boolean mask):
    [labelled tokens × vocabulary] logits instead of [batch × sequence × vocabulary], which with
    a 128k vocabulary and 576 image tokens per question is most of a step's activation memory.
    Equal to the model's own ``labels=`` loss (same shift, same -100 positions ignored).
    """
    import torch

    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    out = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep)
    return torch.nn.functional.cross_entropy(out.logits.float(),
                                             targets[targets != IGNORE_INDEX])
