"""Remedy ``prompt_constraints``: stricter answer-format instructions, scored without training.

The seed model answers GQA-ru with whole sentences and MMBench-ru with explanations in which
no letter can be found. A stricter instruction is the cheapest fix: it costs one dev
evaluation. Each proposal changes the prompt of one benchmark, the one whose errors are most
often format mismatches, to the next phrasing this run has not evaluated with the current
champion (its adapter and its other settings); the other benchmark keeps the champion's.
"""

from __future__ import annotations

from core.evaluate import MMB_OPTION_HEADER
from strategies.base import Candidate, Context, Strategy
from strategies.common import Variant, by_format_share, first_untried, propose_next_variant

GQA_INSTRUCTIONS = {
    "one_word_no_explanation": "Ответь одним словом, без пояснений.",
    "one_word_not_sentence": "Ответ — одно слово. Не пиши предложение.",
    "word_or_number": "Ответь одним словом или числом. Не повторяй вопрос.",
    "base_form_no_period": "Дай короткий ответ: одно слово в начальной форме, без точки.",
}
MMB_HEADERS = {"ru_header": " Варианты ответа:", "lmms_header": MMB_OPTION_HEADER}
MMB_INSTRUCTIONS = {
    "only_letter": "Ответь только буквой варианта (A, B, C или D).",
    "letter_no_explanation": "Ответь одной буквой правильного варианта, без пояснений.",
    "letter_nothing_else": "Ответ — одна буква: A, B, C или D. Больше ничего не пиши.",
    "lmms_instruction": None,
}


def gqa_variants() -> list[Variant]:
    return [Variant("gqa_ru", name, {"instruction": text}, f"instruction «{text}»")
            for name, text in GQA_INSTRUCTIONS.items()]


def mmbench_variants() -> list[Variant]:
    """Every header x instruction pair but lmms-eval's own, the all-Russian header first."""
    out = []
    for h_name, header in MMB_HEADERS.items():
        for i_name, text in MMB_INSTRUCTIONS.items():
            if header == MMB_OPTION_HEADER and text is None:
                continue
            shown = "lmms-eval instruction" if text is None else f"«{text}»"
            out.append(Variant("mmbench_ru", f"{h_name}+{i_name}",
                               {"option_header": header, "instruction": text},
                               f"option header «{header.strip()}», {shown}"))
    return out


class PromptConstraints(Strategy):
    """Alternative instructions per benchmark, most format-broken benchmark first."""

    name = "prompt_constraints"
    addresses = {"format_mismatch": 0.5}
    family = "prompt"
    trains = False
    summary = "stricter answer-format instructions (one word; only the option letter)"

    def variants(self, ctx: Context) -> list[Variant]:
        """Every variant, in the order they are proposed on this profile."""
        by_benchmark = {"gqa_ru": gqa_variants(), "mmbench_ru": mmbench_variants()}
        if ctx.champion.eval_configs["mmbench_ru"].mode == "likelihood":
            # the likelihood protocol scores option texts: a letter instruction makes no sense
            by_benchmark["mmbench_ru"] = []
        return [v for b in by_format_share(ctx) for v in by_benchmark[b]]

    def propose(self, ctx: Context) -> Candidate:
        return propose_next_variant(ctx, self.name, self.variants(ctx), "instruction")

    def estimate_cost(self, ctx: Context) -> float:
        """No training: one dev evaluation of the benchmark whose prompt changes (the other
        benchmark's results are the champion's, reused)."""
        found = first_untried(ctx, self.variants(ctx))
        if found is None:
            return self.eval_cost(ctx)
        b = found[0].benchmark
        return ctx.rates.eval_s_per_sample[b] * ctx.dev_sizes[b]
