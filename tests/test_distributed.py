"""Data-parallel evaluation: N processes (gloo on CPU) give one process's evaluation exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from core.distributed import shard, world
from core.evaluate import image_group
from core.exceptions import UserError
from loop.cli import main
from loop.store import Store

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"seconds", "samples_per_s", "prefill_tokens_per_sample"}
"""What may differ between two runs of one evaluation: wall time and batch padding."""


def _gqa(counts: list[int]) -> list[dict]:
    return [{"benchmark": "gqa_ru", "id": f"q{k}-{j}", "imageId": f"img{k}"}
            for k, n in enumerate(counts) for j in range(n)]


@pytest.mark.parametrize("counts, size, loads", [
    ([1], 2, [1, 0]),                       # fewer images than processes: one waits idle
    ([3, 1], 2, [3, 1]),                    # an image with a single question; uneven split
    ([4, 4, 3, 3, 1], 2, [8, 7]),           # largest first, each to the lightest process
    ([5, 1, 1, 1, 1, 1], 2, [5, 5]),
    ([2, 2, 2, 2, 2], 3, [4, 4, 2]),
])
def test_shards_keep_images_whole_and_balance_question_counts(counts, size, loads):
    examples = _gqa(counts)
    shards = shard(examples, size)
    assert [len(s) for s in shards] == loads
    assert sorted(i for s in shards for i in s) == list(range(len(examples)))
    assert all(s == sorted(s) for s in shards)  # each shard keeps the input order
    owner = {image_group(examples[i]): r for r, s in enumerate(shards) for i in s}
    assert all(owner[image_group(examples[i])] == r for r, s in enumerate(shards) for i in s)
    assert shard(list(examples), size) == shards  # the same on every process


def test_mmbench_rotations_of_a_question_stay_in_one_shard(demo_world):
    from core.data import DataSources, load_benchmark

    records = load_benchmark("mmbench_ru", DataSources.from_dir(demo_world.data_dir))
    rotated = Counter(int(e["index"]) % 1_000_000 for e in records)
    assert max(rotated.values()) >= 3  # the demo has rotation groups to keep together
    for size in (2, 3):
        where: dict[int, set[int]] = {}
        for r, s in enumerate(shard(records, size)):
            for i in s:
                where.setdefault(int(records[i]["index"]) % 1_000_000, set()).add(r)
        assert all(len(ranks) == 1 for ranks in where.values())


@pytest.fixture(scope="module")
def demo_world():
    from core.demo.world import ensure_demo_world

    return ensure_demo_world()


def _crafted(data_dir) -> dict[str, list[str]]:
    """Question ids per benchmark: whole images or rotation groups, one image cut down to a
    single question, a rotation group cut to one row, and shards of unequal size."""
    from core.data import DataSources, load_benchmark

    out = {}
    for b in ("gqa_ru", "mmbench_ru"):
        groups: dict[str, list[str]] = {}
        for e in load_benchmark(b, DataSources.from_dir(data_dir)):
            groups.setdefault(image_group(e), []).append(e["id"])
        whole = [ids for ids in groups.values() if len(ids) >= 3][:3]
        lone = next(ids for ids in list(groups.values())[8:] if len(ids) >= 2)[:1]
        out[b] = [i for ids in whole for i in ids] + lone
    return out


def _worker(rank: int, port: int, ids: dict, out: str) -> None:
    """One of two processes: evaluate the crafted questions data-parallel; rank 0 saves them."""
    import pickle

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from core import distributed

    distributed.setup(timeout_s=300)
    try:
        results = _evaluate_crafted(ids, distributed.evaluate)
        shards = {b: [len(s) for s in distributed.shard(ex, 2)] for b, (ex, _) in results.items()}
    finally:
        distributed.teardown()
    if rank == 0:
        with open(out, "wb") as fh:
            pickle.dump({b: (r.samples, r.metrics, shards[b]) for b, (_, r) in results.items()},
                        fh)


def _evaluate_crafted(ids: dict, evaluate) -> dict:
    from core.data import load_benchmark
    from core.model import load_vlm
    from loop.sources import resolve_sources

    sources = resolve_sources("demo")
    vlm = load_vlm(sources.model)
    results = {}
    for b, wanted in ids.items():
        by_id = {e["id"]: e for e in load_benchmark(b, sources.data)}
        examples = [by_id[i] for i in wanted]
        results[b] = (examples, evaluate(vlm, examples, batch_size=4, progress=False))
    return results


def _strip(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k not in TIMING} for s in samples]


def test_two_gloo_processes_give_the_single_process_evaluation(demo_world, tmp_path):
    import pickle

    import torch.multiprocessing as mp

    from core.evaluate import evaluate

    ids = _crafted(demo_world.data_dir)
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "parallel.pkl"
    mp.spawn(_worker, args=(port, ids, str(out)), nprocs=2, join=True)
    parallel = pickle.loads(out.read_bytes())
    single = _evaluate_crafted(ids, evaluate)
    for b, (examples, result) in single.items():
        samples, metrics, loads = parallel[b]
        groups = Counter(image_group(e) for e in examples)
        assert 1 in groups.values() and loads[0] != loads[1]  # a lone question, uneven shards
        assert [s["sample_id"] for s in samples] == ids[b]  # the input order
        same = sum(a == b for a, b in zip(_strip(samples), _strip(result.samples)))
        assert same == len(ids[b]), f"{b}: {same}/{len(ids[b])} samples identical"
        assert {k: v for k, v in metrics.items() if k not in TIMING} == \
            {k: v for k, v in result.metrics.items() if k not in TIMING}


def _torchrun(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "loop", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("benchmark, limit", [("gqa_ru", 16), ("mmbench_ru", 20)])
def test_loop_eval_under_torchrun_records_once_what_one_process_records(
        demo_world, tmp_path, capsys, benchmark, limit):
    args = ["-q", "eval", "--preset", "demo", "--benchmark", benchmark, "--limit", str(limit),
            "--json", "--samples"]
    assert main(args + ["--db", str(tmp_path / "one.db")]) == 0
    one = json.loads(capsys.readouterr().out)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = _torchrun(args + ["--db", "two.db"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads(done.stdout)  # rank 0 alone prints
    assert two["processes"] == 2 and one["processes"] == 1
    assert _strip(two["samples"]) == _strip(one["samples"])
    assert {k: v for k, v in two.items() if k not in TIMING | {"samples", "processes", "db"}} == \
        {k: v for k, v in one.items() if k not in TIMING | {"samples", "processes", "db"}}
    with Store.open_existing(tmp_path / "two.db") as store:  # written once, by rank 0
        (ev,) = store.evaluations(role="manual")
        assert ev["candidate"]["processes"] == 2
        assert [p["output"] for p in store.predictions(ev["id"])] == \
            [s["output"] for s in one["samples"]]


def test_an_error_on_rank_0_stops_every_process_with_one_line_each(demo_world, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = _torchrun(["-q", "eval", "--preset", "demo", "--benchmark", "gqa_ru", "--limit", "8",
                      "--adapter", "7", "--db", "absent.db"], env, cwd=tmp_path)
    assert done.returncode != 0
    assert "error: no experiments database at absent.db" in done.stderr  # rank 0's own
    assert "error: process 1 of 2 lost contact with the others" in done.stderr
    assert "[rank1]: Traceback" not in done.stderr
    assert not (tmp_path / "absent.db").exists()


def test_other_commands_refuse_to_run_on_several_processes(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["log", "--db", str(tmp_path / "x.db")]) == 2
    err = capsys.readouterr().err
    assert "`loop log` runs in one process" in err and "`loop eval`" in err
    monkeypatch.delenv("RANK")
    with pytest.raises(UserError, match="RANK is not set"):
        world()


@pytest.mark.slow
def test_loop_run_under_torchrun_serves_rank_0s_evaluations(demo_world, tmp_path):
    """Rank 0 drives the loop; rank 1 answers its shards, the trained candidate's included."""
    from core.data import DataSources, load_benchmark
    from core.distributed import shard
    from core.evaluate import EvalConfig, evaluate
    from core.model import load_vlm

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = _torchrun(["-q", "run", "--preset", "demo", "--budget", "150s", "--max-cycles", "1",
                      "--dev-size", "20", "--final-size", "20", "--batch-size", "8",
                      "--strategies", "answer_format_sft", "--db", "e.db"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("e.db-")) == \
        ["e.db", "e.runs"]
    with Store.open_existing(tmp_path / "e.db") as store:
        run = store.latest_run()
        assert run["status"] == "finished"
        (adapter,) = store.adapters(run["id"])
        evals = {(e["role"], e["benchmark"]): store.predictions(e["id"])
                 for e in store.evaluations(run["id"], split="dev")}
    vlm = load_vlm(demo_world.model_dir)
    vlm.load_adapter(adapter["path"], "candidate")
    data = DataSources.from_dir(demo_world.data_dir)
    for b in ("gqa_ru", "mmbench_ru"):
        by_id = {e["id"]: e for e in load_benchmark(b, data)}
        base, cand = evals[("baseline", b)], evals[("candidate", b)]
        examples = [by_id[p["sample_id"]] for p in cand]
        vlm.set_adapter("candidate")
        single = evaluate(vlm, examples, EvalConfig(), batch_size=8, progress=False)
        assert [s["output"] for s in single.samples] == [p["output"] for p in cand]
        # The baseline saw all of dev; the candidate's evaluation may stop early (futility), in
        # chunks each sharded over both ranks: every stored answer is the adapter's (above),
        # and the adapter answers some question otherwise than the base.
        vlm.set_adapter(None)
        examples = [by_id[p["sample_id"]] for p in base]
        single = evaluate(vlm, examples, EvalConfig(), batch_size=8, progress=False)
        assert [s["output"] for s in single.samples] == [p["output"] for p in base]
        assert len(shard(examples, 2)[1]) > 0  # rank 1 had a share of the baseline
        base_by_id = {p["sample_id"]: p["output"] for p in base}
        assert any(base_by_id[p["sample_id"]] != p["output"] for p in cand)
    # `loop eval --adapter ID` reads the adapter's folder from the database on rank 0 only
    done = _torchrun(["-q", "eval", "--preset", "demo", "--benchmark", "gqa_ru", "--limit", "8",
                      "--adapter", str(adapter["id"]), "--db", "e.db", "--json"], env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["model_info"]["adapter"] == adapter["path"]
    with Store.open_existing(tmp_path / "e.db") as store:
        (ev,) = store.evaluations(role="manual")
        assert ev["adapter_id"] == adapter["id"]
