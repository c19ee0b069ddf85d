"""The report's HTML page and its plots, drawn by hand as inline SVG (no plotting library,
no script, nothing fetched).

Each plot function returns one ``<svg>`` element with a panel per benchmark. Every text in the
page, the SVG included (benchmark and strategy names, error labels, model outputs), comes from
the database and is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

from loop.formatting import wilson_interval

if TYPE_CHECKING:
    from loop.report import Report

PANEL_W, PANEL_H = 420, 250
LEFT, RIGHT, TOP, BOTTOM = 48, 14, 30, 36
LEGEND_H = 26

STATUS_COLORS = {"baseline": "#264653", "accepted": "#2a9d8f", "rejected": "#8d99ae",
                 "failed": "#e63946"}
CHAMPION_COLOR = "#e76f51"
LABEL_COLORS = {"format_mismatch": "#e76f51", "counting": "#f4a261", "color": "#e9c46a",
                "location": "#2a9d8f", "missing_image": "#264653", "other": "#8d99ae"}
EXTRA_COLORS = ("#6d597a", "#b56576", "#355070", "#588157", "#bc6c25", "#4a4e69")


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}" '
            f'font-family="sans-serif" font-size="11">' + "".join(body) + "</svg>")


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>'
            f"{escape(str(text))}</text>")


def _legend(items: list[tuple[str, str, str]], y: float) -> tuple[list[str], float]:
    """One row of (shape, color, label) entries and where it ends; shape is "dot", "ring",
    "dash" or "box"."""
    out, x = [], LEFT
    for shape, color, label in items:
        if shape == "dash":
            out.append(f'<line x1="{x}" y1="{y}" x2="{x + 14}" y2="{y}" stroke="{color}" '
                       'stroke-width="2" stroke-dasharray="4 2"/>')
        elif shape == "box":
            out.append(f'<rect x="{x}" y="{y - 5}" width="12" height="10" fill="{color}"/>')
        else:
            fill = "#fff" if shape == "ring" else color
            out.append(f'<circle cx="{x + 6}" cy="{y}" r="4.5" fill="{fill}" stroke="{color}" '
                       'stroke-width="1.5"/>')
        out.append(_text(x + 18, y + 4, label, "start"))
        x += 26 + 6.5 * len(label)
    return out, x


def _y_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    low = max(0.0, math.floor((min(values) - 0.02) * 10) / 10)
    high = min(1.0, math.ceil((max(values) + 0.02) * 10) / 10)
    return (low, high) if high - low >= 0.1 else (max(0.0, high - 0.2), min(1.0, low + 0.2))


def _axes(x0: float, low: float, high: float, title: str, y_of) -> list[str]:
    step = 0.1 if high - low > 0.3 else 0.05
    out = [_text(x0 + PANEL_W / 2, 16, title, extra=' font-weight="bold" font-size="12"')]
    for i in range(round((high - low) / step) + 1):
        value = low + i * step
        y = y_of(value)
        out.append(f'<line x1="{x0 + LEFT}" y1="{y:.1f}" x2="{x0 + PANEL_W - RIGHT}" '
                   f'y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(_text(x0 + LEFT - 6, y + 4, f"{100 * value:.0f}%", "end"))
    return out


def clean_profile(profile: dict) -> dict[str, dict[str, float]]:
    """``{benchmark: {label: count}}`` from a cycle's error profile, which holds per benchmark
    either that mapping or an ``ErrorProfile.to_dict()`` (whose ``counts`` is used)."""
    out = {}
    for bench, entry in profile.items():
        if isinstance(entry, dict):
            counts = entry["counts"] if isinstance(entry.get("counts"), dict) else entry
            out[bench] = {k: v for k, v in counts.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}
    return out


def dev_points(bench: str, baseline: dict | None, cycles: list[dict]) -> list[dict[str, Any]]:
    """The points of ``dev_accuracy_svg`` for one benchmark: the baseline dev evaluation (when
    the run recorded no cycle 0), then every cycle, with the champion's accuracy so far."""
    points, champion = [], None
    if baseline is not None and not any(c["index"] == 0 for c in cycles):
        m = baseline["metrics"]
        champion = m.get("accuracy")
        ci = m.get("ci") or (wilson_interval(champion, baseline["n"])
                             if champion is not None and baseline["n"] else None)
        points.append({"index": 0, "strategy": "baseline", "status": "baseline",
                       "accuracy": champion, "ci": ci, "champion": champion})
    for c in cycles:
        value = (c["dev"] or {}).get(bench)
        if c["status"] in ("accepted", "baseline") and value is not None:
            champion = value
        points.append({"index": c["index"], "strategy": c["strategy"], "status": c["status"],
                       "accuracy": value, "ci": (c["dev_ci"] or {}).get(bench),
                       "champion": champion})
    return points


