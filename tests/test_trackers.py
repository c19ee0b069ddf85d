"""--report-to: a short demo run's numbers in TensorBoard event files; a tracker that is not
installed refused before anything runs; W&B never asks to log in; ``loop show --config``
prints a file that resolves to the run's stored options."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sqlite3
import sys
import types

import pytest

from loop.cli import build_parser, main
from loop.config_file import parse_args, resolved_options

BENCHMARKS = ("gqa_ru", "mmbench_ru")


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
@pytest.mark.parametrize("command", ["run", "train"])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_runs(
        name, command, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # as if the package were absent
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "e.db"
    argv = {"run": ["run", "--budget", "1m", "--db", str(db)],
            "train": ["train", "--steps", "1", "--out", str(tmp_path / "adapter")]}[command]
    assert main([*argv, "--preset", "demo", "--gpu", "cpu", "--report-to", name]) == 2
    err = capsys.readouterr().err
    assert f"--report-to {name} needs `pip install 'llava-ru-loop[{name}]'`" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no database, no adapter folder, nothing


class _FakeRun:
    def __init__(self):
        self.logged, self.config = [], types.SimpleNamespace(update=lambda *a, **k: None)

    def define_metric(self, *args, **kwargs):
        pass

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        pass


@pytest.mark.parametrize(("env", "mode"), [({}, "offline"), ({"WANDB_API_KEY": "k"}, None),
                                           ({"WANDB_MODE": "online"}, None)])
def test_wandb_runs_offline_unless_the_user_set_a_key_or_a_mode(env, mode, tmp_path,
                                                                 monkeypatch):
    from loop.trackers import open_tracker

    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls.append(kwargs) or _FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    tracker = open_tracker("wandb", folder=tmp_path, run_name="run-1")
    tracker.log_scalars({"dev/gqa_ru/champion": 0.5}, 0)
    tracker.close()
    assert calls[0]["mode"] == mode and calls[0]["project"] == "llava-ru-loop"
    assert tracker.run.logged == [{"dev/gqa_ru/champion": 0.5, "cycle": 0}]


# ---------------------------------------------------------------- one short demo run


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A one-cycle demo run that trains (answer_format_sft), from a --config file plus a flag
    that overrides it, reporting to TensorBoard."""
    from core.demo.world import ensure_demo_world

    ensure_demo_world()
    tmp = tmp_path_factory.mktemp("reported")
    config = tmp / "run.yaml"
    config.write_text("budget: 60s\npreset: demo\ngpu: cpu\ndev-size: 30\nfinal-size: 80\n"
                      "max-cycles: 1\nstrategies: answer_format_sft\nreport-to: tensorboard\n",
                      encoding="utf-8")
    db = tmp / "e.db"
    code = main(["-q", "run", "--config", str(config), "--final-size", "30", "--db", str(db)])
    assert code == 0
    return db


def _log(db, capsys) -> dict:
    capsys.readouterr()
    assert main(["log", "--json", "--db", str(db)]) == 0
    return json.loads(capsys.readouterr().out)["runs"][0]


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_runs_numbers(reported_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _log(reported_run, capsys)
    logdir = reported_run.with_name("e.runs") / f"run-{run['id']}" / "tensorboard"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    (cycle,) = run["cycles"]
    for b in BENCHMARKS:
        # the champion's dev score at the baseline (step 0) and after cycle 1
        assert [s for s, _ in scalars[f"dev/{b}/champion"]] == [0, 1]
        assert scalars[f"dev/{b}/candidate"] == [(1, pytest.approx(cycle["dev"][b], abs=1e-6))]
        assert scalars[f"final/{b}/champion"][0][1] == pytest.approx(run["final"][b], abs=1e-6)
        assert scalars[f"final/{b}/baseline"][0][1] == pytest.approx(run["baseline"][b],
                                                                     abs=1e-6)
    assert scalars["decision/accepted"] == [(1, float(cycle["status"] == "accepted"))]
    (loss_tag,) = [t for t in scalars if t.startswith("train/loss/")]
    steps = [s for s, _ in scalars[loss_tag]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5
    assert all(math.isfinite(v) for _, v in scalars[loss_tag])
    texts = events.Tags()["tensors"]
    assert {"decisions/text_summary", "final/text_summary"} <= set(texts)


@pytest.mark.slow
def test_show_config_prints_a_file_that_resolves_to_the_runs_options(reported_run, tmp_path,
                                                                      capsys):
    con = sqlite3.connect(reported_run)
    stored = json.loads(con.execute("select config from loop_runs").fetchone()[0])["options"]
    assert stored["final_size"] == 30 and stored["dev_size"] == 30  # the flag beat the file
    assert stored["report_to"] == "tensorboard" and stored["strategies"] == "answer_format_sft"
    capsys.readouterr()
    assert main(["show", "--config", "--db", str(reported_run)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Run 1 of ") and "final-size: 30\n" in text
    again = tmp_path / "again.yaml"
    again.write_text(text, encoding="utf-8")
    resolved = resolved_options(parse_args(build_parser(), ["run", "--config", str(again)]))
    assert resolved == stored


@pytest.mark.slow
def test_train_reports_its_loss_curve_and_eval_records_its_options(reported_run, tmp_path,
                                                                    capsys):
    """`loop train --report-to tensorboard` writes the loss per step and the GQA-ru dev score
    before and after; `loop eval --config` records the options it resolved with the evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "t.yaml"
    config.write_text("preset: demo\ngpu: cpu\nsteps: 3\nbatch-size: 4\neval-limit: 10\n"
                      "report-to: tensorboard\n", encoding="utf-8")
    out = tmp_path / "adapter"
    assert main(["-q", "train", "--config", str(config), "--out", str(out), "--json"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("train/gqa_ru_dev")] == [0, 3]

    config.write_text("preset: demo\ngpu: cpu\nbenchmark: gqa_ru\nlimit: 12\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["-q", "eval", "--config", str(config), "--split", "final", "--json",
                 "--db", str(reported_run)]) == 0
    eval_id = json.loads(capsys.readouterr().out)["eval_id"]
    con = sqlite3.connect(reported_run)
    row = con.execute("select candidate from loop_evaluations where id = ?", [eval_id]).fetchone()
    options = json.loads(row[0])["options"]
    assert options["limit"] == 12 and options["split"] == "final"
    assert options["benchmark"] == "gqa_ru" and options["preset"] == "demo"
