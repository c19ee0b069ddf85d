"""``--report-to none|tensorboard|mlflow|wandb``: a copy of a run's numbers for an experiment tracker.

Off by default (``none``). SQLite stays the record; a tracker only receives what the loop has
already recorded: dev scores per cycle, the decisions, training loss curves and the final table.
Each tracker's package is an optional extra of the project and is imported only when chosen;
:func:`check` says what to install before anything runs. W&B is never allowed to ask for a
login: it runs offline unless ``WANDB_API_KEY`` or ``WANDB_MODE`` says otherwise.

Loop metrics are plotted against the cycle (0 is the baseline); training losses against the
optimizer step, one curve per trained adapter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from core.exceptions import UserError

log = logging.getLogger(__name__)

PROJECT = "llava-ru-loop"
"""The distribution name (for ``pip install 'llava-ru-loop[mlflow]'``) and the project name
the trackers file runs under."""
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def add_report_arg(parser) -> None:
    parser.add_argument("--report-to", choices=TRACKERS, default="none",
                        help="also send the numbers to an experiment tracker (default: none; "
                        "tensorboard, mlflow and wandb are optional extras, wandb runs offline "
                        "unless WANDB_API_KEY or WANDB_MODE is set)")


def check(name: str) -> None:
    """Refuse, before anything runs, a tracker whose package is not installed."""
    package = _PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        raise UserError(_missing(name))


def _missing(name: str) -> str:
    return (f"--report-to {name} needs `pip install '{PROJECT}[{name}]'` (the {_PACKAGES[name]} "
            "package is not installed), or leave it out: the default is --report-to none")


class Tracker:
    """What every tracker does; this base class does nothing (``--report-to none``)."""

    def log_scalars(self, values: dict[str, float], step: int, axis: str = "cycle") -> None:
        """Record scalars at ``step`` of ``axis`` ("cycle" or "train/step")."""

    def log_text(self, key: str, text: str, step: int = 0) -> None:
        """Record a Markdown text (a decision, a table)."""

    def log_config(self, config: dict[str, Any]) -> None:
        """Record the run's resolved configuration."""

    def close(self) -> None:
        """Flush and end the tracker's run."""


class TensorBoardTracker(Tracker):
    """Event files in ``<folder>/tensorboard`` (the run's folder, or the adapter's)."""

    def __init__(self, folder: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter

        logdir = folder / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(logdir))
        log.info("tensorboard: writing %s to %s (`tensorboard --logdir %s`)", run_name, logdir,
                 logdir)

    def log_scalars(self, values, step, axis="cycle"):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_text(self, key, text, step=0):
        self.writer.add_text(key, text, step)

    def log_config(self, config):
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str)
                             + "\n```", 0)

    def close(self):
        self.writer.close()


class MLflowTracker(Tracker):
    """A run in the experiment ``llava-ru-loop`` (or MLFLOW_EXPERIMENT_NAME), at mlflow's own
    tracking URI (MLFLOW_TRACKING_URI)."""

    def __init__(self, folder: Path, run_name: str):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_EXPERIMENT_NAME" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
            mlflow.set_experiment(PROJECT)
        self.run = mlflow.start_run(run_name=run_name)
        log.info("mlflow: run %s (%s) at %s", run_name, self.run.info.run_id,
                 mlflow.get_tracking_uri())

    def log_scalars(self, values, step, axis="cycle"):
        self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def log_text(self, key, text, step=0):
        self.mlflow.log_text(text, f"{key.replace('/', '_')}-{step}.md")

    def log_config(self, config):
        flat = {k: json.dumps(v, default=str) if isinstance(v, (dict, list)) else v
                for k, v in config.items()}
        self.mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def close(self):
        self.mlflow.end_run()


