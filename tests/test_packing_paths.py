"""Packing by image on every path that trains: the default, ``--no-packing``, records drawn by
image, and what a training reports it trained."""

from __future__ import annotations

import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from types import SimpleNamespace

import pytest

import strategies
from core import data as core_data
from core.processor import Encoded, length_grouped, n_batches
from core.train import TrainConfig, TrainResult
from tests import test_strategies as shared
from tests.test_strategies import make_ctx, winning_history

world, fake_data = shared.world, shared.fake_data  # the strategies' synthetic world fixtures


# ---------------------------------------------------------------- the trainer


def _enc(records: int, length: int) -> Encoded:
    return Encoded(input_ids=[0] * length, labels=[0] * length, image=None, records=records)


def test_packing_is_the_default():
    assert TrainConfig().pack_by_image is True


def test_a_batch_counts_the_records_a_pack_holds():
    """A step learns from about ``batch_size`` records, packed or not; packs are never split."""
    packs = [_enc(r, 10 * r) for r in (3, 3, 2, 1, 3, 2, 1, 1)]  # 16 records
    batches = length_grouped(packs, 4, random.Random(0))
    assert len(batches) == n_batches(packs, 4) == 4
    assert sorted(i for b in batches for i in b) == list(range(len(packs)))
    held = sorted(sum(packs[i].records for i in b) for b in batches)
    assert held[0] >= 1 and sum(held) == 16 and max(held) <= 4 + 2
    plain = [_enc(1, 5) for _ in range(20)]  # one record each: batch_size long, the last shorter
    assert sorted(len(b) for b in length_grouped(plain, 16, random.Random(0))) == [4, 16]
    assert n_batches([_enc(16, 50), _enc(16, 50)], 4) == 2  # never more steps than sequences


@pytest.fixture()
def one_image_records():
    from PIL import Image

    imgs = {k: Image.new("RGB", (48, 48), c) for k, c in (("a", "red"), ("b", "blue"))}
    return [{"id": f"gqa-{i}", "image": imgs["a" if i % 3 else "b"], "source": "gqa_train",
             "conversations": [{"from": "human", "value": f"<image>\nВопрос {i}?\nОтветь одним словом."},
                               {"from": "gpt", "value": ["да", "нет", "два"][i % 3]}],
             "meta": {"imageId": "a" if i % 3 else "b", "question_id": str(i)}}
            for i in range(9)]


def test_a_training_reports_records_questions_packs_and_tokens(tiny_vlm_factory,
                                                                one_image_records, tmp_path):
    from core.lora import read_metadata
    from core.train import train_lora

    vlm = tiny_vlm_factory()
    n_img = vlm.n_image_tokens
    runs = {}
    for pack in (True, False):
        config = TrainConfig(epochs=1.0, batch_size=4, lr=1e-3, pack_by_image=pack)
        runs[pack] = train_lora(vlm, one_image_records, config, tmp_path / str(pack))
    packed, plain = runs[True], runs[False]
    for r in (packed, plain):  # one epoch: every record and question once
        assert r.ok and r.samples == r.n_records == 9 and r.questions == r.n_questions == 9
        assert r.tokens == r.image_tokens + r.text_tokens
    assert packed.packed and not plain.packed
    assert (packed.sequences, plain.sequences) == (2, 9)  # two images
    assert (packed.image_tokens, plain.image_tokens) == (2 * n_img, 9 * n_img)
    assert packed.text_tokens < plain.text_tokens  # one <|begin_of_text|> per sequence
    assert packed.target_tokens == plain.target_tokens  # the same answers learnt
    meta = read_metadata(tmp_path / "True")
    assert meta["config"]["pack_by_image"] and meta["data"]["n_records"] == 9
    assert meta["metrics"]["sequences"] == 2 and meta["metrics"]["image_tokens"] == 2 * n_img


# ---------------------------------------------------------------- records drawn by image


def test_sft_records_are_drawn_by_image_with_their_multiple_choice(tmp_path, fake_data, world):
    from strategies.sft_data import MAX_PER_IMAGE, Mix, SFTDataBuilder

    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    records, info = SFTDataBuilder(ctx).build(60, Mix(0.6, 0.4, 0.0), seed=0)
    assert info["counts"] == {"instruct": 0, "short": 36, "choice": 24}
    kinds = defaultdict(Counter)
    for r in records:
        kinds[r["meta"]["imageId"]][r["source"]] += 1
    per_image = [sum(k.values()) for k in kinds.values()]
    assert max(per_image) <= MAX_PER_IMAGE and len(records) / len(kinds) >= 2.5
    both = [k for k in kinds.values() if k["gqa_train_short"] and k["gqa_train_choice"]]
    assert len(both) >= len(kinds) / 3  # an image's short answers and choices share its pack
    questions = [r["meta"]["question_id"] for r in records]
    assert len(set(questions)) == len(questions)  # no question asked twice, in either kind
    # independent questions would have spread over about one image each
    pool_images = len({ex["imageId"] for ex in world.train})
    assert len(kinds) < min(pool_images, len(records))


