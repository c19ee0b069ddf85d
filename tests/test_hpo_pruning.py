"""HPO trials report while they train, and the median pruner stops the losers early; the
seconds a pruned trial did not spend go back to its cycle."""
# ruff: noqa: F811 (the fixtures of test_strategies are imported, then named as arguments)

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState
from test_strategies import Fakes, fake_data, make_ctx, world  # noqa: F401 (fixtures)

from core.train import TrainResult, _evaluation_steps
from strategies import hpo_study
from strategies.hpo_reports import PRUNER_SETTINGS
from strategies.hpo_trial import run_trial, study_options, trial_record
from strategies.sft_data import SFTDataBuilder

GOOD = {"lr": 3e-4, "dropout": 0.05, "steps_frac": 1.0, "rank": 8, "alpha_mult": 2,
        "choice_share": 0.3, "instruct_share": 0.1}
BAD = {**GOOD, "lr": 6e-5}


@dataclass
class LiveFakes(Fakes):
    """Training step by step on the fake clock, calling ``hooks.evaluate`` where core.train
    would; a trial's accuracy is 0.8 with a learning rate from 1e-4 up, else 0.2, and grows
    from half of that to all of it over its steps."""

    def train(self, records, config, *, name, deadline_s, hooks=None):
        self.current, step_s = config, config.batch_size * self.train_s_per_sample
        marks = _evaluation_steps(hooks, config.steps) if hooks else set()
        call = {"name": name, "config": config, "steps": config.steps, "done": 0}
        self.train_calls.append(call)
        for step in range(1, config.steps + 1):
            self.t += step_s
            call["done"] = step
            self.progress = step / config.steps
            if step in marks and hooks.evaluate(step, config.steps):
                return None, TrainResult(status="stopped", adapter_name=name, steps=step,
                                         step_seconds=step_s)
        path = self.workdir / "adapters" / name
        path.mkdir(parents=True, exist_ok=True)
        self.trained[str(path)] = config.to_dict()
        return str(path), TrainResult(status="finished", adapter_name=name,
                                      adapter_path=str(path), steps=config.steps,
                                      step_seconds=step_s)

    def quality(self, lr: float) -> float:
        return 0.8 if lr >= 1e-4 else 0.2

    def evaluate_live(self, benchmark, eval_config, examples):
        self.eval_calls.append({"benchmark": benchmark, "adapter_path": "(live)",
                                "examples": examples})
        self.t += 0.5 * len(examples)
        return SimpleNamespace(accuracy=self.quality(self.current.lr) * (0.5 + self.progress / 2),
                               n=len(examples))

    def evaluate(self, benchmark, eval_config, *, adapter_path, examples=None):
        self.eval_calls.append({"benchmark": benchmark, "adapter_path": adapter_path,
                                "examples": examples})
        self.t += 0.5 * len(examples)
        return SimpleNamespace(accuracy=self.quality(self.trained[adapter_path]["lr"]),
                               n=len(examples))


def _live_ctx(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, fakes=LiveFakes())
    ctx.evaluate_live = fakes.evaluate_live
    return ctx, fakes


def _run(ctx, study, params: dict, builder, seconds: float = 400.0) -> int:
    study.enqueue_trial(params, user_attrs={hpo_study.CYCLE_ATTR: ctx.cycle})
    trial = hpo_study.claim(study, ctx.cycle)
    return run_trial(ctx, study, trial, builder, seconds)


