"""A training cut short is done again as it was decided: the stored data and config, from its
checkpoint, or cleanly from the start when the checkpoint is unusable (never a failed run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.exceptions import UserError
from core.train import TrainConfig, TrainResult
from loop.budget import Budget, CostModel, priors
from loop.store import Store
from loop.workbench import Workbench


class FakeVLM:
    def set_adapter(self, name):
        pass


def _records(n: int, tag: str) -> list[dict]:
    return [{"id": f"{tag}{i}", "image": None, "source": "test", "conversations": [
        {"from": "human", "value": f"Вопрос {tag} {i}?"}, {"from": "gpt", "value": "да"}]}
        for i in range(n)]


def _bench(store: Store, run: int, tmp: Path) -> Workbench:
    bench = Workbench(store=store, run_id=run, vlm=FakeVLM(), profile=None, sources=None,
                      budget=Budget(600), costs=CostModel(priors("demo", "cpu")), seed=0,
                      workdir=store.run_dir(run), batch_size=4, progress=False)
    bench.train_templates = set()  # this world has no GQA-ru train split (and no eval data)
    return bench


class Calls(list):
    def __init__(self):
        super().__init__()
        self.fail: list[BaseException] = []


@pytest.fixture
def calls(monkeypatch):
    """Every train_lora call; ``fail`` holds exceptions to raise on the next calls."""
    seen = Calls()
    fail = seen.fail

    def fake(vlm, records, config, out, *, resume, **kwargs):
        seen.append({"records": [r["id"] for r in records], "steps": config.steps,
                     "resume": resume, "out": Path(out), "existed": Path(out).exists()})
        if fail:
            raise fail.pop(0)
        Path(out).mkdir(parents=True, exist_ok=True)
        return TrainResult(status="finished", adapter_name="a", adapter_path=str(out),
                           steps=config.steps, samples=config.steps)

    monkeypatch.setattr("core.train.train_lora", fake)
    return seen


def test_a_resumed_cycle_trains_with_the_recorded_data_and_config(tmp_path, calls):
    """The bug: the strategy proposed again with less time (fewer steps), and the trainer
    refused the checkpoint ("config differs in ['steps']"), ending the run."""
    with Store(tmp_path / "e.db") as store:
        run = store.create_run(config={}, environment={}, budget_s=600, preset="demo", gpu="cpu")
        calls.fail.append(KeyboardInterrupt())  # the kill, in the middle of the training
        with pytest.raises(KeyboardInterrupt):
            _bench(store, run, tmp_path).train(_records(6, "a"), TrainConfig(steps=40),
                                               name="c3-x", deadline_s=100, strategy="s", cycle=3)
        stored = store.proposal(run, 3, "train:c3-x")
        assert stored["payload"]["config"]["steps"] == 40 and Path(stored["data_file"]).is_file()
        # resumed: the strategy now proposes fewer steps and other data
        path, result = _bench(store, run, tmp_path).train(
            _records(4, "b"), TrainConfig(steps=25), name="c3-x", deadline_s=50, strategy="s",
            cycle=3)
        assert calls[-1]["steps"] == 40 and calls[-1]["resume"] is True
        assert calls[-1]["records"] == [f"a{i}" for i in range(6)]
        assert result.ok and [a["path"] for a in store.adapters(run)] == [path]
        # done again once more (killed during its evaluation): no second adapter row
        _bench(store, run, tmp_path).train(_records(4, "b"), TrainConfig(steps=25), name="c3-x",
                                           deadline_s=50, strategy="s", cycle=3)
        assert len(store.adapters(run)) == 1


def test_an_unusable_checkpoint_is_set_aside_and_training_starts_again(tmp_path, calls):
    with Store(tmp_path / "e.db") as store:
        run = store.create_run(config={}, environment={}, budget_s=600, preset="demo", gpu="cpu")
        calls.fail.append(KeyboardInterrupt())
        out = store.run_dir(run) / "adapters" / "c1-x"
        (out / "checkpoint").mkdir(parents=True)
        with pytest.raises(KeyboardInterrupt):
            _bench(store, run, tmp_path).train(_records(3, "a"), TrainConfig(steps=10),
                                               name="c1-x", deadline_s=100, strategy="s", cycle=1)
        calls.fail.append(UserError("cannot resume from it: the checkpoint is damaged"))
        path, result = _bench(store, run, tmp_path).train(
            _records(3, "a"), TrainConfig(steps=10), name="c1-x", deadline_s=100, strategy="s",
            cycle=1)
        assert [c["resume"] for c in calls[-2:]] == [True, False]
        assert not calls[-1]["existed"]  # a fresh folder
        assert result.ok and path == str(out)
        assert (out.parent / "c1-x.unusable-1" / "checkpoint").is_dir()


def test_changed_recorded_data_means_a_clean_start_with_the_new_proposal(tmp_path, calls):
    with Store(tmp_path / "e.db") as store:
        run = store.create_run(config={}, environment={}, budget_s=600, preset="demo", gpu="cpu")
        calls.fail.append(KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            _bench(store, run, tmp_path).train(_records(3, "a"), TrainConfig(steps=10),
                                               name="c1-x", deadline_s=100, strategy="s", cycle=1)
        Path(store.proposal(run, 1, "train:c1-x")["data_file"]).write_text("", encoding="utf-8")
        _bench(store, run, tmp_path).train(_records(2, "b"), TrainConfig(steps=7), name="c1-x",
                                           deadline_s=100, strategy="s", cycle=1)
        assert calls[-1]["steps"] == 7 and calls[-1]["records"] == ["b0", "b1"]
        assert store.proposal(run, 1, "train:c1-x")["payload"]["config"]["steps"] == 7