def dev_accuracy_svg(series: dict[str, list[dict]]) -> str:
    """Dev accuracy per cycle with 95% interval bars, one panel per benchmark.

    Args:
        series: ``{benchmark: [point, ...]}``; a point has ``index``, ``strategy``,
            ``status`` (baseline, accepted, rejected, failed), ``accuracy`` and ``ci`` (either
            may be None) and ``champion`` (the champion's dev accuracy after this point).
    """
    body = []
    for panel, (bench, points) in enumerate(series.items()):
        x0 = panel * PANEL_W
        values = [v for p in points for v in [p["accuracy"], *(p["ci"] or [])] if v is not None]
        values += [p["champion"] for p in points if p["champion"] is not None]
        low, high = _y_range(values)
        plot_h = PANEL_H - TOP - BOTTOM

        def y_of(v: float, low=low, high=high, plot_h=plot_h) -> float:
            return TOP + plot_h * (1 - (v - low) / (high - low))

        body += _axes(x0, low, high, bench, y_of)
        slot = (PANEL_W - LEFT - RIGHT) / max(1, len(points))
        xs = [x0 + LEFT + slot * (i + 0.5) for i in range(len(points))]
        steps, last_y = [], None
        for x, p in zip(xs, points):
            if p["champion"] is not None:
                if last_y is not None:
                    steps.append(f"{x:.1f},{last_y:.1f}")
                last_y = y_of(p["champion"])
                steps.append(f"{x:.1f},{last_y:.1f}")
        if steps:
            body.append(f'<polyline points="{" ".join(steps)}" fill="none" '
                        f'stroke="{CHAMPION_COLOR}" stroke-width="2" stroke-dasharray="5 3"/>')
        for x, p in zip(xs, points):
            color = STATUS_COLORS.get(p["status"], "#8d99ae")
            body.append(_text(x, PANEL_H - BOTTOM + 16, p["index"]))
            if p["accuracy"] is None:
                body.append(_text(x, PANEL_H - BOTTOM - 6, "×",
                                  extra=f' fill="{color}" font-size="16"'))
                continue
            tip = f"cycle {p['index']} {p['strategy']}: {p['status']}, {100 * p['accuracy']:.1f}%"
            if p["ci"]:
                lo, hi = y_of(p["ci"][0]), y_of(p["ci"][1])
                tip += f" [{100 * p['ci'][0]:.1f}, {100 * p['ci'][1]:.1f}]"
                body.append(f'<path d="M{x - 4:.1f},{lo:.1f}H{x + 4:.1f}M{x:.1f},{lo:.1f}'
                            f'V{hi:.1f}M{x - 4:.1f},{hi:.1f}H{x + 4:.1f}" stroke="{color}"/>')
            fill = "#fff" if p["status"] == "rejected" else color
            body.append(f'<circle cx="{x:.1f}" cy="{y_of(p["accuracy"]):.1f}" r="5" '
                        f'fill="{fill}" stroke="{color}" stroke-width="2">'
                        f"<title>{escape(tip)}</title></circle>")
        body.append(_text(x0 + PANEL_W / 2, PANEL_H - 4, "cycle"))
    legend, end = _legend([("dot", STATUS_COLORS["baseline"], "baseline"),
                           ("dot", STATUS_COLORS["accepted"], "accepted"),
                           ("ring", STATUS_COLORS["rejected"], "rejected"),
                           ("dot", STATUS_COLORS["failed"], "failed (×)"),
                           ("dash", CHAMPION_COLOR, "champion")], PANEL_H + LEGEND_H / 2)
    return _svg(max(PANEL_W * max(1, len(series)), end), PANEL_H + LEGEND_H, body + legend,
                "dev accuracy per cycle with 95% intervals")


