"""Fixed, seeded splits of the evaluation data into ``dev`` and ``final``, and subsets of them.

GQA-ru testdev is split by image and MMBench-ru by question group (``index % 1_000_000``), so
no image or question is on both sides. Assignment hashes the unit's key with the seed: it does
not depend on the order or the number of records, so a split is stable across runs and
machines. About one third goes to ``dev`` (every decision), two thirds to ``final`` (touched
once, at the end).

Subsets are stratified (GQA-ru by question type, MMBench-ru by category) and nested: the
subset of size n is contained in the subset of size n + k.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable

from core.metrics import ROTATION_BASE

DEV_FRACTION = 1 / 3
SPLITS = ("dev", "final")


def unit_of(example: dict) -> str:
    """The unit that is never divided: the image (GQA-ru) or the question group (MMBench-ru)."""
    if example["benchmark"] == "gqa_ru":
        return f"img:{example['imageId']}"
    return f"grp:{int(example['index']) % ROTATION_BASE}"


def stratum_of(example: dict) -> str:
    if example["benchmark"] == "gqa_ru":
        types = example.get("types") or {}
        return f"{types.get('structural')}/{types.get('semantic')}"
    return str(example.get("category"))


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(example: dict, seed: int = 0, dev_fraction: float = DEV_FRACTION) -> str:
    return "dev" if _unit_hash(seed, unit_of(example)) < dev_fraction else "final"


def make_splits(examples: list[dict], seed: int = 0,
                dev_fraction: float = DEV_FRACTION) -> dict[str, list[dict]]:
    """``{"dev": [...], "final": [...]}``, disjoint by image or question group."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for ex in examples:
        out[split_of(ex, seed, dev_fraction)].append(ex)
    return out


def stratified_subset(examples: list[dict], n: int, seed: int = 0,
                      stratum: Callable[[dict], str] = stratum_of) -> list[dict]:
    """About ``n`` records, whole units only, strata in proportion; nested in ``n``.

    Units (images, question groups) are ranked by a seeded hash inside each stratum and
    taken in rounds, largest remaining share first, so the proportions hold at any size.
    """
    if n >= len(examples):
        return list(examples)
    units: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        units[unit_of(ex)].append(ex)
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for key, members in units.items():
        by_stratum[stratum(members[0])].append(key)
    for keys in by_stratum.values():
        keys.sort(key=lambda k: _unit_hash(seed + 1, k))
    total = len(examples)
    size = {s: sum(len(units[k]) for k in keys) for s, keys in by_stratum.items()}
    taken: dict[str, int] = defaultdict(int)
    pos: dict[str, int] = defaultdict(int)
    chosen: list[str] = []
    count = 0
    while count < n:
        # the stratum furthest below its share of what has been taken so far
        open_strata = [s for s in by_stratum if pos[s] < len(by_stratum[s])]
        s = max(open_strata, key=lambda s: (size[s] / total * (count + 1) - taken[s], s))
        key = by_stratum[s][pos[s]]
        pos[s] += 1
        chosen.append(key)
        taken[s] += len(units[key])
        count += len(units[key])
    keep = set(chosen)
    return [ex for ex in examples if unit_of(ex) in keep]
