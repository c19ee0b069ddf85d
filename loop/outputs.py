"""``--output_path``: a command's evaluations written as lmms-eval 0.7.2 writes its files.

``loop eval`` writes its one evaluation; ``loop run`` writes the final evaluations of the run
(the base and the champion, and the champion with its own settings when it carries some),
each role in its own folder: ``OUTPUT_PATH/<role>/<model_name_sanitized>/``. The dev
evaluations of the cycles stay in the database. The shapes are in ``core.outputs``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

from core.metrics import ROTATION_BASE, gqa_match
from core.outputs import TaskOutput, write_outputs

log = logging.getLogger(__name__)

FINAL_ROLES = ("final_baseline", "final_champion", "final_deployed")


def version() -> str | None:
    try:
        return importlib.metadata.version("llava-ru-loop")
    except importlib.metadata.PackageNotFoundError:
        return None


def harness_config(model: dict, *, batch_size: int | None, device: str | None,
                   limit: int | None, seed: int) -> dict:
    """The results file's ``config``, with the keys lmms-eval's evaluator fills."""
    args = f"pretrained={model['source']}"
    if model.get("adapter"):
        args += f",peft={model['adapter']}"
    return {"model": "loop", "model_args": args, "model_backend": "core.model.VLM (generate)",
            "batch_size": batch_size, "batch_sizes": [], "device": device, "use_cache": None,
            "limit": limit, "offset": 0, "bootstrap_iters": 2000, "gen_kwargs": None,
            "random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": seed}


def write_eval(args, examples: list[dict], result, model: dict, eval_id: int,
               device: str | None) -> dict[str, Path]:
    """``loop eval --output_path``: the evaluation just made and recorded as ``eval_id``."""
    from loop.environment import git_commit

    task = TaskOutput(benchmark=args.benchmark, split=args.split, protocol=result.protocol,
                      config=result.config, metrics=result.metrics, samples=result.samples,
                      examples=examples, n_original=getattr(args, "split_size", None),
                      seconds=result.seconds)
    config = harness_config(model, batch_size=args.batch_size, device=device, limit=args.limit,
                            seed=args.seed)
    files = write_outputs(args.output_path, [task], model=model, config=config,
                          version=version(), git_hash=git_commit(),
                          extra={"eval_id": eval_id, "db": str(args.db)})
    log.info("results and samples written under %s", files["results"].parent)
    return files


def samples_from_store(benchmark: str, predictions: list[dict],
                       by_id: dict[str, dict] | None) -> tuple[list[dict], list[dict | None]]:
    """Stored predictions as ``core.evaluate`` per-sample records, and their examples."""
    samples, examples = [], []
    for p in predictions:
        ex = (by_id or {}).get(p["sample_id"])
        s = {**p, "correct": bool(p["correct"]), "image_ok": bool(p["image_ok"])}
        s.pop("id", None)
        s.pop("eval_id", None)
        if benchmark == "gqa_ru":
            s["correct_normalized"] = gqa_match(p["output"] or "", p["answer"], mode="normalized")
            s["category"] = ((ex or {}).get("types") or {}).get("detailed")
        else:
            s["index"] = int(p["sample_id"])
            s["cluster"] = s["index"] % ROTATION_BASE
            s["category"] = (ex or {}).get("category")
            if ex is not None:
                s["n_options"] = len(ex["options"])
        samples.append(s)
        examples.append(ex)
    return samples, examples


def write_run(store, run_id: int, output_path: str | Path,
              by_id: dict[str, dict[str, dict]] | None = None) -> list[Path]:
    """``loop run --output_path``: the run's final evaluations, one results file per role.

    ``by_id`` (benchmark -> example id -> example) adds what the database does not keep:
    categories, MMBench-ru options.
    """
    run = store.get_run(run_id)
    env = run.get("environment") or {}
    cfg = run.get("config") or {}
    written = []
    for role in FINAL_ROLES:
        evals = store.evaluations(run_id, role=role)
        if not evals:
            continue
        cand = evals[0].get("candidate") or {}
        model = {"source": env.get("model_source") or cfg.get("model") or run.get("preset"),
                 "adapter": cand.get("adapter_path"), "strategy": cand.get("strategy")}
        tasks = []
        for ev in evals:
            b = ev["benchmark"]
            samples, examples = samples_from_store(b, store.predictions(ev["id"]),
                                                   (by_id or {}).get(b))
            tasks.append(TaskOutput(
                benchmark=b, split=ev["split"], protocol=ev["protocol"],
                config=(cand.get("eval_configs") or {}).get(b, {"mode": "generate"}),
                metrics=ev["metrics"], samples=samples,
                examples=examples if all(e is not None for e in examples) else [],
                n_original=((env.get("sizes") or {}).get(b) or {}).get("final"),
                seconds=ev["seconds"] or 0.0))
        profile = env.get("profile") or {}
        config = harness_config(model, batch_size=cfg.get("batch_size") or profile.get("eval_batch_size"),
                                device=profile.get("name"),
                                limit=cfg.get("final_size"), seed=cfg.get("seed", 0))
        files = write_outputs(Path(output_path) / role, tasks, model=model, config=config,
                              version=version(), git_hash=env.get("git_commit"), extra={
                                  "run_id": run_id, "role": role, "db": str(store.path),
                                  "eval_ids": {ev["benchmark"]: ev["id"] for ev in evals}})
        written.append(files["results"])
    return written
