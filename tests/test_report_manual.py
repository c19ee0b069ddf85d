"""``loop eval --split final --adapter ID`` results show in the run's report, as manual ones."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from loop.commands.eval import record
from loop.report import build_report, render_markdown
from loop.report_plots import render_html
from loop.store import Store
from tests.test_report import fill_run


def _manual(db, *, adapter: str, split: str, seed: int = 0, limit=None) -> int:
    """What `loop eval --benchmark gqa_ru --split SPLIT --adapter ADAPTER` records."""
    args = argparse.Namespace(db=str(db), adapter=adapter, benchmark="gqa_ru", split=split,
                              limit=limit, seed=seed)
    result = SimpleNamespace(
        protocol="gqa-ru exact match (lmms-eval prompt and decoding)", n=2, seconds=1.0,
        metrics={"accuracy": 0.5, "n": 2, "ci": [0.1, 0.9]}, config={},
        samples=[{"sample_id": "q1", "correct": True, "output": "да", "cluster": "i1"},
                 {"sample_id": "q2", "correct": False, "output": "нет", "cluster": "i1"}])
    path = adapter if not adapter.isdigit() else f"adapters/a{adapter}"
    return record(args, result, {"source": "model", "adapter": path})


def test_manual_final_evaluations_of_the_runs_adapters_are_in_the_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fixture's adapter paths are relative: adapters/a2, a3
    db = tmp_path / "experiments.db"
    with Store(db) as store:
        run_id = fill_run(store)
        champion = store.adapters(run_id)[0]["id"]
    on_final = _manual(db, adapter=str(champion), split="final")
    by_path = _manual(db, adapter=str(tmp_path / "adapters/a3"), split="all")  # 'all' holds final
    _manual(db, adapter=str(champion), split="dev")          # dev: nothing held out was touched
    _manual(db, adapter="/elsewhere/other", split="final")   # not this run's adapter
    with Store(db) as store:
        report = build_report(store, run_id)
    assert [m["eval_id"] for m in report.manual] == [on_final, by_path]
    assert report.manual[0]["same_questions"] and report.manual[0]["adapter_id"] == champion
    assert not report.manual[1]["same_questions"]
    md, page = render_markdown(report), render_html(report)
    assert "## Manual evaluations on held-out questions" in md
    assert "| the run's final split |" in md and "no longer measures it without bias" in md
    assert "other questions (split all, seed 0)" in md
    assert "Manual evaluations on held-out questions" in page


def test_a_report_without_manual_evaluations_says_nothing_of_them(tmp_path):
    with Store(tmp_path / "experiments.db") as store:
        report = build_report(store, fill_run(store))
    assert report.manual == [] and "Manual evaluations" not in render_markdown(report)
