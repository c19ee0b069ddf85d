"""HPO trials over many workers: a real PostgreSQL server (started here, on a Unix socket
only), a journal file, two `loop worker` processes and the loop's HPO cycle on the demo world;
a worker killed with SIGKILL; the clear errors of a wrong storage or study."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import strategies
from loop.cli import main
from loop.controller import Loop, RunConfig
from loop.hpo_share import close
from loop.store import Store
from strategies import hpo_study

ROOT = Path(__file__).resolve().parents[1]
TIME_LEFT = 70.0
"""The HPO cycle's time: four slots of about 9 s each on the demo world's cost rates."""


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of this machine's packages, listening on a Unix socket only;
    yields the socket folder. initdb refuses root, so as root it runs as user postgres."""
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL binaries (pg_ctl, initdb) are not installed; .ci/run installs "
                    "them with apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg (the postgres extra) is missing")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("initdb refuses to run as root and there is no user 'postgres'")
        prefix = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="loop-pg-")
    if prefix:
        shutil.chown(root, "postgres")
    data = f"{root}/data"
    run = lambda *cmd: subprocess.run(prefix + list(cmd), check=True, capture_output=True,  # noqa: E731
                                      cwd="/tmp", timeout=120)
    run(str(bindir / "initdb"), "-D", data, "-U", "loop", "--auth=trust", "-E", "UTF8",
        "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", data, "-l", f"{root}/server.log", "-w", "-o",
        f"-k {root} -c listen_addresses='' -F", "start")
    try:
        yield root
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"],
                       capture_output=True, cwd="/tmp", timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request):
    """A fresh database of that server for each test."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    with psycopg.connect(host=postgres, user="loop", dbname="postgres", autocommit=True) as conn:
        conn.execute(f"drop database if exists {name}")
        conn.execute(f"create database {name}")
    return f"postgresql://loop@/{name}?host={postgres}"


@pytest.fixture(scope="module")
def demo_world():
    from core.demo.world import ensure_demo_world

    return ensure_demo_world()


# ---------------------------------------------------------------- helpers


def start_loop(tmp_path: Path, url: str, study: str):
    """The loop of a demo run up to its first HPO cycle: set up, baseline, the cycle's context."""
    config = RunConfig(budget_s=3600, gpu="cpu", preset="demo", dev_size=30, final_size=30,
                       batch_size=32, storage=hpo_study.masked(url), study=study,
                       heartbeat_s=1, progress=False)
    store = Store(tmp_path / "experiments.db")
    loop = Loop(config, store, storage_url=url, echo=lambda msg: None)
    loop.start()
    loop.set_up()  # opens the study, so workers load while the baseline runs
    return loop, store


def cycle_context(loop):
    champion, scores = loop.baseline()
    profiles = {b: loop.bench.error_profile(s) for b, s in scores.items()}
    return loop.context(champion, profiles, TIME_LEFT, 1, "optuna_hpo")


def spawn_worker(url: str, study: str, name: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loop", "-q", "worker", "--storage", url, "--study", study,
         "--gpu", "cpu", "--name", name], cwd=ROOT, stdout=log.open("w"),
        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def wait_until(condition, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.3)


def workers_ready(study, names) -> bool:
    attrs = optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs
    return all((attrs.get(f"loop_worker_{n}") or {}).get("state") == "idle" for n in names)


def fresh(url: str, name: str):
    return optuna.load_study(study_name=name, storage=hpo_study.open_storage(url))


def settled(url: str, name: str) -> bool:
    return not fresh(url, name).get_trials(states=(TrialState.WAITING, TrialState.RUNNING))


def ok(t) -> bool:
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED)


# ---------------------------------------------------------------- two workers, one killed

