"""``python -m loop train``: one manual LoRA training run, with GQA-ru dev before and after."""

from __future__ import annotations

import argparse
import logging
import time

from loop.commands._common import GPU_PROFILES, add_json_arg, add_source_args
from loop.config_file import add_config_arg
from loop.presets import TRAIN_LR, train_lr
from loop.trackers import add_report_arg

log = logging.getLogger(__name__)

SOURCES = ("gqa_train", "llava_instruct")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train one LoRA adapter by hand",
                       description="Train a LoRA adapter on the language model (never the "
                       "vision tower) from GQA-ru train, LLaVA-Instruct-ru and/or SFT JSONL files, "
                       "save it in PEFT format with loop_adapter.json, and compare GQA-ru dev "
                       "accuracy before and after.")
    p.add_argument("--source", action="append", metavar="gqa_train|llava_instruct|FILE.jsonl",
                   help="training data; repeat to mix (default: gqa_train)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="at most N records per source, a seeded random choice, GQA-ru train "
                   "whole images at a time (default: steps x batch size with --steps, else all)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps")
    length.add_argument("--epochs", type=float, metavar="X", help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, metavar="X",
                   help="peak learning rate (default: the preset's, as the loop trains it: "
                   + ", ".join(f"{v:g} for {k}" for k, v in TRAIN_LR.items()) + ")")
    p.add_argument("--rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="samples per optimizer step (default 16); the GPU profile sets the "
                   "micro-batch")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="one sequence per record (by default the records about one image are "
                   "packed into one conversation, so the image is read once per pack)")
    p.add_argument("--train-projector", action="store_true",
                   help="also train the multi-modal projector (saved with the adapter)")
    p.add_argument("--gpu", choices=GPU_PROFILES, default="auto",
                   help="GPU profile: t4 (fp16, 4-bit), a100/h100 (bf16), cpu, auto (default)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="override the profile's dtype")
    p.add_argument("--4bit", dest="load_in_4bit", action=argparse.BooleanOptionalAction,
                   default=None, help="load the language model in 4-bit NF4 (default: the "
                   "profile's choice; t4 does)")
    p.add_argument("--out", metavar="DIR", help="adapter folder (default: adapters/train-TIME)")
    p.add_argument("--name", metavar="NAME", help="adapter name (default: the folder's name)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out (same data and settings)")
    p.add_argument("--time-limit", metavar="DURATION",
                   help="stop cleanly, adapter saved, after this long: 90m, 2h, 600s")
    p.add_argument("--eval-limit", type=int, default=200, metavar="N",
                   help="GQA-ru dev questions to compare before/after on (default 200; 0: skip)")
    add_report_arg(p)
    add_source_args(p)
    add_json_arg(p)
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.exceptions import UserError

    problems = []
    for flag, value in (("--steps", args.steps), ("--limit", args.limit),
                        ("--rank", args.rank), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            problems.append(f"`{flag}` must be a positive integer, but got {value}")
    if args.eval_limit < 0:
        problems.append(f"`--eval-limit` must be >= 0, but got {args.eval_limit}")
    if problems:
        raise UserError("; ".join(problems))
    from loop.trackers import check

    check(args.report_to)
    deadline = time.time() + _duration(args.time_limit) if args.time_limit else None

    from pathlib import Path

    from core.device import resolve_profile
    from core.model import load_vlm
    from core.train import TrainConfig, TrainHooks, train_lora
    from loop.commands._common import print_json
    from loop.sources import sources_from_args

    config = TrainConfig(steps=args.steps, epochs=args.epochs, rank=args.rank,
                         lr=args.lr or train_lr(args.preset),
                         batch_size=args.batch_size, train_projector=args.train_projector,
                         seed=args.seed, pack_by_image=args.packing)
    profile = resolve_profile(args.gpu, dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    profile.log_reasons()
    sources = sources_from_args(args)
    limit = args.limit or (args.steps * args.batch_size if args.steps else None)
    protected = evaluation_keys(sources.data)
    records, skipped, guard = load_records(args.source or ["gqa_train"], sources.data, limit,
                                           args.seed, protected)
    if not records:
        raise UserError(f"no training records with a readable image (skipped: {skipped})")
    dev = _dev_examples(sources.data, args.eval_limit, args.seed)
    vlm = load_vlm(sources.model, options=profile.load_options())
    before = _evaluate(vlm, dev, profile, args) if dev else None
    out = Path(args.out or f"adapters/train-{time.strftime('%Y%m%d-%H%M%S')}")
    tracker = _tracker(args, out)
    try:
        result = train_lora(vlm, records, config, out, deadline=deadline, profile=profile,
                            adapter_name=args.name, resume=args.resume, hooks=TrainHooks(
                                after_step=lambda step, loss: tracker.log_scalars(
                                    {"train/loss": loss}, step, axis="train/step")))
        for key, n in skipped.items():
            result.skipped[key] = result.skipped.get(key, 0) + n
        after = _evaluate(vlm, dev, profile, args) if dev and result.ok else None
        for step, e in ((0, before), (result.steps, after)):
            if e:
                tracker.log_scalars({"train/gqa_ru_dev": e["accuracy"]}, step, axis="train/step")
    finally:
        tracker.close()
    report = {"model": sources.model, "profile": profile.name, "records": len(records),
              "guard": guard, "trained": trained(result), "train": result.to_dict(),
              "eval_before": before, "eval_after": after}
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return 0 if result.ok else 1


def trained(result) -> dict:
    """What the run trained: records, questions, packs (sequences) and tokens, each counted
    every time it was seen (one epoch: once), and the data they came from."""
    return {"packed_by_image": result.packed, "records": result.samples,
            "questions": result.questions, "packs": result.sequences, "tokens": result.tokens,
            "image_tokens": result.image_tokens, "text_tokens": result.text_tokens,
            "data": {"records": result.n_records, "questions": result.n_questions,
                     "packs": result.n_examples}}


def _tracker(args: argparse.Namespace, out):
    """``--report-to``: the loss curve also goes to a tracker (files under ``out``)."""
    from loop.config_file import resolved_options
    from loop.trackers import open_tracker

    return open_tracker(args.report_to, folder=out, run_name=out.name,
                        config=resolved_options(args))


def _duration(text: str) -> float:
    from core.exceptions import UserError
    from loop.budget import parse_duration

    try:
        return parse_duration(text)
    except UserError:
        raise UserError(f"`--time-limit` must be a positive duration such as 90m, 2h or 600s, "
                        f"but got '{text}'") from None


def evaluation_keys(data):
    """The leakage guard's keys of every evaluation image and question (both benchmarks)."""
    from core.data import load_benchmark
    from core.exceptions import DataError, UserError
    from strategies.guard import prepare, protected_keys

    examples = []
    for benchmark in ("gqa_ru", "mmbench_ru"):
        try:
            examples += load_benchmark(benchmark, data)
        except (UserError, DataError) as exc:
            raise UserError(f"the leakage guard compares training data with every {benchmark} "
                            f"evaluation image and question, and cannot read them: {exc}") from None
    return prepare(protected_keys(examples, digests=True))


def load_records(names: list[str], data, limit: int | None, seed: int, protected):
    """SFT records from each source, at most ``limit`` per source, that pass the leakage guard
    (``protected``: ``strategies.guard.prepare`` keys); what was skipped; what the guard refused
    per source."""
    import random
    from collections import Counter
    from pathlib import Path

    from core.exceptions import UserError
    from core.sft import gqa_records, llava_instruct_records, load_sft_jsonl
    from strategies.guard import screen, template_questions

    records, skipped, guard = [], Counter(), {}
    for name in names:
        rng = random.Random(seed)
        templates: set[str] = set()
        if name == "gqa_train":
            from core.data import load_gqa

            pool = load_gqa(data.gqa, "train")
            templates = template_questions(pool)
            part = gqa_records(pick_by_image(pool, limit, rng), stats=skipped)
        elif name == "llava_instruct":
            from core.data import load_llava_instruct

            if not data.coco_dir:
                raise UserError("`--source llava_instruct` needs `--coco-dir`: the dataset has no "
                                "images, its records name COCO files")
            rows = _pick(load_llava_instruct(data.instruct, data.coco_dir), limit, rng)
            part = llava_instruct_records(rows, data.coco_dir)
        elif name.endswith(".jsonl") or Path(name).exists():
            part = _pick(load_sft_jsonl(name), limit, rng)
        else:
            raise UserError(f"`--source` must be one of {', '.join(SOURCES)} or a .jsonl file "
                            f"of SFT records, but got '{name}'")
        part, guard[name] = screen(part, protected, source=f"`--source {name}`",
                                   allowed_questions=templates)
        if guard[name]["refused"]:
            skipped["leakage_refused"] += guard[name]["refused"]
        records += part
    return records, dict(skipped), guard


def _pick(rows: list, limit: int | None, rng) -> list:
    if limit is None or limit >= len(rows):
        return rows
    return rng.sample(rows, limit)


def pick_by_image(rows: list[dict], limit: int | None, rng) -> list[dict]:
    """At most ``limit`` GQA-ru questions, whole images at a time (images in a seeded random
    order, the last one cut at the limit), so a pack by image holds all of an image's questions
    that were drawn; the same draw with or without packing."""
    if limit is None or limit >= len(rows):
        return rows
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(str(row["imageId"]), []).append(row)
    images = sorted(by_image)
    rng.shuffle(images)
    out: list[dict] = []
    for image in images:
        out += by_image[image][:limit - len(out)]
        if len(out) == limit:
            break
    return out


def _dev_examples(data, n: int, seed: int) -> list[dict]:
    if n == 0:
        return []
    try:
        from core.data import load_gqa
        from core.splits import make_splits, stratified_subset
    except ImportError:  # evaluation is optional
        return []
    dev = make_splits(load_gqa(data.gqa, "testdev"), seed=seed)["dev"]
    return stratified_subset(dev, n, seed=seed)


def _evaluate(vlm, examples: list[dict], profile, args) -> dict:
    from core.evaluate import evaluate

    result = evaluate(vlm, examples, batch_size=profile.eval_batch_size,
                      progress=not args.quiet and not args.json)
    words = [len(s["output"].split()) for s in result.samples]
    return {"accuracy": result.accuracy, "n": result.n, "ci": result.metrics.get("ci"),
            "accuracy_normalized": result.metrics.get("accuracy_normalized"),
            "one_word_share": round(sum(w == 1 for w in words) / len(words), 4),
            "mean_words": round(sum(words) / len(words), 2),
            "examples": [(s["question"], s["answer"], s["output"]) for s in result.samples[:3]]}


def render(report: dict) -> str:
    from loop.commands._common import format_table

    t = report["train"]
    rows = [["status", t["status"] + (f" ({t['error']})" if t["error"] else "")],
            ["adapter", f"{t['adapter_name']} -> {t['adapter_path']}"],
            ["steps / records", f"{t['steps']} / {t['samples']} (of {report['records']} records)"],
            ["questions / packs", f"{t['questions']} / {t['sequences']}"
             + (" (packed by image)" if t["packed"] else " (not packed)")],
            ["tokens: image + text", f"{t['image_tokens']} + {t['text_tokens']}"],
            ["loss first -> last", _loss(t["loss_curve"])],
            ["tokens/s", t["tokens_per_s"]], ["seconds", round(t["seconds"], 1)],
            ["peak memory", f"{t['peak_memory_gb']} GB ({t['memory_kind']})"],
            ["micro-batch", f"{t['micro_batch_size']} (OOM retries {t['oom_retries']})"],
            ["skipped", t["skipped"] or "-"],
            ["leakage guard", _guard_line(report.get("guard") or {})]]
    lines = [format_table(["training", report["profile"]], rows)]
    if report["eval_before"]:
        evals = [["before", *_eval_row(report["eval_before"])]]
        if report["eval_after"]:
            evals.append(["after", *_eval_row(report["eval_after"])])
        lines += ["", format_table(["GQA-ru dev", "exact match %", "95% CI", "one-word %",
                                    "mean words", "n"], evals)]
        for q, gold, out in (report["eval_after"] or report["eval_before"])["examples"]:
            lines.append(f"  {q} | gold: {gold} | model: {out!r}")
    return "\n".join(lines)


def _guard_line(guard: dict) -> str:
    checked = sum(g["checked"] for g in guard.values())
    refused = sum(g["refused"] for g in guard.values())
    first = next((g["first"][0] for g in guard.values() if g["first"]), None)
    text = f"{refused} of {checked} records refused"
    return text + (f" (first: '{first['record']}', {first['reason']})" if first else "")


def _loss(curve: list[float]) -> str:
    if not curve:
        return "-"
    head, tail = curve[:5], curve[-5:]
    return f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _eval_row(e: dict) -> list:
    ci = e.get("ci") or (None, None)
    fmt = _pct
    return [fmt(e["accuracy"]), f"[{fmt(ci[0])}, {fmt(ci[1])}]", fmt(e["one_word_share"]),
            e["mean_words"], e["n"]]
