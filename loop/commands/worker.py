"""``python -m loop worker``: run HPO trials of a `loop run --storage URL` on this GPU."""

from __future__ import annotations

import argparse

from loop.commands._common import GPU_PROFILES


def add_parser(sub) -> None:
    p = sub.add_parser("worker", help="run HPO trials of a loop that shares its study",
                       description="Take trials from the Optuna study of a `loop run --storage "
                       "URL` and train and score them as the loop would (same trainer, leakage "
                       "guard, tune subset and time box, all read from the study). Start one per "
                       "GPU, on any machine that sees the model, the data and the run's folder "
                       "at the same paths. Stops when the run ends.")
    p.add_argument("--storage", required=True, metavar="URL",
                   help="the storage given to `loop run --storage` (postgresql://..., "
                   "mysql+pymysql://..., journal:///path/study.log)")
    p.add_argument("--study", required=True, metavar="NAME",
                   help="the study's name, as `loop run` printed it (loop-hpo-run<id> unless "
                   "--study was given)")
    p.add_argument("--gpu", choices=GPU_PROFILES, default="auto",
                   help="GPU profile of this worker (pick the device with CUDA_VISIBLE_DEVICES)")
    p.add_argument("--db", metavar="PATH",
                   help="the run's experiments database, when this machine sees it: refuse a "
                   "study that belongs to another database")
    p.add_argument("--max-trials", type=int, metavar="N", help="stop after N trials")
    p.add_argument("--name", metavar="NAME",
                   help="this worker's name in the study (default: host, GPU and pid)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="evaluation batch size (default: the run's)")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="train on one sequence per record even when the run packs records by "
                   "image (a run started with --no-packing never packs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.exceptions import UserError
    from loop.worker import work
    from strategies.hpo_study import normalized

    if args.max_trials is not None and args.max_trials < 1:
        raise UserError(f"--max-trials must be at least 1, but got {args.max_trials}")
    done = work(normalized(args.storage), args.study, gpu=args.gpu, db=args.db, name=args.name,
                max_trials=args.max_trials, batch_size=args.batch_size, progress=not args.quiet,
                packing=args.packing)
    print(f"{done} trials run")
    return 0
