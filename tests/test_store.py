"""The experiment store: schema, WAL, the run lock, atomic steps, resume, pins, Optuna."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.exceptions import UserError
from loop.store import Store, migrations

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "experiments.db"


@pytest.fixture
def store(path: Path):
    with Store(path) as s:
        yield s


def new_run(store: Store) -> int:
    return store.create_run(config={"seed": 0}, environment={"python": "3.11"}, budget_s=3600,
                            preset="demo", gpu="cpu")


def run_python(code: str, *args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def add_cycle(store: Store, run_id: int, index: int, status: str, adapter_id: int | None,
              eval_ids: dict | None = None) -> int:
    return store.add_cycle(
        run_id=run_id, index=index, strategy="prompt_constraints", status=status,
        rationale="format errors dominate", candidate={"prompt": "Ответь одним словом."},
        dev={"gqa_ru": 0.5, "mmbench_ru": 0.4}, dev_ci={"gqa_ru": [0.4, 0.6]},
        paired={"gqa_ru": {"p_value": 0.01}}, error_profile={"gqa_ru": {"format_mismatch": 3}},
        duration_s=12.0, adapter_id=adapter_id, eval_ids=eval_ids or {})


def test_migrations_are_idempotent_on_reopen(path: Path):
    with Store(path) as s:
        run_id = new_run(s)
    with Store(path) as s:
        assert migrations.pending(s.db) == []
        applied = [m.name for m in migrations.applied(s.db)]
        assert len(applied) == len(set(applied)) == len(migrations._migrations)
        assert s.get_run(run_id)["config"] == {"seed": 0}


def test_wal_prefixed_tables_and_plain_sqlite(store: Store, path: Path):
    run_id = new_run(store)
    assert store.db.journal_mode == "wal"
    own = set(store.db.table_names()) - {"_sqlite_migrations"}
    assert own and all(name.startswith("loop_") for name in own)
    conn = sqlite3.connect(path)
    assert conn.execute("select config from loop_runs where id = ?", [run_id]).fetchone() == (
        '{"seed": 0}',)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_runs_update_and_lookup(store: Store):
    run_id = new_run(store)
    assert store.get_run(run_id)["status"] == "running"
    store.update_run(run_id, status="finished", spent_s=10.5, final={"gqa_ru": 0.5},
                     final_n={"gqa_ru": 400})
    run = store.get_run(run_id)
    assert (run["status"], run["spent_s"], run["final"]) == ("finished", 10.5, {"gqa_ru": 0.5})
    assert run["finished_at"] is not None
    assert store.latest_run()["id"] == run_id and len(store.runs()) == 1
    with pytest.raises(ValueError, match="run status must be one of"):
        store.update_run(run_id, status="done")
    with pytest.raises(ValueError, match="unknown fields"):
        store.update_run(run_id, colour="red")
    with pytest.raises(UserError, match=f"no run 99 .*known runs: {run_id}"):
        store.get_run(99)


def test_lock_refused_while_holder_is_alive(store: Store, path: Path):
    run_id = new_run(store)
    store.acquire_run_lock(run_id)
    store.acquire_run_lock(run_id)  # the holder may take it again
    with Store(path) as other:
        with pytest.raises(UserError) as error:
            other.acquire_run_lock(run_id + 1)
        message = str(error.value)
        assert str(path) in message and f"run {run_id}" in message
        assert f"pid {os.getpid()}" in message and "--resume" in message
        store.release_run_lock()
        other.acquire_run_lock(run_id + 1)
        assert other.lock_holder()["run_id"] == run_id + 1
        other.release_run_lock()


def test_lock_of_a_dead_process_is_taken_over(store: Store):
    run_id = new_run(store)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    dead_pid = int(finished.stdout)
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    store.db["loop_lock"].insert({"name": "run", "run_id": run_id, "pid": dead_pid,
                                  "host": socket.gethostname(), "token": "killed",
                                  "acquired_at": now, "heartbeat_at": now})
    store.acquire_run_lock(run_id)
    assert store.lock_holder()["pid"] == os.getpid()
    store.release_run_lock()
    assert store.lock_holder() is None


@pytest.mark.parametrize(("age_s", "refused"), [(5, True), (600, False)])
def test_lock_on_another_host_goes_stale_by_heartbeat(store: Store, age_s: float, refused: bool):
    beat = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - age_s))
    store.db["loop_lock"].insert({"name": "run", "run_id": 7, "pid": 1, "host": "elsewhere",
                                  "token": "x", "acquired_at": beat, "heartbeat_at": beat})
    if refused:
        with pytest.raises(UserError, match="in use by run 7 .*on elsewhere"):
            store.acquire_run_lock(8)
    else:
        store.acquire_run_lock(8)
        assert store.lock_holder()["run_id"] == 8


def test_background_heartbeat_refreshes_the_lock(path: Path):
    with Store(path, heartbeat_every_s=0.05) as s:
        s.acquire_run_lock(new_run(s))
        s.db.execute("update loop_lock set heartbeat_at = '2000-01-01T00:00:00+00:00'")
        deadline = time.time() + 3
        while s.lock_holder()["heartbeat_at"].startswith("2000") and time.time() < deadline:
            time.sleep(0.02)
        assert not s.lock_holder()["heartbeat_at"].startswith("2000")
        s.release_run_lock()


def write_cycle(store: Store, run_id: int, key: str) -> None:
    """The writes of one cycle step, as the controller makes them."""
    eval_id = store.add_evaluation(
        run_id=run_id, cycle_index=1, role="candidate", benchmark="gqa_ru", split="dev",
        protocol="lmms-generate", metrics={"accuracy": 0.5}, n=2, seconds=1.0, adapter_id=None,
        candidate={"prompt": "x"})
    store.add_predictions(eval_id, [
        {"sample_id": "q1", "question": "Какого цвета яблоко?", "answer": "красное",
         "prompt": "p", "output": "красное", "parsed": "красное", "correct": True,
         "image_ok": True, "seconds": 0.1, "labels": []},
        {"sample_id": "q2", "question": "Сколько кошек?", "answer": "две", "prompt": "p",
         "output": "три", "parsed": "три", "correct": False, "image_ok": False,
         "seconds": 0.1, "labels": ["counting", "missing_image"]},
    ])
    add_cycle(store, run_id, 1, "accepted", None, {"gqa_ru": eval_id})
    store.finish_step(run_id, key, {"eval_id": eval_id})


def test_transaction_rolls_back_every_write_of_a_step(store: Store):
    run_id = new_run(store)
    store.begin_step(run_id, "cycle-1", "cycle")
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction():
            write_cycle(store, run_id, "cycle-1")
            raise RuntimeError("boom")
    assert store.evaluations(run_id) == [] and store.cycles(run_id) == []
    assert store.db.execute("select count(*) from loop_predictions").fetchone() == (0,)
    assert store.step(run_id, "cycle-1") is None
    with store.transaction():
        write_cycle(store, run_id, "cycle-1")
    [evaluation] = store.evaluations(run_id, role="candidate")
    rows = store.predictions(evaluation["id"])
    assert [r["correct"] for r in rows] == [True, False] and rows[1]["image_ok"] is False
    assert rows[1]["labels"] == ["counting", "missing_image"]
    assert store.step(run_id, "cycle-1") == {"eval_id": evaluation["id"]}
    assert store.cycle(run_id, 1)["eval_ids"] == {"gqa_ru": evaluation["id"]}


def test_a_process_killed_mid_step_leaves_nothing_half_written(store: Store, path: Path):
    run_id = new_run(store)
    killed = run_python(
        "import os, sys\nfrom loop.store import Store\nfrom tests.test_store import write_cycle\n"
        "s = Store(sys.argv[1])\ns.begin_step(int(sys.argv[2]), 'cycle-1', 'cycle')\n"
        "with s.transaction():\n    write_cycle(s, int(sys.argv[2]), 'cycle-1')\n    os._exit(9)",
        path, run_id)
    assert killed.returncode == 9, killed.stderr
    with Store(path) as again:
        assert again.evaluations(run_id) == [] and again.cycles(run_id) == []
        assert again.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert again.mark_unfinished_failed(run_id) == 1
        assert again.steps(run_id)[0]["status"] == "failed"


def test_steps_resume_semantics(store: Store):
    run_id = new_run(store)
    store.begin_step(run_id, "baseline", "evaluate")
    store.finish_step(run_id, "baseline", {"eval_ids": {"gqa_ru": 1}})
    store.begin_step(run_id, "cycle-1", "cycle")  # the process dies here
    assert store.mark_unfinished_failed(run_id) == 1
    assert store.mark_unfinished_failed(run_id) == 0
    assert store.step(run_id, "baseline") == {"eval_ids": {"gqa_ru": 1}}
    assert store.step(run_id, "cycle-1") is None
    store.begin_step(run_id, "cycle-1", "cycle")
    store.fail_step(run_id, "cycle-1", "CUDA out of memory")
    assert store.steps(run_id)[1]["error"] == "CUDA out of memory"
    store.begin_step(run_id, "cycle-1", "cycle")
    store.finish_step(run_id, "cycle-1", {"status": "rejected"})
    step = store.steps(run_id)[1]
    assert (step["status"], step["attempts"], step["error"]) == ("finished", 3, None)
    assert store.step(run_id, "cycle-1") == {"status": "rejected"}


def test_best_adapter_is_the_champion_of_the_latest_finished_run(store: Store):
    assert store.best_adapter() is None
    first = new_run(store)
    a1 = store.add_adapter(run_id=first, path="runs/1/a1", parent_id=None, strategy="sft",
                           config={"r": 16}, metrics={"loss": 1.0})
    a2 = store.add_adapter(run_id=first, path="runs/1/a2", parent_id=a1, strategy="sft",
                           config={"r": 16}, metrics={"loss": 0.9})
    add_cycle(store, first, 1, "accepted", a1)
    add_cycle(store, first, 2, "rejected", a2)
    assert store.best_adapter() is None  # run not finished yet
    store.update_run(first, status="finished")
    second = new_run(store)
    a3 = store.add_adapter(run_id=second, path="runs/2/a3", parent_id=a1, strategy="sft",
                           config={}, metrics={})
    add_cycle(store, second, 1, "accepted", a3)
    assert store.best_adapter()["id"] == a1
    assert store.adapter(a2)["parent_id"] == a1 and store.adapter(a2)["config"] == {"r": 16}
    assert [a["id"] for a in store.adapters(second)] == [a3]


def test_pin_history(store: Store):
    run_id = new_run(store)
    a1 = store.add_adapter(run_id=run_id, path="a1", parent_id=None, strategy="sft", config={},
                           metrics={})
    a2 = store.add_adapter(run_id=run_id, path="a2", parent_id=a1, strategy="sft", config={},
                           metrics={})
    with pytest.raises(UserError, match=f"no adapter 42 .*known adapters: {a1}, {a2}"):
        store.pin(42)
    assert store.current_pin() is None and store.unpin() is None
    store.pin(a1, note="first")
    assert store.pin(a2)["adapter"]["path"] == "a2"
    assert store.unpin(note="done")["adapter_id"] == a2
    assert store.current_pin() is None and store.unpin() is None
    history = store.pin_history()
    assert [(h["action"], h["adapter_id"]) for h in history] == [
        ("pin", a1), ("pin", a2), ("unpin", a2)]
    assert history[0]["note"] == "first" and all(h["at"] for h in history)


def test_optuna_shares_the_file(store: Store, path: Path):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_id = new_run(store)
    study = optuna.create_study(storage=store.optuna_storage_url(), study_name="x")
    study.optimize(lambda trial: trial.suggest_float("lr", 0.0, 1.0), n_trials=2)
    with Store(path) as again:
        assert {"studies", "trials"} <= set(again.db.table_names())
        assert again.get_run(run_id)["environment"] == {"python": "3.11"}
        assert again.db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(optuna.load_study(study_name="x", storage=store.optuna_storage_url()).trials) == 2
    with pytest.raises(ValueError, match="in-memory"):
        Store(":memory:").optuna_storage_url()


def test_predictions_keep_their_cluster_and_runs_their_final_verdict(store: Store):
    run_id = store.create_run(config={}, environment={}, budget_s=60, preset="demo", gpu="cpu")
    eval_id = store.add_evaluation(
        run_id=run_id, cycle_index=None, role="baseline", benchmark="gqa_ru", split="dev",
        protocol="p", metrics={"accuracy": 0.5}, n=2, seconds=1.0, adapter_id=None, candidate={})
    store.add_predictions(eval_id, [
        {"sample_id": "q1", "correct": True, "cluster": "img7"},
        {"sample_id": "q2", "correct": False, "cluster": 12},
        {"sample_id": "q3", "correct": False},
    ])
    assert [p["cluster"] for p in store.predictions(eval_id)] == ["img7", "12", None]
    store.update_run(run_id, final_p={"gqa_ru": 0.01}, final_deployed={"gqa_ru": 0.7})
    run = store.get_run(run_id)
    assert run["final_p"] == {"gqa_ru": 0.01} and run["final_deployed"] == {"gqa_ru": 0.7}


def test_a_later_run_without_a_champion_does_not_hide_an_earlier_one(store: Store):
    # Users run again in the same folder: a baseline-only run (--max-cycles 0, or nothing
    # accepted) must not make `pin --best` claim that no run has a champion.
    first = new_run(store)
    a1 = store.add_adapter(run_id=first, path="runs/1/a1", parent_id=None, strategy="sft",
                           config={}, metrics={})
    add_cycle(store, first, 1, "accepted", a1)
    store.update_run(first, status="finished")
    second = new_run(store)
    a2 = store.add_adapter(run_id=second, path="runs/2/a2", parent_id=None, strategy="sft",
                           config={}, metrics={})
    add_cycle(store, second, 1, "rejected", a2)
    store.update_run(second, status="finished")
    assert store.best_adapter()["id"] == a1
    third = new_run(store)
    a3 = store.add_adapter(run_id=third, path="runs/3/a3", parent_id=None, strategy="sft",
                           config={}, metrics={})
    add_cycle(store, third, 1, "accepted", a3)
    store.update_run(third, status="finished")
    assert store.best_adapter()["id"] == a3  # the latest champion wins
