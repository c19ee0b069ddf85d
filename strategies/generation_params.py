"""Remedy ``generation_params``: decoding settings and the MMBench-ru likelihood protocol.

No training. Each proposal changes the decoding of one benchmark on top of the champion's
settings: shorter answers cut at a stop string, beams, a repetition penalty, or, for
MMBench-ru, ranking the option texts by likelihood (``mode="likelihood"``), which needs no
letter parsing at all. The order follows the error profile: a variant that fixes the answer's
form scores the share of format mismatches among the benchmark's errors times how much of
them it can fix (the likelihood mode all of them, by construction; a cut answer most), a
variant that may help the content half the remaining share. So a verbose GQA-ru goes to a
short, stopped answer first and an unparseable MMBench-ru to the likelihood mode first, and
when both are equally broken the likelihood mode comes first.
"""

from __future__ import annotations

from strategies.base import Candidate, Context, Strategy
from strategies.common import Variant, first_untried, propose_next_variant, share

LIKELIHOOD_COST_FACTOR = 0.5
"""Likelihood ranking: one forward pass per option, no token-by-token decoding."""

# (variant, share of the format mismatches it can fix; None: it targets the content)
GQA_VARIANTS: list[tuple[Variant, float | None]] = [
    (Variant("gqa_ru", "short_stop_period", {"max_new_tokens": 8, "stop_strings": ["\n", "."]},
             "at most 8 new tokens, cut at the first newline or period"), 0.8),
    (Variant("gqa_ru", "very_short", {"max_new_tokens": 4, "stop_strings": ["\n", ".", ","]},
             "at most 4 new tokens, cut at a newline, period or comma"), 0.7),
    (Variant("gqa_ru", "stop_newline", {"stop_strings": ["\n"]},
             "cut the answer at the first newline"), 0.4),
    (Variant("gqa_ru", "beams3", {"num_beams": 3}, "beam search with 3 beams"), None),
    (Variant("gqa_ru", "repetition_penalty", {"repetition_penalty": 1.2},
             "repetition penalty 1.2"), None),
]
MMB_VARIANTS: list[tuple[Variant, float | None]] = [
    (Variant("mmbench_ru", "likelihood", {"mode": "likelihood", "instruction": None},
             "rank the option texts by length-normalised likelihood (its own protocol)"), 1.0),
    (Variant("mmbench_ru", "letter_short", {"max_new_tokens": 8, "stop_strings": ["\n"]},
             "at most 8 new tokens, cut at the first newline"), 0.4),
    (Variant("mmbench_ru", "beams3", {"num_beams": 3}, "beam search with 3 beams"), None),
    (Variant("mmbench_ru", "repetition_penalty", {"repetition_penalty": 1.2},
             "repetition penalty 1.2"), None),
]


class GenerationParams(Strategy):
    """Decoding variants ordered by what the error profile says is wrong."""

    name = "generation_params"
    addresses = {"format_mismatch": 0.5}
    family = "decoding"
    trains = False
    summary = "max new tokens, stop strings, beams, repetition penalty, MMBench likelihood mode"

    def variants(self, ctx: Context) -> list[Variant]:
        """Every applicable variant, highest score first (see the module docstring)."""
        scored = []
        table = [*GQA_VARIANTS, *MMB_VARIANTS]
        for order, (variant, fixes) in enumerate(table):
            mode = ctx.champion.eval_configs[variant.benchmark].mode
            if mode == "likelihood":
                continue  # nothing is generated: decoding settings change nothing
            fmt = share(ctx, variant.benchmark, "format_mismatch")
            score = 0.5 * (1.0 - fmt) if fixes is None else fixes * fmt
            scored.append((-score, order, variant))
        return [v for _, _, v in sorted(scored, key=lambda s: (s[0], s[1]))]

    def propose(self, ctx: Context) -> Candidate:
        return propose_next_variant(ctx, self.name, self.variants(ctx), "decoding variant")

    def estimate_cost(self, ctx: Context) -> float:
        """One dev evaluation of the benchmark the next variant changes (the other's results
        are the champion's, reused), scaled for beams or the likelihood mode."""
        found = first_untried(ctx, self.variants(ctx))
        if found is None:
            return self.eval_cost(ctx)
        variant, config = found
        factor = LIKELIHOOD_COST_FACTOR if config.mode == "likelihood" else config.num_beams
        b = variant.benchmark
        return float(factor * ctx.rates.eval_s_per_sample[b] * ctx.dev_sizes[b])