def test_one_question_per_image_still_gives_every_record(tmp_path, fake_data, world,
                                                         monkeypatch):
    """Real GQA-ru train has ~1.45 questions per image: drawing by image must not starve."""
    from strategies.sft_data import Mix, SFTDataBuilder

    firsts = list({ex["imageId"]: ex for ex in world.train}.values())
    monkeypatch.setattr(core_data, "load_gqa", lambda source, split: list(firsts))
    ctx, _ = make_ctx(tmp_path, fake_data, world.protected)
    records, info = SFTDataBuilder(ctx).build(30, Mix(1.0, 0.0, 0.0), seed=0)
    assert len(records) == 30 == len({r["meta"]["imageId"] for r in records})


def test_loop_train_draws_whole_images_up_to_the_limit():
    from loop.commands.train import pick_by_image

    rows = [{"id": f"{i}-{j}", "imageId": str(i)} for i in range(20) for j in range(i % 4 + 1)]
    picked = pick_by_image(rows, 17, random.Random(0))
    assert len(picked) == 17 == len({r["id"] for r in picked})
    by_image = Counter(r["imageId"] for r in picked)
    complete = [i for i, n in by_image.items() if n == int(i) % 4 + 1]
    assert len(complete) >= len(by_image) - 1  # only the last image may be cut
    assert pick_by_image(rows, 17, random.Random(0)) == picked  # seeded: packed or not alike
    assert pick_by_image(rows, None, random.Random(0)) == rows


# ---------------------------------------------------------------- strategies and HPO trials


def test_a_strategys_training_is_packed_by_default(tmp_path, fake_data, world):
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected, time_left=300.0)
    cand = strategies.get("answer_format_sft").propose(ctx)
    (call,) = fakes.train_calls
    assert call["config"].pack_by_image and cand.train["config"]["pack_by_image"]
    ctx, fakes = make_ctx(tmp_path / "cd", fake_data, world.protected, history=winning_history())
    strategies.get("context_distill").propose(ctx)
    assert all(c["config"].pack_by_image for c in fakes.train_calls)


def test_an_hpo_trial_is_packed_by_default(tmp_path, fake_data, world):
    from loop.store import Store

    store = Store(tmp_path / "experiments.db")
    ctx, fakes = make_ctx(tmp_path, fake_data, world.protected,
                          storage=store.optuna_storage_url())
    strategies.get("optuna_hpo").propose(ctx)
    store.close()
    assert fakes.train_calls and all(c["config"].pack_by_image for c in fakes.train_calls)


# ---------------------------------------------------------------- --no-packing reaches them


def _fit_recorder(calls):
    def fit(records, config, out, *, deadline, resume, hooks=None):
        calls.append(config.to_dict())
        return TrainResult(status="failed_data", adapter_name="x", error="not trained here")
    return fit


@pytest.mark.parametrize("packing", [True, False])
def test_the_runs_packing_reaches_every_training_and_its_record(tmp_path, packing):
    from loop.store import Store
    from loop.workbench import Workbench

    store = Store(tmp_path / "e.db")
    run_id = store.create_run(config={}, environment={}, budget_s=60, preset="demo", gpu="cpu")
    bench = Workbench.__new__(Workbench)
    calls = []
    bench.store, bench.run_id, bench.workdir, bench.packing = store, run_id, tmp_path, packing
    bench.budget = SimpleNamespace(deadline=lambda s: time.time() + s)
    bench.on_train_step, bench.fit = None, _fit_recorder(calls)
    bench.screened = lambda records, source: (records, {"refused": 0})
    config = TrainConfig(steps=2)  # a strategy's config: packed by default
    records = [{"id": "r", "image": None, "source": "t", "conversations": [
        {"from": "human", "value": "Вопрос?"}, {"from": "gpt", "value": "да"}]}]
    bench.train(records, config, name="c1-x", deadline_s=10, strategy="s", cycle=1)
    stored = store.proposal(run_id, 1, "train:c1-x")["payload"]["config"]
    assert calls[0]["pack_by_image"] is stored["pack_by_image"] is config.pack_by_image is packing


@pytest.mark.parametrize(("run", "flag", "packs"), [(True, True, True), (True, False, False),
                                                     (False, True, False)])
def test_a_worker_packs_as_the_run_does_unless_told_not_to(tmp_path, run, flag, packs):
    from loop.worker import WorkerBench, run_packs

    bench = WorkerBench.__new__(WorkerBench)
    calls = []
    bench.packing, bench.adapter_dir = run_packs({"packing": run}, flag), tmp_path
    bench.fit = _fit_recorder(calls)
    bench.screened = lambda records, source: (records, {"refused": 0})
    config = TrainConfig(steps=2)
    bench.train([], config, name="t0", deadline_s=5, worker="w")
    assert calls[0]["pack_by_image"] is config.pack_by_image is packs
    assert run_packs({}, True)  # a study written before the setting existed: packed


