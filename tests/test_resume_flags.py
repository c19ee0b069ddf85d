"""`loop run --resume` continues a run with its own options: flags that would change them are
refused with one line naming each, never silently dropped."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from loop.cli import main
from loop.controller import RunConfig
from loop.store import Store

OPTIONS = {"budget": "5m", "gpu": "cpu", "preset": "demo", "reserve": 0.2, "seed": 0,
           "prefix_cache": True, "objective": "benchmark", "dev_size": None,
           "strategies": "prompt_constraints,answer_format_sft", "heartbeat": 20}


@pytest.fixture
def killed_run(tmp_path):
    """A database whose latest run was killed mid-way (still 'running')."""
    db = tmp_path / "experiments.db"
    store = Store(str(db))
    config = RunConfig(budget_s=300, gpu="cpu", preset="demo", options=dict(OPTIONS),
                       strategies=["prompt_constraints", "answer_format_sft"])
    store.create_run(config=asdict(config), environment={}, budget_s=300, preset="demo",
                     gpu="cpu")
    store.close()
    return db


def _runs(db):
    store = Store(str(db))
    try:
        return [(r["id"], r["status"]) for r in store._rows("loop_runs", order_by="id")]
    finally:
        store.close()


def test_resume_with_other_options_is_refused_naming_them(killed_run, capsys):
    before = _runs(killed_run)
    rc = main(["run", "--resume", "--db", str(killed_run), "--budget", "1h", "--preset",
               "saiga-tiny", "--dev-size", "40", "--no-prefix-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith("error: ") and "run 1" in line
    for part in ("--budget 1h (the run's: 5m)", "--preset saiga-tiny (the run's: demo)",
                 "--dev-size 40 (the run's: none)", "--no-prefix-cache"):
        assert part in line, line
    assert _runs(killed_run) == before  # nothing resumed, nothing created


def test_resume_with_the_run_s_own_options_or_no_options_is_not_refused(killed_run):
    from loop.commands.run import resume_conflicts

    store = Store(str(killed_run))
    run = store.latest_run()
    store.close()
    same = ["--budget", "5m", "--preset", "demo", "--gpu", "cpu",
            "--strategies", "prompt_constraints,answer_format_sft"]
    assert resume_conflicts(_parsed(["run", "--resume", *same]), run) == []
    assert resume_conflicts(_parsed(["run", "--resume"]), run) == []
    # where the run's password-less storage URL must be given again, and where files go
    # after the run, the caller's flags apply
    assert resume_conflicts(_parsed(["run", "--resume", "--storage", "x.log",
                                     "--output_path", "out"]), run) == []
    assert resume_conflicts(_parsed(["run", "--resume", "--seed", "3"]), run) == [
        "--seed 3 (the run's: 0)"]


def _parsed(argv):
    from loop.cli import build_parser

    return build_parser().parse_args(argv)
