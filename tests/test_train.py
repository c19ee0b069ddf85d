"""Training engine: profiles, LoRA targets, guards (NaN, OOM, deadline), adapters, 4-bit on CPU."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from square_records import logits, square_records

from core.device import GpuInfo, resolve_profile
from core.exceptions import DataError, UserError
from core.lora import METADATA_FILE, adapted_modules, attach_lora, lora_config
from core.train import TrainConfig, TrainHooks, train_lora

T4 = GpuInfo(name="Tesla T4", capability=(7, 5), memory_gb=15.8)
A100 = GpuInfo(name="NVIDIA A100-SXM4-40GB", capability=(8, 0), memory_gb=42.4)
H100 = GpuInfo(name="NVIDIA H100 80GB HBM3", capability=(9, 0), memory_gb=85.0)
_records = square_records


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=4, micro_batch_size=4, lr=5e-3, max_length=128, seed=0)
    return TrainConfig(**{**base, **kw})


_logits = logits


def _lora_weights(vlm, name):
    return {k: v.detach().clone() for k, v in vlm.model.named_parameters()
            if f".{name}." in k and "lora_" in k}


# ---------------------------------------------------------------- profiles

@pytest.mark.parametrize(("name", "gpu", "expected"), [
    ("t4", T4, dict(name="t4", dtype="float16", load_in_4bit=True, autocast_dtype="float16",
                    grad_scaler=True, lora_dtype="float32", gradient_checkpointing=True,
                    attn_implementation="sdpa", optimizer="paged_adamw_8bit")),
    ("a100", A100, dict(name="a100", dtype="bfloat16", load_in_4bit=False,
                        autocast_dtype="bfloat16", grad_scaler=False)),
    ("h100", H100, dict(name="h100", dtype="bfloat16", load_in_4bit=False)),
    ("cpu", None, dict(name="cpu", device="cpu", dtype="float32", load_in_4bit=False,
                       autocast_dtype=None, grad_scaler=False, optimizer="adamw")),
    ("auto", T4, dict(name="t4")), ("auto", A100, dict(name="a100")),
    ("auto", H100, dict(name="h100")), ("auto", None, dict(name="cpu")),
])
def test_profile_resolution(name, gpu, expected):
    profile = resolve_profile(name, gpu=gpu)
    assert {k: getattr(profile, k) for k in expected} == expected
    assert profile.reasons and all(isinstance(r, str) for r in profile.reasons)
    assert profile.load_options().load_in_4bit == profile.load_in_4bit


def test_auto_detects_a_t4_from_cuda_device_properties(monkeypatch):
    import torch

    props = SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15_828_320_256)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    profile = resolve_profile("auto")
    assert profile.name == "t4" and profile.gpu == T4
    assert any("no bf16" in r for r in profile.reasons)


@pytest.mark.parametrize(("kwargs", "flag"), [
    (dict(name="a100", gpu=T4), "`--gpu a100`"),
    (dict(name="t4", gpu=T4, dtype="bfloat16"), "`--dtype bfloat16`"),
    (dict(name="t4", gpu=None), "`--gpu t4`"),
    (dict(name="cpu", gpu=None, dtype="float16"), "`--dtype float16`"),
    (dict(name="v100", gpu=None), "`--gpu`"),
])
def test_unsupported_combinations_name_the_flag(kwargs, flag):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=flag.replace("-", r"\-")):
        resolve_profile(name, **kwargs)


def test_4bit_without_bitsandbytes_names_the_flag(monkeypatch):
    monkeypatch.setattr("core.device.bitsandbytes_available", lambda: False)
    with pytest.raises(UserError, match="`--4bit` needs bitsandbytes"):
        resolve_profile("cpu", gpu=None, load_in_4bit=True)
    with pytest.raises(UserError, match="`--gpu t4`.*--no-4bit"):
        resolve_profile("t4", gpu=T4)


# ---------------------------------------------------------------- config and targets

def test_train_config_reports_every_problem_at_once():
    with pytest.raises(UserError) as info:
        TrainConfig(steps=0, epochs=1.0, lr=-1, dropout=1.5, batch_size=2, micro_batch_size=4,
                    target_modules=".*vision_tower.*q_proj")
    message = str(info.value)
    for field in ("`steps`", "not both", "`lr`", "`dropout`", "`micro_batch_size`",
                  "`target_modules`"):
        assert field in message
    assert TrainConfig().epochs == 1.0


def test_lora_adapts_the_language_model_only(tiny_vlm_factory):
    vlm = tiny_vlm_factory()
    attach_lora(vlm, "ad", lora_config(train_projector=True))
    modules = adapted_modules(vlm.model, "ad")
    lora = [m for m in modules if "projector" not in m]
    assert len(lora) == 4 * 7 and all(".language_model." in m for m in lora)
    assert not any("vision" in m for m in modules)
    assert any(m.endswith("multi_modal_projector") for m in modules)
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_plain_module_names_are_refused_because_they_hit_the_vision_tower(tiny_vlm_factory):
    vlm = tiny_vlm_factory()
    with pytest.raises(UserError, match="vision tower"):
        attach_lora(vlm, "ad", lora_config(target_modules=["q_proj", "v_proj"]))


def test_bad_records_fail_before_training(tiny_vlm_factory, tmp_path):
    records = _records(2)
    del records[1]["conversations"][1]["value"]
    with pytest.raises(DataError, match=r"<in-memory>, row 1: field 'conversations\[1\]'"):
        train_lora(tiny_vlm_factory(), records, _config(), tmp_path / "a")


# ---------------------------------------------------------------- guards

def test_watchdog_stops_on_injected_nan_and_saves_nothing(tiny_vlm_factory, tmp_path):
    import torch

    vlm = tiny_vlm_factory()
    records = _records(8)
    before = _logits(vlm, records[:2])

    def poison(event):
        if event.step == 1:
            for name, p in event.model.named_parameters():
                if "lora_A" in name:
                    p.data.fill_(float("nan"))

    result = train_lora(vlm, records, _config(steps=4, checkpoint_every=1), tmp_path / "nan",
                        hooks=TrainHooks(before_micro_step=poison))
    assert result.status == "failed_nan" and "loss is nan" in result.error
    assert result.steps == 1 and result.adapter_path is None and not result.ok
    assert not (tmp_path / "nan" / METADATA_FILE).exists()
    assert "nan" not in vlm.adapters
    assert torch.equal(_logits(vlm, records[:2]), before)  # the base is back, untouched


def test_oom_backoff_halves_the_micro_batch_and_keeps_the_batch(tiny_vlm_factory, tmp_path):
    import torch

    calls = []

    def oom(event):
        calls.append(event.micro_batch_size)
        if event.micro_batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    result = train_lora(tiny_vlm_factory(), _records(8), _config(steps=2), tmp_path / "oom",
                        hooks=TrainHooks(before_micro_step=oom))
    assert result.status == "finished" and result.ok
    assert result.micro_batch_size == 1 and result.oom_retries == 2
    assert calls[:3] == [4, 2, 1]
    assert result.samples == 2 * 4  # the effective batch is kept


def test_oom_at_micro_batch_one_fails_cleanly(tiny_vlm_factory, tmp_path):
    import torch

    def oom(event):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    vlm = tiny_vlm_factory()
    result = train_lora(vlm, _records(4), _config(micro_batch_size=2), tmp_path / "oom1",
                        hooks=TrainHooks(before_micro_step=oom))
    assert result.status == "failed_oom" and "micro-batch 1" in result.error
    assert not vlm.adapters


def test_deadline_is_honoured_and_the_adapter_saved(tiny_vlm_factory, tmp_path):
    vlm = tiny_vlm_factory()
    records = _records(8)

    def slow(event):
        time.sleep(0.2)

    start = time.time()
    deadline = start + 2.5
    result = train_lora(vlm, records, _config(steps=1000), tmp_path / "dl", deadline=deadline,
                        hooks=TrainHooks(before_micro_step=slow))
    assert time.time() <= deadline + 0.5
    assert result.status == "deadline" and result.ok and 0 < result.steps < 1000
    meta = json.loads((tmp_path / "dl" / METADATA_FILE).read_text())
    assert meta["metrics"]["status"] == "deadline" and meta["metrics"]["steps"] == result.steps


@pytest.mark.slow
def test_resume_after_a_kill_continues_from_the_checkpoint(tiny_vlm_factory, tmp_path):
    records = _records(16)
    config = _config(steps=4, dropout=0.0, checkpoint_every=2)
    straight = tiny_vlm_factory()
    train_lora(straight, records, config, tmp_path / "straight", adapter_name="x")

    def kill(event):
        if event.step == 3:
            raise KeyboardInterrupt

    killed = tiny_vlm_factory()
    with pytest.raises(KeyboardInterrupt):
        train_lora(killed, records, config, tmp_path / "run", adapter_name="x",
                   hooks=TrainHooks(before_micro_step=kill))
    assert (tmp_path / "run" / "checkpoint").is_dir()
    assert not killed.adapters and not hasattr(killed.model, "peft_config")  # left as it was
    resumed = tiny_vlm_factory()
    result = train_lora(resumed, records, config, tmp_path / "run", adapter_name="x", resume=True)
    assert result.status == "finished" and result.resumed_from_step == 2 and result.steps == 4
    import torch

    a, b = _lora_weights(straight, "x"), _lora_weights(resumed, "x")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    again = train_lora(tiny_vlm_factory(), records, config, tmp_path / "run", adapter_name="x",
                       resume=True)
    assert again.steps == 4 and again.adapter_path == str(tmp_path / "run")


class _Planted:
    """A pickle that runs code when loaded: what a shared --workdir lets anyone put there."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_a_checkpoint_is_restored_without_running_pickled_code(tiny_vlm_factory, tmp_path):
    import torch

    from core.train import STATE_FILE

    records, config = _records(8), _config(steps=4, dropout=0.0, checkpoint_every=2)

    def kill(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_vlm_factory(), records, config, tmp_path / "run", adapter_name="x",
                   hooks=TrainHooks(before_micro_step=kill))
    state_file = tmp_path / "run" / "checkpoint" / STATE_FILE
    saved = torch.load(state_file, weights_only=True)  # what the trainer writes loads safely
    saved["planted"] = _Planted(tmp_path / "pwned")
    torch.save(saved, state_file)
    with pytest.raises(UserError, match=f"{STATE_FILE}.*not a checkpoint this tool wrote"):
        train_lora(tiny_vlm_factory(), records, config, tmp_path / "run", adapter_name="x",
                   resume=True)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- adapters

