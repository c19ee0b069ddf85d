"""The Hub metadata of an exported adapter's model card (its YAML front matter).

Built with huggingface_hub's ``ModelCardData`` and ``EvalResult``, so the Hub (and
``huggingface_hub.ModelCard.load``) reads it as what it is: a PEFT adapter of its base model,
with ``model-index`` results for GQA-ru and MMBench-ru measured on the held-out final split
under the exact lmms-eval protocol, each with its n and 95% interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loop.report import LMMS_MARK
from loop.sources import HUB_ID

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

    from loop.report import Report

DATASETS = {
    "gqa_ru": {"type": "deepvk/GQA-ru", "name": "GQA-ru", "config": "testdev_balanced_instructions",
               "split": "testdev", "task": "visual-question-answering",
               "task_name": "Visual question answering",
               "metric": "exact match, lmms-eval gqa-ru protocol", "unit": "questions"},
    "mmbench_ru": {"type": "deepvk/MMBench-ru", "name": "MMBench-ru", "config": None,
                   "split": "dev", "task": "visual-question-answering",
                   "task_name": "Multiple-choice visual question answering",
                   "metric": "circular accuracy, lmms-eval mmbench_ru_dev protocol (answers "
                             "read by its can_infer rule, no GPT judge: unread answers wrong)",
                   "unit": "question groups"},
}
TAGS = ["lora", "peft", "llava", "vision-language", "russian", "gqa-ru", "mmbench-ru"]


def hub_base_model(base: str | None, preset: str) -> str | None:
    """The base model's Hub id, or None when the run used a local folder (the demo worlds, a
    ``--model`` path): the Hub can only link an id it knows."""
    if not base or preset in ("demo", "saiga-tiny") or Path(base).exists():
        return None
    return base if HUB_ID.fullmatch(base) else None


def eval_results(report: Report, results: dict[str, Any]) -> tuple[list, list[str]]:
    """``EvalResult``s of the champion per benchmark under the exact lmms-eval protocol, and a
    sentence for each benchmark left out (not measured, or measured under another protocol)."""
    from huggingface_hub import EvalResult

    demo = report.run["preset"] in ("demo", "saiga-tiny")
    out, left_out = [], []
    if not results["adapter_is_champion"]:
        return [], ["model-index: the final numbers belong to the run's champion, not to this "
                    "adapter."]
    for bench, r in results["benchmarks"].items():
        spec, champ = DATASETS.get(bench), r.get("champion")
        if spec is None:
            continue
        if not champ or not champ.get("n"):
            left_out.append(f"{spec['name']}: the champion was not measured on the final split.")
            continue
        if LMMS_MARK not in (champ.get("protocol") or ""):
            left_out.append(f"{spec['name']}: the champion's final number was measured under "
                            f"'{champ.get('protocol')}', not the exact lmms-eval protocol, so it "
                            "is not in the card metadata.")
            continue
        low, high = (100 * x for x in champ["ci"]) if champ.get("ci") else (None, None)
        interval = f", 95% interval [{low:.1f}, {high:.1f}]" if low is not None else ""
        args = {"n": champ["n"], "n_unit": spec["unit"],
                "ci_95": [round(low, 2), round(high, 2)] if low is not None else None,
                "protocol": champ["protocol"], "subset": "final (held out, fed no decision)",
                "run": report.run["id"],
                "base_model_accuracy": _pct(r.get("baseline")),
                "p_vs_base_model": r.get("final_p")}
        out.append(EvalResult(
            task_type=spec["task"], task_name=spec["task_name"],
            dataset_type=f"synthetic-demo/{spec['name']}" if demo else spec["type"],
            dataset_name=(f"{spec['name']}-like synthetic demo data" if demo else spec["name"]),
            dataset_config=None if demo else spec["config"],
            dataset_split=None if demo else (
                f"{spec['split']} (held-out final subset, n={champ['n']} {spec['unit']})"),
            metric_type="accuracy", metric_value=round(100 * champ["accuracy"], 2),
            metric_name=f"{spec['metric']} (%, n={champ['n']} {spec['unit']}{interval})",
            metric_args={k: v for k, v in args.items() if v is not None}))
    return out, left_out


def _pct(measure: dict | None) -> float | None:
    return round(100 * measure["accuracy"], 2) if measure else None


def base_license(base: str | None) -> str | None:
    """The base model's license from its card, when the card is on this machine (a local
    folder's README.md, or the Hub cache); None otherwise (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    if not base:
        return None
    readme = Path(base) / "README.md"
    if not readme.is_file():
        cached = try_to_load_from_cache(base, "README.md") if HUB_ID.fullmatch(base) else None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    license = (metadata_load(readme) or {}).get("license")
    return license if isinstance(license, str) else None


def card_data(report: Report, adapter: dict[str, Any], results: dict[str, Any],
              base: str | None, license: str | None = None) -> tuple[ModelCardData, list[str]]:
    """The card's metadata and the sentences about what it leaves out.

    Args:
        report: The run's report.
        adapter: The exported adapter's row.
        results: ``benchmark_results.json``'s content.
        base: The model id or folder the run used.
        license: The adapter's license when known (it follows the base model's).
    """
    from huggingface_hub import ModelCardData

    run = report.run
    demo = run["preset"] in ("demo", "saiga-tiny")
    hub_base = hub_base_model(base, run["preset"])
    name = f"{'demo-tiny-llava' if demo else 'llava-saiga-8b'}-loop-adapter-{adapter['id']}"
    evals, left_out = eval_results(report, results)
    if hub_base is None:
        where = (f"the {run['preset']} preset's tiny local model" if demo
                 else f"a local model ({base})")
        left_out.append(f"base_model: the run used {where}, which the Hub cannot link, so the "
                        "metadata names none.")
    extra = {"base_model_relation": "adapter"} if hub_base else {}
    data = ModelCardData(base_model=hub_base, library_name="peft",
                         pipeline_tag="image-text-to-text", language=["ru"],
                         license=license, tags=TAGS + (["synthetic-demo"] if demo else []),
                         model_name=name, eval_results=evals or None, **extra)
    return data, left_out
