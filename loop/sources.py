"""Resolve ``--preset``, ``--model``, ``--data-dir`` and ``--coco-dir`` into concrete sources,
and check, once and quickly, that the hub ids among them can be reached (or are cached)."""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

from core.data import DataSources
from core.exceptions import UserError
from core.model import SAIGA_MODEL_ID

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A hub repository id (``deepvk/GQA-ru``); anything else is a local path."""
PROBE_TIMEOUT_S = 3.0
"""How long one connection attempt to the hub may take before it counts as unreachable."""


@dataclass(frozen=True)
class Sources:
    preset: str
    model: str
    data: DataSources

    def hub_ids(self, parts: tuple[str, ...] = ("model", "gqa", "mmbench")) -> dict[str, str]:
        """What is to come from the hub (an ``org/name`` id, not a local path): what -> hub id,
        among ``parts`` (model, gqa, mmbench, instruct)."""
        named = {"model": self.model, "gqa": self.data.gqa, "mmbench": self.data.mmbench,
                 "instruct": self.data.instruct}
        return {part: named[part] for part in parts
                if HUB_ID.fullmatch(named[part]) and not Path(named[part]).exists()}


def resolve_sources(preset: str = "saiga", model: str | None = None, data_dir: str | None = None,
                    coco_dir: str | None = None, seed: int = 0) -> Sources:
    """demo and saiga-tiny build (or reuse) their embedded world; saiga points at the hub ids."""
    if preset == "demo":
        from core.demo.world import ensure_demo_world

        world = ensure_demo_world()  # the world is fixed; --seed varies splits and training
        return Sources(preset, model or str(world.model_dir),
                       DataSources.from_dir(data_dir or world.data_dir,
                                            coco_dir or world.coco_dir))
    if preset == "saiga-tiny":
        from core.demo.saiga_tiny import ensure_saiga_tiny

        world = ensure_saiga_tiny()
        return Sources(preset, model or str(world.model_dir),
                       DataSources.from_dir(data_dir or world.data_dir,
                                            coco_dir or world.coco_dir))
    data = DataSources.from_dir(data_dir, coco_dir) if data_dir else DataSources(coco_dir=coco_dir)
    return Sources(preset, model or SAIGA_MODEL_ID, data)


PARTS = {"gqa_ru": ("model", "gqa"), "mmbench_ru": ("model", "mmbench")}
"""What an evaluation of each benchmark needs from the hub."""


def sources_from_args(args, parts: tuple[str, ...] | None = None) -> Sources:
    """The sources the flags name, checked to be local, reachable or cached (``parts``: what
    the command needs; by default the model and its ``--benchmark``'s data)."""
    sources = resolve_sources(args.preset, args.model, args.data_dir, args.coco_dir, args.seed)
    check_reachable(sources, parts or PARTS.get(getattr(args, "benchmark", None),
                                                ("model", "gqa", "mmbench")))
    return sources


def hub_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@cache
def hub_reachable() -> bool:
    """One TCP connection to the hub's host, asked once per process and given
    ``PROBE_TIMEOUT_S`` (name lookup included: it runs in a thread that is not waited for
    longer): without it, every file the libraries ask for retries for minutes."""
    import threading

    host, port = hub_host()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(True)
        except OSError as exc:
            log.debug("hub %s:%d not reachable: %s", host, port, exc)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    return bool(result)


def go_offline() -> None:
    """The libraries' offline mode for this process (huggingface_hub reads the variable once,
    at import, so its constant is set too)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency
        pass


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cached(repo_id: str, *, dataset: bool) -> bool:
    """Whether the hub cache holds a download of ``repo_id`` (its folder, with a snapshot)."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / (("datasets--" if dataset else "models--")
                                             + repo_id.replace("/", "--"))
    return (folder / "snapshots").is_dir() and any((folder / "snapshots").iterdir())


def check_reachable(sources: Sources,
                    parts: tuple[str, ...] = ("model", "gqa", "mmbench")) -> None:
    """Refuse, in one line and within seconds, hub ids that can be neither reached nor read
    from the cache. An unreachable hub switches this process to offline mode, so that what is
    cached loads at once instead of after minutes of retries.

    Raises:
        UserError: naming what is missing and the flag that points at a local copy.
    """
    needed = sources.hub_ids(parts)
    if not needed:
        return
    if not offline():
        if hub_reachable():
            return
        go_offline()
        why = f"the hub ({hub_host()[0]}) is not reachable from here"
    else:
        why = "HF_HUB_OFFLINE is set"
    missing = {part: repo for part, repo in needed.items()
               if not cached(repo, dataset=part != "model")}
    if missing:
        part, repo = next(iter(missing.items()))
        flag = "--model" if part == "model" else "--data-dir"
        kind = "--repo-type dataset " if part != "model" else ""
        raise UserError(f"{why}, and {', '.join(missing.values())} "
                        f"{'is' if len(missing) == 1 else 'are'} not in the local cache: "
                        f"download {'it' if len(missing) == 1 else 'them'} where there is "
                        f"network (`huggingface-cli download {repo} {kind}--local-dir DIR`) "
                        f"and pass `{flag} DIR`"
                        + (" (the datasets go in one folder for `--data-dir`, see the README)"
                           if flag == "--model" and len(missing) > 1 else "") + ".")
    log.info("%s: using the cached %s", why, ", ".join(needed.values()))
