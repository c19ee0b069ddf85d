"""``loop.report`` and ``python -m loop report`` on a database filled through the Store API."""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from core.exceptions import UserError
from loop.commands import report as report_command
from loop.report import build_report, write_report
from loop.report_plots import dev_accuracy_svg
from loop.store import Store

XSS = "<script>alert(1)</script>"
GQA_LMMS = "gqa-ru exact match (lmms-eval prompt and decoding)"
MMB_LMMS = "mmbench-ru circular, rule-parsed letter (lmms-eval prompt and decoding)"
MMB_LIKELIHOOD = "mmbench-ru option-text likelihood (circular by construction)"
SAMPLES = {
    "gqa_ru": [(f"g{i}", f"Какого цвета предмет номер {i}?", "красный") for i in range(10)],
    "mmbench_ru": [(f"m{i}", f"Что изображено на картинке {i}?", "A") for i in range(8)],
}


def predictions(bench: str, right: set[str], planted: dict[str, str]) -> list[dict]:
    """Predictions right on ``right``; a wrong answer is verbose (format_mismatch) or planted."""
    rows = []
    for sample_id, question, answer in SAMPLES[bench]:
        ok = sample_id in right
        output = answer if ok else planted.get(sample_id, "На картинке, скорее всего, синий.")
        labels = [] if ok else ["format_mismatch"] + (["color"] if sample_id.endswith("3") else [])
        rows.append({"sample_id": sample_id, "question": question, "answer": answer,
                     "prompt": f"{question}\nОтветь одним словом.", "output": output,
                     "parsed": output if ok else None, "correct": ok, "image_ok": True,
                     "seconds": 0.1, "labels": labels})
    return rows


def add_eval(store: Store, run_id: int, role: str, bench: str, right: set[str], *,
             split: str = "dev", cycle: int | None = None, protocol: str | None = None,
             adapter_id: int | None = None, planted: dict[str, str] | None = None) -> int:
    rows = predictions(bench, right, planted or {})
    acc = sum(r["correct"] for r in rows) / len(rows)
    ci = [max(0.0, acc - 0.2), min(1.0, acc + 0.2)]
    metrics = {"accuracy": acc, "n": len(rows), "ci": ci, "per_category": {}}
    if bench == "gqa_ru":
        metrics.update(accuracy_normalized=acc, ci_normalized=ci)
    else:
        metrics.update(per_row=acc, ci_per_row=ci, n_rows=len(rows), unparseable=1,
                       accuracy_lenient=min(1.0, acc + 0.125), unparseable_lenient=0)
    protocol = protocol or (GQA_LMMS if bench == "gqa_ru" else MMB_LMMS)
    eval_id = store.add_evaluation(
        run_id=run_id, cycle_index=cycle, role=role, benchmark=bench, split=split,
        protocol=protocol, metrics=metrics, n=len(rows), seconds=3.0, adapter_id=adapter_id,
        candidate={"eval_configs": {}} if role == "final_champion" else None)
    store.add_predictions(eval_id, rows)
    return eval_id