@pytest.mark.slow
def test_adapter_round_trip_gives_identical_logits(tiny_vlm_factory, tmp_path):
    import torch

    records = _records(8)
    vlm = tiny_vlm_factory()
    result = train_lora(vlm, records, _config(steps=3, train_projector=True), tmp_path / "rt",
                        adapter_name="rt1")
    assert result.ok and vlm.active_adapter == "rt1"
    for name in ("adapter_config.json", "adapter_model.safetensors", METADATA_FILE):
        assert (tmp_path / "rt" / name).exists()
    meta = json.loads((tmp_path / "rt" / METADATA_FILE).read_text())
    assert meta["base_model"]["id"] == vlm.source and meta["config"]["rank"] == 16
    assert meta["data"]["fingerprint"] and meta["metrics"]["steps"] == 3
    trained = _logits(vlm, records[:3])
    reloaded = tiny_vlm_factory(adapter=tmp_path / "rt")
    assert torch.equal(_logits(reloaded, records[:3]), trained)
    base = tiny_vlm_factory()
    assert not torch.allclose(_logits(base, records[:3]), trained)


@pytest.mark.slow
def test_two_adapters_trained_and_switched_on_one_base(tiny_vlm_factory, tmp_path):
    import torch

    vlm = tiny_vlm_factory()
    records = _records(6)
    base = _logits(vlm, records[:2])
    train_lora(vlm, _records(8, answer="да"), _config(steps=3), tmp_path / "yes")
    yes = _lora_weights(vlm, "yes")
    train_lora(vlm, _records(8, answer="нет"), _config(steps=3), tmp_path / "no")
    assert set(vlm.adapters) == {"yes", "no"} and vlm.active_adapter == "no"
    after = _lora_weights(vlm, "yes")
    assert all(torch.equal(yes[k], after[k]) for k in yes)  # frozen while "no" trained
    no_logits = _logits(vlm, records[:2])
    vlm.set_adapter("yes")
    yes_logits = _logits(vlm, records[:2])
    vlm.set_adapter(None)
    assert torch.equal(_logits(vlm, records[:2]), base)
    assert not torch.allclose(yes_logits, no_logits)
    vlm.set_adapter("no")
    assert torch.equal(_logits(vlm, records[:2]), no_logits)


