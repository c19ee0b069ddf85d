"""``loop.export`` and ``python -m loop export``: PEFT files, model card, report, result files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_report import GQA_LMMS, MMB_LIKELIHOOD, fill_run

from core.exceptions import UserError
from loop.commands import export as export_command
from loop.store import Store

LORA_CONFIG = {
    "peft_type": "LORA", "task_type": None, "base_model_name_or_path": "deepvk/llava-saiga-8b",
    "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none", "inference_mode": True,
    "target_modules": r".*language_model.*\.(q_proj|v_proj)", "modules_to_save": None,
}


def fake_adapter(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A PEFT-format folder: adapter_config.json, small safetensors weights, loop_adapter.json."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    tensors = {f"{prefix}.lora_A.weight": rng.standard_normal((4, 16), dtype=np.float32),
               f"{prefix}.lora_B.weight": rng.standard_normal((16, 4), dtype=np.float32)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(LORA_CONFIG), encoding="utf-8")
    (folder / "loop_adapter.json").write_text(json.dumps({
        "base_model": {"id": "deepvk/llava-saiga-8b", "revision": None},
        "data": {"fingerprint": "f00d", "n_records": 1200,
                 "sources": {"gqa_ru_train": 1000, "llava_instruct_ru": 200}}}), encoding="utf-8")
    return tensors


def cli(*argv: str) -> int:
    """Run ``python -m loop export ARGV`` in process."""
    parser = argparse.ArgumentParser()
    export_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


@pytest.fixture
def db(tmp_path: Path, monkeypatch) -> Path:
    """A finished run whose champion is adapter 1 (folder adapters/a2 beside the database);
    the working folder is elsewhere, so relative adapter paths resolve against the database."""
    path = tmp_path / "data" / "experiments.db"
    path.parent.mkdir()
    with Store(path) as store:
        fill_run(store)
    fake_adapter(path.parent / "adapters" / "a2")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return path


def test_export_writes_peft_files_card_report_and_results(db, tmp_path, capsys):
    with Store(db) as store:
        store.pin(1)
    out = tmp_path / "export"
    assert cli("--db", str(db), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    names = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors",
             "adapter/loop_adapter.json", "README.md", "report.md", "report.html",
             "benchmark_results.json", "error_analysis.json"]
    for name in names:
        assert (out / name).is_file(), name
        assert str(out / name) in printed
    original = load_file(str(db.parent / "adapters" / "a2" / "adapter_model.safetensors"))
    copied = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(original[k], copied[k]) for k in original)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text()) == LORA_CONFIG

    card = (out / "README.md").read_text(encoding="utf-8")
    header = card.split("---")[1]
    for line in ("base_model: deepvk/llava-saiga-8b", "library_name: peft", "- ru"):
        assert line in header.splitlines()
    assert "| gqa_ru | 20.0% [0.0, 40.0] | 80.0% [60.0, 100.0] | +60.0 points | - | 10 |" in card
    assert GQA_LMMS in card and MMB_LIKELIHOOD in card and "51.44%" in card
    assert "## How it was measured" in card and "## Limitations" in card
    # MMBench-ru: lmms-eval's answer rule, the unread answers counted, the lenient reading labelled
    assert "it is not the published protocol's. On final: per row" in card
    assert "answers unread by the lmms-eval rule (counted wrong)" in card
    assert '"rank": 16' in card and "llava_instruct_ru" in card  # training config and data
    assert "not the champion" not in card

    results = json.loads((out / "benchmark_results.json").read_text(encoding="utf-8"))
    assert results["adapter_id"] == 1 and results["adapter_is_champion"] is True
    gqa = results["benchmarks"]["gqa_ru"]
    assert gqa["baseline"]["accuracy"] == pytest.approx(0.2)
    assert gqa["champion"] == {"accuracy": 0.8, "n": 10, "ci": pytest.approx([0.6, 1.0]),
                               "protocol": GQA_LMMS, "split": "final", "adapter_id": 1,
                               "comparable": True,
                               "comparability": "same protocol as the published score"}
    assert gqa["difference"] == 0.6 and gqa["published"]["accuracy"] == 0.5144
    mmb = results["benchmarks"]["mmbench_ru"]
    assert mmb["champion"]["comparable"] is False and mmb["baseline"]["comparable"] is True

    analysis = json.loads((out / "error_analysis.json").read_text(encoding="utf-8"))
    gqa = analysis["benchmarks"]["gqa_ru"]
    assert gqa["baseline"]["counts"] == {"format_mismatch": 8, "color": 1}
    assert gqa["baseline"]["shares"]["format_mismatch"] == 1.0 and gqa["champion"]["wrong"] == 2
    assert (gqa["fixed_n"], gqa["still_wrong_n"]) == (6, 2) and len(gqa["fixed"]) == 6
    assert {"sample_id", "question", "answer", "before", "after"} <= set(gqa["fixed"][0])
    assert "<script" not in (out / "report.html").read_text(encoding="utf-8").lower()


def test_export_defaults_to_the_pin_and_a_folder_per_adapter(db):
    with Store(db) as store:
        store.pin(1)
    assert cli("--db", str(db)) == 0
    run_dir = Path(db).resolve().parent / f"{Path(db).stem}.runs" / "run-1"
    assert (run_dir / "export" / "adapter-1" / "adapter" / "adapter_config.json").is_file()


def test_export_without_a_pin_says_how_to_pin(db):
    with pytest.raises(UserError, match=r"nothing is pinned.*python -m loop pin --best"):
        cli("--db", str(db))


def test_export_of_a_non_champion_says_so(db, tmp_path):
    fake_adapter(db.parent / "adapters" / "a3", seed=1)
    assert cli("--db", str(db), "--adapter", "2", "--out", str(tmp_path / "x")) == 0
    card = (tmp_path / "x" / "README.md").read_text(encoding="utf-8")
    assert "not the champion" in card and "| benchmark | base model | champion |" in card
    results = json.loads((tmp_path / "x" / "benchmark_results.json").read_text(encoding="utf-8"))
    assert results["adapter_is_champion"] is False


def test_export_of_a_missing_or_incomplete_adapter_is_a_user_error(db, tmp_path):
    with pytest.raises(UserError, match="adapter 2 is not on disk"):
        cli("--db", str(db), "--adapter", "2", "--out", str(tmp_path / "x"))
    (db.parent / "adapters" / "a2" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights"):
        cli("--db", str(db), "--adapter", "1", "--out", str(tmp_path / "x"))
    with pytest.raises(UserError, match="no adapter 9"):
        cli("--db", str(db), "--adapter", "9")


def test_demo_card_names_no_hub_base_model(tmp_path, monkeypatch):
    path = tmp_path / "experiments.db"
    with Store(path) as store:
        fill_run(store, preset="demo")
        store.pin(1)
    fake_adapter(tmp_path / "adapters" / "a2")
    monkeypatch.chdir(tmp_path)
    assert cli("--db", str(path), "--out", "out") == 0
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "base_model:" not in card.split("---")[1]
    assert "synthetic world" in card and "not comparable: synthetic demo world" in card
    from huggingface_hub import ModelCard

    data = ModelCard.load(tmp_path / "out" / "README.md").data
    assert data.base_model is None and "synthetic-demo" in data.tags
    (result,) = data.eval_results  # MMBench-ru's champion used the likelihood protocol here
    assert result.dataset_type == "synthetic-demo/GQA-ru" and result.dataset_split is None
    assert "Not in the metadata: base_model: the run used the demo preset's tiny local model" in card


@pytest.mark.slow
def test_exported_adapter_loads_with_peft(db, tmp_path):
    """A real PEFT adapter on a tiny torch module survives the export byte for byte."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    base = Tiny()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["proj"],
                                            init_lora_weights=False))
    folder = db.parent / "adapters" / "a2"
    for f in folder.iterdir():
        f.unlink()
    model.save_pretrained(folder)
    x = torch.randn(3, 8)
    expected = model(x)
    with Store(db) as store:
        store.pin(1)
    assert cli("--db", str(db), "--out", str(tmp_path / "e")) == 0
    fresh = Tiny()
    fresh.load_state_dict(state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "e" / "adapter")
    assert torch.allclose(loaded(x), expected)


