"""``python -m loop eval``: evaluate the base model or an adapter on one benchmark."""

from __future__ import annotations

import argparse
import logging

from loop.commands._common import (
    BENCHMARKS,
    GPU_PROFILES,
    add_db_arg,
    add_json_arg,
    add_output_path_arg,
    add_source_args,
    format_table,
    print_json,
)
from loop.config_file import add_config_arg

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on GQA-ru or MMBench-ru (dev or final split)",
                       description="Evaluate the base model, or the base with a LoRA adapter, "
                       "on a fixed split, scored as lmms-eval scores it, with n and 95% intervals.")
    add_eval_args(p, benchmark_required=True)
    p.add_argument("--show", type=int, default=0, metavar="K",
                   help="also print K example answers")
    p.add_argument("--samples", action="store_true",
                   help="with --json, also print every per-sample output (prompt, output, "
                   "parsed answer, correct), as recorded in --db")
    add_output_path_arg(p)
    add_json_arg(p)
    add_config_arg(p)
    p.set_defaults(func=run)


def add_eval_args(p, *, benchmark_required: bool) -> None:
    """What to evaluate and how: shared by ``eval`` and ``diagnose``."""
    p.add_argument("--benchmark", required=benchmark_required, choices=BENCHMARKS,
                   help="the benchmark to evaluate on")
    p.add_argument("--adapter", metavar="ID|PATH",
                   help="a LoRA adapter: its id in the database or a PEFT folder")
    p.add_argument("--split", choices=("dev", "final", "all"), default="dev",
                   help="dev (decisions), final (held out), all (the whole benchmark)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="a fixed stratified subset of about N questions of the split")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="questions answered per batch (default 16)")
    p.add_argument("--mode", choices=("generate", "likelihood"), default="generate",
                   help="MMBench-ru only: likelihood ranks the option texts (its own protocol)")
    p.add_argument("--gpu", choices=GPU_PROFILES, default="auto", help="GPU profile (default auto)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every question's whole prompt, image included (for comparison "
                   "and as a fallback; the answers are the same)")
    add_source_args(p)
    add_db_arg(p)


def check_eval_args(args: argparse.Namespace) -> None:
    from core.exceptions import UserError

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive number of questions, but got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, but got {args.batch_size}")
    if args.mode == "likelihood" and args.benchmark == "gqa_ru":
        raise UserError("--mode likelihood applies to --benchmark mmbench_ru only")


def evaluate_from_args(args: argparse.Namespace):
    """Load the data split and the model the flags name, evaluate; (examples, result, sources)."""
    examples, result, sources, _ = evaluate_model_from_args(args)
    return examples, result, sources


def evaluate_model_from_args(args: argparse.Namespace):
    """:func:`evaluate_from_args`, and the loaded VLM too."""
    from core import distributed
    from core.data import load_benchmark
    from core.evaluate import EvalConfig
    from core.splits import make_splits, stratified_subset
    from loop.runtime import load_model_for
    from loop.sources import sources_from_args

    sources = sources_from_args(args)
    examples = load_benchmark(args.benchmark, sources.data)
    if args.split != "all":
        examples = make_splits(examples, seed=args.seed)[args.split]
        if not examples:
            from core.exceptions import UserError

            where = sources.data.gqa if args.benchmark == "gqa_ru" else sources.data.mmbench
            raise UserError(f"the {args.split} split of {args.benchmark} at {where} comes out "
                            "empty: the data are too few to split. Use --split all, or point "
                            "--data-dir at the full dataset.")
    args.split_size = len(examples)
    if args.limit:
        examples = stratified_subset(examples, args.limit, seed=args.seed)
    args.adapter_path = _adapter_path(args)
    vlm = load_model_for(sources.model, args.gpu, adapter=args.adapter_path)
    # Under torchrun / accelerate launch (after distributed.setup) each process answers a
    # shard and every process gets the gathered result; otherwise this is core.evaluate.
    result = distributed.evaluate(vlm, examples, EvalConfig(mode=args.mode),
                                  batch_size=args.batch_size, prefix_cache=args.prefix_cache,
                                  progress=not args.quiet and not args.json)
    return examples, result, sources, vlm


def run(args: argparse.Namespace) -> int:
    from core import distributed
    from core.exceptions import UserError

    check_eval_args(args)
    if args.samples and not args.json:
        raise UserError("`--samples` adds every per-sample output to the JSON: add `--json`")
    examples, result, sources, vlm = evaluate_model_from_args(args)
    w = distributed.world()
    if not w.is_main:  # under torchrun, rank 0 records and prints the gathered evaluation
        return 0
    model = describe_model(vlm, args.adapter_path)
    eval_id = record(args, result, model, processes=w.world_size)
    out = {"benchmark": args.benchmark, "split": args.split, "model": sources.model,
           "adapter": args.adapter, "model_info": model, "eval_id": eval_id, "db": args.db,
           "processes": w.world_size, **result.to_dict(with_samples=args.samples)}
    if args.output_path:
        from loop.outputs import write_eval

        files = write_eval(args, examples, result, model, eval_id, str(vlm.device))
        out["output_files"] = {k: str(v) for k, v in files.items()}
    if args.json:
        print_json(out)
    else:
        print(render(out))
        for s in result.samples[: args.show]:
            mark = "+" if s["correct"] else "-"
            print(f"{mark} {s['question']} | gold: {s['answer']} | model: {s['output']!r}")
        for path in out.get("output_files", {}).values():
            print(f"wrote {path}")
    return 0


def describe_model(vlm, adapter_path: str | None) -> dict:
    """What was evaluated: the source, the vocabulary, image tokens per image, the adapter."""
    text = getattr(vlm.model.config, "text_config", vlm.model.config)
    return {"source": str(vlm.source), "vocab_size": getattr(text, "vocab_size", None),
            "tokenizer_size": len(vlm.tokenizer), "image_tokens": vlm.n_image_tokens,
            "adapter": adapter_path}


def record(args: argparse.Namespace, result, model: dict, processes: int = 1) -> int:
    """Store the evaluation and every per-sample output in ``--db`` (role "manual")."""
    from loop.config_file import resolved_options
    from loop.store import Store

    adapter_id = int(args.adapter) if args.adapter and args.adapter.isdigit() else None
    with Store(args.db) as store:
        eval_id = store.add_evaluation(
            run_id=None, cycle_index=None, role="manual", benchmark=args.benchmark,
            split=args.split, protocol=result.protocol, metrics=result.metrics, n=result.n,
            seconds=result.seconds, adapter_id=adapter_id,
            candidate={"strategy": "manual", "model": model, "limit": args.limit,
                       "seed": args.seed, "eval_configs": {args.benchmark: result.config},
                       "adapter_path": model["adapter"], "options": resolved_options(args),
                       "processes": processes})
        store.add_predictions(eval_id, result.samples)
    log.info("evaluation %d and its %d predictions recorded in %s", eval_id, len(result.samples),
             args.db)
    return eval_id


def _adapter_path(args) -> str | None:
    if args.adapter is None or not args.adapter.isdigit():
        return args.adapter
    from core import distributed
    from loop.store import Store

    if distributed.active():  # only rank 0 opens the database; the others are told the path
        path = None
        if distributed.world().is_main:
            with Store.open_existing(args.db) as store:
                path = store.adapter(int(args.adapter))["path"]
        return distributed.broadcast(path)
    with Store.open_existing(args.db) as store:
        return store.adapter(int(args.adapter))["path"]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def ci(pair) -> str:
    return f"[{pct(pair[0])}, {pct(pair[1])}]"


def render(out: dict) -> str:
    """The result as a table for people."""
    head = [["benchmark", out["benchmark"]], ["split", out["split"]],
            ["protocol", out["protocol"]], ["model", out["model"]]]
    if out.get("adapter"):
        head.append(["adapter", out["adapter"]])
    rows = []
    if out["benchmark"] == "gqa_ru":
        rows.append(["exact match (lmms)", pct(out["accuracy"]), ci(out["ci"]), out["n"]])
        rows.append(["exact match (normalized)", pct(out["accuracy_normalized"]),
                     ci(out["ci_normalized"]), out["n"]])
        cats = [[c, pct(v["accuracy"]), "", v["n"]] for c, v in out["per_category"].items()]
    else:
        rows.append(["circular accuracy", pct(out["accuracy"]), ci(out["ci"]), out["n"]])
        rows.append(["per-row accuracy", pct(out["per_row"]), ci(out["ci_per_row"]), out["n_rows"]])
        if out.get("accuracy_lenient") is not None:
            rows.append(["circular, lenient reading (not lmms-eval's)",
                         pct(out["accuracy_lenient"]), "", out["n"]])
        cats = [[c, pct(v["circular"]), f"per row {pct(v['per_row'])}", v["n_groups"]]
                for c, v in out["per_category"].items()]
    lines = [format_table(["", ""], head).split("\n", 2)[-1], "",
             format_table(["metric", "%", "95% CI", "n"], rows), "",
             format_table(["category", "%", "", "n"], cats), "",
             f"{out['samples_per_s']} samples/s, {out['prefill_tokens_per_sample']} prefill "
             f"tokens/question, {out['seconds']:.1f} s; images missing: "
             f"{out['images_missing']}"]
    if out["benchmark"] == "mmbench_ru":
        lines.append(f"answers lmms-eval's rule cannot read (counted wrong; lmms-eval asks a "
                     f"GPT judge): {out['unparseable']}"
                     + (f" (lenient reading: {out['unparseable_lenient']})"
                        if out.get("unparseable_lenient") is not None else "") + "; "
                     f"incomplete rotation groups: {out['incomplete_groups']}")
    return "\n".join(lines)