@pytest.mark.slow
def test_two_workers_split_the_trials_and_a_killed_ones_trial_is_retried(
        demo_world, pg_url, tmp_path):
    loop, store = start_loop(tmp_path, pg_url, "two")
    workers = {n: spawn_worker(pg_url, "two", n, tmp_path / f"{n}.log") for n in ("w0", "w1")}
    try:
        ctx = cycle_context(loop)
        study = fresh(pg_url, "two")
        wait_until(lambda: workers_ready(study, workers), 120, "both workers to load")
        killed: dict = {}

        def kill_w0_in_its_second_trial():
            def second():
                trials = fresh(pg_url, "two").get_trials()
                mine = [t for t in trials if (t.user_attrs.get("worker") or {}).get("name") == "w0"]
                running = [t for t in mine if t.state == TrialState.RUNNING]
                if running and any(ok(t) for t in mine):
                    killed["number"] = running[0].number
                    return True
                return False
            wait_until(second, 120, "w0 to start its second trial")
            time.sleep(1.0)  # inside its training
            workers["w0"].send_signal(signal.SIGKILL)

        killer = threading.Thread(target=kill_w0_in_its_second_trial)
        killer.start()
        t0 = time.time()
        candidate = strategies.get("optuna_hpo").propose(ctx)
        cycle_s = time.time() - t0
        at_return = fresh(pg_url, "two").get_trials()
        killer.join()
        wait_until(lambda: settled(pg_url, "two"), 120, "the retried trial to finish")
    finally:
        close(pg_url, "two", "finished")
        for proc in workers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        loop.store.release_run_lock()

    trials = fresh(pg_url, "two").trials
    assert all(t.user_attrs.get("cycle") == 1 for t in trials)
    # the killed worker's trial was failed by its heartbeat and queued again, same parameters
    dead = trials[killed["number"]]
    assert dead.state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.params == dead.params and ok(retry)
    assert retry.user_attrs["worker"]["name"] == "w1"
    # no slot lost or doubled: four slots, each ended once with a result; a pruned trial's
    # unspent seconds may have come back as more slots
    refunds = [t for t in trials if hpo_study.REFUND_ATTR in t.user_attrs]
    assert not refunds or any(t.state == TrialState.PRUNED for t in trials)
    results = [t for t in trials if ok(t)]
    assert len([t for t in results if t not in refunds]) == 4
    assert len(trials) == 5 + len(refunds)
    assert {t.user_attrs["worker"]["name"] for t in results} == {"w0", "w1"}  # split
    assert all(Path(t.user_attrs["adapter_path"]).name == f"two-t{t.number}" for t in results)
    # the loop waited for the workers and took the best trial finished by then
    finished = [t for t in at_return if t.state == TrialState.COMPLETE]
    best = max(finished, key=lambda t: (t.value, -t.number))
    assert candidate.details["trial_number"] == best.number
    assert candidate.adapter_path == best.user_attrs["adapter_path"]
    assert candidate.details["run_here"] == []
    # what the loop records of each trial lands in experiments.db, the adapters registered
    recorded = {p["payload"]["number"]: p["payload"] for p in store.proposals(loop.run_id, 1)
                if p["name"].startswith("hpo-trial-two-")}
    assert {t.number for t in at_return if t.state.is_finished()} <= set(recorded)
    assert recorded[best.number]["worker"]["name"] in ("w0", "w1")
    paths = {a["path"] for a in store.adapters(loop.run_id)}
    assert best.user_attrs["adapter_path"] in paths
    print(f"\n2 workers, one killed: {sum(map(ok, at_return))} trials finished in the loop's "
          f"{cycle_s:.1f} s cycle")


@pytest.mark.slow
def test_one_worker_on_a_journal_file(demo_world, tmp_path):
    url = f"journal://{tmp_path / 'study.log'}"
    loop, store = start_loop(tmp_path, url, "journal")
    worker = spawn_worker(url, "journal", "solo", tmp_path / "solo.log")
    try:
        ctx = cycle_context(loop)
        study = fresh(url, "journal")
        wait_until(lambda: workers_ready(study, ["solo"]), 120, "the worker to load")
        t0 = time.time()
        candidate = strategies.get("optuna_hpo").propose(ctx)
        cycle_s = time.time() - t0
    finally:
        close(url, "journal", "finished")
        worker.wait(timeout=60)
        loop.store.release_run_lock()
    trials = fresh(url, "journal").trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done and candidate.details["trial_number"] in {t.number for t in done}
    assert {t.user_attrs["worker"]["name"] for t in trials if ok(t)} == {"solo"}
    # the worker scored its adapters while they trained: reports at 25, 50 and 75%
    assert all({25, 50} <= set(t.intermediate_values) for t in trials if ok(t))
    assert all(set(t.intermediate_values) == {25, 50, 75, 100} for t in done)
    assert worker.returncode == 0  # the run closed the study; the worker stopped by itself
    assert "the run is finished; stopping" in (tmp_path / "solo.log").read_text()
    print(f"\n1 worker: {sum(map(ok, trials))} trials finished in the loop's {cycle_s:.1f} s "
          "cycle")


# ---------------------------------------------------------------- clear errors


def _run(tmp_path, capsys, *extra) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["run", "--preset", "demo", "--gpu", "cpu", "--budget", "60s",
                 "--db", str(tmp_path / "e.db"), *extra])
    return code, capsys.readouterr().err


