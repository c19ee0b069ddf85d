"""The HPO study as a shared work queue: its storage, its owner, its slots, its workers.

``loop run`` keeps the study of ``optuna_hpo`` in ``experiments.db`` (SQLite, trials run in
the loop's own process), or, with ``--storage URL``, in a storage many processes share:
PostgreSQL or MySQL (Optuna's ``RDBStorage``) or a journal file (``JournalStorage`` with
``JournalFileBackend``). Then ``loop worker`` processes take trials from it.

What lives in the study, besides Optuna's own trials:

- user attribute ``loop_run``: the run that owns the study (its token, id, database). A
  second run never writes into a study that is not its own.
- ``loop_world``: what a worker needs to rebuild the run's world (model and data sources,
  seed, data fingerprint, the ids of the tune subset, the adapters' folder, the heartbeat).
- ``loop_cycle_<k>``: the settings of HPO cycle k (champion prompts, error profile weights,
  cost rates, each trial's time box, the cycle's wall-clock expiry).
- ``loop_worker_<name>``: each worker's last sign of life.
- slots: WAITING trials tagged with user attribute ``cycle``; whoever claims one (a worker,
  or the loop when no worker is alive) runs it. A claim is Optuna's own WAITING -> RUNNING
  state change, which only one process wins. The seconds a pruned trial did not spend come
  back to its cycle as one more slot (``refund``), whose time box they are.

Heartbeat: on an RDB storage every running trial's process records a heartbeat; a trial
whose process died is failed after the grace period by whoever looks next (the loop while it
waits, or any worker), and ``RetryHeartbeatStaleTrialCallback`` queues it again with the
same parameters and cycle. Optuna has no heartbeat for journal storages: there a dead
worker's trial stays RUNNING and the cycle goes on without it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from core.exceptions import UserError

log = logging.getLogger(__name__)

HEARTBEAT_S = 20
"""Seconds between a running trial's heartbeats (and a worker's signs of life)."""
MAX_RETRY = 2
"""How often a trial whose process died is queued again."""
CYCLE_ATTR = "cycle"
"""Trial user attribute: the HPO cycle a slot belongs to."""
REFUND_ATTR = "refund_s"
"""Trial user attribute of a slot offered with seconds that pruned trials did not spend: its
time box."""


def masked(url: str) -> str:
    """The URL without its password, for messages and records."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def journal_path(url: str) -> Path:
    """``journal:///abs/file.log``, ``journal:file.log`` or a path ending in .log."""
    path = re.sub(r"^journal:(//)?", "", url) if url.startswith("journal:") else url
    return Path(path).expanduser().resolve()


def normalized(url: str) -> str:
    """The URL as stored with a run: a journal file as an absolute path."""
    return f"journal://{journal_path(url)}" if is_journal(url) else url


def open_storage(url: str, heartbeat_s: int | None = None):
    """An Optuna storage for ``url``; with ``heartbeat_s`` an RDB storage records heartbeats
    and fails and retries the trials of dead processes.

    Raises:
        UserError: the URL is not a storage Optuna knows, its driver is missing, or the server
            or file cannot be reached (one line, naming the URL without its password).
    """
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    shown = masked(url)
    if is_journal(url):
        path = journal_path(url)
        if not path.parent.is_dir():
            raise UserError(f"the journal storage {shown} cannot be used: its folder "
                            f"{path.parent} does not exist. Create it or choose another path.")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserError(f"cannot open the journal storage {path}: {exc.strerror or exc}"
                            ) from None
    if not re.match(r"^(postgresql|mysql|sqlite)(\+\w+)?://", url):
        raise UserError(f"--storage must be a postgresql://, mysql:// or sqlite:/// URL, or a "
                        f"journal file (journal:///path/file.log or a path ending in .log), "
                        f"but got '{shown}'")
    kwargs = {}
    if heartbeat_s:
        kwargs = dict(heartbeat_interval=int(heartbeat_s), grace_period=int(3 * heartbeat_s),
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                          max_retry=MAX_RETRY))
    engine = {"pool_pre_ping": True}
    if not url.startswith("sqlite"):
        engine["connect_args"] = {"connect_timeout": 10}
    try:
        return RDBStorage(url, engine_kwargs=engine, **kwargs)
    except ImportError as exc:  # Optuna re-raises the driver's ModuleNotFoundError
        missing = getattr(exc.__cause__, "name", None) or "its driver"
        hint = ("the postgres extra: pip install -e '.[postgres]'" if url.startswith("postgresql")
                else "the driver the URL names, e.g. pymysql for mysql+pymysql://")
        raise UserError(f"the storage {shown} needs the Python module '{missing}': install "
                        f"{hint}") from None
    except Exception as exc:  # sqlalchemy's OperationalError and friends
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"cannot reach the Optuna storage {shown}: {reason}. Check that the "
                        "server runs, the host, port, user and database are right, and that "
                        "this machine may connect.") from None


