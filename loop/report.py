"""The run report: what was measured, what was decided and why.

``build_report`` gathers one run from the store into a ``Report`` (plain, JSON-ready data);
``write_report`` renders it as Markdown and as one self-contained HTML page (inline CSS and
hand-drawn SVG, no script, nothing fetched). Every text that comes from the database, model
outputs above all, is escaped in both: it is untrusted.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.exceptions import UserError
from loop.formatting import (
    benchmarks_of,
    compare,
    format_duration,
    format_p,
    format_pct,
    wilson_interval,
)
from loop.report_plots import clean_profile, dev_points

if TYPE_CHECKING:
    from loop.store import Store

log = logging.getLogger(__name__)

_CARD = "LLaVA-Saiga-8B model card (deepvk/llava-saiga-8b)"
PUBLISHED = {
    "gqa_ru": {"accuracy": 0.5144, "protocol": "gqa-ru exact match (lmms-eval gqa-ru)",
               "source": _CARD},
    "mmbench_ru": {"accuracy": 0.5665, "protocol": "mmbench-ru circular (lmms-eval "
                   "mmbench_ru_dev)", "source": _CARD},
}
LMMS_MARK = "lmms-eval prompt and decoding"
EXAMPLES = 8
MANUAL_HEADERS = ["eval", "adapter", "benchmark", "split", "accuracy [95% interval]", "n",
                  "protocol", "questions"]
ROLES = (("baseline", "base model"), ("champion", "champion's adapter"),
         ("deployed", "champion with its settings (deployment)"))
RUN_KEYS = {"baseline": "baseline", "champion": "final", "deployed": "final_deployed"}
UNPARSEABLE_NOTE = ("MMBench-ru: n counts question groups, each right only if every rotated "
                    "copy is. Answers are read by lmms-eval's own rule (MMBench_Evaluator."
                    "can_infer). Where that rule reads no letter, lmms-eval asks a GPT judge "
                    "and draws a random letter when the judge fails; this project counts those "
                    "answers wrong, so on the same outputs its number is at most lmms-eval's. "
                    "Each MMBench-ru number says how many answers that was, and gives the same "
                    "outputs' score under a lenient Russian-aware reading (Cyrillic letters, "
                    "**B**, «Ответ: B», option texts), which is not lmms-eval's.")
MANUAL_NOTE = ("Some of this run's adapters were also measured by hand on held-out questions "
               "(`loop eval --split final` or `--split all`, listed under 'Manual evaluations'). "
               "Those numbers fed no decision of the run, but an adapter chosen among several by "
               "them was chosen on the final split, which then no longer measures it without "
               "bias.")
DEMO_NOTE = ("This run used the demo preset: a tiny model on a synthetic Russian world. Its "
             "numbers show that the loop works end to end; they are not comparable with the "
             "published scores at all.")


@dataclass
class Report:
    """Everything the report shows about one run, as plain JSON-ready data.

    Attributes:
        run: The run row (id, status, preset, gpu, budget_s, spent_s, config, environment...).
        benchmarks: The benchmarks found in the run, known ones first.
        headline: Per benchmark: ``baseline``, ``champion`` (its adapter under the lmms-eval
            protocol) and ``deployed`` (with the settings it carries) measures on the
            ``final`` split (accuracy, n, ci, protocol, split, adapter_id, detail, comparable
            and a comparability note; None when not measured), ``final_p`` (the paired test
            of champion against base) and ``published`` (accuracy, protocol, source).
        dev: Per benchmark, the dev points per cycle (index, strategy, status, accuracy, ci,
            champion) for the accuracy plot.
        error_profiles: ``[{"label", "profile": {benchmark: {error_label: count}}}]``, the
            champion's error profile when each cycle started.
        cycles: The run's cycles as stored (the decisions table).
        error_analysis: Per benchmark: error label counts of the base model and the champion
            on ``final``, and examples of fixed and still-wrong answers.
        notes: Caveats in words.
        manual: ``loop eval`` measurements of this run's adapters on its final split (or on
            all of the data, which contains it), made by hand outside the run's decisions:
            eval id, adapter, benchmark, split, accuracy, ci, n, protocol, seed, when.
    """

    run: dict[str, Any]
    benchmarks: list[str]
    headline: dict[str, dict[str, Any]]
    dev: dict[str, list[dict[str, Any]]]
    error_profiles: list[dict[str, Any]]
    cycles: list[dict[str, Any]]
    error_analysis: dict[str, dict[str, Any]]
    notes: list[str]
    manual: list[dict[str, Any]] = field(default_factory=list)


def build_report(store: Store, run_id: int | None = None) -> Report:
    """Gather one run (the latest by default) from the store."""
    run = store.get_run(run_id) if run_id is not None else store.latest_run()
    if run is None:
        raise UserError(f"{store.path} has no runs yet; start one with "
                        "`python -m loop run --budget 6h --gpu t4`.")
    cycles = store.cycles(run["id"])
    # The latest evaluation per benchmark wins (evaluations come oldest first).
    dev_base = {e["benchmark"]: e for e in store.evaluations(run["id"], role="baseline")}
    finals = {role: {e["benchmark"]: e for e in store.evaluations(
        run["id"], role=f"final_{role}", split="final")} for role, _ in ROLES}
    benches = benchmarks_of([run["final"] or {}, run["baseline"] or {}, dev_base,
                             *finals.values(), *[c["dev"] or {} for c in cycles]])
    demo = run["preset"] in ("demo", "saiga-tiny")
    headline, analysis = {}, {}
    for bench in benches:
        headline[bench] = {role: _measure(finals[role].get(bench), run, role, bench, demo)
                           for role, _ in ROLES}
        headline[bench]["final_p"] = (run.get("final_p") or {}).get(bench)
        headline[bench]["published"] = PUBLISHED.get(bench)
        preds = {role: store.predictions(evs[bench]["id"]) for role, evs in finals.items()
                 if bench in evs}
        analysis[bench] = {role: _error_counts(preds[role]) for role in ("baseline", "champion")
                           if role in preds}
        if "baseline" in preds and "champion" in preds:
            analysis[bench].update(compare(preds["baseline"], preds["champion"], EXAMPLES))
    profiles = [{"label": str(c["index"]), "profile": clean_profile(c["error_profile"])}
                for c in cycles if c["error_profile"]]
    if not profiles and dev_base:
        profiles = [{"label": "baseline", "profile": {
            b: _error_counts(store.predictions(e["id"]))["counts"] for b, e in dev_base.items()}}]
    notes = [DEMO_NOTE] if demo else []
    if any(m and m["comparability"] == "different protocol"
           for h in headline.values() for m in (h["baseline"], h["champion"], h["deployed"])):
        notes.append("A number marked 'different protocol' was measured with a prompt, decoding "
                     "or scoring other than lmms-eval's, so it cannot be set against the "
                     "published score; the protocol is named next to every number.")
    if "mmbench_ru" in benches:
        notes.append(UNPARSEABLE_NOTE)
    notes.append("Every decision was taken on the dev split (per-cycle subsets, a paired test "
                 "against the champion on the same questions); the final split was touched once, "
                 "at the end, and fed no decision. Intervals are 95%.")
    manual = manual_finals(store, run)
    if manual:
        notes.append(MANUAL_NOTE)
    return Report(run=run, benchmarks=benches, headline=headline,
                  dev={b: dev_points(b, dev_base.get(b), cycles) for b in benches},
                  error_profiles=profiles, cycles=cycles, error_analysis=analysis, notes=notes,
                  manual=manual)


def manual_finals(store: Store, run: dict) -> list[dict[str, Any]]:
    """``loop eval`` results of this run's adapters on the final split (or on all the data,
    which holds it), oldest first: the held-out questions were looked at by hand."""
    adapters = {a["id"]: a for a in store.adapters(run["id"])}
    by_path = {str(Path(a["path"]).resolve()): i for i, a in adapters.items()}
    seed = (run.get("config") or {}).get("seed")
    out = []
    for ev in store.evaluations(role="manual"):
        if ev["split"] not in ("final", "all"):
            continue
        cand = ev["candidate"] or {}
        path = cand.get("adapter_path")
        adapter_id = ev["adapter_id"] if ev["adapter_id"] in adapters else (
            by_path.get(str(Path(path).resolve())) if path else None)
        if adapter_id is None:
            continue
        m = ev["metrics"] or {}
        out.append({"eval_id": ev["id"], "adapter_id": adapter_id, "benchmark": ev["benchmark"],
                    "split": ev["split"], "accuracy": m.get("accuracy"), "ci": m.get("ci"),
                    "n": m.get("n", ev["n"]), "protocol": ev["protocol"],
                    "seed": cand.get("seed"), "same_questions": ev["split"] == "final"
                    and cand.get("seed") == seed and cand.get("limit") is None,
                    "created_at": ev["created_at"]})
    return out


def manual_rows(report: Report) -> list[list[str]]:
    """Rows of (eval, adapter, benchmark, split, accuracy [CI], n, protocol, questions)."""
    return [[str(m["eval_id"]), str(m["adapter_id"]), m["benchmark"], m["split"],
             format_pct(m["accuracy"], m["ci"]), str(m["n"]), m["protocol"] or "not recorded",
             "the run's final split" if m["same_questions"] else
             f"other questions (split {m['split']}, seed {m['seed']})"] for m in report.manual]


def _measure(ev: dict | None, run: dict, role: str, bench: str,
             demo: bool) -> dict[str, Any] | None:
    """A headline number from its evaluation, or from the run row when no evaluation exists,
    with whether it shares the published score's protocol."""
    if ev is None:
        value = (run.get(RUN_KEYS[role]) or {}).get(bench)
        n = (run["final_n"] or {}).get(bench)
        if value is None:
            return None
        return {"accuracy": value, "n": n, "ci": list(wilson_interval(value, n)) if n else None,
                "protocol": None, "split": "final", "adapter_id": None, "detail": "",
                **_comparability(None, demo)}
    m = ev["metrics"]
    n = m.get("n", ev["n"])
    ci = m.get("ci") or (list(wilson_interval(m["accuracy"], n)) if n else None)
    detail = ""
    if "accuracy_normalized" in m:
        detail = f"Russian-aware match {format_pct(m['accuracy_normalized'], m.get('ci_normalized'))}"
    elif "per_row" in m:
        detail = (f"per row {format_pct(m['per_row'], m.get('ci_per_row'))} of "
                  f"{m.get('n_rows')} rows, {m.get('unparseable', 0)} answers unread by the "
                  "lmms-eval rule (counted wrong)")
        if m.get("accuracy_lenient") is not None:
            detail += (f"; lenient reading (not the lmms-eval rule): "
                       f"{format_pct(m['accuracy_lenient'])} circular, "
                       f"{m.get('unparseable_lenient', 0)} unread")
    return {"accuracy": m["accuracy"], "n": n, "ci": ci, "protocol": ev["protocol"],
            "split": ev["split"], "adapter_id": ev["adapter_id"], "detail": detail,
            **_comparability(ev["protocol"], demo)}


