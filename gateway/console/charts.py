"""Bar charts as inline SVG, drawn on the server: no charting library, no script, nothing fetched;
every chart sits above the table that holds its figures (the fallback a screen reader reads)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, BAR, GAP, LABEL = 760, 22, 8, 170


def bars(title: str, rows: Sequence[tuple[str, float]], unit: str = "",
         caps: dict[str, float] | None = None, thresholds: Sequence[int] = ()) -> Markup:
    """Horizontal bars, one per row. Without `caps` they share one scale (the largest value). With
    `caps`, each row is drawn against its own cap (a dark tick; its thresholds, percent of the cap,
    light ticks), so a small team's cap reads as plainly as a large one's."""
    caps = caps or {}
    span = WIDTH - LABEL - 230
    height = len(rows) * (BAR + GAP) + GAP
    top_all = max([v for _, v in rows] + [1.0])
    out = [f'<svg role="img" aria-label="{escape(title)}" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" xmlns="http://www.w3.org/2000/svg">', f"<title>{escape(title)}</title>"]
    for i, (label, value) in enumerate(rows):
        y = GAP + i * (BAR + GAP)
        cap = caps.get(label)
        top = max(value, cap * 1.05) if cap else top_all  # a row over its cap still fits
        w = max(1.0, span * value / top) if value > 0 else 0.0
        text = f"{value:,.0f}{unit}" + (f" of {cap:,.0f}{unit} ({100 * value / cap:.1f}%)" if cap else "")
        out.append(f'<text x="{LABEL - 8}" y="{y + BAR - 6}" text-anchor="end" class="lbl">{escape(label)}</text>')
        out.append(f'<rect x="{LABEL}" y="{y}" width="{w:.1f}" height="{BAR}" class="bar"/>')
        out.append(f'<text x="{LABEL + w + 6:.1f}" y="{y + BAR - 6}" class="val">{escape(text)}</text>')
        if cap:
            for pct in thresholds:
                x = LABEL + span * cap * pct / 100 / top
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 2}" y2="{y + BAR + 2}" class="threshold"/>')
            x = LABEL + span * cap / top
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 3}" y2="{y + BAR + 3}" class="cap"/>')
    out.append("</svg>")
    return Markup("".join(out))