def fill_run(store: Store, *, preset: str = "saiga", adapter_path: str = "adapters/a2") -> int:
    """A finished run: dev baseline, three cycles (prompt accepted, SFT accepted, HPO
    rejected) and the final evaluations of the base model and the champion (adapter 2's)."""
    run_id = store.create_run(config={"seed": 0, "preset": preset},
                              environment={"versions": {"torch": "2.13.0", "peft": "0.21.2"},
                                           "seed": 0, "git_commit": "abc123"},
                              budget_s=21600, preset=preset, gpu="t4")
    for bench in SAMPLES:
        add_eval(store, run_id, "baseline", bench, {"g0", "g1", "m0"})
    profile = {"gqa_ru": {"format_mismatch": 8, "color": 1}, "mmbench_ru": {"format_mismatch": 7}}
    adapters = [None]
    for index, (strategy, status, right, p_value, trains) in enumerate([
            ("prompt_constraints", "accepted", {"g0", "g1", "g2", "g3", "m0", "m1"}, 0.01, False),
            ("sft_short_answers", "accepted", {f"g{i}" for i in range(7)} | {"m0", "m1", "m2"},
             0.003, True),
            ("hpo", "rejected", {f"g{i}" for i in range(6)} | {"m0", "m1"}, 0.6, True)],
            start=1):
        adapter_id = None
        if trains:
            adapter_id = store.add_adapter(run_id=run_id, path=f"adapters/a{index}",
                                           parent_id=adapters[-1], strategy=strategy,
                                           config={"rank": 16, "lr": 2e-4, "epochs": 1},
                                           metrics={"train_loss": 0.8})
            adapters.append(adapter_id)
        eval_ids = {b: add_eval(store, run_id, "candidate", b, right, cycle=index,
                                adapter_id=adapter_id) for b in SAMPLES}
        dev = {"gqa_ru": len([s for s in right if s[0] == "g"]) / 10,
               "mmbench_ru": len([s for s in right if s[0] == "m"]) / 8}
        store.add_cycle(
            run_id=run_id, index=index, strategy=strategy, status=status,
            rationale=f"format_mismatch is 89% of GQA-ru errors; {strategy} has not been tried",
            candidate={"strategy": strategy, "description": strategy, "eval_configs": {}},
            dev=dev, dev_ci={b: [v - 0.15, min(1.0, v + 0.15)] for b, v in dev.items()},
            paired={b: {"n": 10, "diff": 0.2, "p_value": p_value} for b in SAMPLES},
            error_profile=profile, duration_s=300.0 * index, adapter_id=adapter_id,
            eval_ids=eval_ids)
        # Later profiles in the shape of core.errors.ErrorProfile.to_dict().
        profile = {b: {"benchmark": b, "n": 10, "n_errors": 4, "counts": counts,
                       "shares": {k: v / 4 for k, v in counts.items()}, "main_cause": "color"}
                   for b, counts in (("gqa_ru", {"format_mismatch": 2, "color": 2}),
                                     ("mmbench_ru", {"other": 4}))}
    champion = adapters[1]
    add_eval(store, run_id, "final_baseline", "gqa_ru", {"g0", "g1"}, split="final",
             planted={"g5": "Предмет красного цвета " + XSS})
    add_eval(store, run_id, "final_champion", "gqa_ru", {f"g{i}" for i in range(8)},
             split="final", adapter_id=champion, planted={"g9": XSS + " синий"})
    add_eval(store, run_id, "final_baseline", "mmbench_ru", {"m0"}, split="final")
    add_eval(store, run_id, "final_champion", "mmbench_ru", {"m0", "m1", "m2", "m3"},
             split="final", adapter_id=champion, protocol=MMB_LIKELIHOOD)
    store.update_run(run_id, status="finished", spent_s=21000.0,
                     baseline={"gqa_ru": 0.2, "mmbench_ru": 0.125},
                     final={"gqa_ru": 0.8, "mmbench_ru": 0.5},
                     final_n={"gqa_ru": 10, "mmbench_ru": 8})
    return run_id


def cli(*argv: str) -> int:
    """Run ``python -m loop report ARGV`` in process."""
    parser = argparse.ArgumentParser()
    report_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    return args.func(args)


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, int]:
    db = tmp_path / "experiments.db"
    with Store(db) as store:
        run_id = fill_run(store)
    return db, run_id


def write(db: Path, out: Path, run_id: int | None = None) -> tuple[str, str]:
    with Store(db) as store:
        md, html = write_report(build_report(store, run_id), out)
    return md.read_text(encoding="utf-8"), html.read_text(encoding="utf-8")


def test_untrusted_output_is_escaped(filled, tmp_path):
    md, html = write(*filled[:1], tmp_path / "r" / "report.md")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html.lower()
    assert "<script" not in md.lower()


def test_headline_has_n_intervals_protocols_and_published_scores(filled, tmp_path):
    md, html = write(filled[0], tmp_path / "report.md")
    for text in (md, html):
        assert "80.0% [60.0, 100.0]" in text  # GQA-ru champion on final with its interval
        assert "20.0% [0.0, 40.0]" in text  # GQA-ru base model
        assert "51.44%" in text and "56.65%" in text
        assert GQA_LMMS in text and MMB_LIKELIHOOD in text
        assert "same protocol as the published score" in text
        assert "different protocol" in text  # the likelihood champion on MMBench-ru
        assert "random letter" in text  # lmms-eval vs counting unparseable answers wrong
        assert "slightly lower" not in text  # measured, not guessed:
        assert "1 answers unread by the lmms-eval rule (counted wrong)" in text
        assert "lenient reading (not the lmms-eval rule): " in text
        assert "GPU profile t4" in text and "budget 6h00m" in text and "git_commit: abc123" in text
    row = next(line for line in md.splitlines() if line.startswith("| gqa_ru | champion"))
    assert "| 10 |" in row  # n next to the number
    row = next(line for line in md.splitlines() if line.startswith("| mmbench_ru | base model"))
    assert row.endswith("| same protocol as the published score |")