def test_a_trial_clearly_worse_than_earlier_ones_is_pruned_mid_training(tmp_path, fake_data,
                                                                        world):
    ctx, fakes = _live_ctx(tmp_path, fake_data, world)
    study = optuna.create_study(direction="maximize", **study_options(0))
    builder = SFTDataBuilder(ctx)
    for _ in range(2):
        _run(ctx, study, GOOD, builder)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert set(study.trials[0].intermediate_values) == {25, 50, 75, 100}

    number = _run(ctx, study, BAD, builder)
    bad = study.trials[number]
    assert bad.state == TrialState.PRUNED
    call = fakes.train_calls[-1]
    assert call["done"] < call["steps"]  # its training stopped early
    pruned = bad.user_attrs["pruned"]
    assert pruned["at"] == 50 == PRUNER_SETTINGS["n_warmup_steps"]  # not at 25: warm-up
    assert pruned["step"] == call["done"] and pruned["steps"] == call["steps"]
    assert pruned["value"] < pruned["median"] and pruned["n_compared"] == 2
    assert pruned["saved_train_s"] == pytest.approx(
        (call["steps"] - call["done"]) * call["config"].batch_size * fakes.train_s_per_sample)
    assert pruned["saved_s"] > pruned["saved_train_s"]  # the tune evaluation it skipped too
    assert pruned["reason"].startswith(f"pruned at 50% of its steps (step {call['done']}/")
    assert "below the median" in pruned["reason"]
    # no adapter, no tune evaluation after training
    assert "adapter_path" not in bad.user_attrs or bad.user_attrs["adapter_path"] is None
    assert not [c for c in fakes.eval_calls if call["name"] in str(c["adapter_path"])]
    record = trial_record(study.study_name, bad)
    assert record["state"] == "PRUNED" and record["note"] == pruned["reason"]
    assert record["pruned"]["saved_s"] == pruned["saved_s"]
    assert [r["at"] for r in record["reports"]] == [25, 50]


def test_a_good_trial_is_not_pruned(tmp_path, fake_data, world):
    ctx, fakes = _live_ctx(tmp_path, fake_data, world)
    study = optuna.create_study(direction="maximize", **study_options(0))
    builder = SFTDataBuilder(ctx)
    for params in (GOOD, GOOD, BAD, GOOD):
        _run(ctx, study, params, builder)
    last = study.trials[-1]
    assert last.state == TrialState.COMPLETE and "pruned" not in last.user_attrs
    assert fakes.train_calls[-1]["done"] == fakes.train_calls[-1]["steps"]
    assert [r["at"] for r in last.user_attrs["reports"]] == [25, 50, 75, 100]
    assert last.value == pytest.approx(0.8)  # the whole tune set, scored after training


def test_the_report_slice_is_the_same_whole_units_for_every_trial(tmp_path, fake_data,
                                                                  world):
    from core.splits import unit_of

    ctx, fakes = _live_ctx(tmp_path, fake_data, world)
    study = optuna.create_study(direction="maximize", **study_options(0))
    builder = SFTDataBuilder(ctx)
    for params in (GOOD, BAD):
        _run(ctx, study, params, builder)
    live = [c for c in fakes.eval_calls if c["adapter_path"] == "(live)"]
    for b in ("gqa_ru", "mmbench_ru"):
        slices = {tuple(ex["id"] for ex in c["examples"]) for c in live if c["benchmark"] == b}
        assert len(slices) == 1  # one slice for all reports of all trials
        (ids,) = slices
        tune = ctx.tune_examples[b]
        units = {unit_of(ex) for ex in tune if ex["id"] in ids}
        assert {ex["id"] for ex in tune if unit_of(ex) in units} == set(ids)  # whole units
        assert len(ids) <= len(tune) // 2 or len(units) == 1