@pytest.mark.slow
def test_a_candidate_trained_on_the_champion_starts_from_its_weights(tiny_vlm_factory, tmp_path):
    """Continued training: at step 0 the new adapter's logits are the champion's, not the base's."""
    import torch

    vlm = tiny_vlm_factory()
    records = _records(8)
    base = _logits(vlm, records[:3])
    train_lora(vlm, _records(8, answer="да"), _config(steps=3, rank=8), tmp_path / "champ",
               adapter_name="champ")
    champion = _logits(vlm, records[:3])
    assert not torch.allclose(champion, base)
    at_start = {}

    def capture(event):
        if event.step == 0 and not at_start:
            at_start["logits"] = _logits(vlm, records[:3])

    result = train_lora(vlm, records, _config(steps=2, dropout=0.0,
                                              init_from=str(tmp_path / "champ")),
                        tmp_path / "cont", adapter_name="cont",
                        hooks=TrainHooks(before_micro_step=capture))
    assert result.ok
    assert torch.allclose(at_start["logits"], champion, atol=1e-5)
    meta = json.loads((tmp_path / "cont" / METADATA_FILE).read_text())
    assert meta["parent"] == str(tmp_path / "champ") and meta["config"]["init_from"]
    assert json.loads((tmp_path / "cont" / "adapter_config.json").read_text())["r"] == 8
    assert not torch.allclose(_logits(vlm, records[:3]), champion)  # and then it trained on

    at_start.clear()
    train_lora(vlm, records, _config(steps=1, dropout=0.0), tmp_path / "fresh",
               adapter_name="fresh", hooks=TrainHooks(before_micro_step=capture))
    assert torch.allclose(at_start["logits"], base, atol=1e-5)  # a fresh LoRA starts at the base


