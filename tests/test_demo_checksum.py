"""The demo world says which weights it holds, so figures from two machines can be compared."""

from __future__ import annotations

import hashlib
import json

from core.demo.world import build_cached


def _fake_build(world):
    world.model_dir.mkdir(parents=True)
    (world.model_dir / "model.safetensors").write_bytes(b"weights" * 1000)


def test_a_built_world_records_its_weights_checksum_and_how_it_was_built(tmp_path, capsys,
                                                                         monkeypatch):
    import torch

    from core.demo import __main__ as demo_main

    world = build_cached(tmp_path / "v9-seed0", _fake_build, what="test world", version=9, seed=0)
    info = json.loads((world.root / "COMPLETE").read_text())
    expected = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert info["sha256"] == expected == world.checksum()
    assert info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__
    monkeypatch.setattr(demo_main, "ensure_demo_world", lambda seed: world)
    assert demo_main.main([]) == 0
    line = capsys.readouterr().out
    assert f"model sha256 {expected}" in line and f"threads {info['threads']}" in line