def heartbeat_enabled(study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def fail_dead_trials(study) -> None:
    """Fail (and queue again) the running trials whose process stopped beating."""
    import optuna

    if heartbeat_enabled(study):
        optuna.storages.fail_stale_trials(study)


# ---------------------------------------------------------------- ownership


def check_owner(study, owner: dict, url: str) -> None:
    """Take an unowned empty study, or make sure it belongs to ``owner`` (same run token).

    Raises:
        UserError: the study belongs to another run, or holds trials no run of ours made.
    """
    have = study.user_attrs.get("loop_run")
    if have is None:
        if study.trials:
            raise UserError(f"the study '{study.study_name}' in {masked(url)} already has "
                            f"{len(study.trials)} trials and was not created by `loop run`; "
                            "choose another name with --study")
        study.set_user_attr("loop_run", owner)
        return
    if have.get("run_token") != owner.get("run_token"):
        raise UserError(f"the study '{study.study_name}' in {masked(url)} belongs to run "
                        f"{have.get('run_id')} of {have.get('db')} (started {have.get('started')}), "
                        f"not to run {owner.get('run_id')} of {owner.get('db')}; choose another "
                        "name with --study, or another storage")


def load_or_none(url: str, name: str, storage=None):
    """The study ``name``, or None while it does not exist yet."""
    import optuna

    storage = storage or open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


# ---------------------------------------------------------------- slots


def cycle_trials(study, cycle: int, states=None) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if t.user_attrs.get(CYCLE_ATTR) == cycle]


def claim(study, cycle: int | None = None):
    """Claim one WAITING slot (of ``cycle`` when given) for this process, or None.

    Optuna's own WAITING -> RUNNING change is the lock: ``set_trial_state_values`` returns
    False (or raises) for every process but the one that changed it first, as in
    ``Study.ask``; unlike ``ask`` this never creates a trial nobody asked for.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if CYCLE_ATTR not in frozen.user_attrs:
            continue
        if cycle is not None and frozen.user_attrs[CYCLE_ATTR] != cycle:
            continue
        try:
            if not study._storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        return optuna.Trial(study, frozen._trial_id)
    return None


def cancel_waiting(study, cycle: int, why: str) -> list[int]:
    """Fail the slots of ``cycle`` nobody has taken (the cycle is over); their numbers."""
    from optuna.trial import TrialState

    cancelled = []
    while (trial := claim(study, cycle)) is not None:
        trial.set_user_attr("cancelled", why)
        study.tell(trial, state=TrialState.FAIL)
        cancelled.append(trial.number)
    return cancelled


def refund(study, cycle: int, time_box: float, left: float, floor: float) -> float | None:
    """Offer one more slot of ``cycle`` when its pruned trials left seconds unspent: their
    seconds not yet given back, at most ``time_box`` and what ``left`` holds beyond the waiting
    slots; none under ``floor`` (the smallest trial). Returns the new slot's time box."""
    from optuna.trial import TrialState

    trials = cycle_trials(study, cycle)
    saved = sum((t.user_attrs.get("pruned") or {}).get("saved_s", 0.0) for t in trials
                if t.state == TrialState.PRUNED)
    given = sum(t.user_attrs.get(REFUND_ATTR) or 0.0 for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    seconds = min(time_box, saved - given, left - waiting * time_box)
    if seconds < floor:
        return None
    study.enqueue_trial({}, user_attrs={CYCLE_ATTR: cycle, REFUND_ATTR: round(seconds, 2)})
    log.info("cycle %d: pruned trials left %.0f s unspent; one more trial of %.0f s offered",
             cycle, saved - given, seconds)
    return seconds


# ---------------------------------------------------------------- workers and heartbeats


def report_alive(study, name: str, state: str) -> None:
    study.set_user_attr(f"loop_worker_{name}", {"seen": time.time(), "state": state})


def live_workers(study, within_s: float) -> list[str]:
    """Names of the workers that gave a sign of life in the last ``within_s`` seconds."""
    now = time.time()
    return [k.removeprefix("loop_worker_") for k, v in study.user_attrs.items()
            if k.startswith("loop_worker_") and isinstance(v, dict)
            and v.get("state") != "stopped" and now - float(v.get("seen", 0)) < within_s]


@contextmanager
def beating(study, trial_id: int | None, every_s: float, alive=None):
    """While the block runs: the trial's heartbeat (RDB storages) and ``alive()`` every
    ``every_s`` seconds, from a background thread (a training step may take minutes)."""
    stop = threading.Event()
    storage = study._storage
    beats = trial_id is not None and heartbeat_enabled(study)

    def run():
        while True:
            try:
                if beats:
                    storage.record_heartbeat(trial_id)
                if alive is not None:
                    alive()
            except Exception as exc:  # a lost connection must not kill the trial
                log.warning("heartbeat not recorded: %s", exc)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=run, daemon=True, name="hpo-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