def _comparability(protocol: str | None, demo: bool) -> dict[str, Any]:
    """Whether a number shares the published score's protocol (lmms-eval's), in words too."""
    comparable = not demo and protocol is not None and LMMS_MARK in protocol
    if demo:
        note = "not comparable: synthetic demo world"
    elif protocol is None:
        note = "protocol not recorded"
    else:
        note = "same protocol as the published score" if comparable else "different protocol"
    return {"comparable": comparable, "comparability": note}


def _error_counts(predictions: list[dict]) -> dict[str, Any]:
    """How many answers are wrong and how often each error label occurs among them."""
    wrong = [p for p in predictions if not p["correct"]]
    counts = Counter(label for p in wrong for label in p["labels"] or ["unlabelled"])
    return {"n": len(predictions), "wrong": len(wrong), "counts": dict(counts.most_common()),
            "shares": {k: v / len(wrong) for k, v in counts.most_common()}}


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html``; returns their paths.

    Args:
        report: What ``build_report`` gathered.
        out: The Markdown path (the HTML goes beside it with the ``.html`` suffix), or a
            folder that receives ``report.md`` and ``report.html``.
    """
    from loop.report_plots import render_html

    out = Path(out)
    md_path = out.with_suffix(".md") if out.suffix in (".md", ".html") else out / "report.md"
    html_path = md_path.with_suffix(".html")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(render_markdown(report), encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    log.info("report of run %s written to %s and %s", report.run["id"], md_path, html_path)
    return md_path, html_path


def header_lines(report: Report) -> list[str]:
    """The run at a glance: status, preset, GPU profile, budget, environment."""
    run = report.run
    lines = [f"status {run['status']}, preset {run['preset']}, GPU profile {run['gpu']}",
             f"budget {format_duration(run['budget_s'])}, spent {format_duration(run['spent_s'])}"
             f", started {run['started_at']}, finished {run['finished_at'] or '-'}",
             f"objective {(run.get('config') or {}).get('objective', 'benchmark')}: "
             + ("only adapters could win (judged by the exact lmms-eval protocol)"
                if (run.get("config") or {}).get("objective", "benchmark") == "benchmark"
                else "prompt and decoding settings were part of the candidates")]
    if run.get("final_p"):
        lines.append("champion vs base on the final split, cluster-aware paired test: " + ", ".join(
            f"{b} p={format_p(p)} (n={(run.get('final_n') or {}).get(b, '-')})"
            for b, p in run["final_p"].items()))
    for key, value in (run["environment"] or {}).items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        lines.append(clip(f"{key}: {value}", 240))
    return lines


def headline_rows(report: Report) -> list[list[str]]:
    """Rows of (benchmark, model, accuracy [CI], n, protocol, comparability) per benchmark."""
    rows = []
    for bench, h in report.headline.items():
        for role, name in ROLES:
            m = h[role]
            if m is None and role == "deployed":
                continue
            if m is None:
                rows.append([bench, name, "not measured", "-", "-", ""])
                continue
            rows.append([bench, name, format_pct(m["accuracy"], m["ci"]), str(m["n"] or "-"),
                         m["protocol"] or "not recorded", m["comparability"]])
        if h["published"]:
            pub = h["published"]
            rows.append([bench, pub["source"], f"{100 * pub['accuracy']:.2f}%", "-",
                         pub["protocol"], "published, for context"])
    return rows


def decision_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the decisions table."""
    benches = report.benchmarks
    headers = ["cycle", "strategy", "status", *[f"{b} dev" for b in benches],
               *[f"p {b}" for b in benches], "duration", "rationale"]
    rows = []
    for c in report.cycles:
        dev, ci, paired = c["dev"] or {}, c["dev_ci"] or {}, c["paired"] or {}
        why = (c["rationale"] or "") + (f" (error: {c['error']})" if c["error"] else "")
        rows.append([str(c["index"]), c["strategy"], c["status"],
                     *[format_pct(dev.get(b), ci.get(b)) for b in benches],
                     *[format_p((paired.get(b) or {}).get("p_value")) for b in benches],
                     format_duration(c["duration_s"]), why])
    return headers, rows


