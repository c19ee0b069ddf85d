"""Recognising out-of-memory errors and freeing memory before a smaller retry."""

from __future__ import annotations

import gc


def is_oom(exc: BaseException) -> bool:
    """True for torch's (CUDA) out-of-memory error and the RuntimeErrors older torch raised."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError)
                                    and "out of memory" in str(exc).lower())


def free_memory(device) -> None:
    """Collect garbage and return cached CUDA blocks, so that a retry starts clean."""
    import torch

    gc.collect()
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.empty_cache()
