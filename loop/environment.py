"""The environment of a run, stored with it: versions, seed, git commit, model fingerprint."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "optuna", "sqlite-utils",
            "jsonschema", "pillow", "numpy")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def model_fingerprint(model: str) -> str:
    """sha256 of the config and the weight index/file sizes of a local folder; the id otherwise."""
    path = Path(model)
    if not path.is_dir():
        return f"hub:{model}"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".txt", ".jinja"):
            h.update(f.name.encode() + f.read_bytes())
        elif f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def environment(config) -> dict:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "packages": package_versions(), "git_commit": git_commit(), "seed": config.seed,
            "model": config.model or config.preset,
            "model_fingerprint": model_fingerprint(config.model) if config.model else None}
