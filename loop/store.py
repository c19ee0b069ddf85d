"""The experiment store: the only code that reads or writes ``experiments.db``.

SQLite through sqlite-utils, in WAL mode. Every project table is prefixed ``loop_`` because
Optuna keeps its studies in the same file under its own names (``studies``, ``trials``, ...).
The schema is a list of append-only migrations (sqlite-utils ``Migrations``, set ``loop``,
recorded in ``_sqlite_migrations``) applied on every open. Dicts and lists are stored as JSON
TEXT, so any sqlite3 tool can read the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations
from sqlite_utils.db import NotFoundError

from core.exceptions import UserError

log = logging.getLogger(__name__)

RUN_STATUSES = ("running", "finished", "failed", "interrupted")
LOCK_STALE_S = 120.0
HEARTBEAT_EVERY_S = 30.0

_JSON_COLUMNS = {
    "loop_runs": ("config", "environment", "baseline", "final", "final_n", "final_deployed",
                  "final_p"),
    "loop_steps": ("result",),
    "loop_evaluations": ("metrics", "candidate", "progress"),
    "loop_predictions": ("labels",),
    "loop_cycles": ("candidate", "dev", "dev_ci", "paired", "error_profile", "eval_ids",
                    "subsets"),
    "loop_adapters": ("config", "metrics"),
    "loop_proposals": ("payload",),
}
_RUN_FIELDS = {"status", "spent_s", "baseline", "final", "final_n", "final_deployed", "final_p",
               "report_path", "environment", "config", "error"}
_PREDICTION_COLUMNS = ("sample_id", "question", "answer", "prompt", "output", "parsed", "correct",
                       "image_ok", "seconds", "labels", "cluster")

migrations = Migrations("loop")


@migrations()
def m001_initial(db: Database) -> None:
    """Runs, the run lock, resumable steps, evaluations, predictions, cycles, adapters, pins."""
    db["loop_runs"].create({
        "id": int, "status": str, "preset": str, "gpu": str, "budget_s": float, "spent_s": float,
        "started_at": str, "updated_at": str, "finished_at": str, "config": str,
        "environment": str, "baseline": str, "final": str, "final_n": str, "report_path": str,
        "error": str,
    }, pk="id", not_null=["status", "started_at"])
    db["loop_lock"].create({
        "name": str, "run_id": int, "pid": int, "host": str, "token": str, "acquired_at": str,
        "heartbeat_at": str,
    }, pk="name")
    db["loop_steps"].create({
        "id": int, "run_id": int, "key": str, "kind": str, "status": str, "attempts": int,
        "result": str, "error": str, "started_at": str, "finished_at": str,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])
    db["loop_steps"].create_index(["run_id", "key"], unique=True)
    db["loop_evaluations"].create({
        "id": int, "run_id": int, "cycle_index": int, "role": str, "benchmark": str, "split": str,
        "protocol": str, "metrics": str, "n": int, "seconds": float, "adapter_id": int,
        "candidate": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])
    db["loop_evaluations"].create_index(["run_id", "cycle_index"])
    db["loop_predictions"].create({
        "id": int, "eval_id": int, "sample_id": str, "question": str, "answer": str,
        "prompt": str, "output": str, "parsed": str, "correct": int, "image_ok": int,
        "seconds": float, "labels": str,
    }, pk="id", foreign_keys=[("eval_id", "loop_evaluations", "id")])
    db["loop_predictions"].create_index(["eval_id", "sample_id"])
    db["loop_cycles"].create({
        "id": int, "run_id": int, "cycle_index": int, "strategy": str, "status": str,
        "rationale": str, "candidate": str, "dev": str, "dev_ci": str, "paired": str,
        "error_profile": str, "duration_s": float, "adapter_id": int, "eval_ids": str,
        "error": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])
    db["loop_cycles"].create_index(["run_id", "cycle_index"], unique=True)
    db["loop_adapters"].create({
        "id": int, "run_id": int, "path": str, "parent_id": int, "strategy": str, "config": str,
        "metrics": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])
    db["loop_pins"].create({"id": int, "action": str, "adapter_id": int, "note": str, "at": str},
                           pk="id")


@migrations()
def m002_clusters_and_final_verdict(db: Database) -> None:
    """Each prediction's cluster (GQA-ru image, MMBench-ru question group); the run's final
    numbers under its deployment setting and the final paired test's p-values."""
    db["loop_predictions"].add_column("cluster", str)
    db["loop_runs"].add_column("final_deployed", str)
    db["loop_runs"].add_column("final_p", str)


