"""``python -m loop diagnose``: why a model is wrong on a benchmark, and what to try.

Either evaluates (the base model or an adapter, on a fixed split, as ``loop eval`` does) or
reads the stored predictions of an earlier evaluation (``--from-db EVAL_ID``), then classifies
every error (``core.error_profile.BenchmarkOptimizer``) and prints the error profile (label, count,
share, examples), the recommended remedies and the errors per question category.
"""

from __future__ import annotations

import argparse
import logging

from loop.commands._common import add_json_arg, format_table, print_json
from loop.commands.eval import add_eval_args, check_eval_args, evaluate_from_args

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="error profile and recommended remedies of an evaluation",
                       description="Classify every error of an evaluation (format mismatch, "
                       "counting, colour, location, missing image, other) and recommend remedies. "
                       "Evaluates now, or reads stored predictions with --from-db.")
    add_eval_args(p, benchmark_required=False)
    p.add_argument("--from-db", type=int, metavar="EVAL_ID",
                   help="profile the stored predictions of evaluation EVAL_ID in --db instead "
                   "of evaluating")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.error_profile import BenchmarkOptimizer
    from core.exceptions import UserError

    if args.from_db is None and args.benchmark is None:
        raise UserError("diagnose needs --benchmark gqa_ru|mmbench_ru, or --from-db EVAL_ID "
                        "to read an evaluation already stored in --db")
    check_eval_args(args)
    head, samples = _from_db(args) if args.from_db is not None else _evaluate(args)
    import strategies

    profile = BenchmarkOptimizer(remedies=strategies.remedies()).profile(head["benchmark"],
                                                                        samples)
    out = {**head, "profile": profile.to_dict(), "recommendations": profile.recommendations()}
    if args.json:
        print_json(out)
    else:
        print(render(out))
    return 0


def _from_db(args) -> tuple[dict, list[dict]]:
    """The stored evaluation's predictions; an error without stored labels counts as other."""
    from sqlite_utils.db import NotFoundError

    from core.exceptions import UserError
    from loop.store import Store

    with Store.open_existing(args.db) as store:
        try:
            evaluation = store.evaluation(args.from_db)
        except NotFoundError:
            raise UserError(f"no evaluation {args.from_db} in {args.db}; `python -m loop log` "
                            "lists the runs and their cycles") from None
        rows = store.predictions(args.from_db)
    benchmark = evaluation["benchmark"]
    if args.benchmark and args.benchmark != benchmark:
        raise UserError(f"evaluation {args.from_db} is on {benchmark}, but --benchmark "
                        f"{args.benchmark} was given; drop --benchmark or pick another id")
    samples = [{"example": {"id": r["sample_id"], "question": r["question"], "answer": r["answer"]},
                "prediction": r["output"], "image_ok": r["image_ok"],
                "labels": r["labels"] or ([] if r["correct"] else ["other"])} for r in rows]
    metrics = evaluation.get("metrics") or {}
    head = {"benchmark": benchmark, "source": f"evaluation {args.from_db} in {args.db}",
            "eval_id": args.from_db, "split": evaluation.get("split"),
            "protocol": evaluation.get("protocol"), "accuracy": metrics.get("accuracy"),
            "n": evaluation.get("n")}
    return head, samples


def _evaluate(args) -> tuple[dict, list[dict]]:
    examples, result, sources = evaluate_from_args(args)
    samples = [{"example": {k: v for k, v in ex.items() if not k.startswith("_")},
                "prediction": s["output"], "image_ok": s["image_ok"], "labels": s["labels"]}
               for ex, s in zip(examples, result.samples, strict=True)]
    head = {"benchmark": args.benchmark,
            "source": f"{args.split} split of {sources.model}"
                      + (f" with adapter {args.adapter}" if args.adapter else ""),
            "split": args.split, "protocol": result.protocol, "accuracy": result.accuracy,
            "n": result.n, "model": sources.model, "adapter": args.adapter}
    return head, samples


def _short(text, width: int = 48) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render(out: dict, examples: int = 1) -> str:
    """The profile as tables for people, ``examples`` example errors per label (``--json``
    has up to three)."""
    prof = out["profile"]
    acc = "-" if out.get("accuracy") is None else f"{100 * out['accuracy']:.1f}%"
    lines = [f"{out['benchmark']}: {out['source']}",
             f"protocol: {out.get('protocol')}; accuracy {acc} (n={out.get('n')})",
             f"{prof['n_errors']} of {prof['n']} answers wrong; main cause: {prof['main_cause']}",
             ""]
    rows = []
    for label, count in sorted(prof["counts"].items(), key=lambda kv: -kv[1]):
        if not count:
            continue
        shown = prof["examples"].get(label, [])[:examples] or [None]
        for i, ex in enumerate(shown):
            text = "" if ex is None else (f"{_short(ex['question'], 40)} | gold: "
                                          f"{_short(ex['answer'], 16)} | model: "
                                          f"{_short(repr(ex['prediction']), 40)}")
            rows.append([label, count, f"{prof['shares'][label]:.0%}", text] if i == 0
                        else ["", "", "", text])
    if rows:
        lines += [format_table(["label", "errors", "share", "example"], rows), ""]
    lines.append("Recommendations:")
    lines += [f"  {i}. {line}" for i, line in enumerate(out["recommendations"], 1)]
    if prof["recommended_strategies"]:
        lines.append(f"Strategies, in order: {', '.join(prof['recommended_strategies'])}")
    cats = [[c, v["n"], v["errors"], f"{v['errors'] / v['n']:.0%}"]
            for c, v in sorted(prof["per_category"].items()) if v["n"]]
    if len(cats) > 1 or (cats and cats[0][0] != "unknown"):
        lines += ["", format_table(["category", "n", "errors", "error rate"], cats)]
    return "\n".join(lines)
