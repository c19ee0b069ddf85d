"""``--config FILE.yaml`` for run, eval and train: the same resolved options as the equivalent
flags, flags over the file, and a wrong file as one clear line naming the file and the key."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from core.exceptions import UserError
from loop.cli import build_parser, main
from loop.config_file import parse_args, resolved_options, to_yaml

CASES = {
    "run": ("""
budget: 5m
preset: demo
gpu: cpu
dev-size: 60
final_size: 40            # underscores work too
no-prefix-cache: true
strategies: prompt_constraints,answer_format_sft
report-to: tensorboard
reserve: 0.25
seed: 3
""", ["--budget", "5m", "--preset", "demo", "--gpu", "cpu", "--dev-size", "60",
      "--final-size", "40", "--no-prefix-cache", "--strategies",
      "prompt_constraints,answer_format_sft", "--report-to", "tensorboard", "--reserve", "0.25",
      "--seed", "3"]),
    "eval": ("""
benchmark: mmbench_ru     # required on the command line, enough in the file
split: final
limit: 50
batch-size: 8
mode: likelihood
json: true
""", ["--benchmark", "mmbench_ru", "--split", "final", "--limit", "50", "--batch-size", "8",
      "--mode", "likelihood", "--json"]),
    "train": ("""
source: [gqa_train, extra.jsonl]
steps: 20
lr: 1e-3                  # YAML reads this as a string; --lr's own type makes it a float
rank: 8
4bit: false
train-projector: true
time-limit: 10m
report_to: tensorboard
""", ["--source", "gqa_train", "--source", "extra.jsonl", "--steps", "20", "--lr", "1e-3",
      "--rank", "8", "--no-4bit", "--train-projector", "--time-limit", "10m",
      "--report-to", "tensorboard"]),
}


def parse(argv: list[str]) -> dict:
    return resolved_options(parse_args(build_parser(), argv))


def write(tmp_path, text: str, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("command", CASES)
def test_a_file_resolves_to_the_same_options_as_the_flags(command, tmp_path):
    text, flags = CASES[command]
    from_file = parse([command, "--config", write(tmp_path, text)])
    from_flags = parse([command, *flags])
    assert from_file == from_flags
    if command == "train":
        assert from_file["lr"] == 1e-3 and from_file["load_in_4bit"] is False
        assert from_file["source"] == ["gqa_train", "extra.jsonl"]


@pytest.mark.parametrize("command", CASES)
def test_resolved_options_round_trip_through_yaml(command, tmp_path):
    options = parse([command, *CASES[command][1]])
    again = parse([command, "--config", write(tmp_path, to_yaml(options, "a header"))])
    assert again == options


def test_flags_on_the_command_line_override_the_file(tmp_path):
    path = write(tmp_path, CASES["run"][0])
    options = parse(["run", "--config", path, "--dev-size", "30", "--gpu", "auto"])
    assert options["dev_size"] == 30 and options["gpu"] == "auto"
    assert options["final_size"] == 40 and options["prefix_cache"] is False  # the file's
    # A flag of a mutually exclusive pair replaces the file's other one.
    train = parse(["train", "--config", write(tmp_path, "steps: 20\n", "t.yaml"),
                   "--epochs", "2"])
    assert train["steps"] is None and train["epochs"] == 2.0


def test_the_run_command_builds_the_same_run_config_from_a_file(tmp_path, monkeypatch):
    """What `loop run` stores on the run (its RunConfig, options included) does not depend on
    whether the options came from flags or from a file."""
    import loop.controller

    seen = []

    class Captured(UserError):
        pass

    class FakeLoop:
        def __init__(self, config, store, *, resume=False, storage_url=None):
            seen.append(asdict(config))
            raise Captured("captured")

    monkeypatch.setattr(loop.controller, "Loop", FakeLoop)
    db = str(tmp_path / "e.db")
    text, flags = CASES["run"]
    assert main(["run", "--config", write(tmp_path, text), "--db", db]) == 2
    assert main(["run", *flags, "--db", db]) == 2
    assert len(seen) == 2 and seen[0] == seen[1]
    assert seen[0]["dev_size"] == 60 and seen[0]["report_to"] == "tensorboard"
    assert seen[0]["options"]["strategies"] == "prompt_constraints,answer_format_sft"


BAD = [
    ("dev-sise: 60\n", ["unknown key `dev-sise`", "did you mean `dev-size`?", "budget"]),
    ("dev-size: many\n", ["`dev-size` must be an integer (N), but got 'many'"]),
    ("dev-size: 2.5\n", ["`dev-size` must be an integer (N), but got 2.5"]),
    ("gpu: v100\n", ["`gpu` must be one of auto, t4, a100, h100, cpu, but got 'v100'"]),
    ("no-prefix-cache: maybe\n", ["`no-prefix-cache` must be true or false, but got 'maybe'"]),
    ("budget: [5m]\n", ["`budget` must be a string (DURATION), but got a list"]),
    ("reserve: null\n", ["`reserve` cannot be empty (null)"]),
    ("gpu: v100\nseed: x\n", ["`gpu` must be one of", "`seed` must be an integer, but got 'x'"]),
    ("- budget: 5m\n", ["must be a mapping of option names to values"]),
    ("budget: 5m\nseed: [1\n", ["is not valid YAML at line"]),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[b[0].split(":")[0] for b in BAD])
def test_a_wrong_file_is_one_clear_line_and_nothing_runs(text, expected, tmp_path, capsys):
    path = write(tmp_path, text)
    db = tmp_path / "e.db"
    assert main(["run", "--config", path, "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}") and "\n" not in err and "Traceback" not in err
    for fragment in expected:
        assert fragment in err
    assert not db.exists()


def test_a_missing_file_names_it(tmp_path, capsys):
    assert main(["eval", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"--config {tmp_path / 'nope.yaml'}: no such file" in err


def test_a_file_cannot_set_both_of_an_exclusive_pair(tmp_path, capsys):
    path = write(tmp_path, "steps: 10\nepochs: 2\n")
    assert main(["train", "--config", path]) == 2
    assert "epochs, steps exclude each other" in capsys.readouterr().err
