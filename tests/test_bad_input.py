"""Bad input at every entry point: one clear line naming the file, a non-zero exit, never a
traceback. Each case is run the way a user would, through ``loop.cli.main``."""

from __future__ import annotations

import json
import shutil
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
