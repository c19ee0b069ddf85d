"""Bad input at every entry point: one clear line naming the file, a non-zero exit, never a
traceback. Each case is run the way a user would, through ``loop.cli.main``."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from loop.cli import main
from tests.test_data import _png, _question, write_gqa


def _gqa(root: Path, n_images: int = 12, drop: str | None = None) -> str:
    """A GQA-ru folder of ``n_images`` images with 3 questions each; ``drop`` removes a column
    of the images config."""
    images = [{"id": f"i{k}", "image": _png(Image.new("RGB", (8, 8), "red"))}
              for k in range(n_images)]
    questions = [_question(f"q{k}-{j}", f"i{k}") for k in range(n_images) for j in range(3)]
    folder = write_gqa(root / "GQA-ru", questions, images)
    if drop:
        import pyarrow.parquet as pq

        (path,) = (root / "GQA-ru" / "testdev_balanced_images").glob("*.parquet")
        table = pq.read_table(path)
        pq.write_table(table.rename_columns([f"{c}_renamed" if c == drop else c
                                             for c in table.column_names]), path)
    return folder


def _no_tokenizer(model_dir: Path, tmp: Path) -> Path:
    out = tmp / "model-without-tokenizer"
    shutil.copytree(model_dir, out)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)
    return out


def _adapter(tmp: Path, config: str | None, weights: bytes) -> Path:
    from peft import LoraConfig

    out = tmp / "adapter"
    LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(out)
    if config is not None:
        (out / "adapter_config.json").write_text(config, encoding="utf-8")
    (out / "adapter_model.safetensors").write_bytes(weights)
    return out


def _not_sqlite(tmp: Path) -> Path:
    db = tmp / "notes.db"
    db.write_text("these are my notes, not a database\n" * 50, encoding="utf-8")
    return db


# (case, argv builder(tmp, tiny_vlm_dir) -> list, expected words in the message)
CASES = [
    ("gqa images without an image column",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--model", str(m),
                   "--data-dir", str(Path(_gqa(t, drop="image")).parent)],
     ["testdev_balanced_images", "'image'"]),
    ("gqa images without an id column",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--model", str(m),
                   "--data-dir", str(Path(_gqa(t, drop="id")).parent)],
     ["testdev_balanced_images", "'id'"]),
    ("an empty dev split, loop eval",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "dev", "--model", str(m),
                   "--data-dir", str(Path(_gqa(t, n_images=1)).parent)],
     ["GQA-ru", "dev", "empty"]),
    ("an empty dev split, loop run",
     lambda t, m: ["run", "--budget", "1m", "--gpu", "cpu", "--model", str(m),
                   "--db", str(t / "e.db"), "--data-dir", str(Path(_gqa(t, n_images=1)).parent)],
     ["gqa_ru", "GQA-ru", "empty"]),
    ("a model folder without a tokenizer",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--gpu", "cpu",
                   "--model", str(_no_tokenizer(m, t)), "--data-dir", str(Path(_gqa(t)).parent)],
     ["model-without-tokenizer", "no tokenizer"]),
    ("an adapter with a garbage config",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--limit", "2", "--gpu",
                   "cpu", "--model", str(m), "--data-dir", str(Path(_gqa(t)).parent),
                   "--adapter", str(_adapter(t, "{not json", b"\x00" * 64))],
     ["adapter_config.json", "not valid JSON"]),
    ("an adapter config of another kind",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--limit", "2", "--gpu",
                   "cpu", "--model", str(m), "--data-dir", str(Path(_gqa(t)).parent),
                   "--adapter", str(_adapter(t, json.dumps({"r": 2}), b"\x00" * 64))],
     ["adapter_config.json", "peft_type"]),
    ("an adapter with garbage weights",
     lambda t, m: ["eval", "--benchmark", "gqa_ru", "--split", "all", "--limit", "2", "--gpu",
                   "cpu", "--model", str(m), "--data-dir", str(Path(_gqa(t)).parent),
                   "--adapter", str(_adapter(t, None, b"garbage" * 100))],
     ["cannot load the adapter", "adapter"]),
    *[(f"--db not SQLite, loop {cmd}",
       lambda t, m, cmd=cmd, extra=extra: [cmd, *extra, "--db", str(_not_sqlite(t))],
       ["notes.db", "not an experiments database"])
      for cmd, extra in (("run", ["--budget", "1m", "--preset", "demo"]), ("log", []),
                         ("show", ["1"]), ("pin", ["--best"]), ("report", []),
                         ("export", []))],
    ("--db in a folder nobody may write to",
     lambda t, m: ["run", "--budget", "1m", "--preset", "demo", "--db", "/proc/experiments.db"],
     ["/proc/experiments.db", "cannot write"]),
    ("--workdir nobody may write to",
     lambda t, m: ["run", "--budget", "1m", "--preset", "demo", "--db", str(t / "e.db"),
                   "--workdir", "/proc/loop-runs"],
     ["/proc/loop-runs", "cannot write"]),
]


@pytest.mark.parametrize("case,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(case, argv, words, tmp_path, tiny_vlm_dir, capsys,
                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["-q", *argv(tmp_path, tiny_vlm_dir)])
    err = capsys.readouterr().err
    assert code != 0, case
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_a_jsonl_line_that_is_not_json_names_the_file_and_the_line(tmp_path):
    """SFT files count rows from 0 (as `loop train` reports them); samples files count lines
    from 1 (as an editor shows them). Blank lines are skipped but still counted."""
    from core.exceptions import DataError
    from core.rescore import read_samples
    from core.sft import load_sft_jsonl

    bad = tmp_path / "bad.jsonl"
    bad.write_text('\n{"id": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 1: not valid JSON \(Expecting value "
                                        r"at column 1\)"):
        load_sft_jsonl(bad)
    bad.write_text('\n{"task": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_samples(bad)


# ---------------------------------------------------------------- nothing left behind

def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_a_gpu_profile_without_a_gpu_leaves_no_run_and_no_files(tmp_path, capsys, monkeypatch):
    import core.device

    monkeypatch.setattr(core.device, "detect_gpu", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "run", "--budget", "6h", "--gpu", "t4"]) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "`--gpu t4` needs a CUDA GPU" in line
    assert list(tmp_path.iterdir()) == []  # no experiments.db, no experiments.runs/


def test_an_unreachable_hub_fails_fast_once_with_one_line_and_leaves_nothing(
        tmp_path, capsys, monkeypatch):
    """No network and no HF_HUB_OFFLINE: one short connection attempt, then offline mode and
    the same clear error as with HF_HUB_OFFLINE=1, in seconds (it took minutes of retries)."""
    import socket

    from huggingface_hub import constants

    import loop.sources

    attempts = []

    def unreachable(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    loop.sources.hub_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        code = main(["-q", "run", "--budget", "6h", "--gpu", "auto"])
        seconds = time.perf_counter() - t0
        offline = os.environ.get("HF_HUB_OFFLINE")
    finally:
        loop.sources.hub_reachable.cache_clear()
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and seconds < 20, seconds
    assert len(attempts) == 1 and attempts[0][0][0] == "huggingface.co" and attempts[0][1] <= 5
    assert "not reachable" in line and "deepvk/llava-saiga-8b" in line and "--model" in line
    assert offline == "1"
    assert list(work.iterdir()) == []
    print(f"offline --gpu auto failed in {seconds:.1f} s")


# ---------------------------------------------------------------- duplicated ids

def _gqa_with_repeats(root: Path, identical: bool | None) -> Path:
    """A GQA-ru testdev of 12 images x 3 questions where 3 question ids appear twice (None:
    none repeated)."""
    images = [{"id": f"i{k}", "image": _png(Image.new("RGB", (8, 8), "red"))} for k in range(12)]
    questions = [_question(f"q{k}-{j}", f"i{k}") for k in range(12) for j in range(3)]
    for k in (1, 4, 7) if identical is not None else ():
        copy = dict(questions[3 * k])
        if not identical:
            copy["answer"] = "синий"
        questions.append(copy)
    write_gqa(root / "GQA-ru", questions, images)
    return root


def _mmbench_with_repeats(root: Path, identical: bool | None) -> Path:
    """A MMBench-ru dev of 8 questions x 2 rotations where 3 `index` values appear twice
    (None: none repeated)."""
    from tests.test_data import _mmb_row, write_mmbench

    rows = [_mmb_row(g + r * 1_000_000, answer="AB"[r], A="красный" if r == 0 else "синий",
                     B="синий" if r == 0 else "красный") for g in range(8) for r in range(2)]
    for g in (2, 3, 5) if identical is not None else ():
        copy = dict(rows[2 * g])
        if not identical:
            copy["question"] = "Сколько кругов?"
        rows.append(copy)
    write_mmbench(root / "MMBench-ru", rows)
    return root


@pytest.mark.parametrize("bench", ["gqa_ru", "mmbench_ru"])
def test_differing_rows_with_one_id_are_one_clear_error(bench, tmp_path, tiny_vlm_dir, capsys):
    data = _gqa_with_repeats(tmp_path / "data", False if bench == "gqa_ru" else None)
    _mmbench_with_repeats(data, False if bench == "mmbench_ru" else None)
    for argv in (["eval", "--benchmark", bench, "--split", "all"],
                 ["run", "--budget", "1m", "--db", str(tmp_path / "e.db")]):
        code = main(["-q", *argv, "--gpu", "cpu", "--model", str(tiny_vlm_dir),
                     "--data-dir", str(data)])
        (line,) = _error_lines(capsys.readouterr().err)
        assert code != 0
        if bench == "gqa_ru":  # the first repeated id, the rows that share it, what differs
            assert "GQA-ru" in line and "question id 'q1-0'" in line and "rows 3 and 36" in line
            assert "'answer'" in line
        else:
            assert "MMBench-ru" in line and "index '2'" in line and "rows 4 and 16" in line
            assert "'question'" in line


@pytest.mark.slow
@pytest.mark.parametrize("bench,rows,kept", [("gqa_ru", 39, 36), ("mmbench_ru", 19, 16)])
def test_identical_repeated_rows_are_counted_once_and_reported(bench, rows, kept, tmp_path,
                                                                tiny_vlm_dir, capsys):
    make = _gqa_with_repeats if bench == "gqa_ru" else _mmbench_with_repeats
    data = make(tmp_path / "data", identical=True)
    assert main(["eval", "--benchmark", bench, "--split", "all", "--gpu", "cpu", "--json",
                 "--model", str(tiny_vlm_dir), "--data-dir", str(data),
                 "--db", str(tmp_path / "e.db")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert (out["n"] if bench == "gqa_ru" else out["n_rows"]) == kept
    (warning,) = [line for line in captured.err.splitlines() if "duplicated" in line]
    assert f"{rows - kept} duplicated row(s) dropped" in warning
    import sqlite3

    con = sqlite3.connect(tmp_path / "e.db")
    assert con.execute("select count(*), count(distinct sample_id) from loop_predictions"
                       ).fetchone() == (kept, kept)
    con.close()


def test_a_hub_probe_that_hangs_gives_up_within_seconds(monkeypatch):
    """A name lookup that hangs (no socket timeout covers it) does not hold the command."""
    import socket

    import loop.sources

    monkeypatch.setattr(loop.sources, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: time.sleep(5))
    loop.sources.hub_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        assert loop.sources.hub_reachable() is False
        assert time.perf_counter() - t0 < 2.5
    finally:
        loop.sources.hub_reachable.cache_clear()