def label_colors(labels: list[str]) -> dict[str, str]:
    """A fixed color per known error label, then the extra palette in order."""
    extra = iter(EXTRA_COLORS * (1 + len(labels) // len(EXTRA_COLORS)))
    return {label: LABEL_COLORS.get(label) or next(extra) for label in labels}


def error_shares_svg(bars: list[dict], benchmarks: list[str]) -> str:
    """Stacked bars of error-label shares, one bar per entry, one panel per benchmark.

    Args:
        bars: ``[{"label": "1", "profile": {benchmark: {error_label: count}}}, ...]`` in
            order (for cycles: the champion's error profile when the cycle started).
        benchmarks: the panels, in order.
    """
    found = {lab for b in bars for counts in b["profile"].values() for lab in counts}
    labels = [lab for lab in LABEL_COLORS if lab in found] + sorted(found - set(LABEL_COLORS))
    colors = label_colors(labels)
    plot_h = PANEL_H - TOP - BOTTOM
    body = []
    for panel, bench in enumerate(benchmarks):
        x0 = panel * PANEL_W
        body += _axes(x0, 0.0, 1.0, bench, lambda v: TOP + plot_h * (1 - v))
        slot = (PANEL_W - LEFT - RIGHT) / max(1, len(bars))
        width = min(36.0, slot * 0.7)
        for i, bar in enumerate(bars):
            x = x0 + LEFT + slot * (i + 0.5)
            body.append(_text(x, PANEL_H - BOTTOM + 16, bar["label"]))
            counts = bar["profile"].get(bench) or {}
            total = sum(counts.values())
            y = TOP + plot_h
            for label in labels:
                if not counts.get(label):
                    continue
                h = plot_h * counts[label] / total
                y -= h
                tip = f"{bar['label']}: {label} {counts[label]} ({100 * counts[label] / total:.0f}%)"
                body.append(f'<rect x="{x - width / 2:.1f}" y="{y:.1f}" width="{width:.1f}" '
                            f'height="{h:.1f}" fill="{colors[label]}">'
                            f"<title>{escape(tip)}</title></rect>")
        body.append(_text(x0 + PANEL_W / 2, PANEL_H - 4, "cycle"))
    legend, end = _legend([("box", colors[lab], lab) for lab in labels], PANEL_H + LEGEND_H / 2)
    return _svg(max(PANEL_W * max(1, len(benchmarks)), end), PANEL_H + LEGEND_H, body + legend,
                "error-cause shares over cycles")


CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.text{max-width:340px;white-space:pre-wrap;word-break:break-word}
tr.accepted td{background:#e8f5f2}tr.failed td{background:#fdecee}tr.published td{color:#666}
.note{background:#fff8e5;border-left:4px solid #e9c46a;padding:.4em .8em;margin:.5em 0}
svg{max-width:100%;height:auto;display:block;margin:.5em 0}
"""


def _table(headers: list[str], rows: list[list[Any]], classes: list[str] | None = None,
           text_from: int | None = None) -> str:
    """An HTML table with every cell escaped; columns from ``text_from`` wrap long text."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{escape(classes[i])}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td{" class=text" if text_from is not None and j >= text_from else ""}>'
            f'{escape("" if c is None else str(c))}</td>' for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page: inline CSS and SVG, no script."""
    from loop.report import (
        MANUAL_HEADERS,
        ROLES,
        clip,
        decision_rows,
        error_rows,
        header_lines,
        headline_rows,
        manual_rows,
    )

    run_id = escape(str(report.run["id"]))
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>Run {run_id} report</title><style>{CSS}</style></head><body>",
           f"<h1>Run {run_id}: self-improvement report</h1><ul>",
           *[f"<li>{escape(line)}</li>" for line in header_lines(report)], "</ul>",
           "<h2>Base model vs champion on the held-out final split</h2>"]
    rows = headline_rows(report)
    out.append(_table(["benchmark", "model", "accuracy [95% interval]", "n", "protocol",
                       "vs published"], rows,
                      ["published" if r[5] == "published, for context" else "" for r in rows]))
    details = [f"<li>{escape(b)} {name}: {escape(h[role]['detail'])}</li>"
               for b, h in report.headline.items() for role, name in ROLES
               if h[role] and h[role]["detail"]]
    out += ["<ul>", *details, "</ul>"] if details else []
    out += [f"<p class='note'>{escape(note)}</p>" for note in report.notes]
    if report.benchmarks:
        out += ["<h2>Dev accuracy per cycle</h2>", dev_accuracy_svg(report.dev)]
    if report.error_profiles:
        out += ["<h2>Error causes over cycles</h2><p>Shares of the error labels of the champion "
                "when each cycle started (what the policy saw when it chose).</p>",
                error_shares_svg(report.error_profiles, report.benchmarks)]
    out.append("<h2>Decisions</h2>")
    if report.cycles:
        headers, rows = decision_rows(report)
        out.append(_table(headers, rows, [c["status"] for c in report.cycles],
                          text_from=len(headers) - 1))
    else:
        out.append("<p>No cycle was recorded.</p>")
    if report.manual:
        out += ["<h2>Manual evaluations on held-out questions</h2><p>Measured by "
                "<code>loop eval</code> outside the run; not part of its decisions.</p>",
                _table(MANUAL_HEADERS, manual_rows(report))]
    rows = error_rows(report)
    if rows:
        out += ["<h2>Error causes on the final split</h2><p>Counts of error labels among wrong "
                "answers (an answer can carry several), with their share of the wrong answers."
                "</p>", _table(["benchmark", "label", "base model", "champion"], rows)]
    for bench, a in report.error_analysis.items():
        if "fixed" not in a:
            continue
        out.append(f"<h2>Examples: {escape(bench)}</h2><p>Of {a['paired_n']} paired final answers "
                   f"the champion fixed {a['fixed_n']}, broke {a['broken_n']} and still gets "
                   f"{a['still_wrong_n']} wrong.</p>")
        for kind in ("fixed", "still_wrong"):
            if a[kind]:
                out += [f"<h3>{kind.replace('_', ' ')}</h3>", _table(
                    ["sample", "question", "gold", "base model", "champion"],
                    [[e["sample_id"], clip(e["question"]), clip(e["answer"]), clip(e["before"]),
                      clip(e["after"])] for e in a[kind]], text_from=1)]
    return "\n".join(out + ["</body></html>"]) + "\n"
