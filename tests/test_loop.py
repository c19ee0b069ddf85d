"""The loop end to end on the demo world: run, budget, log shape, concurrency, kill and resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import strategies
from loop.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--preset", "demo", "--dev-size", "60", "--final-size", "60", "--batch-size", "32"]


@pytest.fixture(scope="session")
def demo_world():
    from core.demo.world import ensure_demo_world

    return ensure_demo_world()


def _log(db, capsys) -> dict:
    capsys.readouterr()
    assert main(["log", "--json", "--db", str(db)]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_run_end_to_end_records_everything(demo_world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "e.db"
    code = main(["-q", "run", "--budget", "150s", "--db", str(db), *SMALL,
                 "--strategies", "prompt_constraints,generation_params,answer_format_sft"])
    assert code == 0
    log = _log(db, capsys)
    (run,) = log["runs"]
    assert run["status"] == "finished" and run["budget_s"] == 150
    assert run["spent_s"] <= 150 + 60  # the budget, with the 60 s slack the issue allows
    assert set(run["baseline"]) == set(run["final"]) == {"gqa_ru", "mmbench_ru"}
    assert all(0 <= v <= 1 for v in run["final"].values())
    assert run["final_n"]["gqa_ru"] > 0 and run["cycles"]
    for cycle in run["cycles"]:
        assert cycle["status"] in ("accepted", "rejected", "failed")
        assert {"index", "strategy", "dev", "duration_s"} <= set(cycle)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n_pred = con.execute("SELECT count(*) FROM loop_predictions").fetchone()[0]
    assert n_pred >= 4 * 60  # baseline dev + final, both benchmarks, every prediction stored
    assert main(["show", "1", "--db", str(db)]) == 0
    shown = capsys.readouterr().out
    assert "why: " in shown and "decision: " in shown


class SlowFake(strategies.base.Strategy):
    """A remedy that takes 8 s to propose the champion again (never better)."""

    name, family, summary = "slow_fake", "fake", "sleeps"
    addresses = {label: 0.5 for label in ("format_mismatch", "counting", "color", "location",
                                          "other")}

    def propose(self, ctx):
        time.sleep(8)
        return ctx.champion.derive("slow_fake", "no change, slowly")

    def estimate_cost(self, ctx):
        return 8.0


def test_budget_is_respected_under_a_slow_strategy(demo_world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(strategies.REGISTRY, "slow_fake", f"{__name__}:SlowFake")
    monkeypatch.setitem(sys.modules, __name__, sys.modules[__name__])
    db = tmp_path / "e.db"
    t0 = time.time()
    # a remedy that trains nothing is an ordinary candidate only under --objective deployment
    assert main(["-q", "run", "--budget", "45s", "--db", str(db), *SMALL,
                 "--strategies", "slow_fake", "--objective", "deployment"]) == 0
    wall = time.time() - t0
    (run,) = _log(db, capsys)["runs"]
    assert run["status"] == "finished"
    assert run["spent_s"] <= 45 * 1.03 + 2 and wall < 45 + 20  # + interpreter start-up, report
    assert len(run["cycles"]) >= 1 and all(c["status"] == "rejected" for c in run["cycles"])


def test_a_second_run_on_a_live_database_is_refused(demo_world, tmp_path, capsys):
    from loop.store import Store

    db = tmp_path / "e.db"
    holder = Store(db)
    run_id = holder.create_run(config={}, environment={}, budget_s=10, preset="demo", gpu="cpu")
    holder.acquire_run_lock(run_id)
    try:
        code = main(["-q", "run", "--budget", "30s", "--db", str(db), *SMALL])
        assert code == 2
        err = capsys.readouterr().err
        assert "run" in err and str(os.getpid()) in err
    finally:
        holder.release_run_lock()
        holder.close()


def _spawn(db: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loop", "-q", "run", "--db", str(db), *SMALL,
                             *extra], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(db: Path, sql: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        if db.exists():
            try:
                con = sqlite3.connect(db, timeout=1)
                if con.execute(sql).fetchone()[0]:
                    return
            except sqlite3.OperationalError:
                pass
            finally:
                con.close()
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for: {sql}")


# Kills during evaluations (baseline, candidate, final) at default sizes: tests/test_survive.py.
@pytest.mark.parametrize("moment,strategy_list,sql", [
    ("training", "answer_format_sft",
     "SELECT count(*) FROM loop_steps WHERE kind='cycle' AND status='started'"),
])
def test_killed_run_resumes_without_loss_or_double_counting(demo_world, tmp_path, capsys,
                                                           moment, strategy_list, sql):
    db = tmp_path / "e.db"
    proc = _spawn(db, tmp_path, "--budget", "150s", "--strategies", strategy_list)
    _wait_for(db, sql, proc)
    time.sleep(2.0 if moment == "training" else 0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    before = con.execute("SELECT count(*) FROM loop_cycles").fetchone()[0]
    evals_before = con.execute("SELECT count(*) FROM loop_evaluations").fetchone()[0]
    con.close()
    resumed = subprocess.run([sys.executable, "-m", "loop", "-q", "run", "--resume", "--db", str(db)],
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    (status,) = con.execute("SELECT status FROM loop_runs").fetchone()
    assert status == "finished"
    indices = [r[0] for r in con.execute("SELECT cycle_index FROM loop_cycles ORDER BY cycle_index")]
    assert indices == list(range(1, len(indices) + 1)) and len(indices) >= before
    roles = [r[0] for r in con.execute(
        "SELECT role FROM loop_evaluations WHERE role LIKE 'final%' OR role='baseline'")]
    assert roles.count("baseline") == 2 and roles.count("final_baseline") == 2
    assert roles.count("final_champion") == 2
    assert con.execute("SELECT count(*) FROM loop_evaluations").fetchone()[0] >= evals_before
