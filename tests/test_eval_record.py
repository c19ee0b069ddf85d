"""`loop eval` keeps what it did: the evaluation and every per-sample output, in --db."""

from __future__ import annotations

import json

from loop.cli import main
from loop.store import Store


def test_eval_records_the_evaluation_and_every_sample(tmp_path, capsys):
    db = tmp_path / "exp.db"
    args = ["-q", "eval", "--preset", "demo", "--benchmark", "gqa_ru", "--limit", "12",
            "--db", str(db), "--json"]
    assert main(args + ["--samples"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"accuracy", "n", "samples_per_s"} <= set(out)
    model = out["model_info"]
    assert model["source"].endswith("model") and model["adapter"] is None
    assert model["vocab_size"] > 100 and model["image_tokens"] > 0
    assert len(out["samples"]) == out["n"]
    with Store.open_existing(db) as store:
        (ev,) = store.evaluations(role="manual")
        assert ev["id"] == out["eval_id"] and ev["run_id"] is None and ev["n"] == out["n"]
        assert ev["candidate"]["model"] == model
        stored = store.predictions(ev["id"])
    assert [p["output"] for p in stored] == [s["output"] for s in out["samples"]]
    assert sum(p["correct"] for p in stored) == round(out["accuracy"] * out["n"])

    assert main(args) == 0  # without --samples: no outputs printed, still recorded
    assert "samples" not in json.loads(capsys.readouterr().out)
    with Store.open_existing(db) as store:
        assert len(store.evaluations(role="manual")) == 2


def test_eval_samples_needs_json(tmp_path, capsys):
    assert main(["eval", "--benchmark", "gqa_ru", "--samples", "--db",
                 str(tmp_path / "x.db")]) == 2
    assert "--json" in capsys.readouterr().err
