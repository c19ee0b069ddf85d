"""``loop compare``: two runs side by side, from one database or two."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.metrics import paired_test
from loop.cli import main
from loop.formatting import format_p
from loop.store import Store

GQA = "gqa-ru exact match (lmms-eval prompt and decoding)"
MMB = "mmbench-ru circular, rule-parsed letter (lmms-eval prompt and decoding)"
XSS = "<script>alert(1)</script>"
GQA_IDS = [f"g{i}" for i in range(12)]  # 4 images, 3 questions each
MMB_GROUPS = range(4)  # 2 rotations each: index g and 1_000_000 + g


def _gqa_rows(right: set[str], ids: list[str] = GQA_IDS, tag: str = "") -> list[dict]:
    return [{"sample_id": s, "question": f"Какого цвета предмет {s}?{tag}"
             + (XSS if s == "g6" else ""), "answer": "красный",
             "output": "красный" if s in right else "синий", "parsed": None,
             "correct": s in right, "labels": [] if s in right else ["color"],
             "cluster": f"img{int(s[1:]) // 3}"} for s in ids]


def _mmb_rows(right: set[int], partly: set[int] = frozenset()) -> list[dict]:
    rows = []
    for g in MMB_GROUPS:
        for rot in (0, 1):
            ok = g in right or (g in partly and rot == 0)
            rows.append({"sample_id": str(rot * 1_000_000 + g), "question": f"Что на картинке {g}?",
                         "answer": "AB"[rot], "output": "AB"[rot] if ok else "C", "parsed": None,
                         "correct": ok, "labels": [] if ok else ["other"], "cluster": str(g)})
    return rows


def _eval(store: Store, run_id: int, role: str, bench: str, rows: list[dict]) -> None:
    acc = sum(r["correct"] for r in rows) / len(rows)
    eval_id = store.add_evaluation(
        run_id=run_id, cycle_index=None, role=role, benchmark=bench, split="final",
        protocol=GQA if bench == "gqa_ru" else MMB,
        metrics={"accuracy": acc, "n": len(rows), "ci": [max(0, acc - 0.2), min(1, acc + 0.2)]},
        n=len(rows), seconds=1.0)
    store.add_predictions(eval_id, rows)


def fill(store: Store, *, seed: int, gqa: tuple[set, set], mmb: tuple[set, set],
         partly: set[int] = frozenset(), cycles: list[tuple] = (), gqa_ids=GQA_IDS,
         tag: str = "", finished: bool = True, final_size: int | None = None) -> int:
    """A run with final evaluations: ``gqa``/``mmb`` = (base right, champion right)."""
    run_id = store.create_run(config={"seed": seed, "objective": "benchmark",
                                      "final_size": final_size},
                              environment={"model": "demo"}, budget_s=300, preset="demo",
                              gpu="cpu")
    for index, (strategy, status, p, decision, error) in enumerate(cycles, start=1):
        store.add_cycle(run_id=run_id, index=index, strategy=strategy, status=status,
                        rationale=f"why {strategy}", candidate={}, dev={"gqa_ru": 0.5},
                        dev_ci={}, paired={} if p is None else {"gqa_ru": {
                            "p_value": p, "alpha": 0.03, "decision": decision}},
                        error_profile={}, duration_s=10.0, adapter_id=None, eval_ids={},
                        error=error)
    if not finished:
        return run_id
    for role, g, m in (("final_baseline", gqa[0], mmb[0]), ("final_champion", gqa[1], mmb[1])):
        _eval(store, run_id, role, "gqa_ru", _gqa_rows(g, gqa_ids, tag))
        _eval(store, run_id, role, "mmbench_ru",
              _mmb_rows(m, partly if role == "final_champion" else frozenset()))
    gqa_p = paired_test([s in gqa[0] for s in gqa_ids], [s in gqa[1] for s in gqa_ids],
                        clusters=[int(s[1:]) // 3 for s in gqa_ids]).p_value
    store.update_run(run_id, status="finished", baseline={"gqa_ru": len(gqa[0]) / len(gqa_ids)},
                     final={"gqa_ru": len(gqa[1]) / len(gqa_ids)},
                     final_n={"gqa_ru": len(gqa_ids), "mmbench_ru": 4}, final_p={"gqa_ru": gqa_p})
    return run_id


BASE = {"g0", "g1", "g2"}
A_GQA = BASE | {"g3", "g4", "g5"}
B_GQA = BASE | {"g3", "g6", "g7", "g8", "g9", "g10"}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Run 1 (A) and run 2 (B) on the same final questions, seed 0."""
    path = tmp_path / "e.db"
    with Store(path) as store:
        fill(store, seed=0, gqa=(BASE, A_GQA), mmb=({0}, {0, 1}), partly={3},
             cycles=[("answer_format_sft", "accepted", 0.004,
                      "significantly better on gqa_ru, worse on none", None)])
        fill(store, seed=0, gqa=(BASE, B_GQA), mmb=({0}, {0, 2, 3}),
             cycles=[("prompt_constraints", "rejected", 0.5,
                      "a prompt/decoding setting cannot win under --objective benchmark", None),
                     ("optuna_hpo", "failed", None, None, "CUDA out of memory")])
    return path