def _to_json(value: Any) -> Any:
    """numpy scalars and arrays become Python numbers and lists, paths become strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} as JSON: {value!r}")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=_to_json)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat(threading.Thread):
    """Refreshes the lock's heartbeat from its own connection while the controller works."""

    def __init__(self, path: Path, token: str, every_s: float):
        super().__init__(name="loop-store-heartbeat", daemon=True)
        self.path, self.token, self.every_s = path, token, every_s
        self.stopped = threading.Event()
        self.spent: tuple[int, Any] | None = None
        """(run_id, callable returning seconds spent): written with every beat."""

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            while not self.stopped.wait(self.every_s):
                try:
                    with conn:
                        conn.execute("update loop_lock set heartbeat_at = ? where token = ?",
                                     [_now(), self.token])
                        if self.spent is not None:
                            run_id, spent = self.spent
                            conn.execute("update loop_runs set spent_s = ?, updated_at = ? "
                                         "where id = ? and status = 'running'",
                                         [float(spent()), _now(), run_id])
                except sqlite3.Error as exc:
                    log.warning("could not refresh the run lock's heartbeat: %s", exc)
        finally:
            conn.close()


class Store:
    """The experiments database.

    Args:
        path: A database file (created with its schema when absent) or ``":memory:"``.
        stale_after_s: A run lock whose heartbeat is older than this is taken over.
        heartbeat_every_s: How often a held lock's heartbeat is refreshed in the background.
    """

    def __init__(self, path: str | Path, *, stale_after_s: float = LOCK_STALE_S,
                 heartbeat_every_s: float = HEARTBEAT_EVERY_S):
        self.memory = str(path) == ":memory:"
        self.path = Path(path) if self.memory else Path(path).resolve()
        if not self.memory and not self.path.parent.is_dir():
            raise UserError(f"cannot create the experiments database {path}: the folder "
                            f"{self.path.parent} does not exist. Create it or choose another --db.")
        self.stale_after_s = stale_after_s
        self.heartbeat_every_s = heartbeat_every_s
        try:
            self.db = Database(":memory:" if self.memory else self.path)
            self.db.conn.execute("PRAGMA busy_timeout = 30000")
            if not self.memory:
                self.db.enable_wal()
            migrations.apply(self.db)
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "db"):
                self.db.close()
            raise UserError(_open_error(path, exc)) from None
        self._token = uuid.uuid4().hex
        self._heartbeat: _Heartbeat | None = None

    @classmethod
    def open_existing(cls, path: str | Path) -> Store:
        """Open a database that must already exist (for the commands that only read it)."""
        if str(path) != ":memory:" and not Path(path).is_file():
            raise UserError(f"no experiments database at {path}: start one with "
                            "`python -m loop run --budget 6h --gpu t4`, or point --db at an "
                            "existing file.")
        return cls(path)

    def close(self) -> None:
        """Stop the heartbeat (leaving the lock row as is) and close the connection."""
        self._stop_heartbeat()
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Commit every write inside the block together, or none of them (nests safely)."""
        with self.db.atomic():
            yield

    def optuna_storage_url(self) -> str:
        """The SQLAlchemy URL under which Optuna keeps its studies in this same file."""
        if self.memory:
            raise ValueError("Optuna needs a database file; an in-memory store cannot be shared")
        return f"sqlite:///{self.path}"

    # Rows in and out -------------------------------------------------------------------

    def _encode(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        json_cols = _JSON_COLUMNS.get(table, ())
        return {k: _dumps(v) if k in json_cols and v is not None else v
                for k, v in row.items()}

    def _decode(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        for col in _JSON_COLUMNS.get(table, ()):
            if row.get(col) is not None:
                row[col] = json.loads(row[col])
        if table == "loop_cycles":
            row["index"] = row.pop("cycle_index")
        elif table == "loop_predictions":
            row["correct"], row["image_ok"] = bool(row["correct"]), bool(row["image_ok"])
        return row

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        return int(self.db[table].insert(self._encode(table, row)).last_pk)

    def _rows(self, table: str, where: str | None = None, args: list | None = None,
              order_by: str = "id") -> list[dict[str, Any]]:
        rows = self.db[table].rows_where(where, args or [], order_by=order_by)
        return [self._decode(table, row) for row in rows]

    # Runs ------------------------------------------------------------------------------

    def create_run(self, *, config: dict, environment: dict, budget_s: float, preset: str,
                   gpu: str) -> int:
        """Record a new run as ``running``; returns its id."""
        now = _now()
        return self._insert("loop_runs", {
            "status": "running", "preset": preset, "gpu": gpu, "budget_s": float(budget_s),
            "spent_s": 0.0, "started_at": now, "updated_at": now, "config": config,
            "environment": environment,
        })

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Change a run's status, spent_s, baseline, final, final_n, report_path, environment,
        config or error; a final status also stamps ``finished_at``."""
        unknown = set(fields) - _RUN_FIELDS
        if unknown:
            raise ValueError(f"update_run() got unknown fields {sorted(unknown)}; "
                             f"allowed: {sorted(_RUN_FIELDS)}")
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, "
                             f"but got {fields['status']!r}")
        row = self._encode("loop_runs", fields)
        row["updated_at"] = _now()
        if "status" in fields:
            row["finished_at"] = None if fields["status"] == "running" else row["updated_at"]
        self.db["loop_runs"].update(run_id, row)

    def get_run(self, run_id: int) -> dict[str, Any]:
        """One run, JSON decoded; an unknown id is a UserError listing the known ones."""
        try:
            return self._decode("loop_runs", self.db["loop_runs"].get(run_id))
        except NotFoundError:
            known = ", ".join(str(r["id"]) for r in self.runs()) or "none yet"
            raise UserError(f"no run {run_id} in {self.path}; known runs: {known}") from None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        return self._rows("loop_runs")

    def latest_run(self) -> dict[str, Any] | None:
        """The most recently created run, or None."""
        rows = self._rows("loop_runs", order_by="id desc")
        return rows[0] if rows else None

    # The run lock ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _immediate(self) -> Iterator[None]:
        self.db.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.conn.rollback()
            raise
        self.db.conn.commit()

    def acquire_run_lock(self, run_id: int) -> None:
        """Take this database's run lock for ``run_id`` and keep its heartbeat fresh.

        Raises:
            UserError: another live process holds the lock (its pid is alive on this host, or
                its heartbeat is newer than ``stale_after_s`` on another host).
        """
        host = socket.gethostname()
        with self._immediate():
            holder = self.lock_holder()
            if holder and holder["token"] != self._token:
                age = time.time() - datetime.fromisoformat(holder["heartbeat_at"]).timestamp()
                stale = age > self.stale_after_s or (
                    holder["host"] == host and not _pid_alive(holder["pid"]))
                if not stale:
                    raise UserError(
                        f"{self.path} is in use by run {holder['run_id']} (pid {holder['pid']} "
                        f"on {holder['host']}, last heartbeat {age:.0f} s ago). Wait for it to "
                        "finish, or stop that process and continue its run with "
                        "`python -m loop run --resume` (a lock whose process is gone is taken "
                        "over automatically); or use another database with --db PATH.")
                log.info("taking over the stale run lock of run %s (pid %s on %s)",
                         holder["run_id"], holder["pid"], holder["host"])
            now = _now()
            self.db["loop_lock"].upsert({
                "name": "run", "run_id": run_id, "pid": os.getpid(), "host": host,
                "token": self._token, "acquired_at": now, "heartbeat_at": now,
            }, pk="name")
        if not self.memory and self._heartbeat is None:
            self._heartbeat = _Heartbeat(self.path, self._token, self.heartbeat_every_s)
            self._heartbeat.start()

    def track_spent(self, run_id: int, spent) -> None:
        """Write ``spent()`` to the run's ``spent_s`` with every heartbeat (and now), so a
        killed run loses at most one heartbeat interval of its accounting."""
        self.update_run(run_id, spent_s=float(spent()))
        if self._heartbeat is not None:
            self._heartbeat.spent = (run_id, spent)

    def heartbeat(self) -> None:
        """Mark the held lock as alive now (the background thread also does this)."""
        self.db.execute("update loop_lock set heartbeat_at = ? where token = ?",
                        [_now(), self._token])

    def lock_holder(self) -> dict[str, Any] | None:
        """The lock row (run_id, pid, host, acquired_at, heartbeat_at), or None."""
        rows = self._rows("loop_lock", order_by="name")
        return rows[0] if rows else None

    def release_run_lock(self) -> None:
        """Give the lock back if this store holds it."""
        self._stop_heartbeat()
        self.db.execute("delete from loop_lock where token = ?", [self._token])

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stopped.set()
            self._heartbeat.join()
            self._heartbeat = None

    # Resumable steps -------------------------------------------------------------------

    def step(self, run_id: int, key: str) -> dict[str, Any] | None:
        """The stored result of a finished step, or None when it has to be (re)done."""
        rows = self._rows("loop_steps", "run_id = ? and key = ? and status = 'finished'",
                          [run_id, key])
        return rows[0]["result"] if rows else None

    def steps(self, run_id: int) -> list[dict[str, Any]]:
        """Every step of a run with its status, attempts and timestamps, in start order."""
        return self._rows("loop_steps", "run_id = ?", [run_id])

    def begin_step(self, run_id: int, key: str, kind: str) -> None:
        """Mark a step as started (again, after a failure or a crash)."""
        self.db.execute(
            "insert into loop_steps (run_id, key, kind, status, attempts, started_at) "
            "values (?, ?, ?, 'started', 1, ?) on conflict (run_id, key) do update set "
            "kind = excluded.kind, status = 'started', attempts = loop_steps.attempts + 1, "
            "started_at = excluded.started_at, result = null, error = null, finished_at = null",
            [run_id, key, kind, _now()])

    def finish_step(self, run_id: int, key: str, result: dict) -> None:
        """Store a step's result; call it inside the ``transaction()`` holding its writes."""
        self.db.execute(
            "update loop_steps set status = 'finished', result = ?, finished_at = ? "
            "where run_id = ? and key = ?",
            [_dumps(result), _now(), run_id, key])

    def fail_step(self, run_id: int, key: str, error: str) -> None:
        """Record why a step failed; it will be retried on resume."""
        self.db.execute("update loop_steps set status = 'failed', error = ?, finished_at = ? "
                        "where run_id = ? and key = ?", [error, _now(), run_id, key])

    def mark_unfinished_failed(self, run_id: int) -> int:
        """Turn steps left 'started' by a killed process into 'failed'; returns how many."""
        cursor = self.db.execute(
            "update loop_steps set status = 'failed', finished_at = ?, "
            "error = 'interrupted: the process stopped before the step finished' "
            "where run_id = ? and status = 'started'", [_now(), run_id])
        return cursor.rowcount

    # Evaluations and predictions -------------------------------------------------------

    def add_evaluation(self, *, run_id: int | None, cycle_index: int | None, role: str,
                       benchmark: str, split: str, protocol: str, metrics: dict, n: int,
                       seconds: float, adapter_id: int | None = None,
                       candidate: dict | None = None, progress: dict | None = None) -> int:
        """Record one evaluation (role: baseline, analysis, candidate, final_baseline,
        final_champion, manual; split: dev, analysis or final); returns its id. ``progress``:
        a chunked dev evaluation's units done and total and why it stopped."""
        return self._insert("loop_evaluations", {
            "run_id": run_id, "cycle_index": cycle_index, "role": role, "benchmark": benchmark,
            "split": split, "protocol": protocol, "metrics": metrics, "n": n, "seconds": seconds,
            "adapter_id": adapter_id, "candidate": candidate, "progress": progress,
            "created_at": _now(),
        })

    def add_predictions(self, eval_id: int, rows: list[dict[str, Any]]) -> None:
        """Store every per-sample prediction of an evaluation in one ``executemany``."""
        placeholders = ", ".join("?" * (len(_PREDICTION_COLUMNS) + 1))
        sql = (f"insert into loop_predictions (eval_id, {', '.join(_PREDICTION_COLUMNS)}) "
               f"values ({placeholders})")
        params = [(
            eval_id, str(r["sample_id"]), r.get("question"), r.get("answer"), r.get("prompt"),
            r.get("output"), r.get("parsed"), int(bool(r["correct"])),
            int(bool(r.get("image_ok", True))), r.get("seconds"),
            _dumps(sorted(r.get("labels") or [])),
            None if r.get("cluster") is None else str(r["cluster"]),
        ) for r in rows]
        with self.db.atomic():
            self.db.conn.executemany(sql, params)

    def evaluation(self, eval_id: int) -> dict[str, Any]:
        """One evaluation, JSON decoded."""
        return self._decode("loop_evaluations", self.db["loop_evaluations"].get(eval_id))

    def evaluations(self, run_id: int | None = None, *, cycle_index: int | None = None,
                    role: str | None = None, benchmark: str | None = None,
                    split: str | None = None) -> list[dict[str, Any]]:
        """Evaluations matching every given filter, oldest first."""
        filters = {"run_id": run_id, "cycle_index": cycle_index, "role": role,
                   "benchmark": benchmark, "split": split}
        given = {k: v for k, v in filters.items() if v is not None}
        where = " and ".join(f"{k} = ?" for k in given) or None
        return self._rows("loop_evaluations", where, list(given.values()))

    def predictions(self, eval_id: int) -> list[dict[str, Any]]:
        """The per-sample predictions of an evaluation, in the order they were stored."""
        return self._rows("loop_predictions", "eval_id = ?", [eval_id])

    # Cycles ----------------------------------------------------------------------------

    def add_cycle(self, *, run_id: int, index: int, strategy: str, status: str, rationale: str,
                  candidate: dict, dev: dict, dev_ci: dict, paired: dict, error_profile: dict,
                  duration_s: float, adapter_id: int | None, eval_ids: dict,
                  error: str | None = None, subsets: dict | None = None) -> int:
        """Record one cycle's decision (accepted, rejected or failed); returns its row id."""
        return self._insert("loop_cycles", {
            "run_id": run_id, "cycle_index": index, "strategy": strategy, "status": status,
            "rationale": rationale, "candidate": candidate, "dev": dev, "dev_ci": dev_ci,
            "paired": paired, "error_profile": error_profile, "duration_s": duration_s,
            "adapter_id": adapter_id, "eval_ids": eval_ids, "error": error,
            "subsets": subsets, "created_at": _now(),
        })

    def cycles(self, run_id: int) -> list[dict[str, Any]]:
        """A run's cycles ordered by index (the index is under the key ``index``)."""
        return self._rows("loop_cycles", "run_id = ?", [run_id], order_by="cycle_index")

    def cycle(self, run_id: int, index: int) -> dict[str, Any] | None:
        """One cycle of a run, or None."""
        rows = self._rows("loop_cycles", "run_id = ? and cycle_index = ?", [run_id, index])
        return rows[0] if rows else None

    # Adapters and pins -----------------------------------------------------------------

    def add_adapter(self, *, run_id: int | None, path: str, parent_id: int | None,
                    strategy: str, config: dict, metrics: dict) -> int:
        """Record a trained adapter with its parent (lineage); returns its id."""
        return self._insert("loop_adapters", {
            "run_id": run_id, "path": str(path), "parent_id": parent_id, "strategy": strategy,
            "config": config, "metrics": metrics, "created_at": _now(),
        })

    def adapter(self, adapter_id: int) -> dict[str, Any]:
        """One adapter; an unknown id is a UserError listing the known ones."""
        try:
            return self._decode("loop_adapters", self.db["loop_adapters"].get(adapter_id))
        except NotFoundError:
            known = ", ".join(str(a["id"]) for a in self.adapters())
            hint = f"known adapters: {known}" if known else "no adapter has been trained yet"
            raise UserError(f"no adapter {adapter_id} in {self.path}; {hint}. "
                            "See them with `python -m loop log`.") from None

    def adapters(self, run_id: int | None = None) -> list[dict[str, Any]]:
        """Every adapter (of one run when given), oldest first."""
        if run_id is None:
            return self._rows("loop_adapters")
        return self._rows("loop_adapters", "run_id = ?", [run_id])

    def best_adapter(self) -> dict[str, Any] | None:
        """The champion: the adapter of the latest accepted cycle (with an adapter) of the
        latest finished run that has one, or None (a later run that accepted nothing does
        not hide an earlier champion)."""
        row = self.db.execute(
            "select c.adapter_id from loop_cycles c join loop_runs r on r.id = c.run_id "
            "where c.status = 'accepted' and c.adapter_id is not null "
            "and r.status = 'finished' "
            "order by c.run_id desc, c.cycle_index desc limit 1").fetchone()
        return self.adapter(row[0]) if row else None

    def pin(self, adapter_id: int, note: str = "") -> dict[str, Any]:
        """Pin an adapter (the one ``export`` ships); returns the new current pin."""
        self.adapter(adapter_id)
        self._insert("loop_pins", {"action": "pin", "adapter_id": adapter_id, "note": note,
                                   "at": _now()})
        return self.current_pin()

    def unpin(self, note: str = "") -> dict[str, Any] | None:
        """Remove the pin; returns what was pinned (None when nothing was, and then records
        nothing)."""
        current = self.current_pin()
        if current is not None:
            self._insert("loop_pins", {"action": "unpin", "adapter_id": current["adapter_id"],
                                       "note": note, "at": _now()})
        return current

    def current_pin(self) -> dict[str, Any] | None:
        """``{"adapter_id", "note", "at", "adapter"}`` for the pinned adapter, or None."""
        rows = self._rows("loop_pins", order_by="id desc")
        if not rows or rows[0]["action"] != "pin":
            return None
        last = rows[0]
        return {"adapter_id": last["adapter_id"], "note": last["note"], "at": last["at"],
                "adapter": self.adapter(last["adapter_id"])}

    def pin_history(self) -> list[dict[str, Any]]:
        """Every pin and unpin event, oldest first (never deleted)."""
        return self._rows("loop_pins")

    # Where a run's files go, its decisions, its resumes ---------------------------------

    def files_dir(self) -> Path:
        """The folder of this database's files: ``<db dir>/<db stem>.runs`` (``runs`` for an
        in-memory store), so databases sharing a working folder never share files."""
        if self.memory:
            return Path("runs")
        return self.path.with_name(f"{self.path.stem}.runs")

    def run_dir(self, run_id: int) -> Path:
        """Adapters, SFT data and the report of one run: ``<db stem>.runs/run-<id>`` beside
        the database, or ``<workdir>/run-<id>`` when the run was given ``--workdir``."""
        workdir = (self.get_run(run_id).get("config") or {}).get("workdir")
        return (Path(workdir) if workdir else self.files_dir()) / f"run-{run_id}"

    def save_proposal(self, run_id: int, cycle_index: int, name: str, payload: dict, *,
                      data_file: str | None = None, data_sha256: str | None = None) -> None:
        """Store (or replace) what a cycle decided under ``name`` before it is used."""
        self.db.execute(
            "insert into loop_proposals (run_id, cycle_index, name, payload, data_file, "
            "data_sha256, created_at) values (?, ?, ?, ?, ?, ?, ?) on conflict "
            "(run_id, cycle_index, name) do update set payload = excluded.payload, "
            "data_file = excluded.data_file, data_sha256 = excluded.data_sha256, "
            "created_at = excluded.created_at",
            [run_id, cycle_index, name, _dumps(payload), data_file, data_sha256, _now()])

    def drop_proposal(self, run_id: int, cycle_index: int, name: str) -> None:
        """Forget a stored decision (one that was not carried out)."""
        self.db.execute("delete from loop_proposals where run_id = ? and cycle_index = ? "
                        "and name = ?", [run_id, cycle_index, name])

    def proposal(self, run_id: int, cycle_index: int, name: str) -> dict[str, Any] | None:
        """A stored decision ``{"payload", "data_file", "data_sha256", ...}``, or None."""
        rows = self._rows("loop_proposals", "run_id = ? and cycle_index = ? and name = ?",
                          [run_id, cycle_index, name])
        return rows[0] if rows else None

    def proposals(self, run_id: int, cycle_index: int | None = None) -> list[dict[str, Any]]:
        """Every stored decision of a run (of one cycle when given), in the order made."""
        if cycle_index is None:
            return self._rows("loop_proposals", "run_id = ?", [run_id])
        return self._rows("loop_proposals", "run_id = ? and cycle_index = ?",
                          [run_id, cycle_index])

    def add_resume(self, run_id: int, spent_s: float, redone: int) -> None:
        """Record that a run was resumed, with the time it had spent and the steps redone."""
        self._insert("loop_resumes", {"run_id": run_id, "at": _now(), "spent_s": spent_s,
                                      "pid": os.getpid(), "redone": redone})

    def resumes(self, run_id: int) -> list[dict[str, Any]]:
        """When a run was resumed (``at``, ``spent_s`` before it, ``redone`` steps), oldest first."""
        return self._rows("loop_resumes", "run_id = ?", [run_id])


