"""The run's side of a shared HPO study (``loop run --storage URL``): check the storage and the
study before anything is recorded, say how to start workers, tell them what to load, and close
the study when the run ends (workers then stop).
"""

from __future__ import annotations

import logging
import uuid

from core.exceptions import UserError
from strategies import hpo_study

log = logging.getLogger(__name__)


def run_owner(store, run_id: int) -> dict:
    """The run's identity in a shared study: a token made once and kept with the run's
    environment (so a moved database keeps it), its id, database and start."""
    run = store.get_run(run_id)
    env = run.get("environment") or {}
    if not env.get("run_token"):
        env = {**env, "run_token": uuid.uuid4().hex}
        store.update_run(run_id, environment=env)
    return {"run_token": env["run_token"], "run_id": run_id, "db": str(store.path),
            "started": run.get("started_at")}


def study_of(config, run_id: int) -> str:
    return config.study or f"loop-hpo-run{run_id}"


def check(url: str, name: str | None, owner: dict | None) -> None:
    """Refuse, in one line, an unreachable storage and a study that belongs to another run
    (``owner`` None: a new run, which owns no study yet)."""
    import optuna

    storage = hpo_study.open_storage(url)
    if name is None:
        return
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    have = study.user_attrs.get("loop_run")
    if have is None and not study.trials:
        return
    if owner is None or have is None or have.get("run_token") != owner["run_token"]:
        hpo_study.check_owner(study, owner or {"run_token": None, "run_id": "(new)",
                                               "db": "this database"}, url)


def world(loop) -> dict:
    """What a worker needs to rebuild this run's world, for ``Context.world``."""
    from strategies.hpo_trial import tune_slice

    cfg, bench = loop.config, loop.bench
    return {"owner": run_owner(loop.store, loop.run_id), "preset": cfg.preset,
            "model": cfg.model, "data_dir": cfg.data_dir, "coco_dir": cfg.coco_dir,
            "seed": cfg.seed, "data_fingerprint": bench.data_fingerprint(),
            "adapter_dir": str((bench.workdir / "adapters").resolve()),
            "heartbeat_s": cfg.heartbeat_s, "hpo_here": cfg.hpo_here,
            "batch_size": bench.batch_size,
            "prefix_cache": cfg.prefix_cache, "packing": cfg.packing,
            "tune_ids": {b: [str(e["id"]) for e in tune_slice(ex)]
                         for b, ex in bench.tune.items() if ex}}


def open_for_workers(loop) -> None:
    """Create the run's study (or take it back on resume) with what workers need, so that
    they load the model and data while the loop measures the baseline."""
    import optuna

    cfg = loop.config
    name = study_of(cfg, loop.run_id)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=hpo_study.open_storage(loop.storage_url),
                                study_name=name, direction="maximize", load_if_exists=True)
    hpo_study.check_owner(study, run_owner(loop.store, loop.run_id), loop.storage_url)
    facts = {k: v for k, v in world(loop).items() if k != "owner"}
    if study.user_attrs.get("loop_world") != facts:
        study.set_user_attr("loop_world", facts)
    if study.user_attrs.get("loop_closed"):  # a resumed run: its workers may come back
        study.set_user_attr("loop_closed", None)
    loop.echo(f"HPO trials go to study '{name}' in {cfg.storage}; start workers with "
              f"`python -m loop worker --storage URL --study {name}`")


def close(url: str, name: str, status: str) -> None:
    """Tell the study's workers that the run is over (they finish their trial and stop)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=hpo_study.open_storage(url))
        study.set_user_attr("loop_closed", status)
    except KeyError:
        return  # no HPO cycle ran: there is no study
    except Exception as exc:  # the run's end is recorded whatever the storage does
        log.warning("could not tell the workers of study %s that the run ended: %s", name, exc)


def resumed_storage(config, given: str | None) -> str | None:
    """The shared storage of a resumed run: the one given (recorded, password masked), else
    the stored one, which must be given again when it carried a password (never stored)."""
    if given:
        config.storage = hpo_study.masked(hpo_study.normalized(given))
        return hpo_study.normalized(given)
    if config.storage and "***" in config.storage:
        raise UserError(f"this run uses the Optuna storage {config.storage}; give it again with "
                        "--storage URL (passwords are not stored)")
    return config.storage