def test_init_from_a_folder_without_an_adapter_is_a_clear_error(tiny_vlm_factory, tmp_path):
    vlm = tiny_vlm_factory()
    with pytest.raises(UserError, match="`init_from` must be a LoRA adapter folder"):
        train_lora(vlm, _records(4), _config(init_from=str(tmp_path)), tmp_path / "x")
    assert not vlm.adapters


@pytest.mark.slow
def test_short_training_makes_answers_short(tiny_vlm_factory, tmp_path):
    """The untrained model rambles to max_new_tokens; after SFT on one-word answers it stops."""
    vlm = tiny_vlm_factory()
    probe = _records(12)[6:]
    texts = [r["conversations"][0]["value"] for r in probe]
    images = [r["image"] for r in probe]

    def mean_tokens():
        answers = vlm.generate(texts, images, max_new_tokens=12)
        return sum(len(vlm.tokenizer(a, add_special_tokens=False)["input_ids"])
                   for a in answers) / len(answers), answers

    before, _ = mean_tokens()
    result = train_lora(vlm, _records(48), _config(steps=20, batch_size=8, lr=1e-2),
                        tmp_path / "short")
    after, answers = mean_tokens()
    assert result.ok and result.loss_curve[-1] < result.loss_curve[0]
    assert before >= 8 and after <= 2, (before, after, answers)
    assert all(a in ("да", "нет") for a in answers), answers


@pytest.mark.slow
def test_4bit_nf4_on_cpu_trains_saves_and_reloads(tmp_path):
    import bitsandbytes as bnb
    import torch

    from core.demo.tiny_model import build_tiny_llava, train_tokenizer
    from core.model import load_vlm
    from tests.conftest import TINY_CORPUS

    # Every width a multiple of 64, as in every real Llama: bitsandbytes' CPU 4-bit inference
    # kernels need whole 64-value blocks per row (the demo's MLP width, 352, is not).
    folder = tmp_path / "tiny64"
    model, processor = build_tiny_llava(train_tokenizer(TINY_CORPUS * 4), seed=0,
                                        text_overrides={"intermediate_size": 384})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    options = resolve_profile("cpu", gpu=None, load_in_4bit=True).load_options()

    def tiny_vlm_factory(**kwargs):
        return load_vlm(folder, **kwargs)

    vlm = tiny_vlm_factory(options=options)
    quantized = [n for n, m in vlm.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".language_model." in n for n in quantized)
    records = _records(8)
    result = train_lora(vlm, records, _config(steps=2, gradient_checkpointing=True),
                        tmp_path / "q4")
    assert result.ok
    lora_b = _lora_weights(vlm, "q4")
    assert any(float(v.abs().sum()) > 0 for k, v in lora_b.items() if "lora_B" in k), \
        "LoRA did not train under gradient checkpointing"
    trained = _logits(vlm, records[:2])
    reloaded = tiny_vlm_factory(options=options, adapter=tmp_path / "q4")
    assert torch.allclose(_logits(reloaded, records[:2]), trained, atol=1e-5)


# ---------------------------------------------------------------- the command

def test_train_command_on_a_jsonl_file(tiny_vlm_dir, tmp_path, capsys):
    from core.demo.world import ensure_demo_world
    from core.sft import write_sft_jsonl
    from loop.cli import main

    path = write_sft_jsonl(_records(8), tmp_path / "data" / "sft.jsonl")
    rc = main(["-q", "train", "--source", str(path), "--model", str(tiny_vlm_dir),
               "--data-dir", str(ensure_demo_world().data_dir),  # the guard's evaluation data
               "--steps", "2", "--batch-size", "4", "--lr", "5e-3", "--gpu", "cpu",
               "--eval-limit", "0", "--out", str(tmp_path / "cli"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["train"]["status"] == "finished" and report["records"] == 8
    assert (tmp_path / "cli" / METADATA_FILE).exists()
    assert main(["train", "--source", "nonsense", "--model", str(tiny_vlm_dir)]) == 2
