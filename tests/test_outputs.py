"""--output_path writes lmms-eval 0.7.2-shaped results and samples; `loop rescore` reads them
back; a consumer written against lmms-eval's own files reads ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.metrics import gqa_match
from core.outputs import check_results, validator
from loop.cli import main

BENCH = {"gqa-ru": "gqa_ru", "mmbench_ru_dev": "mmbench_ru"}
TASK = {b: t for t, b in BENCH.items()}


def _files(folder: Path) -> dict[str, Path]:
    """The results file and the samples files (by benchmark) under ``folder`` (one model)."""
    (model_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    out = {"results": next(model_dir.glob("*_results.json"))}
    for path in model_dir.glob("*_samples_*.jsonl"):
        out[BENCH[path.name.split("_samples_")[1].removesuffix(".jsonl")]] = path
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`loop eval --output_path` on the demo world, once per benchmark, at default flags."""
    root = tmp_path_factory.mktemp("outputs")
    out = {}
    for name, bench, extra in (("gqa_ru", "gqa_ru", []), ("mmbench_ru", "mmbench_ru", []),
                               ("likelihood", "mmbench_ru", ["--mode", "likelihood"])):
        folder = root / name
        args = ["-q", "eval", "--preset", "demo", "--benchmark", bench, "--limit", "24",
                "--db", str(root / "e.db"), "--output_path", str(folder), *extra]
        assert main(args) == 0
        out[name] = _files(folder)
    return out