def test_the_run_tells_its_workers_whether_to_pack(tmp_path):
    from loop import hpo_share
    from loop.controller import RunConfig
    from loop.store import Store

    store = Store(tmp_path / "e.db")
    run_id = store.create_run(config={}, environment={}, budget_s=60, preset="demo", gpu="cpu")
    for packing in (True, False):
        loop = SimpleNamespace(config=RunConfig(budget_s=60, preset="demo", packing=packing),
                               store=store, run_id=run_id,
                               bench=SimpleNamespace(data_fingerprint=lambda: "f", workdir=tmp_path,
                                                     batch_size=4, tune={}))
        assert hpo_share.world(loop)["packing"] is packing


def test_no_packing_flags_reach_the_run_the_worker_and_train(tmp_path, monkeypatch):
    from loop import worker
    from loop.cli import build_parser
    from loop.controller import Loop, RunConfig
    from loop.store import Store

    parser = build_parser()
    assert parser.parse_args(["run", "--budget", "1h"]).packing is True
    assert parser.parse_args(["run", "--budget", "1h", "--no-packing"]).packing is False
    assert parser.parse_args(["train", "--no-packing"]).packing is False
    assert parser.parse_args(["train"]).packing is True
    seen = {}
    monkeypatch.setattr(worker, "work", lambda *a, **kw: seen.update(kw) or 0)
    from loop.cli import main

    assert main(["worker", "--storage", f"journal://{tmp_path / 's.log'}", "--study", "s",
                 "--no-packing"]) == 0
    assert seen["packing"] is False
    # stored with the run, so --resume keeps it whatever the resuming command says
    store = Store(tmp_path / "e.db")
    config = RunConfig(budget_s=60, gpu="cpu", preset="demo", packing=False, progress=False)
    store.create_run(config=asdict(config), environment={}, budget_s=60, preset="demo", gpu="cpu")
    loop = Loop(RunConfig(budget_s=1, gpu="cpu", preset="demo", progress=False), store,
                resume=True, echo=lambda msg: None)
    loop.start()
    try:
        assert loop.config.packing is False
    finally:
        store.release_run_lock()


# ---------------------------------------------------------------- `loop train` on the demo world


def test_loop_train_json_reports_what_it_trained_packed_and_not(capsys, tmp_path):
    """The real trainer on the demo world: one epoch over the same 24 questions, both ways."""
    from loop.cli import main

    reports = {}
    for packing in (True, False):
        argv = ["-q", "train", "--preset", "demo", "--limit", "24", "--epochs", "1",
                "--batch-size", "8", "--gpu", "cpu", "--eval-limit", "0",
                "--out", str(tmp_path / str(packing)), "--json"]
        capsys.readouterr()
        assert main(argv + ([] if packing else ["--no-packing"])) == 0
        reports[packing] = json.loads(capsys.readouterr().out)
    packed, plain = reports[True]["trained"], reports[False]["trained"]
    for t in (packed, plain):
        assert t["records"] == t["questions"] == t["data"]["records"] == 24
        assert t["tokens"] == t["image_tokens"] + t["text_tokens"]
    assert packed["packed_by_image"] and not plain["packed_by_image"]
    assert plain["packs"] == 24 and packed["packs"] < 24 / 2  # whole images were drawn
    assert packed["image_tokens"] * 2 < plain["image_tokens"]
    assert packed["tokens"] < plain["tokens"]
    adapter = json.loads((tmp_path / "True" / "loop_adapter.json").read_text())
    assert adapter["metrics"]["sequences"] == packed["packs"]


@pytest.mark.parametrize("command", ["run", "train"])
def test_a_config_file_turns_packing_off_as_the_flag_does(command, tmp_path):
    from loop.cli import build_parser
    from loop.config_file import parse_args, resolved_options

    path = tmp_path / "c.yaml"
    path.write_text("budget: 5m\nno-packing: true\n" if command == "run" else "no-packing: true\n")
    by_file = resolved_options(parse_args(build_parser(), [command, "--config", str(path)]))
    flags = [command, "--no-packing"] + (["--budget", "5m"] if command == "run" else [])
    assert by_file["packing"] is False
    assert resolved_options(parse_args(build_parser(), flags))["packing"] is False


def test_the_packing_bench_compares_loop_train_both_ways(load_bench):
    """``bench/train_speed.py --packing`` on the demo world: the same questions, fewer tokens."""
    m = load_bench("train_speed").measure_packing("demo", 24, 8, "cpu")
    plain, packed = m["runs"]["one record per question"], m["runs"]["packed by image"]
    assert plain["questions"] == packed["questions"] == m["trained_questions"] > 0
    assert packed["packs"] < plain["packs"] == plain["questions"]
    assert m["token_reduction"] == round(plain["tokens"] / packed["tokens"], 2) > 1
    # the demo model reads 9 tokens per image, so the image's share is what packing cuts
    assert packed["image_tokens_per_question"] * 2 < plain["image_tokens_per_question"]
    assert m["speedup"] > 0 and m["questions"] == 24
