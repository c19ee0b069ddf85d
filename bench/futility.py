"""What futility stopping saved in a run, and the replay that checks it lost nothing.

Reads a run's stored candidate dev evaluations (``loop_evaluations.progress``): seconds spent
against the seconds the full evaluations would have taken (each stopped one extrapolated from
its own rate), per cycle and in total; then replays the rule over every candidate evaluation
that ran to the end (``loop.futility.replay_run``) and checks that it stops no accepted one.
With ``--complete`` it first evaluates every stopped candidate on the whole dev subset (the
run's model, data, subsets and adapters), so the replay covers every candidate of the run and
compares the rule with the full test's decision on each.

``--export FILE`` (with ``--complete``) writes every candidate's and champion's per-question
outcomes and the full test's decisions as JSON: ``tests/data/futility_demo_run.json`` is such
a file, from a default demo run, and ``tests/test_futility.py`` replays it.

    .venv/bin/python bench/futility.py --db experiments.db [--run ID] [--complete] [--export FILE]
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
    p.add_argument("--complete", action="store_true",
                   help="evaluate the stopped candidates in full first (loads the model)")
    p.add_argument("--export", metavar="FILE", help="write the outcome tables (with --complete)")
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
        if args.complete:
            rows = [complete(store, run, r, int(batch)) if r["replay"] is None else r
                    for r in rows]
        lost = [r for r in rows if (r.get("full") or r["status"]) == "accepted"
                and r["replay"] and r["replay"]["stopped"]]
        for r in rows:
            if r["replay"] is None:
                what = "stopped live (no full test to replay)"
            else:
                out = r["replay"]
                what = (f"replay stops at {out['n_done']}/{out['n_total']} questions"
                        if out["stopped"] else "replay runs to the end")
            full = f", full test: {r['full']}" if r.get("full") else ""
            print(f"cycle {r['cycle']} {r['strategy']} {r['status']}{full}: {what}")
        print(f"replay over {sum(r['replay'] is not None for r in rows)} full evaluations: "
              f"{len(lost)} accepted candidates would have been stopped")
        if args.export:
            export(store, run, rows, int(batch), Path(args.export))
    return 1 if lost else 0


_BENCH = {}


def complete(store, run: dict, row: dict, batch: int) -> dict:
    """Evaluate a stopped candidate on the whole dev subset, judge it with the full test at
    the α_k it was given, and replay the rule on it."""
    from core.device import resolve_profile
    from core.evaluate import EvalConfig
    from core.model import load_vlm
    from loop.budget import Budget, CostModel, priors
    from loop.decision import futile, judge
    from loop.futility import replay
    from loop.sources import resolve_sources
    from loop.workbench import Scored, Workbench

    cfg = run.get("config") or {}
    if not _BENCH:
        profile = resolve_profile(cfg.get("gpu", "cpu"))
        sources = resolve_sources(cfg["preset"], cfg.get("model"), cfg.get("data_dir"),
                                  cfg.get("coco_dir"), cfg.get("seed", 0))
        bench = Workbench(store=store, run_id=run["id"],
                          vlm=load_vlm(sources.model, options=profile.load_options()),
                          profile=profile, sources=sources, budget=Budget(1e9),
                          costs=CostModel(priors(cfg["preset"], profile.name)),
                          seed=cfg.get("seed", 0), workdir=store.run_dir(run["id"]),
                          batch_size=batch, progress=False)
        bench.load_data()
        _BENCH["bench"] = bench
    bench = _BENCH["bench"]
    cycle = store.cycle(run["id"], row["cycle"])
    judged = cycle["subsets"]["judged"]
    tested = [b for b in judged if (cycle["paired"].get(b) or {}).get("k")]
    champ, cand, tables = {}, {}, {}
    for b in tested:
        c = store.evaluation(cycle["eval_ids"][b])["candidate"]
        r = bench.run_eval(b, EvalConfig(**c["eval_configs"][b]), c["adapter_path"],
                           bench.dev[b])
        champ[b] = bench.load_scored(judged[b]["champion_eval_id"])
        cand[b] = Scored(b, r.samples, r.metrics, -1)
        tables[b] = (champ[b].samples, r.samples)
    at = {b: cycle["paired"][b]["alpha"] for b in tested}
    alpha = float(cfg.get("alpha", 0.05))
    status, _ = judge(champ, cand, alpha=alpha,
                      k_done=min(cycle["paired"][b]["k"] for b in tested) - 1,
                      setting_only=False, objective="deployment")
    out = replay(tables, seed=cfg.get("seed", 0), min_questions=batch,
                 should_stop=lambda bounds: futile(bounds, at, alpha))
    return {**row, "full": status, "replay": out, "tables": tables}


def export(store, run: dict, rows: list[dict], batch: int, path: Path) -> None:
    """Per-question outcomes (in dev order) of each replayed candidate and its champion."""
    import json

    from loop.futility import _samples

    cfg = run.get("config") or {}
    order: dict[str, list] = {}
    out = {"source": f"a default demo run (`loop run --preset demo --gpu cpu --budget 5m`), "
                     f"run {run['id']}", "alpha": cfg.get("alpha", 0.05),
           "seed": cfg.get("seed", 0), "min_questions": batch, "questions": order, "cycles": []}
    for r in rows:
        if r["replay"] is None:
            continue
        cycle = store.cycle(run["id"], r["cycle"])
        entry = {"cycle": r["cycle"], "strategy": r["strategy"], "status": r["status"],
                 "full": r.get("full") or r["status"], "champion": {}, "candidate": {},
                 "k": {}, "alpha_k": {}}
        for b, j in cycle["subsets"]["judged"].items():
            if not (cycle["paired"].get(b) or {}).get("k"):
                continue
            champ = _samples(store, j["champion_eval_id"])
            cand = (r.get("tables") or {}).get(b, (None, None))[1] or _samples(
                store, cycle["eval_ids"][b])
            order.setdefault(b, [[s["sample_id"], s["cluster"]] for s in champ])
            ids = [i for i, _ in order[b]]
            for key, samples in (("champion", champ), ("candidate", cand)):
                right = {s["sample_id"]: bool(s["correct"]) for s in samples}
                entry[key][b] = "".join("1" if right[i] else "0" for i in ids)
            entry["k"][b], entry["alpha_k"][b] = cycle["paired"][b]["k"], cycle["paired"][b]["alpha"]
        out["cycles"].append(entry)
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