def test_unreachable_storage_is_one_clear_line(tmp_path, capsys):
    code, err = _run(tmp_path, capsys, "--storage",
                     f"postgresql://loop:secret@/loop?host={tmp_path / 'no-server'}")
    assert code == 2
    assert err.startswith("error: cannot reach the Optuna storage postgresql://loop:***@/loop")
    assert len(err.strip().splitlines()) == 1 and "secret" not in err
    assert Store.open_existing(tmp_path / "e.db").runs() == []  # refused before recording


@pytest.mark.parametrize("url, says", [
    ("http://example.org/db", "--storage must be a postgresql://"),
    ("journal:///no/such/folder/study.log", "folder /no/such/folder does not exist"),
])
def test_a_storage_optuna_cannot_use_is_refused(tmp_path, capsys, url, says):
    code, err = _run(tmp_path, capsys, "--storage", url)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1


def _taken(url: str, name: str) -> None:
    study = optuna.create_study(storage=hpo_study.open_storage(url), study_name=name)
    study.set_user_attr("loop_run", {"run_token": "another", "run_id": 7,
                                     "db": "/elsewhere/experiments.db", "started": "yesterday"})
    study.set_user_attr("loop_world", {"heartbeat_s": 1, "seed": 0})


def test_a_study_of_another_run_is_refused_by_run_and_worker(pg_url, tmp_path, capsys):
    _taken(pg_url, "taken")
    code, err = _run(tmp_path, capsys, "--storage", pg_url, "--study", "taken")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'taken'" in err and "belongs to run 7 of /elsewhere/experiments.db" in err
    capsys.readouterr()
    code = main(["worker", "--storage", pg_url, "--study", "taken",
                 "--db", str(tmp_path / "e.db")])
    err = capsys.readouterr().err
    assert code == 2 and "belongs to run 7 of /elsewhere/experiments.db, not to a run of" in err


def test_a_journal_study_of_another_run_is_refused(tmp_path, capsys):
    url = f"journal://{tmp_path / 'study.log'}"
    _taken(url, "taken")
    code, err = _run(tmp_path, capsys, "--storage", url, "--study", "taken")
    assert code == 2 and "belongs to run 7" in err


@pytest.mark.parametrize("kind", ["postgres", "journal"])
def test_optuna_dashboard_opens_the_study(kind, request, tmp_path):
    """The README's `optuna-dashboard URL` lists the run's study, whichever storage."""
    exe = shutil.which("optuna-dashboard") or str(Path(sys.executable).with_name(
        "optuna-dashboard"))
    if not Path(exe).exists():
        pytest.skip("optuna-dashboard (the dashboard extra) is not installed")
    if kind == "postgres":
        url = shown = request.getfixturevalue("pg_url")
    else:
        url, shown = f"journal://{tmp_path / 'study.log'}", str(tmp_path / "study.log")
    _taken(url, "seen")
    import socket as socket_module

    with socket_module.socket() as s:  # a free port (binding is local, not a connection)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([exe, shown, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    get = ("import sys, time, urllib.request\n"
           "for _ in range(100):\n"
           "    try:\n"
           f"        print(urllib.request.urlopen('http://127.0.0.1:{port}/api/studies').read()"
           ".decode()); sys.exit(0)\n"
           "    except OSError:\n"
           "        time.sleep(0.2)\n"
           "sys.exit(1)\n")
    try:
        out = subprocess.run([sys.executable, "-c", get], capture_output=True, text=True,
                             timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert out.returncode == 0 and '"study_name": "seen"' in out.stdout


def test_a_worker_on_an_unreachable_storage_is_one_clear_line(tmp_path, capsys):
    code = main(["worker", "--storage", f"postgresql://loop@/loop?host={tmp_path}",
                 "--study", "exp1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot reach the Optuna storage postgresql://")
    assert len(err.strip().splitlines()) == 1


def test_a_resumed_run_asks_for_a_password_it_never_stored():
    from core.exceptions import UserError
    from loop.hpo_share import resumed_storage

    config = RunConfig(budget_s=60, storage=hpo_study.masked("postgresql://loop:pw@db/loop"))
    assert config.storage == "postgresql://loop:***@db/loop"
    with pytest.raises(UserError, match="give it again with --storage URL"):
        resumed_storage(config, None)
    assert resumed_storage(config, "postgresql://loop:pw@db/loop") == "postgresql://loop:pw@db/loop"
    journal = RunConfig(budget_s=60, storage=hpo_study.normalized("runs/study.log"))
    assert resumed_storage(journal, None) == f"journal://{Path('runs/study.log').resolve()}"
