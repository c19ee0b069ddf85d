"""Arguments and output helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_DB = "experiments.db"
PRESETS = ("demo", "saiga", "saiga-tiny")
GPU_PROFILES = ("auto", "t4", "a100", "h100", "cpu")
BENCHMARKS = ("gqa_ru", "mmbench_ru")


def add_db_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help=f"the experiments database (default: ./{DEFAULT_DB})")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object for machines")


def add_output_path_arg(parser: argparse.ArgumentParser, what: str = "the evaluation") -> None:
    parser.add_argument("--output_path", "--output-path", dest="output_path", metavar="DIR",
                        help=f"also write {what} as lmms-eval 0.7.2 writes its files: "
                        "DIR/<model>/<date>_results.json and <date>_samples_<task>.jsonl "
                        "(one line per question)")


def add_source_args(parser: argparse.ArgumentParser) -> None:
    """--preset, --model, --data-dir, --coco-dir: where the weights and the data come from."""
    parser.add_argument("--preset", choices=PRESETS, default="saiga",
                        help="saiga: deepvk/llava-saiga-8b and the deepvk datasets (default); "
                        "demo: the bundled tiny VLM and synthetic Russian data, CPU-friendly; "
                        "saiga-tiny: the real checkpoint's structure and files at tiny width "
                        "(576 image tokens, 128k vocabulary), for shapes, memory and loading")
    parser.add_argument("--model", metavar="ID_OR_PATH",
                        help="model hub id or local folder (overrides the preset's model)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="local folder with GQA-ru/, MMBench-ru/, LLaVA-Instruct-ru/ "
                        "laid out as on the hub (overrides the preset's hub ids)")
    parser.add_argument("--coco-dir", metavar="DIR",
                        help="COCO image folder for LLaVA-Instruct-ru (its JSON has no images)")
    parser.add_argument("--seed", type=int, default=0, help="seed for splits, subsets and training")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, ensure_ascii=False, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with left-aligned columns, for people."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