class WandbTracker(Tracker):
    """A run of the project ``llava-ru-loop``, its local files under ``<folder>/wandb``."""

    def __init__(self, folder: Path, run_name: str):
        import wandb

        # Never a login prompt: offline unless the user set a key or a mode themselves.
        mode = None if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") else "offline"
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=PROJECT, name=run_name, dir=str(folder), mode=mode)
        self.run.define_metric("cycle")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.defined: set[str] = set()
        log.info("wandb: run %s (%s mode) in %s", run_name, mode or "configured", folder)

    def log_scalars(self, values, step, axis="cycle"):
        if axis == "cycle":
            for key in values.keys() - self.defined:
                self.run.define_metric(key, step_metric="cycle")
                self.defined.add(key)
        self.run.log({**values, axis: step})

    def log_text(self, key, text, step=0):
        import html
        import io

        import wandb

        page = io.StringIO(f"<pre>{html.escape(text)}</pre>")  # literal HTML, not a path
        self.run.log({key: wandb.Html(page), "cycle": step})

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def close(self):
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def open_tracker(name: str, *, folder: Path, run_name: str,
                 config: dict[str, Any] | None = None) -> Tracker:
    """The tracker ``--report-to`` names, started; :class:`Tracker` (no-op) for ``none``."""
    if name == "none":
        return Tracker()
    check(name)
    try:
        tracker = _CLASSES[name](Path(folder), run_name)
    except ImportError as exc:
        raise UserError(f"{_missing(name)}; importing it failed: {exc}") from None
    if config:
        tracker.log_config(config)
    return tracker


def _guarded(method):
    """A tracker that fails stops receiving; the run, recorded in SQLite, goes on."""

    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # a tracker is a copy of the record, never a reason to stop
            log.warning("the experiment tracker failed (%s: %s); the run goes on without it, "
                        "the database keeps everything", type(exc).__name__, exc)
            self.tracker = Tracker()

    return call


class RunReporter:
    """Turns the loop's events into a tracker's scalars and texts (the loop's vocabulary)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker
        self.champion: dict[str, float] = {}

    @_guarded
    def close(self) -> None:
        self.tracker.close()

    def set_champion(self, scores: dict) -> None:
        """The champion's dev scores (``{benchmark: Scored}``), the curve's next value."""
        self.champion = {b: s.metrics["accuracy"] for b, s in scores.items()}

    @_guarded
    def baseline(self, scores: dict) -> None:
        self.set_champion(scores)
        self.tracker.log_scalars({f"dev/{b}/champion": v for b, v in self.champion.items()}, 0)

    @_guarded
    def cycle(self, index: int, strategy: str, status: str, rationale: str, results: dict,
              paired: dict, error: str | None = None) -> None:
        if status == "accepted":
            self.set_champion(results)
        values = {f"dev/{b}/champion": v for b, v in self.champion.items()}
        values.update({f"dev/{b}/candidate": s.metrics["accuracy"] for b, s in results.items()})
        values.update({f"decision/{b}/p_value": p["p_value"] for b, p in paired.items()
                       if p.get("p_value") is not None})
        values["decision/accepted"] = float(status == "accepted")
        self.tracker.log_scalars(values, index)
        scores = ", ".join(f"{b} {100 * s.metrics['accuracy']:.1f}%" for b, s in results.items())
        self.tracker.log_text("decisions", f"**cycle {index}: {strategy} {status}**"
                              + (f" ({scores})" if scores else f" ({error})")
                              + f"\n\nwhy: {rationale}", index)

    @_guarded
    def final(self, baseline: dict, champion: dict, deployed: dict | None, p: dict,
              step: int) -> None:
        values = {}
        rows = ["| benchmark | baseline | champion | n | p |", "|---|---|---|---|---|"]
        for b in baseline:
            base, champ = baseline[b].metrics, champion[b].metrics
            values[f"final/{b}/baseline"] = base["accuracy"]
            values[f"final/{b}/champion"] = champ["accuracy"]
            values[f"final/{b}/p_value"] = p[b]
            if deployed:
                values[f"final/{b}/deployed"] = deployed[b].metrics["accuracy"]
            rows.append(f"| {b} | {_pct_ci(base)} | {_pct_ci(champ)} | {champ['n']} "
                        f"| {p[b]:.3g} |")
        self.tracker.log_scalars(values, step)
        self.tracker.log_text("final", "Final split, exact lmms-eval protocol\n\n"
                              + "\n".join(rows), step)

    @_guarded
    def train_step(self, name: str, step: int, loss: float) -> None:
        self.tracker.log_scalars({f"train/loss/{name}": loss}, step, axis="train/step")


def _pct_ci(m: dict) -> str:
    ci = m.get("ci") or (None, None)
    if ci[0] is None:
        return f"{100 * m['accuracy']:.1f}%"
    return f"{100 * m['accuracy']:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
