"""bench/learning_curve.py at a tiny size: both curves, every figure, accuracies in range."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_tiny_curves_from_base_and_champion(load_bench, capsys):
    bench = load_bench("learning_curve")
    assert bench.main(["--sizes", "20,40", "--champion-size", "20", "--dev-size", "30",
                       "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["preset"] == "demo" and m["batch_size"] == 16 and m["lr"] == 2e-3
    assert [c["start"] for c in m["curves"]] == ["base", "champion"]
    for c in m["curves"]:
        assert [p["size"] for p in c["points"]] == [20, 40]
        for start in c["start_dev"].values():
            assert 0 <= start["accuracy"] <= 1 and 0 <= start["errors"] <= start["questions"]
        for p in c["points"]:
            assert p["train_status"] == "finished" and p["steps"] == 5  # MIN_STEPS
            assert 0 < p["records"] <= p["size"] and sum(p["kinds"].values()) == p["records"]
            for b, d in p["dev"].items():
                start = c["start_dev"][b]
                assert 0 <= d["accuracy"] <= 1 and 0 <= d["ci"][0] <= d["ci"][1] <= 1
                assert d["questions"] == start["questions"] == m["dev"][b]["questions"]
                assert d["errors_before"] == start["errors"]
                assert d["fixed"] <= d["errors_before"] and d["net"] == d["fixed"] - d["broken"]
                assert 0 <= d["p_value"] <= 1
                for row in d["labels"].values():
                    assert 0 <= row["fixed"] <= row["errors"] <= d["errors_before"]
        rule = c["sizing"]
        assert [r["size"] for r in rule["points"]] == [20, 40]
        assert rule["floor"] in (None, 20, 40) and rule["ceiling"] in (None, 20, 40)
    # the second curve continues the first curve's 20-record adapter: it starts where it ended
    first = m["curves"][0]["points"][0]["dev"]
    assert {b: d["accuracy"] for b, d in first.items()} == {
        b: s["accuracy"] for b, s in m["curves"][1]["start_dev"].items()}
    bench.print_table(m)
    table = capsys.readouterr().out
    assert "from the base model" in table and "from the 20-record adapter" in table
