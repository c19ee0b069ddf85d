"""What futility stopping saved in a run, and the replay that checks it lost nothing.

Reads a run's stored candidate dev evaluations (``loop_evaluations.progress``): seconds spent
against the seconds the full evaluations would have taken (each stopped one extrapolated from
its own rate), per cycle and in total; then replays the rule over every candidate evaluation
that ran to the end (``loop.futility.replay_run``) and checks that it stops no accepted one.

    .venv/bin/python bench/futility.py --db experiments.db [--run ID]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop.futility import replay_run  # noqa: E402
from loop.store import Store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True)
    p.add_argument("--run", type=int)
    args = p.parse_args(argv)
    with Store.open_existing(args.db) as store:
        run = store.get_run(args.run) if args.run else store.latest_run()
        env = run.get("environment") or {}
        batch = (run.get("config") or {}).get("batch_size") or (
            env.get("profile") or {}).get("eval_batch_size") or 1
        spent = full = 0.0
        print("cycle  strategy             status    benchmark   units      questions  seconds "
              "(est. full)")
        for ev in store.evaluations(run["id"], role="candidate", split="dev"):
            prog = ev.get("progress")
            if not prog:
                continue
            c = store.cycle(run["id"], ev["cycle_index"])
            spent += prog["seconds"]
            full += prog["full_s_est"]
            print(f"{ev['cycle_index']:>5}  {c['strategy']:<20} {c['status']:<9} "
                  f"{ev['benchmark']:<11} {prog['units_done']:>3}/{prog['units_total']:<5} "
                  f"{prog['n_done']:>4}/{prog['n_total']:<5} {prog['seconds']:7.1f} "
                  f"({prog['full_s_est']:.1f}){'  stopped' if prog['stopped'] else ''}")
        saved = 1 - spent / full if full else 0.0
        print(f"candidate dev evaluations: {spent:.1f} s spent of an estimated {full:.1f} s "
              f"for full evaluations: {100 * saved:.1f}% saved")
        rows = replay_run(store, run["id"], min_questions=int(batch))
        lost = [r for r in rows if r["status"] == "accepted" and r["replay"]
                and r["replay"]["stopped"]]
        for r in rows:
            what = ("stopped live (no full test to replay)" if r["replay"] is None else
                    f"replay: {'stops at ' + str(r['replay']['n_done']) + '/' + str(r['replay']['n_total']) if r['replay']['stopped'] else 'runs to the end'}")
            print(f"cycle {r['cycle']} {r['strategy']} {r['status']}: {what}")
        print(f"replay over {sum(r['replay'] is not None for r in rows)} full evaluations: "
              f"{len(lost)} accepted candidates would have been stopped")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
