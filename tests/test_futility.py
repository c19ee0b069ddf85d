"""Futility stopping never rejects a candidate the full test would accept (``loop.futility``).

Checked three ways on outcome tables (no model): by brute force over every way the remaining
units could be answered, by replaying the chunked rule over many simulated candidate/champion
tables including borderline accepted ones, and on clearly worse candidates, which stop early.
"""

from __future__ import annotations

import itertools
import json
import random
from functools import partial
from pathlib import Path

import pytest

from core.evaluate import summarize
from core.stats import paired_test, sign_flip_p
from loop.decision import futile, judge, levels
from loop.futility import best_case, chunks, replay
from loop.workbench import Scored


def _gqa(counts: list[tuple[int, int]], tag: str = "") -> list[dict]:
    """Samples of images with (questions, right answers) each."""
    out = []
    for u, (m, right) in enumerate(counts):
        for q in range(m):
            ok = q < right
            out.append({"sample_id": f"q{u}-{q}", "cluster": f"img{u}", "correct": ok,
                        "correct_normalized": ok, "image_ok": True, "category": "c",
                        "labels": [], "output": tag, "parsed": tag})
    return out


def _mmb(outcomes: list[bool], rotations: int = 2) -> list[dict]:
    return [{"sample_id": str(g + r * 1_000_000), "index": g + r * 1_000_000, "cluster": g,
             "correct": ok, "image_ok": True, "category": "c", "labels": [], "parsed": "A",
             "output": "A", "n_options": 2}
            for g, ok in enumerate(outcomes) for r in range(rotations)]


@pytest.fixture(autouse=True)
def _few_bootstrap_draws(monkeypatch):
    """The decision reads the p-value only; a short bootstrap keeps thousands of tests fast."""
    monkeypatch.setattr("loop.decision.paired_test", partial(paired_test, n_boot=10))


def _scored(b, samples):
    return Scored(b, samples, summarize(b, samples), 1)


def _full_status(tables: dict, alpha: float, k_done: int) -> str:
    champ = {b: _scored(b, c) for b, (c, _) in tables.items()}
    cand = {b: _scored(b, x) for b, (_, x) in tables.items()}
    status, _ = judge(champ, cand, alpha=alpha, k_done=k_done, setting_only=False,
                      objective="benchmark")
    return status


def _rule(tables: dict, alpha: float, k_done: int):
    at = {b: lv for b, (_, lv) in levels(list(tables), alpha=alpha, k_done=k_done).items()}
    return lambda bounds: futile(bounds, at, alpha)


@pytest.mark.parametrize("seed", range(40))
def test_no_completion_of_a_stopped_evaluation_is_accepted_brute_force(seed):
    """Whenever the rule says stop after some units, every way of answering the rest is
    rejected by the full rule (exhaustive over the remaining units' right-answer counts)."""
    rng = random.Random(seed)
    alpha, k_done = rng.choice([0.05, 0.3, 0.5]), rng.choice([0, 1, 3])
    sizes = [rng.randint(1, 2) for _ in range(rng.randint(3, 5))]
    champ = [(m, rng.randint(0, m)) for m in sizes]
    done = rng.randint(1, len(sizes) - 1)
    cand_done = [(m, rng.randint(0, m)) for m in sizes[:done]]
    mmb_champ = [rng.random() < 0.5 for _ in range(4)]
    mmb_done = [rng.random() < 0.5 for _ in range(2)]
    at = {b: lv for b, (_, lv) in levels(["gqa_ru", "mmbench_ru"], alpha=alpha,
                                          k_done=k_done).items()}
    partial = {"gqa_ru": best_case("gqa_ru", _gqa(champ), _gqa(cand_done)),
               "mmbench_ru": best_case("mmbench_ru", _mmb(mmb_champ), _mmb(mmb_done))}
    stop = futile(partial, at, alpha)
    accepted = 0
    for rest in itertools.product(*[range(m + 1) for m in sizes[done:]]):
        for mmb_rest in itertools.product([False, True], repeat=2):
            cand = cand_done + [(m, r) for m, r in zip(sizes[done:], rest)]
            tables = {"gqa_ru": (_gqa(champ), _gqa(cand)),
                      "mmbench_ru": (_mmb(mmb_champ), _mmb(mmb_done + list(mmb_rest)))}
            accepted += _full_status(tables, alpha, k_done) == "accepted"
    if stop:
        assert accepted == 0, stop


def test_the_best_case_p_is_a_lower_bound_of_every_positive_completion():
    rng = random.Random(7)
    for _ in range(300):
        d_done = [rng.randint(-2, 2) for _ in range(rng.randint(0, 4))]
        tops = [rng.randint(0, 3) for _ in range(rng.randint(1, 4))]
        best_p, _ = sign_flip_p(d_done + tops)
        for rest in itertools.product(*[range(-2, t + 1) for t in tops]):
            d = d_done + list(rest)
            if sum(d) > 0:
                assert sign_flip_p(d)[0] >= best_p - 1e-12


def _borderline(rng: random.Random, n_units: int, k_done: int) -> dict:
    """A GQA-ru table the full test just accepts: starting from the champion's answers, random
    images are answered right one at a time until the candidate passes its α_k."""
    champ = [(m, rng.randint(0, m)) for m in (rng.randint(1, 4) for _ in range(n_units))]
    cand = list(champ)
    for u in rng.sample(range(n_units), n_units):
        cand[u] = (cand[u][0], cand[u][0])
        tables = {"gqa_ru": (_gqa(champ), _gqa(cand))}
        if _full_status(tables, 0.05, k_done) == "accepted":
            break
    return tables


