"""The loaded base model with its evaluation data: what both the loop's ``Workbench`` and a
``loop worker`` need to train and score an adapter the same way.

It switches adapters on the one loaded base, evaluates, and trains behind the one leakage
guard (``strategies.guard``): every evaluation image and question, of dev and final alike, is
kept out of training data, whoever built it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from functools import cached_property
from pathlib import Path

from core.distributed import evaluate  # plain core.evaluate on one process
from core.exceptions import UserError
from strategies.base import BENCHMARKS

log = logging.getLogger(__name__)


class ModelBench:
    """Needs ``vlm``, ``profile``, ``sources``, ``examples`` (benchmark -> every record),
    ``batch_size``, ``progress``, ``prefix_cache`` and ``packing``."""

    vlm = profile = sources = None
    examples: dict[str, list[dict]]
    batch_size: int
    progress: bool = True
    prefix_cache: bool = True
    packing: bool = True
    """Pack each training's records by image (``--no-packing`` turns it off)."""

    # ------------------------------------------------------------ data and guard

    def data_fingerprint(self) -> str:
        h = hashlib.sha256()
        for b in BENCHMARKS:
            for e in self.examples.get(b, []):
                h.update(f"{b}:{e['id']}:{e.get('answer')}\n".encode())
        return h.hexdigest()[:16]

    @cached_property
    def protected(self) -> dict[str, set[str]]:
        """What training data must not contain: every evaluation image (by id and by pixel
        digest) and question, of dev and final alike (``strategies.guard``)."""
        from strategies.guard import protected_keys

        return protected_keys([e for records in self.examples.values() for e in records],
                              digests=True)

    @cached_property
    def guard_keys(self):
        """``protected`` prepared for fast checks (``strategies.guard.prepare``)."""
        from strategies.guard import prepare

        return prepare(self.protected)

    @cached_property
    def train_templates(self) -> set[str]:
        """Questions GQA-ru train asks about many images: sharing one leaks nothing."""
        from core.data import load_gqa
        from strategies.guard import template_questions

        try:
            return template_questions(load_gqa(self.sources.data.gqa, "train"))
        except UserError as exc:  # then only the records' own templates are allowed
            log.warning("GQA-ru train unreadable, no template questions allowed: %s", exc)
            return set()

    # ------------------------------------------------------------ adapters

    def activate(self, adapter_path: str | None) -> None:
        if adapter_path is None:
            self.vlm.set_adapter(None)
            return
        name = adapter_name(adapter_path)
        if name not in self.vlm.adapters:
            self.vlm.load_adapter(adapter_path, name)
        self.vlm.set_adapter(name)

    def drop(self, adapter_path: str | None) -> None:
        """Unload an adapter (its files stay on disk and in the record)."""
        if adapter_path and adapter_name(adapter_path) in self.vlm.adapters:
            self.vlm.set_adapter(None)
            self.vlm.delete_adapter(adapter_name(adapter_path))

    # ------------------------------------------------------------ evaluate and train

    def score(self, config, adapter_path: str | None, examples: list[dict]):
        """Evaluate ``examples`` with ``adapter_path`` active; the EvalResult."""
        self.activate(adapter_path)
        return evaluate(self.vlm, examples, config, batch_size=self.batch_size,
                        progress=self.progress, prefix_cache=self.prefix_cache)

    def score_live(self, config, examples: list[dict]):
        """Evaluate ``examples`` with the adapter being trained, as it is (from a training
        hook: the adapter is not saved nor registered yet, so nothing is switched)."""
        return evaluate(self.vlm, examples, config, batch_size=self.batch_size,
                        progress=False, prefix_cache=self.prefix_cache)

    def screened(self, records: list[dict], source: str) -> tuple[list[dict], dict]:
        """The records the leakage guard lets through, and its counts.

        Raises:
            ProposalFailed: too many records showed evaluation data (``LeakageError``).
        """
        from strategies.base import ProposalFailed
        from strategies.guard import LeakageError, screen

        try:
            return screen(records, self.guard_keys, source=source,
                          allowed_questions=self.train_templates)
        except LeakageError as exc:
            raise ProposalFailed(str(exc)) from None

    def packed(self, config):
        """``config`` with this bench's packing setting, set in place: every training of a run
        (or a worker) packs or not as the run says, and the strategy's own record of the config
        (``config.to_dict()`` after training) is what was trained."""
        config.pack_by_image = self.packing
        return config

    def fit(self, records: list[dict], config, out: Path, *, deadline: float, resume: bool,
            hooks=None):
        """Train a fresh LoRA on the bare base into ``out`` until ``deadline``; TrainResult.

        ``hooks`` (``core.train.TrainHooks``) see every step, e.g. a tracker's loss curve.
        """
        from core.train import train_lora

        self.vlm.set_adapter(None)
        return train_lora(self.vlm, records, config, out, resume=resume, deadline=deadline,
                          profile=self.profile, adapter_name=adapter_name(str(out)), hooks=hooks)


def adapter_name(path: str) -> str:
    """A stable adapter name for a folder (PEFT names must be identifiers)."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", Path(path).name)
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:6]
    return f"a_{stem}_{digest}"