def _rescore(capsys, path, *extra) -> dict:
    capsys.readouterr()
    assert main(["rescore", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("bench", ["gqa_ru", "mmbench_ru"])
def test_results_file_has_the_harness_shape_and_fits_the_schema(exported, bench):
    doc = json.loads(exported[bench]["results"].read_text(encoding="utf-8"))
    check_results(doc)
    assert not list(validator("eval_results.schema.json").iter_errors(doc))
    task = TASK[bench]
    res = doc["results"][task]
    metric = "exact_match,none" if bench == "gqa_ru" else "circular_accuracy,none"
    stat = metric.replace(",", "_stderr_clustered,")
    low, high = res[metric.replace(",", "_ci95,")]
    assert low <= res[metric] <= high and 0 < res[stat] < 0.5
    assert res[metric] == doc["loop"]["metrics"][bench]["accuracy"]
    assert "lmms-eval prompt" in doc["configs"][task]["protocol"]
    assert doc["configs"][task]["generation_kwargs"]["max_new_tokens"] in (16, 1024)
    assert doc["config"]["model_args"].startswith("pretrained=") and doc["config"]["limit"] == 24
    lines = exported[bench][bench].read_text(encoding="utf-8").splitlines()
    assert doc["n-samples"][task]["effective"] == len(lines) == res["samples"]
    assert doc["n-samples"][task]["original"] > len(lines)
    assert doc["loop"]["samples_files"][bench] == exported[bench][bench].name
    first = json.loads(lines[0])
    assert {"id", "prompt", "output", "parsed", "target", "correct", "labels", "image_id",
            "input", "filtered_resps", "doc_id", "doc_hash"} <= set(first)
    assert "resps" not in first  # lmms-eval drops it when it equals filtered_resps
    assert first["filtered_resps"] == first["output"] and first["input"] == first["prompt"]
    if bench == "mmbench_ru":
        assert set(first["options"]) >= {"A", "B"} and first["image_id"].isdigit()
        assert first["gpt_eval_score"]["prediction"] == first["output"].strip()


def test_the_schema_rejects_a_malformed_results_file(exported):
    doc = json.loads(exported["gqa_ru"]["results"].read_text(encoding="utf-8"))
    doc["results"]["gqa-ru"]["exact_match,none"] = 1.5
    with pytest.raises(ValueError, match=r"results\.gqa-ru\.exact_match,none"):
        check_results(doc)
    del doc["n-samples"]
    assert list(validator("eval_results.schema.json").iter_errors(doc))


@pytest.mark.parametrize("name,bench", [("gqa_ru", "gqa_ru"), ("mmbench_ru", "mmbench_ru"),
                                        ("likelihood", "mmbench_ru")])
def test_samples_round_trip_into_the_same_numbers(exported, name, bench, capsys):
    doc = json.loads(exported[name]["results"].read_text(encoding="utf-8"))
    check_results(doc)
    out = _rescore(capsys, exported[name][bench])
    assert out["results"] == doc["results"][TASK[bench]]
    assert out["recorded"] == out["value"]
    assert out["metrics"]["per_category"] == doc["loop"]["metrics"][bench]["per_category"]
    likelihood = name == "likelihood"
    assert (doc["configs"][TASK[bench]]["output_type"] == "loglikelihood") == likelihood
    assert (doc["configs"][TASK[bench]]["generation_kwargs"] is None) == likelihood


def test_rescore_under_another_mode_gives_that_modes_numbers(exported, tmp_path, capsys):
    mmb = exported["mmbench_ru"]["mmbench_ru"]
    rows = [json.loads(s) for s in mmb.read_text(encoding="utf-8").splitlines()]
    per_row = _rescore(capsys, mmb, "--mode", "per_row")
    circular = _rescore(capsys, mmb)
    assert per_row["headline"] == "per_row_accuracy,none"
    assert per_row["value"] == sum(r["correct"] for r in rows) / len(rows)
    assert circular["headline"] == "circular_accuracy,none"
    assert circular["value"] <= per_row["value"] and circular["n"] == per_row["n"]

    # GQA-ru: answers in «» with a capital and ё count under "normalized", not under "lmms".
    gqa = exported["gqa_ru"]["gqa_ru"]
    rows = [json.loads(s) for s in gqa.read_text(encoding="utf-8").splitlines()]
    for r in rows[:6]:
        r["output"] = "«" + r["target"].capitalize().replace("е", "ё") + "»"
    edited = tmp_path / gqa.name
    edited.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                      encoding="utf-8")
    lmms = _rescore(capsys, edited)
    norm = _rescore(capsys, edited, "--mode", "normalized", "--output_path",
                    str(tmp_path / "re"))
    want = {m: sum(gqa_match(r["output"], r["target"], mode=m) for r in rows) / len(rows)
            for m in ("lmms", "normalized")}
    assert lmms["value"] == want["lmms"] and norm["value"] == want["normalized"]
    assert norm["value"] > lmms["value"]
    written = json.loads(Path(norm["output_files"]["results"]).read_text(encoding="utf-8"))
    check_results(written)
    assert written["results"]["gqa-ru"]["exact_match_normalized,none"] == want["normalized"]
    assert written["loop"]["headline"] == "exact_match_normalized,none"


@pytest.mark.parametrize("change,field", [
    (lambda r: r.pop("target"), "target"),
    (lambda r: r.update(correct="yes"), "correct"),
    (lambda r: r.update(filtered_resps=["raw"]), "filtered_resps"),
])
def test_a_bad_samples_file_names_the_file_line_and_field(exported, tmp_path, capsys, change,
                                                          field):
    rows = [json.loads(s) for s in
            exported["gqa_ru"]["gqa_ru"].read_text(encoding="utf-8").splitlines()]
    change(rows[2])
    bad = tmp_path / "20260101_000000_samples_gqa-ru.jsonl"
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    assert main(["rescore", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 3" in err and f"'{field}'" in err
    assert "Traceback" not in err


def test_a_samples_file_that_is_not_json_or_not_there(tmp_path, capsys):
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"doc_id": 0,\n', encoding="utf-8")
    assert main(["rescore", str(bad)]) == 2
    assert f"{bad}, line 1: not valid JSON" in capsys.readouterr().err
    assert main(["rescore", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_writes_its_final_evaluations(tmp_path, capsys):
    out, db = tmp_path / "out", tmp_path / "r.db"
    assert main(["-q", "run", "--preset", "demo", "--budget", "120s", "--max-cycles", "0",
                 "--dev-size", "30", "--final-size", "30", "--db", str(db),
                 "--output_path", str(out)]) == 0
    assert str(out / "final_champion") in capsys.readouterr().out
    assert main(["log", "--json", "--db", str(db)]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    for role in ("final_baseline", "final_champion"):
        files = _files(out / role)
        doc = json.loads(files["results"].read_text(encoding="utf-8"))
        check_results(doc)
        assert doc["loop"]["role"] == role and doc["loop"]["run_id"] == 1
        assert set(doc["results"]) == {"gqa-ru", "mmbench_ru_dev"}
        if role == "final_champion":
            assert doc["results"]["gqa-ru"]["exact_match,none"] == run["final"]["gqa_ru"]
            assert doc["results"]["mmbench_ru_dev"]["circular_accuracy,none"] == \
                run["final"]["mmbench_ru"]
        for bench in ("gqa_ru", "mmbench_ru"):
            assert doc["configs"][TASK[bench]]["test_split"] == "final"
            assert _rescore(capsys, files[bench])["results"] == doc["results"][TASK[bench]]


def test_run_refuses_an_output_path_it_cannot_make_before_running(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    db = tmp_path / "r.db"
    assert main(["-q", "run", "--preset", "demo", "--budget", "60s", "--db", str(db),
                 "--output_path", str(blocker / "out")]) == 1
    assert str(blocker) in capsys.readouterr().err
    assert not db.exists()


def test_a_consumer_of_lmms_evals_files_reads_ours(exported):
    """lmms-eval's own readers (job_scheduler, baselines/loader) and the keys a script reads."""
    from lmms_eval_consumer import HEADLINE, mean_stderr, summary

    for name, task in (("gqa_ru", "gqa-ru"), ("mmbench_ru", "mmbench_ru_dev")):
        folder = exported[name]["results"].parent.parent
        (model,) = summary(str(folder)).values()
        doc = json.loads(exported[name]["results"].read_text(encoding="utf-8"))
        got = model["tasks"][task]
        assert model["date"] == exported[name]["results"].name.split("_results.json")[0]
        assert model["lmms_eval_version"].startswith("llava-ru-loop@")
        assert model["seconds"] == pytest.approx(model["elapsed"], abs=1e-3)
        assert got["n"] == len(got["samples"]) > 0
        assert all(isinstance(s["answer"], str) and isinstance(s["target"], str)
                   and s["input"] for s in got["samples"])
        res = doc["results"][task]
        if task == "gqa-ru":
            ems = [s["exact_match"] for s in got["samples"]]
            assert got["score"] == sum(ems) / len(ems) == res["exact_match,none"]
            # i.i.d. under _stderr, as lmms-eval computes it; cluster-robust beside it
            assert got["stderr"] == pytest.approx(mean_stderr(ems))
            assert res["exact_match_stderr_clustered,none"] != got["stderr"]
            assert doc["loop"]["metrics"]["gqa_ru"]["ci"] == res["exact_match_ci95,none"]
        else:
            assert HEADLINE[task] == "gpt_eval_score,none" and got["stderr"] is None
            assert got["score"] == pytest.approx(100 * res["circular_accuracy,none"])
        assert all(s["baseline_score"] in (0.0, 1.0) for s in got["samples"])