def test_card_and_results_show_final_p_the_objective_and_deployed_numbers_apart(db, tmp_path):
    with Store(db) as store:
        run = store.latest_run()
        store.update_run(run["id"], final_p={"gqa_ru": 0.0004, "mmbench_ru": 0.2},
                         final_deployed={"gqa_ru": 0.9})
        store.pin(1)
    out = tmp_path / "export"
    assert cli("--db", str(db), "--out", str(out)) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "| gqa_ru | 20.0% [0.0, 40.0] | 80.0% [60.0, 100.0] | +60.0 points | &lt;0.001 | 10 |" in card
    assert "Objective of the run: benchmark" in card
    assert "- gqa_ru: 90.0%" in card and "not comparable with the base model" in card
    results = json.loads((out / "benchmark_results.json").read_text(encoding="utf-8"))
    gqa = results["benchmarks"]["gqa_ru"]
    assert results["objective"] == "benchmark" and gqa["final_p"] == 0.0004
    assert gqa["deployed"]["accuracy"] == 0.9 and gqa["difference"] == 0.6  # never 0.9 - 0.2
    assert results["benchmarks"]["mmbench_ru"]["deployed"] is None


def test_card_metadata_reads_back_with_huggingface_hub(db, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    with Store(db) as store:
        store.update_run(store.latest_run()["id"], final_p={"gqa_ru": 0.0004, "mmbench_ru": 0.2})
        store.pin(1)
    out = tmp_path / "export"
    assert cli("--db", str(db), "--out", str(out)) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "deepvk/llava-saiga-8b" and data.library_name == "peft"
    assert data.pipeline_tag == "image-text-to-text" and data.language == ["ru"]
    assert {"lora", "llava", "gqa-ru", "mmbench-ru"} <= set(data.tags)
    assert data.to_dict()["base_model_relation"] == "adapter"
    # GQA-ru under the exact lmms-eval protocol; MMBench-ru's champion number is a likelihood
    # score (its own protocol), so it stays out of the metadata and the card says why
    (result,) = data.eval_results
    # the split names what was measured: a held-out part of testdev, not all of it
    assert (result.dataset_type, result.dataset_name, result.dataset_split) == (
        "deepvk/GQA-ru", "GQA-ru", "testdev (held-out final subset, n=10 questions)")
    assert result.task_type == "visual-question-answering" and result.metric_type == "accuracy"
    assert result.metric_value == 80.0 and "n=10 questions" in result.metric_name
    assert result.metric_args == {
        "n": 10, "n_unit": "questions", "ci_95": [60.0, 100.0], "protocol": GQA_LMMS,
        "subset": "final (held out, fed no decision)", "run": 1, "base_model_accuracy": 20.0,
        "p_vs_base_model": 0.0004}
    assert "not in the card metadata" in card.text and "MMBench-ru" in card.text
    assert "More information needed" not in card.content
    raw = metadata_load(out / "README.md")
    assert raw["model-index"][0]["results"][0]["metrics"][0]["value"] == 80.0


def test_card_metadata_of_a_non_champion_has_no_results(db, tmp_path):
    from huggingface_hub import ModelCard

    fake_adapter(db.parent / "adapters" / "a3", seed=1)
    assert cli("--db", str(db), "--adapter", "2", "--out", str(tmp_path / "x")) == 0
    card = ModelCard.load(tmp_path / "x" / "README.md")
    assert card.data.eval_results is None and card.data.library_name == "peft"
    assert "belong to the run's champion, not to this adapter" in card.text
