"""What a run stores so that it survives a kill: decisions, resumes, time spent, its folder."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.exceptions import UserError
from loop.store import Store

REPO = Path(__file__).resolve().parents[1]


def new_run(store: Store, **config) -> int:
    return store.create_run(config=config, environment={}, budget_s=600, preset="demo", gpu="cpu")


def test_each_database_has_its_own_folder_of_run_files(tmp_path: Path):
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        ra, rb = new_run(a), new_run(b)
        assert ra == rb == 1  # every database starts at run 1 ...
        assert a.run_dir(ra) != b.run_dir(rb)  # ... and still never shares a folder
        assert a.run_dir(ra) == (tmp_path / "a.runs" / "run-1").resolve()
        custom = new_run(a, workdir=str(tmp_path / "mine"))
        assert a.run_dir(custom) == tmp_path / "mine" / f"run-{custom}"


def test_a_decision_is_read_back_as_stored_and_can_be_replaced(tmp_path: Path):
    with Store(tmp_path / "e.db") as store:
        run = new_run(store)
        assert store.proposal(run, 3, "train:x") is None
        store.save_proposal(run, 3, "train:x", {"config": {"steps": 40}}, data_file="d.jsonl",
                            data_sha256="ab")
        store.save_proposal(run, 3, "train:x", {"config": {"steps": 30}}, data_file="d.jsonl",
                            data_sha256="cd")
        got = store.proposal(run, 3, "train:x")
        assert got["payload"] == {"config": {"steps": 30}} and got["data_sha256"] == "cd"
        assert [p["name"] for p in store.proposals(run, 3)] == ["train:x"]
        store.drop_proposal(run, 3, "train:x")
        assert store.proposal(run, 3, "train:x") is None


def test_resumes_are_recorded(tmp_path: Path):
    with Store(tmp_path / "e.db") as store:
        run = new_run(store)
        store.add_resume(run, 42.0, 1)
        store.add_resume(run, 90.5, 0)
        assert [(r["spent_s"], r["redone"]) for r in store.resumes(run)] == [(42.0, 1), (90.5, 0)]


def test_spent_time_survives_a_sigkill_within_one_heartbeat(tmp_path: Path):
    """A run killed without warning has its time counted up to its last heartbeat."""
    db = tmp_path / "e.db"
    with Store(db) as store:
        run = new_run(store)
    code = ("import sys, time; from loop.store import Store\n"
            "s = Store(sys.argv[1], heartbeat_every_s=0.2); s.acquire_run_lock(1)\n"
            "t0 = time.monotonic(); s.track_spent(1, lambda: 100 + time.monotonic() - t0)\n"
            "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    spent = sqlite3.connect(db).execute("select spent_s from loop_runs where id = ?",
                                        [run]).fetchone()[0]
    assert 101.0 <= spent <= 102.5


@pytest.mark.parametrize("content", [b"hello, not a database\n" * 40, b"SQLite format 3\x00" + b"\xff" * 200])
def test_a_file_that_is_not_sqlite_is_a_clear_error(tmp_path: Path, content: bytes):
    db = tmp_path / "notes.db"
    db.write_bytes(content)
    with pytest.raises(UserError, match=r"notes\.db is not an experiments database"):
        Store(db)