def test_seconds_a_pruned_trial_did_not_spend_come_back_as_a_slot():
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({}, user_attrs={hpo_study.CYCLE_ATTR: 3})
    trial = hpo_study.claim(study, 3)
    trial.set_user_attr("pruned", {"saved_s": 50.0})
    trial.report(0.1, 50)
    study.tell(trial, state=TrialState.PRUNED)

    assert hpo_study.refund(study, 3, time_box=40.0, left=200.0, floor=10.0) == 40.0
    slot = study.get_trials(states=(TrialState.WAITING,))[0]
    assert slot.user_attrs == {hpo_study.CYCLE_ATTR: 3, hpo_study.REFUND_ATTR: 40.0}
    # 10 s are left to give; a waiting slot of 40 s leaves 45 - 40 = 5 s in the cycle
    assert hpo_study.refund(study, 3, time_box=40.0, left=45.0, floor=10.0) is None
    assert hpo_study.refund(study, 3, time_box=40.0, left=200.0, floor=10.0) == 10.0
    assert hpo_study.refund(study, 3, time_box=40.0, left=200.0, floor=1.0) is None  # all given
    assert hpo_study.refund(study, 4, time_box=40.0, left=200.0, floor=1.0) is None  # other cycle


# ---------------------------------------------------------------- the real trainer on the demo


@pytest.fixture(scope="module")
def demo_cycle(tmp_path_factory):
    """The demo's loop up to its first HPO cycle: the real model, trainer and evaluator."""
    from core.demo.world import ensure_demo_world
    from loop.controller import Loop, RunConfig
    from loop.store import Store

    ensure_demo_world()
    tmp = tmp_path_factory.mktemp("demo-hpo")
    config = RunConfig(budget_s=3600, gpu="cpu", preset="demo", dev_size=30, final_size=30,
                       batch_size=32, progress=False)
    store = Store(tmp / "experiments.db")
    loop = Loop(config, store, echo=lambda msg: None)
    loop.start()
    loop.set_up()
    champion, scores = loop.baseline()
    profiles = {b: loop.bench.error_profile(s) for b, s in scores.items()}
    yield loop, loop.context(champion, profiles, 600.0, 1, "optuna_hpo")
    store.close()


@pytest.mark.slow
def test_real_trials_report_while_they_train_and_a_loser_stops_early(demo_cycle):
    from strategies.optuna_hpo import OptunaHPO

    loop, ctx = demo_cycle
    assert ctx.evaluate_live is not None
    study = OptunaHPO().open_study(ctx)
    builder = SFTDataBuilder(ctx)
    quick = {**GOOD, "lr": ctx.train_lr, "steps_frac": 0.3}

    number = _run(ctx, study, quick, builder, seconds=90.0)
    first = study.trials[number]
    assert first.state == TrialState.COMPLETE  # nothing to compare with yet
    reports = first.user_attrs["reports"]
    assert [r["at"] for r in reports] == [25, 50, 75, 100]
    assert all(0.0 <= r["value"] <= 1.0 for r in reports)
    assert reports[-1]["step"] == reports[-1]["steps"] == first.user_attrs["train"]["config"][
        "steps"]
    assert reports[0]["step"] < reports[1]["step"] < reports[2]["step"] < reports[-1]["step"]

    # two finished trials that scored 1.0 at every point: the next real trial is worse
    for _ in range(2):
        study.add_trial(optuna.trial.create_trial(
            value=1.0, intermediate_values={25: 1.0, 50: 1.0, 75: 1.0, 100: 1.0}))
    number = _run(ctx, study, quick, builder, seconds=90.0)
    loser = study.trials[number]
    assert loser.state == TrialState.PRUNED
    pruned = loser.user_attrs["pruned"]
    assert pruned["at"] == 50 and pruned["step"] < pruned["steps"]
    assert pruned["median"] == 1.0 and pruned["saved_train_s"] > 0
    assert "adapter_path" not in loser.user_attrs or not loser.user_attrs["adapter_path"]
    name = f"{study.study_name}-t{loser.number}"
    assert not (loop.bench.workdir / "adapters" / name / "adapter_config.json").exists()
    # the model is as it was: the next trial trains and evaluates normally
    assert not any(name in a for a in loop.bench.vlm.adapters.values())


# ---------------------------------------------------------------- where trials are shown


