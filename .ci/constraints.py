"""Write constraints.txt (Python 3.11+): the exact versions of the project's dependencies and all of theirs,
as installed in the running environment (run it with the venv's python after an upgrade)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def closure(names: list[str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        req = Requirement(todo.pop())
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        seen[key] = dist.version.split("+")[0]
        for dep in dist.requires or []:
            dep_req = Requirement(dep)
            if dep_req.marker is None or dep_req.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return seen


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["dev"]
    # torch comes first from the Makefile's TORCH (the CPU build); pip is the venv's own.
    pins = {k: v for k, v in closure(names).items() if k not in ("torch", "pip")}
    lines = ["# Exact versions for `make install` (pip install -c constraints.txt ...).",
             f"# Written by .ci/constraints.py on Python {sys.version.split()[0]}. torch is not "
             "here: the Makefile installs it first (TORCH, the CPU build).", ""]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
