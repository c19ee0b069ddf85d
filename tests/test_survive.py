"""Runs that survive anything, tried as a user would: default sizes, SIGKILL at several moments
of one demo run and at ten random moments of another, each followed by ``--resume``; a resumed
run keeps what it had ruled out; databases sharing a working folder; remedies that raise."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.exceptions import UserError
from loop.cli import main
from strategies.base import Candidate, Context, Strategy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

# The moments to kill the run at: an SQL condition on the database that says the run is inside
# that phase now, or "checkpoint" (a training has saved a resumable checkpoint), and how long to
# wait before the kill. Checked in order; a moment the run has already passed is skipped.
_IN_CYCLE = ("join loop_steps s on s.run_id = p.run_id and s.key = 'cycle-' || p.cycle_index "
             "and s.status = 'started'")
_TRAINED = "select 1 from loop_adapters a where a.path = json_extract(p.payload, '$.adapter_path')"
MOMENTS = [
    ("baseline", "select count(*) from loop_steps where key = 'baseline' and status = 'started'",
     1.0),
    ("sft data", f"select count(*) from loop_proposals p {_IN_CYCLE} where p.name = 'choice' "
     "and json_extract(p.payload, '$.strategy') = 'answer_format_sft' and not exists (select 1 "
     "from loop_proposals t where t.cycle_index = p.cycle_index and t.name like 'train:%')", 0.3),
    ("sft training", "checkpoint", 0.5),
    ("candidate evaluation", f"select count(*) from loop_proposals p {_IN_CYCLE} where p.name "
     f"like 'train:%' and exists ({_TRAINED})", 0.5),
    ("final evaluation", "select count(*) from loop_steps where key like 'final-%' and "
     "status = 'started'", 1.0),
]


def _at(db: Path, moment: str) -> bool:
    if moment == "checkpoint":
        return any(db.with_name(f"{db.stem}.runs").glob("run-*/adapters/*/checkpoint/trainer_state.pt"))
    return bool(_query(db, moment))


def _query(db: Path, sql: str) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute(sql).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _run(db: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "loop", "-q", "run", "--db", str(db), *args],
                            cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(db: Path, sql: str, proc: subprocess.Popen, timeout: float = 300) -> bool:
    """True once ``sql`` counts something; False when the process ended first."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if db.exists() and _at(db, sql):
            return True
        time.sleep(0.2)
    return False


def _cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def demo_world():
    from core.demo.world import ensure_demo_world

    return ensure_demo_world()


