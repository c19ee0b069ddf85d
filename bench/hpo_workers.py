"""HPO throughput with 0, 1 or 2 `loop worker` processes on the demo world: the loop's HPO
cycles (four slots each) on a shared study, timed from the first slot offered to the last trial
finished. Prints trials per minute and training samples per minute (each trial trains until its
time box ends, so trials per minute alone would hide processes slowing each other down).

    .venv/bin/python bench/hpo_workers.py --workers 2 [--cycles 2] [--storage URL] [--json]

``--workers 0`` is the default run: the study in experiments.db, every trial in the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--time-left", type=float, default=70.0,
                        help="seconds each HPO cycle is given (default 70: 4 slots of ~9 s)")
    parser.add_argument("--storage", help="shared storage URL (default: a journal file)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per worker (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import optuna

    import strategies
    from loop.controller import Loop, RunConfig
    from loop.hpo_share import close
    from loop.store import Store
    from strategies import hpo_study

    tmp = Path(tempfile.mkdtemp(prefix="hpo-bench-"))
    url = None if args.workers == 0 else (args.storage or f"journal://{tmp / 'study.log'}")
    config = RunConfig(budget_s=3600, gpu="cpu", preset="demo", dev_size=30, final_size=30,
                       batch_size=32, storage=hpo_study.masked(url) if url else None,
                       study="bench", heartbeat_s=2, progress=False)
    loop = Loop(config, Store(tmp / "experiments.db"), storage_url=url, echo=lambda m: None)
    loop.start()
    loop.set_up()
    procs = [subprocess.Popen([sys.executable, "-m", "loop", "-q", "worker", "--storage", url,
                               "--study", "bench", "--gpu", "cpu", "--name", f"w{i}"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, **({"OMP_NUM_THREADS": str(args.threads)}
                                                    if args.threads else {})})
             for i in range(args.workers)]
    champion, scores = loop.baseline()
    profiles = {b: loop.bench.error_profile(s) for b, s in scores.items()}
    storage = hpo_study.open_storage(url or loop.store.optuna_storage_url())
    try:
        if url:
            study = optuna.load_study(study_name="bench", storage=storage)
            while not all((study.user_attrs.get(f"loop_worker_w{i}") or {}).get("state")
                          == "idle" for i in range(args.workers)):
                time.sleep(0.5)
                study = optuna.load_study(study_name="bench", storage=storage)
        t0 = time.time()
        for k in range(1, args.cycles + 1):
            ctx = loop.context(champion, profiles, args.time_left, k, "optuna_hpo")
            strategies.get("optuna_hpo").propose(ctx)
            while True:  # a trial may still finish after the loop's cycle ended
                study = optuna.load_study(study_name="bench", storage=storage)
                if not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                    break
                time.sleep(0.5)
        seconds = time.time() - t0
    finally:
        if url:
            close(url, "bench", "finished")
        for p in procs:
            p.wait(timeout=120)
        loop.store.release_run_lock()
    trials = optuna.load_study(study_name="bench", storage=storage).trials
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    samples = sum((t.user_attrs.get("train") or {}).get("samples") or 0 for t in done)
    out = {"workers": args.workers, "cycles": args.cycles, "trials_finished": len(done),
           "trials_failed": sum(t.state.name == "FAIL" for t in trials),
           "seconds": round(seconds, 1), "trials_per_min": round(60 * len(done) / seconds, 2),
           "train_samples_per_min": round(60 * samples / seconds),
           "threads_per_worker": args.threads,
           "storage": "experiments.db" if url is None else hpo_study.masked(url),
           "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.workers} worker(s): {len(done)} trials in {seconds:.1f} s = "
              f"{out['trials_per_min']} trials/min, {out['train_samples_per_min']} training "
              f"samples/min ({out['trials_failed']} failed; {out['storage']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
