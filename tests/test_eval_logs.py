"""Evaluation commands log what they did, counted as they store it, and nothing about training."""

from __future__ import annotations

import sqlite3

import pytest

from loop.cli import main


def test_eval_logs_the_predictions_it_stored_and_no_training_choices(tmp_path, capsys):
    db = tmp_path / "e.db"
    assert main(["eval", "--preset", "demo", "--benchmark", "mmbench_ru", "--split", "all",
                 "--gpu", "cpu", "--db", str(db)]) == 0
    err = capsys.readouterr().err
    con = sqlite3.connect(db)
    (rows,) = con.execute("select count(*) from loop_predictions").fetchone()
    (groups,) = con.execute("select n from loop_evaluations").fetchone()
    con.close()
    assert rows > groups  # MMBench-ru: rotations are rows, n counts question groups
    assert f"evaluation 1 and its {rows} predictions recorded" in err
    assert "cpu: fp32 weights and compute" in err  # the choices that apply are logged
    for training in ("AdamW", "gradient checkpointing", "micro-batch", "LoRA weights"):
        assert training not in err, training


def test_training_logs_its_training_choices():
    from core.device import is_training_reason, resolve_profile
    from tests.test_train import T4

    profile = resolve_profile("t4", gpu=T4)
    training = [r for r in profile.reasons if is_training_reason(r)]
    assert any("AdamW" in r for r in training) and any("checkpointing" in r for r in training)
    assert not any("4-bit NF4" in r or "SDPA" in r for r in training)


@pytest.mark.slow
def test_saiga_tiny_decodes_the_same_text_without_the_bpe_cleanup_warning():
    """Llama-3's tokenizer files set clean_up_tokenization_spaces, which transformers ignores
    for BPE with a warning on every command; loading turns it off where it is ignored."""
    import logging

    from transformers import AutoTokenizer

    from core.demo.saiga_tiny import ensure_saiga_tiny
    from core.model import skip_ignored_bpe_cleanup

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    tok = AutoTokenizer.from_pretrained(ensure_saiga_tiny().model_dir)
    assert tok.clean_up_tokenization_spaces  # as the files say
    ids = tok("Круг , красный . Ответ : A", add_special_tokens=False)["input_ids"]
    records = Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        logging.Logger.warning_once.cache_clear()
        before = tok.decode(ids)
        assert any("clean_up_tokenization_spaces" in m for m in records.messages)
        records.messages.clear()
        skip_ignored_bpe_cleanup(tok)
        logging.Logger.warning_once.cache_clear()
        assert tok.decode(ids) == before == "Круг , красный . Ответ : A"
        assert not any("clean_up_tokenization_spaces" in m for m in records.messages)
    finally:
        logging.getLogger("transformers").removeHandler(records)