def test_sigkill_at_every_phase_then_resume_loses_and_doubles_nothing(demo_world, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "e.db"
    proc = _run(db, tmp_path, "--preset", "demo", "--gpu", "cpu", "--budget", "150s")
    killed = []
    for name, sql, delay in MOMENTS:
        if not _wait_for(db, sql, proc):
            continue
        time.sleep(delay)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed.append(name)
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        proc = _run(db, tmp_path, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert len(killed) >= 3, killed

    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("select status from loop_runs").fetchall() == [("finished",)]
    indices = [r[0] for r in con.execute("select cycle_index from loop_cycles order by 1")]
    assert indices == list(range(1, len(indices) + 1))
    doubled = con.execute(
        "select count(*) from (select 1 from loop_evaluations where role != 'candidate' "
        "group by run_id, role, benchmark, split, cycle_index having count(*) > 1)"
    ).fetchone()[0]
    doubled += con.execute(
        "select count(*) from (select 1 from loop_evaluations where role = 'candidate' "
        "group by cycle_index, benchmark having count(*) > 1)").fetchone()[0]
    doubled += con.execute("select count(*) from (select 1 from loop_predictions "
                           "group by eval_id, sample_id having count(*) > 1)").fetchone()[0]
    assert doubled == 0
    assert con.execute("select count(*) from (select path from loop_adapters group by path "
                       "having count(*) > 1)").fetchone()[0] == 0
    # No finished step was done twice: every step done again was one a kill had cut short.
    redone = con.execute("select count(*) from loop_steps where attempts > 1").fetchone()[0]
    assert redone <= len(killed)
    resumes = con.execute("select count(*) from loop_resumes").fetchone()[0]
    assert resumes == len(killed)
    # The subsets were decided once and never re-sized: every dev evaluation that ran to the
    # end (not stopped for futility) has one size.
    sizes = con.execute("select benchmark, count(distinct n) from loop_evaluations "
                        "where split = 'dev' and coalesce(json_extract(progress, '$.stopped'), "
                        "0) = 0 group by benchmark").fetchall()
    assert all(k == 1 for _, k in sizes), sizes
    if "sft training" in killed:  # the training cut short went on from its checkpoint
        resumed = con.execute("select count(*) from loop_adapters where "
                              "json_extract(metrics, '$.resumed_from_step') > 0").fetchone()[0]
        assert resumed >= 1
    spent, budget = con.execute("select spent_s, budget_s from loop_runs").fetchone()
    con.close()
    assert spent <= budget + 60

    log = json.loads(_cli(capsys, "log", "--json", "--db", str(db)))
    assert len(log["runs"][0]["resumes"]) == len(killed)
    assert "resumed" in _cli(capsys, "log", "--db", str(db))
    _cli(capsys, "report", "--db", str(db))
    assert (tmp_path / "e.runs" / "run-1" / "report" / "report.html").is_file()
    adapters = sqlite3.connect(db).execute("select id from loop_adapters").fetchall()
    if adapters:
        _cli(capsys, "pin", str(adapters[-1][0]), "--db", str(db))
        _cli(capsys, "export", "--db", str(db))
    print(f"killed at: {killed}")


def _finished(db: Path) -> dict:
    """What the run has finished so far: steps (with their attempts), cycles, evaluations with
    their sizes and stored predictions."""
    con = sqlite3.connect(db)
    try:
        return {
            "steps": set(con.execute("select key, attempts from loop_steps "
                                     "where status = 'finished'")),
            "cycles": set(con.execute("select cycle_index, status, strategy from loop_cycles")),
            "evaluations": set(con.execute(
                "select e.id, e.n, count(p.id) from loop_evaluations e join loop_predictions p "
                "on p.eval_id = e.id group by e.id")),
        }
    finally:
        con.close()


def test_ten_sigkills_at_random_moments_each_resumed_lose_nothing_finished(demo_world, tmp_path,
                                                                          monkeypatch):
    """Default flags but the budget; kill moments drawn from a seeded generator, measured from
    the moment each process has taken up the run (so every process gets some work done)."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(23)
    db = tmp_path / "e.db"
    proc = _run(db, tmp_path, "--preset", "demo", "--budget", "150s")
    kills, before = 0, None
    t0 = time.time()
    while kills < 10:
        taken_up = (f"select count(*) from loop_runs where status = 'running' and "
                    f"(select count(*) from loop_resumes) = {kills}")
        if not _wait_for(db, taken_up, proc):
            break  # the run finished before the next kill
        time.sleep(rng.uniform(0.0, 8.0))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
        now = _finished(db)
        if before is not None:  # nothing a killed process had finished is lost or redone
            for key in before:
                assert before[key] <= now[key], (key, before[key] - now[key])
        before = now
        proc = _run(db, tmp_path, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert kills == 10, f"the run finished after {kills} kills"
    after = _finished(db)
    for key in before:
        assert before[key] <= after[key], key
    con = sqlite3.connect(db)
    assert con.execute("select status from loop_runs").fetchall() == [("finished",)]
    assert con.execute("select count(*) from loop_resumes").fetchone()[0] == 10
    assert con.execute("select count(*) from (select 1 from loop_predictions "
                       "group by eval_id, sample_id having count(*) > 1)").fetchone()[0] == 0
    con.close()
    print(f"10 kills and resumes, finished in {time.time() - t0:.0f} s")


def test_a_resumed_run_keeps_the_strategies_it_had_ruled_out(tmp_path):
    from loop.controller import Loop, RunConfig
    from loop.store import Store
    from strategies.base import base_candidate

    with Store(tmp_path / "e.db") as store:
        run_id = store.create_run(config={}, environment={}, budget_s=60.0, preset="demo",
                                  gpu="cpu")
        first = Loop(RunConfig(budget_s=60.0, preset="demo"), store)
        first.run_id = run_id
        first.exhausted.add("prompt_constraints")
        first.blocked.add("answer_format_sft")
        first.save_strategy_sets()
        resumed = Loop(RunConfig(budget_s=60.0, preset="demo"), store, resume=True)
        resumed.run_id = run_id
        resumed.replay(base_candidate(), {})
        assert resumed.exhausted == {"prompt_constraints"}
        assert resumed.blocked == {"answer_format_sft"}
        # a new champion frees the blocked ones, and that is kept too
        resumed.blocked.clear()
        resumed.save_strategy_sets()
        again = Loop(RunConfig(budget_s=60.0, preset="demo"), store, resume=True)
        again.run_id = run_id
        again.replay(base_candidate(), {})
        assert again.exhausted == {"prompt_constraints"} and again.blocked == set()


def test_databases_in_one_folder_never_touch_each_other(demo_world, tmp_path, capsys):
    small = ["--preset", "demo", "--gpu", "cpu", "--budget", "45s", "--dev-size", "40",
             "--final-size", "40", "--strategies", "answer_format_sft"]
    a = _run(tmp_path / "a.db", tmp_path, *small)
    b = _run(tmp_path / "b.db", tmp_path, *small)  # at the same time, same folder
    for proc in (a, b):
        _, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err[-3000:]
    after = _run(tmp_path / "a.db", tmp_path, *small)  # then one after the other
    _, err = after.communicate(timeout=400)
    assert after.returncode == 0, err[-3000:]
    for name, runs in (("a", 2), ("b", 1)):
        con = sqlite3.connect(tmp_path / f"{name}.db")
        assert [r[0] for r in con.execute("select status from loop_runs")] == ["finished"] * runs
        for (path,) in con.execute("select path from loop_adapters"):
            assert Path(path).is_relative_to((tmp_path / f"{name}.runs").resolve()), path
        con.close()
        for run in range(1, runs + 1):
            assert (tmp_path / f"{name}.runs" / f"run-{run}" / "report" / "report.md").is_file()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


class Raises(Strategy):
    """A remedy whose proposal raises a UserError (bad data it found, say)."""

    name, family, summary = "raises", "test", "raises while proposing"
    trains = True  # an adapter-making remedy: under --objective benchmark it can win, so it runs
    addresses = {"format_mismatch": 1.0, "other": 1.0, "color": 1.0, "counting": 1.0,
                 "location": 1.0}

    def propose(self, ctx: Context) -> Candidate:
        raise UserError("the remedy found nothing it can use")

    def estimate_cost(self, ctx: Context) -> float:
        return 1.0


class BadAdapter(Raises):
    """A remedy whose candidate fails in evaluation: its adapter folder does not exist."""

    name, summary = "bad_adapter", "proposes an adapter that is not there"

    def propose(self, ctx: Context) -> Candidate:
        return ctx.champion.derive(self.name, "a missing adapter",
                                   adapter_path=str(ctx.workdir / "nowhere"))


def test_a_remedy_that_raises_is_a_failed_cycle_and_the_run_goes_on(demo_world, tmp_path,
                                                                    capsys, monkeypatch):
    import strategies

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(strategies.REGISTRY, "raises", f"{__name__}:Raises")
    monkeypatch.setitem(strategies.REGISTRY, "bad_adapter", f"{__name__}:BadAdapter")
    db = tmp_path / "e.db"
    assert main(["-q", "run", "--preset", "demo", "--gpu", "cpu", "--budget", "60s",
                 "--dev-size", "30", "--final-size", "30", "--max-cycles", "2",
                 "--strategies", "raises,bad_adapter", "--db", str(db)]) == 0
    log = json.loads(_cli(capsys, "log", "--json", "--db", str(db)))["runs"][0]
    assert log["status"] == "finished"
    assert [c["status"] for c in log["cycles"]] == ["failed", "failed"]
    con = sqlite3.connect(db)
    errors = [r[0] for r in con.execute("select error from loop_cycles order by cycle_index")]
    assert any("nothing it can use" in e for e in errors)
    assert any("no PEFT adapter" in e for e in errors)
