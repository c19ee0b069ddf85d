"""``loop log``, ``loop show`` and ``loop pin`` on a database filled through the Store API."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

from core.exceptions import UserError
from loop.commands import COMMANDS, log, pin, show
from loop.store import Store

QUESTIONS = {
    "gqa_ru": [("g1", "Какого цвета яблоко?", "красное"), ("g2", "Сколько кошек?", "две"),
               ("g3", "Где лежит книга?", "на столе")],
    "mmbench_ru": [("m1", "Что изображено?", "A"), ("m2", "Какое время года?", "C")],
}
# Which questions each evaluation gets right.
BASELINE_RIGHT = {"g2"}
CYCLE1_RIGHT = {"g1", "g2", "m1"}
CYCLE2_RIGHT = {"g1", "m1"}


def predictions(bench: str, right: set[str]) -> list[dict]:
    rows = []
    for sample_id, question, answer in QUESTIONS[bench]:
        ok = sample_id in right
        output = answer if ok else f"На изображении видно много интересного, {sample_id}"
        rows.append({"sample_id": sample_id, "question": question, "answer": answer,
                     "prompt": question, "output": output, "parsed": output if ok else None,
                     "correct": ok, "image_ok": True, "seconds": 0.2,
                     "labels": [] if ok else ["format_mismatch"]})
    return rows


def evaluate(store: Store, run_id: int, cycle_index: int | None, role: str,
             right: set[str]) -> dict[str, int]:
    ids = {}
    for bench in QUESTIONS:
        rows = predictions(bench, right)
        ids[bench] = store.add_evaluation(
            run_id=run_id, cycle_index=cycle_index, role=role, benchmark=bench, split="dev",
            protocol="lmms-generate", n=len(rows), seconds=1.0, adapter_id=None, candidate=None,
            metrics={"accuracy": sum(r["correct"] for r in rows) / len(rows)})
        store.add_predictions(ids[bench], rows)
    return ids


def fill(path: Path) -> dict[str, int]:
    """A finished run (baseline, an accepted and a rejected cycle) and a running one."""
    with Store(path) as store:
        run_id = store.create_run(config={"seed": 0}, environment={}, budget_s=21600,
                                  preset="demo", gpu="cpu")
        evaluate(store, run_id, None, "baseline", BASELINE_RIGHT)
        adapters = []
        for index, (status, right) in enumerate(
                [("accepted", CYCLE1_RIGHT), ("rejected", CYCLE2_RIGHT)], start=1):
            adapter_id = store.add_adapter(run_id=run_id, path=f"runs/1/adapter-{index}",
                                           parent_id=adapters[-1] if adapters else None,
                                           strategy="sft_short_answers", config={"r": 16},
                                           metrics={})
            adapters.append(adapter_id)
            store.add_cycle(
                run_id=run_id, index=index, strategy="sft_short_answers", status=status,
                rationale=f"format_mismatch is most of the errors (cycle {index})",
                candidate={"epochs": index}, dev={"gqa_ru": 0.6 + index / 100, "mmbench_ru": 0.5},
                dev_ci={"gqa_ru": [0.5, 0.7], "mmbench_ru": [0.4, 0.6]},
                paired={"gqa_ru": {"p_value": 0.004, "delta": 0.3}, "mmbench_ru": {"p_value": 0.5}},
                error_profile={"gqa_ru": {"format_mismatch": 2, "counting": 1}},
                duration_s=95.0, adapter_id=adapter_id,
                eval_ids=evaluate(store, run_id, index, "candidate", right))
        store.update_run(run_id, status="finished", spent_s=20000.0,
                         baseline={"gqa_ru": 0.25, "mmbench_ru": 0.0},
                         final={"gqa_ru": 0.55, "mmbench_ru": 0.5},
                         final_n={"gqa_ru": 800, "mmbench_ru": 600},
                         final_deployed={"gqa_ru": 0.6, "mmbench_ru": 0.52},
                         final_p={"gqa_ru": 0.0004, "mmbench_ru": 0.03})
        running = store.create_run(config={}, environment={}, budget_s=3600, preset="demo",
                                   gpu="cpu")
    return {"run": run_id, "running": running, "champion": adapters[0], "other": adapters[1]}


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, dict[str, int]]:
    path = tmp_path / "experiments.db"
    return str(path), fill(path)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (log, show, pin):
        module.add_parser(sub)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_log_json_has_the_design_shape(db, capsys):
    path, ids = db
    assert cli("log", "--db", path, "--json") == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["id"] for r in runs] == [ids["run"], ids["running"]]
    finished, running = runs
    for run in runs:
        assert {"id", "status", "budget_s", "spent_s", "cycles"} <= set(run)
    assert finished["status"] == "finished" and running["status"] == "running"
    assert (finished["budget_s"], finished["spent_s"]) == (21600, 20000.0)
    assert [c["index"] for c in finished["cycles"]] == [1, 2] and running["cycles"] == []
    for cycle in finished["cycles"]:
        assert {"index", "strategy", "status", "dev", "duration_s"} <= set(cycle)
        assert set(cycle["dev"]) == {"gqa_ru", "mmbench_ru"}
        assert all(isinstance(v, float) and 0 <= v <= 1 for v in cycle["dev"].values())
    assert [c["status"] for c in finished["cycles"]] == ["accepted", "rejected"]
    assert set(finished["baseline"]) == set(finished["final"]) == {"gqa_ru", "mmbench_ru"}
    assert finished["final_n"] == {"gqa_ru": 800, "mmbench_ru": 600}
    assert finished["final_p"] == {"gqa_ru": 0.0004, "mmbench_ru": 0.03}
    assert finished["final_deployed"] == {"gqa_ru": 0.6, "mmbench_ru": 0.52}
    assert finished["objective"] == "benchmark" and "final_p" not in running


def test_log_table_for_people(db, capsys):
    assert cli("log", "--db", db[0]) == 0
    out = capsys.readouterr().out
    assert "61.0% [50.0, 70.0]" in out and "0.004" in out and "1m35s" in out
    assert "champion's adapter (lmms-eval protocol) on the final split: gqa_ru 55.0% [" in out
    assert "n=800" in out and "objective benchmark" in out
    assert "champion with its settings (deployment) on the final split: gqa_ru 60.0%" in out
    assert "gqa_ru p=<0.001, mmbench_ru p=0.03" in out


def test_log_without_a_database_suggests_a_run(tmp_path: Path):
    missing = tmp_path / "nothing.db"
    with pytest.raises(UserError, match=r"nothing\.db.*python -m loop run"):
        cli("log", "--db", str(missing))
    assert not missing.exists()


def test_show_explains_the_decision_with_fixed_examples(db, capsys):
    path, ids = db
    assert cli("show", "1", "--db", path, "--run", str(ids["run"])) == 0
    out = capsys.readouterr().out
    assert "format_mismatch is most of the errors (cycle 1)" in out
    assert "accepted: the candidate is the new champion" in out
    assert "g1: Какого цвета яблоко?" in out and "gqa_ru: 1 fixed, 0 broken, 1 still wrong" in out
    assert "format_mismatch  2      67%" in out


def test_show_json_pairs_against_the_champion_before_the_cycle(db, capsys):
    path, ids = db
    assert cli("show", "2", "--db", path, "--run", str(ids["run"]), "--json") == 0
    view = json.loads(capsys.readouterr().out)
    # Cycle 1 was accepted, so cycle 2 is compared with cycle 1's evaluations.
    with Store(path) as store:
        assert view["champion_eval_ids"] == store.cycle(ids["run"], 1)["eval_ids"]
    gqa = view["examples"]["gqa_ru"]
    assert (gqa["fixed_n"], gqa["broken_n"], gqa["still_wrong_n"]) == (0, 1, 1)
    assert view["decision"].startswith("rejected")


def test_show_cycle_zero_is_the_baseline(db, capsys):
    path, ids = db
    assert cli("show", "0", "--db", path, "--run", str(ids["run"]), "--json") == 0
    view = json.loads(capsys.readouterr().out)
    assert view["strategy"] == "baseline" and view["error_profile"]["gqa_ru"] == {
        "format_mismatch": 2}
    assert view["examples"]["gqa_ru"]["still_wrong_n"] == 2


def test_show_unknown_cycle_lists_the_valid_ones(db):
    path, ids = db
    with pytest.raises(UserError, match="no cycle 7; valid cycles: 0, 1, 2"):
        cli("show", "7", "--db", path, "--run", str(ids["run"]))
    with pytest.raises(UserError, match="no cycle 1; valid cycles: none yet"):
        cli("show", "1", "--db", path)  # the latest run has no cycles


def test_pin_best_unpin_and_history(db, capsys):
    path, ids = db
    assert cli("pin", "--best", "--db", path) == 0
    assert f"pinned: adapter {ids['champion']}" in capsys.readouterr().out
    assert cli("pin", str(ids["other"]), "--note", "manual", "--db", path) == 0
    assert cli("pin", "--unpin", "--db", path) == 0
    capsys.readouterr()
    assert cli("pin", "--db", path, "--json") == 0
    state = json.loads(capsys.readouterr().out)
    assert state["pinned"] is None
    assert [(h["action"], h["adapter_id"]) for h in state["history"]] == [
        ("pin", ids["champion"]), ("pin", ids["other"]), ("unpin", ids["other"])]
    assert cli("pin", "--history", "--db", path) == 0
    out = capsys.readouterr().out
    assert "nothing is pinned" in out and "manual" in out


def test_pin_errors(db, tmp_path: Path):
    path, ids = db
    with pytest.raises(UserError, match=f"no adapter 99 .*known adapters: {ids['champion']}"):
        cli("pin", "99", "--db", path)
    empty = tmp_path / "empty.db"
    Store(empty).close()
    with pytest.raises(UserError, match="no champion adapter yet"):
        cli("pin", "--best", "--db", str(empty))


def test_through_the_real_cli_when_every_command_exists(db, capsys):
    for name in COMMANDS:
        try:
            importlib.import_module(f"loop.commands.{name}")
        except ImportError:
            pytest.skip(f"loop.commands.{name} is not written yet")
    from loop.cli import main

    assert main(["log", "--db", db[0], "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 2
    assert main(["show", "9", "--db", db[0]]) == 2
    assert "valid cycles" in capsys.readouterr().err
