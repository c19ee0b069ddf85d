"""``loop compare``'s page: a ``Comparison`` as Markdown or as one self-contained HTML page.

Every text from the databases (questions, model outputs) is escaped in both: it is untrusted.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from loop.compare import SIDES, Comparison
from loop.formatting import format_duration, format_p, format_pct
from loop.report import clip, md_cell
from loop.report_plots import CSS, _table

SCORE_HEADERS = ["benchmark", "run", "base model", "champion", "champion − base",
                 "p (champion vs base)", "n", "protocol"]
DECISION_HEADERS = ["cycle", *[f"{h} (run {s})" for s in SIDES
                               for h in ("strategy", "status", "p", "reason")]]
EXAMPLE_HEADERS = ["id", "question", "gold", "run A: base → champion", "run B: base → champion"]


def run_lines(c: Comparison) -> list[str]:
    """One line per run: where it is and how it was set up."""
    return [f"run {s}: run {r['id']} of {r['db']}, status {r['status']}, preset {r['preset']}, "
            f"model {r['model']}, seed {r['seed']}, objective {r['objective']}, GPU profile "
            f"{r['gpu']}, budget {format_duration(r['budget_s'])}, spent "
            f"{format_duration(r['spent_s'])}" for s, r in c.runs.items()]


def score_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for bench, sides in c.scores.items():
        for s, m in sides.items():
            base, champ = m["baseline"], m["champion"]
            diff = (f"{100 * (champ['accuracy'] - base['accuracy']):+.1f} pts"
                    if base and champ else "-")
            rows.append([bench, f"{s}: run {c.runs[s]['id']}",
                         format_pct(base["accuracy"], base["ci"]) if base else "not measured",
                         format_pct(champ["accuracy"], champ["ci"]) if champ else "not measured",
                         diff, format_p(m["final_p"]), str((champ or base or {}).get("n") or "-"),
                         (champ or base or {}).get("protocol") or "-"])
    return rows


def paired_line(bench: str, c: Comparison) -> str:
    """The paired test of the two champions in one sentence, or why there is none."""
    t, shared = c.paired[bench], c.shared[bench]
    if t is None:
        return f"{bench}: no paired test: {shared['why']}."
    units = f"{t['n']} shared final {t['unit']}s"
    if t["clustered_by"]:
        units += f" on {t['n_clusters']} {t['clustered_by']}s"
    return (f"{bench}: {units}; champion A {100 * t['baseline_acc']:.1f}%, champion B "
            f"{100 * t['candidate_acc']:.1f}%, B − A {100 * t['diff']:+.1f} pts "
            f"[{100 * t['diff_low']:+.1f}, {100 * t['diff_high']:+.1f}], p {_p(t['p_value'])}"
            f" (cluster sign-flip, {t['method']}); right only under B: {t['c_only']}, right only "
            f"under A: {t['b_only']}." + (f" Note: {shared['why']}." if shared["why"] else ""))


def _p(p: float) -> str:
    """``= 0.12`` or ``< 0.001``."""
    text = format_p(p)
    return f"< {text[1:]}" if text.startswith("<") else f"= {text}"


def fixed_line(bench: str, c: Comparison) -> str:
    f = c.fixed[bench]
    unit = c.paired[bench]["unit"]
    return (f"{bench}: of {f['n']} shared {unit}s (fixed = wrong under the run's own base model, "
            f"right under its champion), fixed by both {f['both']}, only by run A {f['only_a']}, "
            f"only by run B {f['only_b']}.")


def example_rows(examples: list[dict[str, Any]]) -> list[list[str]]:
    return [[e["id"], e["question"], e["answer"],
             f"{clip(e['A_baseline'], 60)} → {clip(e['A_champion'], 60)}",
             f"{clip(e['B_baseline'], 60)} → {clip(e['B_champion'], 60)}"] for e in examples]


def decision_rows(c: Comparison) -> list[list[str]]:
    rows = []
    for row in c.decisions:
        cells = [str(row["cycle"])]
        for s in SIDES:
            d = row[s]
            if d is None:
                cells += ["-", "-", "-", "-"]
                continue
            p = ", ".join(f"{b} {format_p(v)}" + (f" (α {d['alpha'][b]:.3g})"
                                                  if d["alpha"].get(b) is not None else "")
                          for b, v in d["p"].items()) or "-"
            cells += [d["strategy"], d["status"], p, d["reason"]]
        rows.append(cells)
    return rows


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(md_cell(x) for x in row) + " |" for row in rows]


def _title(c: Comparison) -> str:
    return f"Run {c.runs['A']['id']} (A) vs run {c.runs['B']['id']} (B)"


def render_markdown(c: Comparison) -> str:
    out = [f"# {_title(c)}", "", *[f"- {md_cell(line, 1000)}" for line in run_lines(c)], "",
           "## Final scores (held-out final split, exact lmms-eval protocol)", ""]
    out += _md_table(SCORE_HEADERS, score_rows(c))
    out += ["", "## Paired test of the two champions on the final questions both answered", ""]
    out += [f"- {md_cell(paired_line(b, c), 2000)}" for b in c.benchmarks]
    out += ["", "## Questions one run fixed and the other did not", ""]
    for bench in c.benchmarks:
        if c.fixed[bench] is None:
            out += [f"- {md_cell(bench)}: nothing to compare (no shared final questions).", ""]
            continue
        out += [f"- {md_cell(fixed_line(bench, c), 1000)}", ""]
        for s in SIDES:
            shown = c.fixed[bench][f"examples_only_{s.lower()}"]
            if shown:
                out += [f"Fixed only by run {s} ({len(shown)} of "
                        f"{c.fixed[bench][f'only_{s.lower()}']} shown):", ""]
                out += _md_table(EXAMPLE_HEADERS, example_rows(shown)) + [""]
    out += ["## Decision paths", ""]
    out += _md_table(DECISION_HEADERS, decision_rows(c)) if c.decisions else ["No cycles."]
    out += ["", *[f"> {md_cell(note, 1000)}\n" for note in c.notes]]
    return "\n".join(out).rstrip() + "\n"


def render_html(c: Comparison) -> str:
    title = escape(_title(c))
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
           f"<style>{CSS}</style></head><body><h1>{title}</h1><ul>",
           *[f"<li>{escape(line)}</li>" for line in run_lines(c)], "</ul>",
           "<h2>Final scores (held-out final split, exact lmms-eval protocol)</h2>",
           _table(SCORE_HEADERS, score_rows(c)),
           "<h2>Paired test of the two champions on the final questions both answered</h2><ul>",
           *[f"<li>{escape(paired_line(b, c))}</li>" for b in c.benchmarks], "</ul>",
           "<h2>Questions one run fixed and the other did not</h2>"]
    for bench in c.benchmarks:
        if c.fixed[bench] is None:
            out.append(f"<p>{escape(bench)}: nothing to compare (no shared final questions).</p>")
            continue
        out.append(f"<p>{escape(fixed_line(bench, c))}</p>")
        for s in SIDES:
            shown = c.fixed[bench][f"examples_only_{s.lower()}"]
            if shown:
                out += [f"<h3>{escape(bench)}: fixed only by run {s} ({len(shown)} of "
                        f"{c.fixed[bench][f'only_{s.lower()}']} shown)</h3>",
                        _table(EXAMPLE_HEADERS, example_rows(shown), text_from=1)]
    out.append("<h2>Decision paths</h2>")
    out.append(_table(DECISION_HEADERS, decision_rows(c), text_from=1) if c.decisions
               else "<p>No cycles.</p>")
    out += [f"<p class='note'>{escape(note)}</p>" for note in c.notes]
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_page(c: Comparison, out: Path) -> Path:
    """Write the page: HTML when ``out`` ends with .html, Markdown otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(c) if out.suffix == ".html" else render_markdown(c)
    out.write_text(text, encoding="utf-8")
    return out
