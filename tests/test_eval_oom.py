"""Evaluation survives CUDA out-of-memory: the batch is halved and the batch retried."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from core.evaluate import EvalConfig, evaluate


class _Tight:
    """A VLM stand-in that runs out of CUDA memory above ``limit`` questions per batch."""

    def __init__(self, vlm, limit: int):
        self.vlm, self.limit, self.batches = vlm, limit, []

    def __getattr__(self, name):
        return getattr(self.vlm, name)

    def _check(self, texts):
        import torch

        self.batches.append(len(texts))
        if len(texts) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB")

    def generate(self, texts, images, **kwargs):
        self._check(texts)
        return self.vlm.generate(texts, images, **kwargs)

    def option_logprobs(self, texts, images, options, **kwargs):
        self._check(texts)
        return self.vlm.option_logprobs(texts, images, options, **kwargs)


def _examples(benchmark: str, n: int) -> list[dict]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (48, 48), ["red", "blue", "green"][i % 3])
        common = {"benchmark": benchmark, "id": str(i), "question": "Какого цвета фигура?",
                  "_image": lambda img=img: img}
        if benchmark == "gqa_ru":
            out.append({**common, "imageId": f"i{i}", "answer": "красный",
                        "types": {"structural": "query", "semantic": "attr", "detailed": "color"}})
        else:
            out.append({**common, "index": i, "hint": None, "answer": "A", "category": "color",
                        "options": {"A": "красный", "B": "синий", "C": "зелёный"}})
    return out


@pytest.mark.parametrize(("benchmark", "mode"), [("gqa_ru", "generate"),
                                                 ("mmbench_ru", "likelihood")])
def test_oom_halves_the_batch_and_keeps_every_answer(tiny_vlm, caplog, benchmark, mode):
    examples = _examples(benchmark, 7)
    config = EvalConfig(mode=mode)
    tight = _Tight(tiny_vlm, limit=2)
    with caplog.at_level(logging.WARNING, logger="core.evaluate"):
        result = evaluate(tight, examples, config, batch_size=8, progress=False)
    roomy = evaluate(tiny_vlm, examples, config, batch_size=8, progress=False)
    assert tight.batches[:3] == [7, 4, 2] and max(tight.batches[3:]) <= 2
    assert [s["output"] for s in result.samples] == [s["output"] for s in roomy.samples]
    assert result.n == roomy.n
    assert "out of memory" in caplog.text and "retrying with batch 2" in caplog.text


def test_oom_at_batch_one_is_raised(tiny_vlm):
    import torch

    with pytest.raises(torch.cuda.OutOfMemoryError):
        evaluate(_Tight(tiny_vlm, limit=0), _examples("gqa_ru", 2), batch_size=1,
                 progress=False)


def test_other_errors_are_not_retried(tiny_vlm):
    class Broken(_Tight):
        def generate(self, texts, images, **kwargs):
            self.batches.append(len(texts))
            raise ValueError("bad input")

    broken = Broken(tiny_vlm, limit=8)
    with pytest.raises(ValueError, match="bad input"):
        evaluate(broken, _examples("gqa_ru", 4), batch_size=4, progress=False)
    assert broken.batches == [4]
