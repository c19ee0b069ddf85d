"""Which questions play which role for a candidate.

- The **analysis** subset (the run's ``tune`` subset: dev-split units kept out of the dev
  subset, ``Workbench.load_data``) shapes candidates: the champion is evaluated on it once per
  champion, and its error profile and answer styles (``Context.profiles``) come from there;
  a setting-only candidate under ``--objective benchmark``, which cannot win and only feeds
  context distillation, is measured there too, so the setting a distillation carries is chosen
  without the questions that judge the distilled adapter; HPO trials score on it.
- The **dev** subset judges: every candidate that can win is evaluated on it in chunks of
  whole units with futility stopping (``loop.futility``), and paired-tested against the
  champion's dev answers at its α_k (``loop.decision``).
"""

from __future__ import annotations

from core.evaluate import EvalResult, summarize
from loop.decision import futile, levels
from loop.futility import ChunkedEval, chunks, run_chunks
from loop.workbench import Scored, Workbench
from strategies.base import BENCHMARKS, Candidate


def same_setting(candidate: Candidate, adapter_path: str | None, config: dict, b: str) -> bool:
    return (candidate.adapter_path == adapter_path
            and candidate.eval_configs[b].to_dict() == config)


def on_dev(bench: Workbench, candidate: Candidate, scores: dict[str, Scored], *, alpha: float,
           k_done: int) -> tuple[dict[str, Scored], str | None]:
    """The candidate on the dev subsets (the champion's results where nothing changed for a
    benchmark), chunk by chunk, stopped for futility when no completion could be accepted.

    Returns:
        (benchmark -> ``Scored``, each new one with its ``progress``; the reason it stopped or
        None when it ran to the end).
    """
    changed = [b for b in BENCHMARKS
               if not same_setting(candidate, scores[b].adapter_path, scores[b].config, b)]
    at = {b: level for b, (_, level) in levels(changed, alpha=alpha, k_done=k_done).items()}
    evals = {b: ChunkedEval(b, chunks(b, bench.dev[b], seed=bench.seed,
                                      min_questions=bench.batch_size), scores[b].samples)
             for b in changed}
    stopped = run_chunks(
        evals, lambda b, examples: bench.run_eval(b, candidate.eval_configs[b],
                                                  candidate.adapter_path, examples),
        lambda bounds: futile(bounds, at, alpha))
    results = {b: scores[b] for b in BENCHMARKS if b not in changed}
    for b, e in evals.items():
        order = {ex["id"]: i for i, ex in enumerate(bench.dev[b])}
        samples = sorted(e.samples, key=lambda s: order[s["sample_id"]])
        config = candidate.eval_configs[b].to_dict()
        metrics = summarize(b, samples)
        results[b] = Scored(b, samples, metrics, -1, config, candidate.adapter_path,
                            result=EvalResult(b, e.protocol, config, metrics, samples, e.seconds),
                            progress=e.progress(stopped, at[b]))
    return {b: results[b] for b in BENCHMARKS}, stopped


def on_analysis(bench: Workbench, candidate: Candidate,
                reference: dict[str, Scored] | None = None) -> dict[str, Scored]:
    """The candidate on the analysis subsets, in full; ``reference``'s results where its
    adapter and settings are the candidate's."""
    results = {}
    for b in BENCHMARKS:
        ref = (reference or {}).get(b)
        if ref is not None and same_setting(candidate, ref.adapter_path, ref.config, b):
            results[b] = ref
            continue
        r = bench.run_eval(b, candidate.eval_configs[b], candidate.adapter_path, bench.tune[b])
        results[b] = Scored(b, r.samples, r.metrics, -1, candidate.eval_configs[b].to_dict(),
                            candidate.adapter_path, result=r)
    return results


def champion_analysis(bench: Workbench, champion: Candidate, since: int,
                      previous: dict[str, Scored] | None) -> dict[str, Scored]:
    """The champion's evaluation on the analysis subsets, done once per champion (step
    ``analysis-<cycle it won, 0 for the base>``, recorded with role ``analysis``) and read back
    on resume; ``previous`` (the former champion's) is reused where nothing changed."""
    store, key = bench.store, f"analysis-{since}"
    done = store.step(bench.run_id, key)
    if done is None:
        store.begin_step(bench.run_id, key, "analysis")
        results = on_analysis(bench, champion, previous)
        with store.transaction():
            ids = {b: s.eval_id if s.eval_id != -1 else bench.record(
                champion, b, s.result, role="analysis", cycle_index=since or None,
                split="analysis") for b, s in results.items()}
            store.finish_step(bench.run_id, key, {"eval_ids": ids})
            store.update_run(bench.run_id, spent_s=bench.budget.spent())
        done = {"eval_ids": ids}
    return {b: bench.load_scored(i) for b, i in done["eval_ids"].items()}


def roles(profile: dict[str, Scored], judged: dict[str, Scored], subset: str,
          reference: dict[str, Scored]) -> dict:
    """What ``loop show`` prints about a cycle's subsets: the evaluations the error profile
    came from, the ones that judged (or measured) the candidate and the champion's ones it was
    compared with, with their n (questions) and units (images, question groups)."""
    def side(s: Scored, name: str) -> dict:
        out = {"subset": name, "eval_id": s.eval_id, "n": len(s.samples),
               "units": len({str(x.get("cluster")) for x in s.samples})}
        if s.progress:
            out["progress"] = s.progress
        return out

    return {"profile": {b: side(s, "analysis") for b, s in profile.items()},
            "judged": {b: {**side(s, subset), "champion_eval_id": reference[b].eval_id}
                       for b, s in judged.items() if b in reference}}
