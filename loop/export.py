"""Ship an adapter: its PEFT files, a model card, the run's report and the result files.

The layout of an export folder::

    adapter/                 adapter_config.json, adapter_model.safetensors, loop_adapter.json
                             (PeftModel.from_pretrained(base, "<out>/adapter") loads it)
    README.md                the model card (Hugging Face YAML header, numbers, how measured)
    report.md, report.html   the run's report
    benchmark_results.json   base model vs champion on the final split, per benchmark
    error_analysis.json      error labels on the final split, per benchmark, with examples
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.exceptions import UserError
from loop.formatting import format_p, format_pct
from loop.report import Report, build_report, md_cell, write_report

if TYPE_CHECKING:
    from loop.store import Store

log = logging.getLogger(__name__)

BASE_MODEL = "deepvk/llava-saiga-8b"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
OPTIONAL_FILES = ("loop_adapter.json",)


@dataclass
class Export:
    """What ``export_adapter`` wrote."""

    out: Path
    adapter_id: int
    run_id: int
    files: list[Path] = field(default_factory=list)


def export_adapter(store: Store, out: Path | None = None, adapter_id: int | None = None) -> Export:
    """Export the pinned adapter (or ``adapter_id``) with its card, report and result files.

    Raises:
        UserError: nothing is pinned and no id is given, the adapter's folder is missing or
            incomplete, or the adapter belongs to no run.
    """
    if adapter_id is None:
        pinned = store.current_pin()
        if pinned is None:
            raise UserError("nothing is pinned, so there is nothing to export: pin the champion "
                            "with `python -m loop pin --best` (or an adapter by id with `python "
                            "-m loop pin ADAPTER_ID`), or name one with --adapter ID.")
        adapter_id = pinned["adapter_id"]
    adapter = store.adapter(adapter_id)
    if adapter["run_id"] is None:
        raise UserError(f"adapter {adapter_id} belongs to no run, so there are no final numbers "
                        "to put in its model card; export an adapter trained by `loop run`.")
    source = adapter_folder(store, adapter)
    report = build_report(store, adapter["run_id"])
    out = (Path(out) if out
           else store.run_dir(adapter["run_id"]) / "export" / f"adapter-{adapter_id}")
    result = Export(out=out, adapter_id=adapter_id, run_id=adapter["run_id"])
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", *WEIGHT_FILES, *OPTIONAL_FILES):
        if (source / name).is_file():
            result.files.append(Path(shutil.copy2(source / name, out / "adapter" / name)))
    result.files += write_report(report, out)
    results = benchmark_results(report, adapter_id)
    for name, data in (("benchmark_results.json", results),
                       ("error_analysis.json", error_analysis(report))):
        (out / name).write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n",
                                encoding="utf-8")
        result.files.append(out / name)
    champion_evals = store.evaluations(report.run["id"], role="final_champion", split="final")
    card = model_card(report, adapter, results, _read_json(source / "loop_adapter.json"),
                      {e["benchmark"]: e["candidate"] for e in champion_evals if e["candidate"]})
    (out / "README.md").write_text(card, encoding="utf-8")
    result.files.append(out / "README.md")
    log.info("adapter %s exported to %s", adapter_id, out)
    return result


def adapter_folder(store: Store, adapter: dict[str, Any]) -> Path:
    """The adapter's folder: its stored path, absolute or relative to the working folder or
    to the database's folder; it must hold adapter_config.json and the weights."""
    path = Path(adapter["path"])
    candidates = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and not store.memory:
        candidates.append(store.path.parent / path)
    for folder in candidates:
        if (folder / "adapter_config.json").is_file():
            if not any((folder / w).is_file() for w in WEIGHT_FILES):
                raise UserError(f"adapter {adapter['id']}'s folder {folder} has no weights "
                                f"({' or '.join(WEIGHT_FILES)}); it is incomplete. Export "
                                "another adapter with --adapter ID.")
            return folder
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(f"adapter {adapter['id']} is not on disk: no adapter_config.json in {looked}. "
                    "Was its folder moved or deleted? Export another one with --adapter ID.")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def benchmark_results(report: Report, adapter_id: int) -> dict[str, Any]:
    """Base model vs champion on the final split, per benchmark (``benchmark_results.json``)."""
    benchmarks = {}
    for bench, h in report.headline.items():
        entry = {}
        for role in ("baseline", "champion", "deployed"):
            m = h[role]
            entry[role] = None if m is None else {k: m[k] for k in (
                "accuracy", "n", "ci", "protocol", "split", "adapter_id", "comparable",
                "comparability")}
        both = entry["baseline"] and entry["champion"]
        entry["difference"] = (round(entry["champion"]["accuracy"]
                                     - entry["baseline"]["accuracy"], 6) if both else None)
        entry["final_p"] = h.get("final_p")
        entry["published"] = h["published"]
        benchmarks[bench] = entry
    champions = {(h["champion"] or {}).get("adapter_id") for h in report.headline.values()}
    return {"run_id": report.run["id"], "preset": report.run["preset"], "split": "final",
            "objective": (report.run.get("config") or {}).get("objective", "benchmark"),
            "adapter_id": adapter_id, "adapter_is_champion": champions == {adapter_id},
            "benchmarks": benchmarks, "notes": report.notes}