def _open_error(path: str | Path, exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text or "encrypted" in text:
        return (f"{path} is not an experiments database (SQLite said: {text}). "
                "Point --db at the file `loop run` created, or at a new path.")
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        return (f"cannot write the experiments database {path} ({text}): check that you may "
                "write to the file and its folder, or choose another --db.")
    return f"cannot open the experiments database {path}: {text}"


@migrations()
def m101_proposals_and_resumes(db: Database) -> None:
    """Decisions stored before they are used (subsets, cycle choices, training proposals) and
    the resumes of each run."""
    db["loop_proposals"].create({
        "id": int, "run_id": int, "cycle_index": int, "name": str, "payload": str,
        "data_file": str, "data_sha256": str, "created_at": str,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])
    db["loop_proposals"].create_index(["run_id", "cycle_index", "name"], unique=True)
    db["loop_resumes"].create({
        "id": int, "run_id": int, "at": str, "spent_s": float, "pid": int, "redone": int,
    }, pk="id", foreign_keys=[("run_id", "loop_runs", "id")])


@migrations()
def m110_analysis_and_futility(db: Database) -> None:
    """Where a chunked dev evaluation stopped and why (``progress``), and which subset played
    which role in a cycle (``subsets``: the error profile's, the judging one's)."""
    db["loop_evaluations"].add_column("progress", str)
    db["loop_cycles"].add_column("subsets", str)