def test_replaying_simulated_runs_never_stops_an_accepted_candidate():
    rng = random.Random(0)
    counts = {"accepted": 0, "stopped": 0, "saved": 0, "questions": 0}
    for case in range(400):
        k_done = rng.choice([0, 2, 6, 12])
        kind = case % 4
        if kind == 0:  # borderline: accepted by the last image that made it better
            tables = _borderline(rng, rng.randint(15, 40), k_done)
        elif kind == 1:  # clearly worse
            champ = [(3, rng.randint(1, 3)) for _ in range(30)]
            tables = {"gqa_ru": (_gqa(champ), _gqa([(m, max(0, r - 2)) for m, r in champ]))}
        else:  # both benchmarks, random differences
            g_champ = [(rng.randint(1, 4), 0) for _ in range(rng.randint(10, 30))]
            g_champ = [(m, rng.randint(0, m)) for m, _ in g_champ]
            g_cand = [(m, min(m, max(0, r + rng.choice([-1, 0, 0, 1, 1]))))
                      for m, r in g_champ]
            m_champ = [rng.random() < 0.6 for _ in range(rng.randint(10, 40))]
            m_cand = [c if rng.random() < 0.7 else not c for c in m_champ]
            tables = {"gqa_ru": (_gqa(g_champ), _gqa(g_cand)),
                      "mmbench_ru": (_mmb(m_champ), _mmb(m_cand))}
        status = _full_status(tables, 0.05, k_done)
        out = replay(tables, seed=case, should_stop=_rule(tables, 0.05, k_done),
                     min_questions=4)
        if status == "accepted":
            counts["accepted"] += 1
            assert out["stopped"] is None, (case, out)
        else:
            counts["stopped"] += out["stopped"] is not None
            counts["saved"] += out["n_total"] - out["n_done"]
            counts["questions"] += out["n_total"]
    assert counts["accepted"] >= 20  # the simulation has accepted candidates to lose
    assert counts["stopped"] >= 100 and counts["saved"] > 0.3 * counts["questions"]


def test_a_clearly_worse_candidate_stops_after_its_first_chunks_with_the_reason():
    champ = [(4, 3)] * 40
    tables = {"gqa_ru": (_gqa(champ), _gqa([(4, 0)] * 40))}
    out = replay(tables, seed=0, should_stop=_rule(tables, 0.05, 0), min_questions=8)
    assert out["stopped"].startswith("cannot pass its α_k even if it answers every remaining")
    assert "gqa_ru after 5/40 units" in out["stopped"]
    assert out["n_done"] <= 0.25 * out["n_total"]


def test_chunks_hold_whole_units_in_one_order_for_every_candidate():
    samples = _gqa([(3, 1)] * 20)
    first = chunks("gqa_ru", samples, seed=3, min_questions=5)
    again = chunks("gqa_ru", list(reversed(samples)), seed=3, min_questions=5)
    units = [{s["cluster"] for s in c} for c in first]
    assert units == [{s["cluster"] for s in c} for c in again]
    assert all(not (a & b) for a, b in itertools.combinations(units, 2))
    assert sum(len(c) for c in first) == len(samples) and all(len(c) >= 5 for c in first)


DEMO_RUN = Path(__file__).parent / "data" / "futility_demo_run.json"


def _stored(benchmark: str, questions: list, outcomes: str) -> list[dict]:
    out = []
    for (sample_id, cluster), bit in zip(questions, outcomes):
        s = {"sample_id": sample_id, "cluster": cluster, "correct": bit == "1",
             "correct_normalized": bit == "1", "image_ok": True, "category": "c", "labels": []}
        if benchmark == "mmbench_ru":
            s.update(index=int(sample_id), n_options=2, parsed="A", output="A")
        out.append(s)
    return out


def test_replaying_a_default_demo_runs_evaluations_loses_no_accepted_candidate():
    """Every candidate of a default 5-minute demo run (bench/futility.py --complete --export:
    the stopped ones evaluated in full afterwards), each against the champion it faced at the
    α_k it was tested at: the full test's decision is reproduced, the rule never stops an
    accepted one, and it stops the rejected ones early."""
    run = json.loads(DEMO_RUN.read_text())
    alpha, statuses, done, total = run["alpha"], [], 0, 0
    for c in run["cycles"]:
        tables = {b: (_stored(b, run["questions"][b], c["champion"][b]),
                      _stored(b, run["questions"][b], c["candidate"][b])) for b in c["champion"]}
        champ = {b: _scored(b, t[0]) for b, t in tables.items()}
        cand = {b: _scored(b, t[1]) for b, t in tables.items()}
        full, _ = judge(champ, cand, alpha=alpha, k_done=min(c["k"].values()) - 1,
                        setting_only=False, objective="benchmark")
        assert full == c["full"], c["cycle"]
        out = replay(tables, seed=run["seed"], min_questions=run["min_questions"],
                     should_stop=lambda bounds, at=c["alpha_k"]: futile(bounds, at, alpha))
        if full == "accepted":
            assert out["stopped"] is None, c["cycle"]
        statuses.append(full)
        done, total = done + out["n_done"], total + out["n_total"]
    assert statuses.count("accepted") >= 1 and statuses.count("rejected") >= 5
    assert done < 0.7 * total  # the rule saves at least 30% of the questions
