"""``python -m loop diagnose``: the profile from stored predictions and from a live evaluation."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from core.data import DataSources
from core.demo import scenes as sc
from core.exceptions import UserError
from loop.commands import diagnose
from loop.store import Store


def run_cli(argv: list[str]) -> int:
    """Parse and run like ``loop.cli.main`` with only this subcommand registered."""
    parser = argparse.ArgumentParser(prog="python -m loop")
    parser.add_argument("-q", "--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    diagnose.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


ROWS = [  # sample_id, question, answer, output, correct, labels
    ("1", "Какого цвета фигура слева?", "красный", "На этой картинке фигура красного цвета.",
     False, ["color", "format_mismatch"]),
    ("2", "Сколько фигур на картинке?", "две", "Я вижу две фигуры разного цвета.", False,
     ["counting", "format_mismatch"]),
    ("3", "Где находится синяя фигура?", "слева", "справа", False, ["location"]),
    ("4", "Есть ли на картинке круг?", "да", "да", True, []),
    ("5", "Какого цвета фигура справа?", "синий", "зелёный", False, []),
]


@pytest.fixture()
def db_with_eval(tmp_path):
    path = tmp_path / "experiments.db"
    with Store(path) as store:
        eval_id = store.add_evaluation(run_id=None, cycle_index=None, role="manual",
                                       benchmark="gqa_ru", split="dev",
                                       protocol="gqa-ru exact match", metrics={"accuracy": 0.2},
                                       n=len(ROWS), seconds=1.0)
        store.add_predictions(eval_id, [
            {"sample_id": sid, "question": q, "answer": a, "output": o, "parsed": o,
             "correct": c, "image_ok": True, "labels": labels}
            for sid, q, a, o, c, labels in ROWS])
    return path, eval_id


def test_diagnose_from_db_json(db_with_eval, capsys):
    path, eval_id = db_with_eval
    assert run_cli(["diagnose", "--from-db", str(eval_id), "--db", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prof = out["profile"]
    assert out["benchmark"] == "gqa_ru" and out["accuracy"] == 0.2 and out["n"] == 5
    assert prof["n"] == 5 and prof["n_errors"] == 4
    assert prof["counts"]["format_mismatch"] == 2 and prof["counts"]["other"] == 1
    assert prof["main_cause"] == "format_mismatch"
    assert prof["recommended_strategies"][0] == "prompt_constraints"
    assert out["recommendations"][0].startswith("2 of 4 errors (50%) are format_mismatch")


def test_diagnose_from_db_table(db_with_eval, capsys):
    path, eval_id = db_with_eval
    assert run_cli(["diagnose", "--from-db", str(eval_id), "--db", str(path)]) == 0
    text = capsys.readouterr().out
    assert "main cause: format_mismatch" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("label"))
    assert lines[header].split() == ["label", "errors", "share", "example"]
    assert lines[header + 2].split()[:3] == ["format_mismatch", "2", "50%"]
    assert "Recommendations:" in text and "prompt_constraints" in text


@pytest.mark.parametrize("argv, message", [
    (["diagnose"], "needs --benchmark"),
    (["diagnose", "--benchmark", "gqa_ru", "--limit", "0"], "--limit must be a positive"),
    (["diagnose", "--benchmark", "gqa_ru", "--mode", "likelihood"], "mmbench_ru only"),
])
def test_diagnose_rejects_bad_arguments(argv, message):
    with pytest.raises(UserError, match=message):
        run_cli(argv)


def test_diagnose_from_db_checks_the_benchmark_and_the_id(db_with_eval):
    path, eval_id = db_with_eval
    with pytest.raises(UserError, match="is on gqa_ru, but --benchmark mmbench_ru"):
        run_cli(["diagnose", "--from-db", str(eval_id), "--db", str(path),
                 "--benchmark", "mmbench_ru"])
    with pytest.raises(UserError, match="no evaluation 99"):
        run_cli(["diagnose", "--from-db", "99", "--db", str(path)])
    with pytest.raises(UserError, match="no experiments database"):
        run_cli(["diagnose", "--from-db", "1", "--db", str(path.with_name("none.db"))])


def test_diagnose_evaluates_and_profiles(monkeypatch, tiny_vlm, capsys):
    """A live evaluation with the tiny random VLM on synthetic GQA-ru questions."""
    import core.data
    import loop.runtime
    import loop.sources

    rng = random.Random(0)
    examples = []
    for i in range(3):
        scene = sc.random_scene(rng)
        img = sc.render(scene, rng)
        for j, q in enumerate(sc.questions_for(scene, rng)):
            examples.append({"id": f"t{i}{j}", "imageId": f"t{i}", "question": q.question,
                             "answer": q.answer, "benchmark": "gqa_ru",
                             "types": dict(zip(("structural", "semantic", "detailed"), q.types)),
                             "semantic": [{"operation": op, "argument": a, "dependencies": []}
                                          for op, a in q.semantic],
                             "_image": lambda im=img: im})
    monkeypatch.setattr(loop.sources, "sources_from_args",
                        lambda args: loop.sources.Sources("demo", "tiny", DataSources()))
    monkeypatch.setattr(core.data, "load_benchmark", lambda benchmark, data: examples)
    monkeypatch.setattr(loop.runtime, "load_model_for", lambda model, gpu, adapter=None: tiny_vlm)
    assert run_cli(["-q", "diagnose", "--benchmark", "gqa_ru", "--split", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    prof = out["profile"]
    assert out["n"] == prof["n"] == len(examples)
    assert prof["n_errors"] == round(len(examples) * (1 - out["accuracy"]))
    assert {"attr", "obj"} <= set(prof["per_category"]) <= {"attr", "rel", "obj"}
    assert sum(prof["counts"].values()) >= prof["n_errors"]