def error_analysis(report: Report) -> dict[str, Any]:
    """Error labels of the base model and the champion on the final split, with examples
    (``error_analysis.json``); a share is the fraction of wrong answers with that label."""
    return {"run_id": report.run["id"], "split": "final", "benchmarks": {
        bench: {key: a.get(key) for key in ("baseline", "champion", "paired_n", "fixed_n",
                                            "broken_n", "still_wrong_n", "fixed", "still_wrong")}
        for bench, a in report.error_analysis.items()}}


def model_card(report: Report, adapter: dict[str, Any], results: dict[str, Any],
               metadata: dict[str, Any], champion_candidates: dict[str, dict]) -> str:
    """A Hugging Face style model card (README.md) for the exported adapter."""
    from loop.card_metadata import base_license, card_data

    run, demo = report.run, report.run["preset"] in ("demo", "saiga-tiny")
    base = ((metadata.get("base_model") or {}).get("id") or (run.get("config") or {}).get("model")
            or BASE_MODEL)
    license = metadata.get("license") or base_license(base)
    data, left_out = card_data(report, adapter, results, base, license)
    header = ["---", data.to_yaml(), "---", ""]
    lines = header + [
        f"# LoRA adapter {adapter['id']} for {'the demo tiny LLaVA' if demo else 'LLaVA-Saiga-8B'}",
        "", f"Trained by the self-improvement loop (run {run['id']}, strategy "
        f"{md_cell(adapter['strategy'])}, parent adapter {adapter['parent_id'] or 'none'}) on top "
        f"of {md_cell(base)}. Only changes that a paired test on the dev split found better were "
        "kept.",
        "", "## Results on the held-out final split", "",
        f"| benchmark | base model | {'this adapter' if results['adapter_is_champion'] else 'champion'}"
        " | difference | p (paired, by cluster) | n | protocol | published |",
        "|---|---|---|---|---|---|---|---|"]
    for bench, r in results["benchmarks"].items():
        b, c = r["baseline"] or {}, r["champion"] or {}
        diff = f"{100 * r['difference']:+.1f} points" if r["difference"] is not None else "-"
        pub = r["published"]
        pub_text = (f"{100 * pub['accuracy']:.2f}% ({pub['protocol']}; this adapter's number: "
                    f"{c.get('comparability', 'not measured')})" if pub else "-")
        cells = [bench, format_pct(b.get("accuracy"), b.get("ci")),
                 format_pct(c.get("accuracy"), c.get("ci")), diff, format_p(r.get("final_p")),
                 c.get("n") or b.get("n") or "-", c.get("protocol") or "-", pub_text]
        lines.append("| " + " | ".join(md_cell(x) for x in cells) + " |")
    deployed = {bench: r["deployed"] for bench, r in results["benchmarks"].items()
                if r.get("deployed")}
    if deployed:
        lines += ["", "With the prompt/decoding settings it was selected with (a deployment "
                  "setting, its own protocol; not comparable with the base model above):", ""]
        lines += [f"- {md_cell(bench)}: {format_pct(d['accuracy'], d.get('ci'))} "
                  f"(n={d.get('n')}; {md_cell(d.get('protocol') or '-')})"
                  for bench, d in deployed.items()]
    lines += ["", f"Objective of the run: {results['objective']}. Both columns above use the "
              "exact lmms-eval protocol: the base model and this adapter with lmms-eval's prompt, "
              "decoding and scoring."]
    if not results["adapter_is_champion"]:
        lines += ["", "**Note:** this adapter is not the champion measured on the final split of "
                  f"run {run['id']}; the numbers above belong to that champion."]
    lines += ["", "## How it was measured", "",
              "- GQA-ru testdev was split by image and MMBench-ru dev by question group, with a "
              "fixed seed: about one third `dev` (every decision of the loop), two thirds `final` "
              "(touched once, at the end, for the base model and the champion; it fed no "
              "decision). n is the number of final questions (MMBench-ru: question groups, each "
              "scored circularly over its rotated copies).",
              "- Intervals are 95% (GQA-ru: cluster bootstrap over images; MMBench-ru: Wilson "
              "over question groups). p is a sign-flip test of the per-cluster differences "
              "between this adapter and the base model on the same final questions. A protocol that says 'lmms-eval prompt and decoding' "
              "matches the lmms-eval tasks behind the published scores; any other protocol is "
              "its own measurement and is not comparable with them.",
              "- MMBench-ru: answers are read by lmms-eval's own rule (its `can_infer`). Where "
              "that rule reads no letter, lmms-eval asks a GPT judge (and draws a random letter "
              "when the judge fails); here such an answer counts as wrong, so the number is at "
              "most what lmms-eval would report for the same outputs. A lenient Russian-aware "
              "reading is given beside it for comparison only; it is not the published "
              "protocol's." + _mmbench_detail(report),
              "- The card's metadata (YAML header) names the base model, the library (peft) and, "
              "in `model-index`, the champion's final numbers under the exact lmms-eval protocol "
              "with n, the 95% interval and p against the base model."
              + (f" License: {md_cell(license)}." if license else " License: that of the base "
                 "model (see its card).")]
    lines += [f"- Not in the metadata: {md_cell(text, 1000)}" for text in left_out]
    for bench, cand in champion_candidates.items():
        config = (cand.get("eval_configs") or {}).get(bench)
        if config:
            lines += ["", f"Evaluation settings of the champion on {md_cell(bench)}:", "",
                      *_code(config)]
    lines += ["", "## Training", "", f"Strategy {md_cell(adapter['strategy'])}; the adapter's "
              "config:",
              "", *_code(adapter["config"] or {})]
    data = metadata.get("data")
    if data:
        lines += ["", "Training data:", "", *_code(data)]
    lines += ["", "## Usage", "", "```python", "from peft import PeftModel",
              "from transformers import AutoProcessor, LlavaForConditionalGeneration", "",
              f'base = LlavaForConditionalGeneration.from_pretrained("{base}", torch_dtype="auto")',
              f'processor = AutoProcessor.from_pretrained("{base}")',
              'model = PeftModel.from_pretrained(base, "adapter")', "```", "",
              "## Limitations", "",
              "- Measured on subsets of public evaluation sets (the n above), not on a leaderboard "
              "test server; the intervals say how far the numbers can move.",
              "- Tuned for short Russian answers to GQA-ru and MMBench-ru style questions; open "
              "conversation may be terser than the base model's.",
              "- Training data came from GQA-ru train_balanced and LLaVA-Instruct-ru (with COCO "
              "images) only; a guard refused any example whose image or question is in an "
              "evaluation split."]
    if demo:
        lines.append("- Demo preset: a tiny model on a synthetic world; the numbers only show "
                     "that the loop works and are not comparable with any published score.")
    lines += ["", "See `report.html` for the decisions and plots, `benchmark_results.json` and "
              "`error_analysis.json` for the numbers."]
    return "\n".join(lines) + "\n"


def _code(value: Any) -> list[str]:
    """A JSON value as an indented Markdown code block (no fence a value could close)."""
    text = json.dumps(value, ensure_ascii=False, indent=2, default=str)
    return ["    " + line for line in text.splitlines()]


def _mmbench_detail(report: Report) -> str:
    """The champion's MMBench-ru breakdown on final (per row, unread answers, lenient reading)."""
    champ = (report.headline.get("mmbench_ru") or {}).get("champion") or {}
    return f" On final: {md_cell(champ['detail'])}." if champ.get("detail") else ""
