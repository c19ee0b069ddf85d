"""Resolve ``--preset``, ``--model``, ``--data-dir`` and ``--coco-dir`` into concrete sources."""

from __future__ import annotations

from dataclasses import dataclass

from core.data import DataSources
from core.model import SAIGA_MODEL_ID


@dataclass(frozen=True)
class Sources:
    preset: str
    model: str
    data: DataSources


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


def sources_from_args(args) -> Sources:
    return resolve_sources(args.preset, args.model, args.data_dir, args.coco_dir, args.seed)