def error_rows(report: Report) -> list[list[str]]:
    """Rows of (benchmark, label, base model count (share), champion count (share))."""
    rows = []
    for bench, a in report.error_analysis.items():
        labels = list(dict.fromkeys([*a.get("baseline", {}).get("counts", {}),
                                     *a.get("champion", {}).get("counts", {})]))
        for label in labels:
            cells = []
            for role in ("baseline", "champion"):
                counts = a.get(role) or {"counts": {}, "shares": {}}
                n = counts["counts"].get(label, 0)
                cells.append(f"{n} ({100 * counts['shares'].get(label, 0):.0f}%)")
            rows.append([bench, label, *cells])
    return rows


def clip(text: Any, width: int = 300) -> str:
    """One line of at most ``width`` characters."""
    text = " ".join(str("" if text is None else text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def md_cell(text: Any, width: int = 300) -> str:
    """One line of Markdown-safe text: clipped, HTML-escaped, pipes escaped."""
    return html.escape(clip(text, width), quote=False).replace("|", "\\|")


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
             "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]


def render_markdown(report: Report) -> str:
    """The report as Markdown (plots are in the HTML page)."""
    out = [f"# Run {report.run['id']}: self-improvement report", ""]
    out += [f"- {md_cell(line)}" for line in header_lines(report)]
    out += ["", "## Base model vs champion on the held-out final split", ""]
    out += _md_table(["benchmark", "model", "accuracy [95% interval]", "n", "protocol",
                      "vs published"], headline_rows(report))
    out += [""] + [f"- {md_cell(b)} {name}: {md_cell(h[role]['detail'])}"
                   for b, h in report.headline.items() for role, name in ROLES
                   if h[role] and h[role]["detail"]]
    out += ["", *[f"> {md_cell(note, 1000)}\n" for note in report.notes]]
    out += ["## Decisions", "", "Plots of dev accuracy and error causes per cycle are in the "
            "HTML report.", ""]
    if report.cycles:
        out += _md_table(*decision_rows(report))
    else:
        out.append("No cycle was recorded.")
    if report.manual:
        out += ["", "## Manual evaluations on held-out questions", "",
                "Measured by `loop eval` outside the run, after or while it ran; not part of its "
                "decisions.", ""]
        out += _md_table(MANUAL_HEADERS, manual_rows(report))
    rows = error_rows(report)
    if rows:
        out += ["", "## Error causes on the final split", "", "Counts of error labels among wrong "
                "answers (an answer can carry several), with their share of the wrong answers.", ""]
        out += _md_table(["benchmark", "label", "base model", "champion"], rows)
    for bench, a in report.error_analysis.items():
        if "fixed" not in a:
            continue
        out += ["", f"## Examples: {md_cell(bench)}", "",
                f"Of {a['paired_n']} paired final answers the champion fixed {a['fixed_n']}, broke "
                f"{a['broken_n']} and still gets {a['still_wrong_n']} wrong.", ""]
        for kind in ("fixed", "still_wrong"):
            if a[kind]:
                out += [f"**{kind.replace('_', ' ')}**", ""]
                out += _md_table(["sample", "question", "gold", "base model", "champion"],
                                 [[e["sample_id"], e["question"], e["answer"], e["before"],
                                   e["after"]] for e in a[kind]]) + [""]
    return "\n".join(out).rstrip() + "\n"
