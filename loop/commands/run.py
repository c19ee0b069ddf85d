"""``python -m loop run``: improve the model within a wall-clock budget."""

from __future__ import annotations

import argparse

from loop.budget import DEFAULT_RESERVE
from loop.commands._common import GPU_PROFILES, add_db_arg, add_output_path_arg, add_source_args
from loop.config_file import add_config_arg
from loop.trackers import add_report_arg


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the improvement loop within a budget",
                       description="Evaluate, diagnose, retrain and keep what a paired test says "
                       "is better, until the budget (minus the reserve for the final evaluation "
                       "on the held-out split) is spent. Everything is recorded in the database.")
    p.add_argument("--budget", metavar="DURATION",
                   help="wall-clock budget, everything included: 6h, 90m, 1h30m, 300s "
                   "(required unless --resume, which keeps the run's own)")
    p.add_argument("--gpu", choices=GPU_PROFILES, default="auto",
                   help="GPU profile: t4 (16 GB, fp16, 4-bit), a100/h100 (bf16), cpu, auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest unfinished run in the database with its own options "
                   "(flags that would change them are refused; --storage and --output_path apply)")
    p.add_argument("--reserve", type=float, default=DEFAULT_RESERVE, metavar="FRACTION",
                   help=f"share of the budget kept for the final evaluation (default {DEFAULT_RESERVE:g})")
    p.add_argument("--objective", choices=("benchmark", "deployment"), default="benchmark",
                   help="what the loop optimises: benchmark (default; the exact lmms-eval "
                   "protocol, so only adapters can win) or deployment (prompt and decoding "
                   "settings are part of the candidate)")
    p.add_argument("--max-cycles", type=int, metavar="N", help="stop after N cycles")
    p.add_argument("--dev-size", type=int, metavar="N",
                   help="dev questions per benchmark per evaluation (default: from the cost model)")
    p.add_argument("--final-size", type=int, metavar="N",
                   help="final questions per benchmark (default: what fits in the reserve)")
    p.add_argument("--strategies", metavar="NAMES",
                   help="comma-separated strategies to allow (default: all registered)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="evaluation batch size (default: the GPU profile's)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="compute every question's whole prompt, image included (for comparison; "
                   "by default each image's prompt prefix is computed once per batch)")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="train on one sequence per record (for comparison; by default every "
                   "training packs the records about one image into one conversation)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where adapters, SFT data and reports go, in DIR/run-<id> (default: "
                   "beside the database, <db stem>.runs/run-<id>, so databases never share files)")
    p.add_argument("--storage", metavar="URL",
                   help="keep the HPO study in a storage that `loop worker` processes share: "
                   "postgresql://USER@HOST/DB, mysql+pymysql://..., or a journal file "
                   "(journal:///path/study.log or a path ending in .log); default: the study "
                   "lives in the database and the loop runs every trial itself")
    p.add_argument("--study", metavar="NAME",
                   help="the HPO study's name in --storage (default: loop-hpo-run<id>)")
    p.add_argument("--hpo-here", action="store_true",
                   help="with --storage, the loop also runs HPO trials on its own GPU while "
                   "workers run theirs (default: only when no worker is alive)")
    p.add_argument("--heartbeat", type=int, default=20, metavar="SECONDS",
                   help="seconds between a shared trial's heartbeats; a trial whose process "
                   "is silent for three of them is failed and queued again (default 20)")
    add_output_path_arg(p, "the final evaluations (base, champion) under DIR/<role>/")
    add_report_arg(p)
    add_source_args(p)
    add_db_arg(p)
    add_config_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from loop.trackers import check

    check(args.report_to)  # before anything runs or the database is touched
    import strategies
    from core.exceptions import UserError
    from loop.budget import parse_duration
    from loop.config_file import resolved_options
    from loop.controller import Loop, RunConfig
    from loop.store import Store
    from strategies.hpo_study import masked, normalized

    if args.budget is None and not args.resume:
        raise UserError("`--budget` is required, e.g. `--budget 6h` (or `--resume` a run)")
    if args.resume:
        refuse_conflicting_flags(args)
    names = strategies.names()
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.max_cycles is not None and args.max_cycles < 0:
        raise UserError(f"--max-cycles must be >= 0, but got {args.max_cycles}")
    config = RunConfig(budget_s=parse_duration(args.budget) if args.budget else 1.0, gpu=args.gpu, preset=args.preset,
                       model=args.model, data_dir=args.data_dir, coco_dir=args.coco_dir,
                       seed=args.seed, reserve_fraction=args.reserve, max_cycles=args.max_cycles,
                       dev_size=args.dev_size, final_size=args.final_size,
                       batch_size=args.batch_size, prefix_cache=args.prefix_cache,
                       packing=args.packing,
                       workdir=args.workdir, strategies=names,
                       objective=args.objective, report_to=args.report_to,
                       options={**resolved_options(args), "strategies": ",".join(names)},
                       study=args.study, heartbeat_s=args.heartbeat, hpo_here=args.hpo_here,
                       storage=masked(normalized(args.storage)) if args.storage else None,
                       progress=not args.quiet)
    if not args.resume:  # a user error leaves no run, no database and no run folder behind
        preflight(config, args.db)
    if args.output_path:  # a folder that cannot be made fails now, not after the run
        from pathlib import Path

        Path(args.output_path).mkdir(parents=True, exist_ok=True)
    store = Store(args.db)
    url = normalized(args.storage) if args.storage else None
    try:
        loop = Loop(config, store, resume=args.resume, storage_url=url)
        run_id = loop.run()
        if args.output_path:
            from loop.outputs import write_run

            for path in write_run(store, run_id, args.output_path, loop.bench.by_id):
                print(f"wrote {path} (and its samples files)")
    finally:
        store.close()
    run_row = Store(args.db).get_run(run_id)
    if run_row.get("report_path"):
        print(f"report: {run_row['report_path']}")
    print(f"see `python -m loop log --db {args.db}` and `python -m loop show CYCLE`")
    return 0


def preflight(config, db: str) -> None:
    """What a new run needs, checked before anything is created: the GPU of its profile, the
    model and the data (local, or a reachable or cached hub id), and folders it may write.

    Raises:
        UserError: one line naming what is missing and what to do.
    """
    import tempfile
    from pathlib import Path

    from core.device import resolve_profile
    from core.exceptions import UserError
    from loop.sources import check_reachable, resolve_sources

    resolve_profile(config.gpu)
    check_reachable(resolve_sources(config.preset, config.model, config.data_dir,
                                    config.coco_dir, config.seed))
    for flag, value in (("--db", db), ("--workdir", config.workdir)):
        if value is None:
            continue
        target = Path(value).resolve()
        target = target.parent if flag == "--db" else target
        existing = next(p for p in (target, *target.parents) if p.exists())
        try:  # a file made and removed at once: the folder is left as it was
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise UserError(f"cannot write to {value} ({flag}): {exc.strerror or exc} in "
                            f"{existing}. Choose a folder you may write to with {flag}."
                            ) from None


RESUME_MAY_CHANGE = {"resume", "db", "storage", "output_path"}
"""Options a resumed run takes from the caller: the database to resume, the storage URL (its
password is never stored, so it is given again) and where the final files are written."""


def resume_conflicts(args: argparse.Namespace, run: dict) -> list[str]:
    """Options of this command line (or its --config file) that differ from the stored run's
    own, as ``--flag VALUE (the run's: VALUE)``; empty when the run was stored without its
    options (before they were recorded)."""
    from loop.config_file import resolved_options

    stored = (run.get("config") or {}).get("options")
    if not stored:
        return []
    defaults = _pristine_defaults()
    out = []
    for dest, value in resolved_options(args).items():
        if dest in RESUME_MAY_CHANGE or dest not in defaults or value == defaults[dest]:
            continue
        if dest in stored and value != stored[dest]:
            out.append(_flag(dest, value, stored[dest], defaults))
    return out


def refuse_conflicting_flags(args: argparse.Namespace) -> None:
    """Raises ``UserError`` naming every flag that would silently not apply to the resumed run."""
    from core.exceptions import UserError
    from loop.store import Store

    store = Store(args.db)
    try:
        run = store.latest_run()
    finally:
        store.close()
    if run is None:
        return  # the controller says there is nothing to resume
    conflicts = resume_conflicts(args, run)
    if conflicts:
        raise UserError(f"--resume continues run {run['id']} with its own options; these differ "
                        f"from them: {', '.join(conflicts)}. Drop them to resume, or start a new "
                        "run without --resume")


def _pristine_defaults() -> dict:
    """The run command's defaults as declared (a --config file changes the parser's own)."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run_parser = sub.choices["run"]
    return {a.dest: a.default for a in run_parser._actions if a.option_strings}


def _flag(dest: str, value, stored, defaults: dict) -> str:
    if isinstance(value, bool) and dest == "prefix_cache":
        return f"--{'' if value else 'no-'}prefix-cache (the run's: {'on' if stored else 'off'})"
    name = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return f"{name} (the run's: {'on' if stored else 'off'})"
    return f"{name} {value} (the run's: {'none' if stored is None else stored})"