def compare_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["compare", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_page_shows_scores_paired_test_fixed_questions_and_decisions(db, capsys):
    assert main(["compare", "1", "2", "--db", str(db)]) == 0
    page = capsys.readouterr().out
    # final scores with intervals, as the report shows them
    assert "| gqa_ru | A: run 1 | 25.0% [5.0, 45.0] | 50.0% [30.0, 70.0] | +25.0 pts |" in page
    assert "| gqa_ru | B: run 2 | 25.0% [5.0, 45.0] | 75.0% [55.0, 95.0] | +50.0 pts |" in page
    # the paired test of the two champions, clustered by image, as an independent call gives
    expected = paired_test([s in A_GQA for s in GQA_IDS], [s in B_GQA for s in GQA_IDS],
                           clusters=[int(s[1:]) // 3 for s in GQA_IDS])
    assert expected.p_value == 0.75  # images flip together: ±2 ±3 ±2, |sum| >= 3 in 6 of 8
    assert ("gqa_ru: 12 shared final questions on 4 images; champion A 50.0%, champion B 75.0%, "
            "B − A +25.0 pts") in page
    assert "p = 0.75 (cluster sign-flip, exact); right only under B: 5, right only under A: 2" in page
    # MMBench-ru: groups, circular (group 3 is only partly right under A's champion)
    assert ("mmbench_ru: 4 shared final question groups; champion A 50.0%, champion B 75.0%"
            in page)
    assert "fixed by both 1, only by run A 2, only by run B 5." in page
    assert "fixed by both 0, only by run A 1, only by run B 2." in page
    assert "| g4 | Какого цвета предмет g4? | красный | синий → красный | синий → синий |" in page
    assert "| 3 | Что на картинке 3? | A | 0/2 rotations right → 1/2 rotations right | 0/2 " \
           "rotations right → 2/2 rotations right |" in page
    # decision paths side by side
    assert re.search(r"\| 1 \| answer_format_sft \| accepted \| gqa_ru 0.004 \(α 0.03\) \| "
                     r"significantly better on gqa_ru, worse on none \| prompt_constraints \| "
                     r"rejected \| gqa_ru 0.5 \(α 0.03\) \| a prompt/decoding setting", page)
    assert "| 2 | - | - | - | - | optuna_hpo | failed | - | error: CUDA out of memory |" in page


def test_json_agrees_with_the_stored_predictions(db, capsys):
    data = compare_json(capsys, "1", "2", "--db", str(db), "--examples", "1")
    gqa = data["fixed"]["gqa_ru"]
    assert (gqa["both"], gqa["only_a"], gqa["only_b"]) == (1, 2, 5)
    assert [e["id"] for e in gqa["examples_only_b"]] == ["g6"]  # capped at --examples
    t = data["paired"]["gqa_ru"]
    assert (t["n"], t["n_clusters"], t["b_only"], t["c_only"]) == (12, 4, 2, 5)
    assert t["p_value"] == 0.75 and t["diff"] == pytest.approx(0.25)
    assert data["shared"]["gqa_ru"] == {"n_a": 12, "n_b": 12, "n_shared": 12, "why": None}
    assert data["scores"]["gqa_ru"]["A"]["champion"]["accuracy"] == 0.5
    assert [d["cycle"] for d in data["decisions"]] == [1, 2] and data["decisions"][1]["A"] is None


def test_two_databases_to_an_escaped_html_page(db, tmp_path, capsys):
    other = tmp_path / "other.db"
    with Store(other) as store:
        fill(store, seed=0, gqa=(BASE, B_GQA), mmb=({0}, {0, 2, 3}))
    out = tmp_path / "pages" / "cmp.html"
    assert main(["compare", "1", "1", "--db", str(db), "--db-b", str(other),
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # g6's question, fixed only by B
    assert f"run B: run 1 of {other.resolve()}" in page and "right only under B: 5" in page
    md = tmp_path / "cmp.md"
    assert main(["compare", "1", "1", "--db", str(db), "--db-b", str(other), "--out", str(md)]) == 0
    assert md.read_text(encoding="utf-8").startswith("# Run 1 (A) vs run 1 (B)")


def test_runs_without_shared_questions_say_why_and_still_compare(db, tmp_path, capsys):
    other = tmp_path / "seed1.db"
    ids = [f"g{i}" for i in range(12, 24)]
    with Store(other) as store:
        fill(store, seed=1, gqa=({"g12"}, {"g12", "g13"}), mmb=({0}, {0}), gqa_ids=ids)
    data = compare_json(capsys, "1", "1", "--db", str(db), "--db-b", str(other))
    assert data["paired"]["gqa_ru"] is None and data["fixed"]["gqa_ru"] is None
    assert "share no final gqa_ru questions" in data["shared"]["gqa_ru"]["why"]
    assert "different seeds" in data["shared"]["gqa_ru"]["why"]
    assert data["paired"]["mmbench_ru"]["n"] == 4  # MMBench-ru groups are still shared
    assert main(["compare", "1", "1", "--db", str(db), "--db-b", str(other)]) == 0
    page = capsys.readouterr().out
    assert "gqa_ru: no paired test: the two runs share no final gqa_ru questions" in page
    assert "| gqa_ru | B: run 1 | 8.3% [0.0, 28.3] | 16.7% [0.0, 36.7] |" in page
    assert "| 1 | answer_format_sft | accepted |" in page  # the decision path is still there


def test_a_smaller_final_subset_is_paired_on_what_it_shares(db, tmp_path, capsys):
    other = tmp_path / "small.db"
    with Store(other) as store:
        fill(store, seed=0, gqa=(BASE, B_GQA), mmb=({0}, {0, 2, 3}), gqa_ids=GQA_IDS[:6],
             final_size=6)
    data = compare_json(capsys, "1", "1", "--db", str(db), "--db-b", str(other))
    assert data["paired"]["gqa_ru"]["n"] == 6 and data["fixed"]["gqa_ru"]["n"] == 6
    assert data["shared"]["gqa_ru"]["why"] == (
        "the two runs share 6 of their final gqa_ru questions (12 in A, 6 in B): different "
        "final subset sizes: run A sized from its budget, run B 6")


def test_same_ids_with_other_questions_are_not_paired(db, tmp_path, capsys):
    other = tmp_path / "other-data.db"
    with Store(other) as store:
        fill(store, seed=0, gqa=(BASE, B_GQA), mmb=({0}, {0}), tag=" (другие данные)")
    data = compare_json(capsys, "1", "1", "--db", str(db), "--db-b", str(other))
    assert data["paired"]["gqa_ru"] is None
    assert "12 questions have the same id but different questions" in data["shared"]["gqa_ru"]["why"]


def test_a_run_without_final_numbers_is_compared_as_far_as_it_goes(db, capsys):
    with Store(db) as store:
        store.update_run(fill(store, seed=0, gqa=(set(), set()), mmb=(set(), set()),
                              finished=False), status="interrupted")
    data = compare_json(capsys, "1", "3", "--db", str(db))
    assert data["paired"]["gqa_ru"] is None
    assert data["shared"]["gqa_ru"]["why"] == ("run 3 (run B) has no final evaluation of gqa_ru "
                                               "(status interrupted)")
    assert data["scores"]["gqa_ru"]["B"]["champion"] is None


@pytest.mark.parametrize("argv, message", [
    (["1", "9"], r"no run 9 in .*e\.db; known runs: 1, 2"),
    (["1", "2", "--db-b", "{tmp}/missing.db"], r"no experiments database at .*missing\.db"),
    (["1", "1"], r"RUN_A and RUN_B are both run 1"),
    (["1", "2", "--out", "{tmp}/page.pdf"], r"--out must name a \.md or \.html file"),
])
def test_errors_are_clear(db, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["compare", *argv, "--db", str(db)]) != 0
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_missing_first_database(tmp_path, capsys):
    assert main(["compare", "1", "2", "--db", str(tmp_path / "none.db")]) != 0
    assert "no experiments database at" in capsys.readouterr().err


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory):
    """Two short demo runs on the same final questions: run 1 stops after the baseline, run 2
    tries one trained remedy."""
    from core.demo.world import ensure_demo_world

    ensure_demo_world()
    path = tmp_path_factory.mktemp("compare-demo") / "e.db"
    small = ["--preset", "demo", "--gpu", "cpu", "--dev-size", "60", "--final-size", "40",
             "--batch-size", "32", "--db", str(path)]
    assert main(["-q", "run", "--budget", "60s", "--max-cycles", "0", *small]) == 0
    assert main(["-q", "run", "--budget", "150s", "--max-cycles", "1",
                 "--strategies", "answer_format_sft", *small]) == 0
    return path


def _stored(db: Path, run_id: int, role: str, bench: str) -> dict[str, tuple[bool, str]]:
    import sqlite3

    con = sqlite3.connect(db)
    rows = con.execute(
        "select p.sample_id, p.correct, p.cluster from loop_predictions p join loop_evaluations e "
        "on p.eval_id = e.id where e.run_id = ? and e.role = ? and e.benchmark = ? "
        "and e.split = 'final' order by p.id", [run_id, role, bench]).fetchall()
    con.close()
    return {s: (bool(c), k) for s, c, k in rows}


@pytest.mark.slow
def test_compare_two_demo_runs(demo_runs, capsys, tmp_path):
    db = demo_runs
    data = compare_json(capsys, "1", "2", "--db", str(db))
    capsys.readouterr()
    assert main(["log", "--json", "--db", str(db)]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    for side, run in zip("AB", runs, strict=True):
        for bench in ("gqa_ru", "mmbench_ru"):
            assert data["scores"][bench][side]["champion"]["accuracy"] == run["final"][bench]
            assert data["scores"][bench][side]["final_p"] == run["final_p"][bench]
    # GQA-ru from the stored predictions: the same questions, the same test, the same fixes
    a_base, a_champ, b_base, b_champ = (_stored(db, r, role, "gqa_ru") for r, role in (
        (1, "final_baseline"), (1, "final_champion"), (2, "final_baseline"), (2, "final_champion")))
    ids = list(a_champ)
    assert set(ids) == set(b_champ) and data["shared"]["gqa_ru"]["n_shared"] == len(ids) > 30
    expected = paired_test([a_champ[s][0] for s in ids], [b_champ[s][0] for s in ids],
                           clusters=[a_champ[s][1] for s in ids])
    t = data["paired"]["gqa_ru"]
    assert (t["p_value"], t["b_only"], t["c_only"], t["n_clusters"]) == (
        expected.p_value, expected.b_only, expected.c_only, expected.n_clusters)
    fixed_a = {s for s in ids if a_champ[s][0] and not a_base[s][0]}
    fixed_b = {s for s in ids if b_champ[s][0] and not b_base[s][0]}
    f = data["fixed"]["gqa_ru"]
    assert (f["both"], f["only_a"], f["only_b"]) == (
        len(fixed_a & fixed_b), len(fixed_a - fixed_b), len(fixed_b - fixed_a))
    assert not fixed_a  # run 1's champion is its base model
    assert data["decisions"][0]["A"] is None and data["decisions"][0]["B"]["strategy"] == \
        "answer_format_sft"
    out = tmp_path / "cmp.html"
    assert main(["compare", "1", "2", "--db", str(db), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    p_text = format_p(t["p_value"])
    p_text = f"&lt; {p_text[1:]}" if p_text.startswith("<") else f"= {p_text}"
    assert f"p {p_text} (cluster sign-flip" in page