def test_loop_show_and_log_list_the_trials_and_why_one_was_pruned(tmp_path, capsys):
    import json

    from test_cli_log import cli, fill

    from loop.store import Store

    path = tmp_path / "experiments.db"
    ids = fill(path)
    reason = ("pruned at 50% of its steps (step 12/24): report-slice accuracy 0.310 below the "
              "median 0.620 of 2 completed trials there; 95 s not spent")
    done = optuna.trial.create_trial(
        value=0.64, intermediate_values={25: 0.5, 50: 0.6, 75: 0.62, 100: 0.64},
        user_attrs={"cycle": 2, "worker": {"name": "loop"}, "reports": [
            {"at": at, "value": v} for at, v in ((25, 0.5), (50, 0.6), (75, 0.62), (100, 0.64))]})
    pruned = optuna.trial.create_trial(
        state=TrialState.PRUNED, value=0.31, intermediate_values={25: 0.3, 50: 0.31},
        user_attrs={"cycle": 2, "worker": {"name": "gpu1"},
                    "pruned": {"at": 50, "step": 12, "steps": 24, "value": 0.31,
                               "median": 0.62, "saved_train_s": 80.0, "saved_s": 95.0,
                               "reason": reason}})
    with Store(path) as store:
        for number, t in enumerate((done, pruned)):
            t.number = number
            store.save_proposal(ids["run"], 2, f"hpo-trial-s-{number}", trial_record("s", t))

    assert cli("show", "2", "--db", str(path), "--run", str(ids["run"])) == 0
    out = capsys.readouterr().out
    assert "2 HPO trials: 1 complete, 1 pruned, 0 failed, pruning saved 1m35s:" in out
    assert "25%:0.500 50%:0.600 75%:0.620 100%:0.640" in out
    assert "1      PRUNED" in out and reason in out
    assert cli("log", "--db", str(path), "--json") == 0
    cycles = json.loads(capsys.readouterr().out)["runs"][0]["cycles"]
    assert "trials" not in cycles[0]
    assert cycles[1]["trials"] == {"n": 2, "complete": 1, "pruned": 1, "failed": 0,
                                   "saved_s": 95.0}
    assert cli("log", "--db", str(path)) == 0
    assert "cycle 2: 2 HPO trials: 1 complete, 1 pruned, 0 failed, pruning saved 1m35s" in \
        capsys.readouterr().out


def test_a_cycle_runs_more_trials_with_the_time_its_pruned_trials_gave_back(tmp_path, fake_data,
                                                                           world):
    import strategies
    from strategies.base import ProposalFailed

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    seeded = optuna.create_study(storage=storage, study_name="loop-hpo-0", direction="maximize")
    for _ in range(2):  # finished trials nobody can beat: every trial of the cycle is pruned
        seeded.add_trial(optuna.trial.create_trial(
            value=1.0, intermediate_values={25: 1.0, 50: 1.0, 75: 1.0, 100: 1.0}))
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, storage=storage,
                          time_left=300.0, fakes=LiveFakes())
    ctx.evaluate_live = fakes.evaluate_live
    with pytest.raises(ProposalFailed, match="no completed trial"):
        strategies.get("optuna_hpo").propose(ctx)
    study = optuna.load_study(study_name="loop-hpo-0", storage=storage)
    cycle = hpo_study.cycle_trials(study, ctx.cycle)
    offered = [t for t in cycle if hpo_study.REFUND_ATTR not in t.user_attrs]
    given_back = [t for t in cycle if hpo_study.REFUND_ATTR in t.user_attrs]
    assert given_back and len(fakes.train_calls) > len(offered)
    assert {t.state for t in offered} == {TrialState.PRUNED}
    saved = sum(t.user_attrs["pruned"]["saved_s"] for t in cycle if t.state == TrialState.PRUNED)
    assert sum(t.user_attrs[hpo_study.REFUND_ATTR] for t in given_back) <= saved
    # a slot given back has that many seconds: its training was planned within them
    for t in given_back:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["seconds"] <= t.user_attrs[hpo_study.REFUND_ATTR]