def test_decisions_and_examples(filled, tmp_path):
    md, html = write(filled[0], tmp_path / "report.md")
    assert "sft_short_answers" in md and "rejected" in md and "0.003" in md and "5m00s" in md
    assert "format_mismatch is 89% of GQA-ru errors" in html
    assert "fixed 6, broke 0 and still gets 2 wrong" in md  # GQA-ru: g2..g7 fixed, g8, g9 not
    assert "Какого цвета предмет номер 5?" in html and "Какого цвета предмет номер 9?" in html


def test_html_is_self_contained_with_valid_svg_plots(filled, tmp_path):
    _, html = write(filled[0], tmp_path / "report.md")
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 2
    for svg in svgs:
        ET.fromstring(svg)  # well-formed XML
    assert "<circle" in svgs[0] and "<polyline" in svgs[0] and "<rect" in svgs[1]
    assert ">other</text>" in svgs[1] and ">color</text>" in svgs[1] and "n_errors" not in svgs[1]
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)
    assert "<style>" in html


def test_dev_plot_marks_failed_cycles_without_a_value():
    svg = dev_accuracy_svg({"gqa_ru": [
        {"index": 0, "strategy": "baseline", "status": "baseline", "accuracy": 0.3,
         "ci": [0.2, 0.4], "champion": 0.3},
        {"index": 1, "strategy": "<b>sft</b>", "status": "failed", "accuracy": None, "ci": None,
         "champion": 0.3}]})
    ET.fromstring(svg)
    assert "×" in svg and "<b>" not in svg


def test_run_without_cycles_or_final(tmp_path):
    db = tmp_path / "experiments.db"
    with Store(db) as store:
        empty = store.create_run(config={}, environment={}, budget_s=300, preset="demo", gpu="cpu")
        with_baseline = store.create_run(config={}, environment={}, budget_s=300, preset="demo",
                                         gpu="cpu")
        for bench in SAMPLES:
            add_eval(store, with_baseline, "baseline", bench, {"g0", "m0"})
    md, html = write(db, tmp_path / "a", empty)
    assert "No cycle was recorded." in md and "<svg" not in html
    md, html = write(db, tmp_path / "b", with_baseline)
    assert "not measured" in md and "synthetic" in md
    assert html.count("<svg") == 2  # the baseline's dev point and error profile


def test_demo_run_is_marked_not_comparable(tmp_path):
    db = tmp_path / "experiments.db"
    with Store(db) as store:
        fill_run(store, preset="demo")
    md, _ = write(db, tmp_path / "report.md")
    assert "not comparable: synthetic demo world" in md
    assert "same protocol as the published score" not in md


def test_report_command_writes_both_files_and_records_the_path(filled, tmp_path, monkeypatch,
                                                               capsys):
    db, run_id = filled
    monkeypatch.chdir(tmp_path)
    assert cli("--db", str(db)) == 0
    printed = capsys.readouterr().out
    # the run's own folder beside its database, so databases in one folder never collide
    md = Path(db).resolve().parent / f"{Path(db).stem}.runs" / f"run-{run_id}" / "report" / "report.md"
    assert md.is_file() and md.with_suffix(".html").is_file()
    assert str(md) in printed and str(md.with_suffix(".html")) in printed
    with Store(db) as store:
        assert store.get_run(run_id)["report_path"] == str(md)
    assert cli("--db", str(db), "--run", str(run_id), "--out", str(tmp_path / "elsewhere")) == 0
    assert (tmp_path / "elsewhere" / "report.html").is_file()


def test_report_without_runs_is_a_user_error(tmp_path):
    db = tmp_path / "experiments.db"
    Store(db).close()
    with pytest.raises(UserError, match="no runs yet.*python -m loop run"):
        cli("--db", str(db))
    with pytest.raises(UserError, match="no run 7 in"):
        cli("--db", str(db), "--run", "7")


def test_report_names_the_objective_and_the_final_verdict(filled, tmp_path):
    db, run_id = filled
    with Store(db) as store:
        store.update_run(run_id, final_p={"gqa_ru": 0.0004, "mmbench_ru": 0.2},
                         final_deployed={"gqa_ru": 0.9})
    md, html_text = write(db, tmp_path / "r")
    for text in (md, html_text):
        assert "objective benchmark: only adapters could win" in text
        assert "gqa_ru p=" in text and "mmbench_ru p=0.2" in text
        assert "champion with its settings (deployment)" in text and "90.0%" in text
