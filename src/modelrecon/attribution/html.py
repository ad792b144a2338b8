"""Self-contained HTML pages (inline CSS and SVG, no script, no network) for the logit lens and the
causal-vs-correlational report."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from modelrecon.attribution.compare import Comparison
from modelrecon.attribution.lens import LensResult
from modelrecon.files import write_text_atomic

_STYLE = """
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 16px; } .meta { color: #555; margin-bottom: 12px; }
table { border-collapse: collapse; } td, th { padding: 1px 5px; font-family: monospace; white-space: pre; }
td { border: 1px solid #fff; } thead th { text-align: left; }
"""


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def lens_html(lens: LensResult) -> str:
    header = "".join(f"<th>{html.escape(t)}</th>" for t in lens.tokens)
    rows = []
    for r, name in enumerate(lens.rows):
        cells = []
        for p in range(len(lens.tokens)):
            prob = float(lens.top_probs[r, p, 0])
            tip = "\n".join(
                f"{t!r} {float(q):.3f}" for t, q in zip(lens.top_tokens[r][p], lens.top_probs[r, p], strict=True)
            )
            if lens.target is not None:
                tip += f"\n{lens.target!r}: p={float(lens.target_probs[r, p]):.3g}, rank {int(lens.target_ranks[r, p])}"
            shade = round(255 * (1 - prob))
            cells.append(
                f'<td style="background:rgb({shade},{shade},255);color:{"#fff" if prob > 0.6 else "#000"}" '
                f'title="{html.escape(tip)}">{html.escape(lens.top_tokens[r][p][0])}</td>'
            )
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    meta = "Top next token after each position, read off the residual stream after each layer (hover for the top-k)."
    if lens.target is not None:
        meta += f" Target {lens.target!r}, hover for its probability and rank."
    table = f"<table><thead><tr><th></th>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return _page(f"logit lens: {lens.prompt}", f'<div class="meta">{html.escape(meta)}</div>{table}')


def write_lens_html(lens: LensResult, out: str | Path) -> Path:
    return write_text_atomic(out, lens_html(lens))


def _scatter(comparison: Comparison, size: int = 360, pad: int = 40) -> str:
    est, ex = np.array(comparison.estimate, float), np.array(comparison.exact, float)
    keep = np.isfinite(est) & np.isfinite(ex)
    lo = float(min(est[keep].min(), ex[keep].min(), 0.0)) if keep.any() else 0.0
    hi = float(max(est[keep].max(), ex[keep].max(), 1.0)) if keep.any() else 1.0

    def x(v):
        return pad + (v - lo) / (hi - lo) * (size - 2 * pad)

    def y(v):
        return size - pad - (v - lo) / (hi - lo) * (size - 2 * pad)

    flagged = {(d.site, d.position, d.head) for d in comparison.disagreements}
    dots = []
    for k, cell in enumerate(comparison.cells):
        if not keep[k]:
            continue
        bad = (cell["site"], cell["position"], cell["head"]) in flagged
        where = cell["site"] + (f" head {cell['head']}" if cell["head"] is not None else f" pos {cell['position']}")
        dots.append(
            f'<circle cx="{x(ex[k]):.1f}" cy="{y(est[k]):.1f}" r="3" fill="{"#d33" if bad else "#36c"}" '
            f'fill-opacity="0.7"><title>{html.escape(where)}: exact {ex[k]:.3f}, estimate {est[k]:.3f}</title></circle>'
        )
    return (
        f'<svg width="{size}" height="{size}" style="border:1px solid #ccc">'
        f'<line x1="{x(lo)}" y1="{y(lo)}" x2="{x(hi)}" y2="{y(hi)}" stroke="#aaa" stroke-dasharray="4"/>'
        f'<text x="{x(lo)}" y="{size - pad + 14}" text-anchor="middle">{lo:.2f}</text>'
        f'<text x="{x(hi)}" y="{size - pad + 14}" text-anchor="middle">{hi:.2f}</text>'
        f'<text x="{pad - 4}" y="{y(lo)}" text-anchor="end">{lo:.2f}</text>'
        f'<text x="{pad - 4}" y="{y(hi) + 4}" text-anchor="end">{hi:.2f}</text>'
        f'<text x="{size / 2}" y="{size - 6}" text-anchor="middle">exact patching effect</text>'
        f'<text x="12" y="{size / 2}" transform="rotate(-90 12 {size / 2})" text-anchor="middle">'
        f"{html.escape(comparison.method)} estimate</text>{''.join(dots)}</svg>"
    )


def verify_html(comparison: Comparison) -> str:
    meta = (
        f"{comparison.n_cells} cells of the {comparison.kind} sweep; Spearman {comparison.spearman:.3f}, Kendall "
        f"{comparison.kendall:.3f}, Pearson {comparison.pearson:.3f}. Red: cells where the estimate and the exact "
        f"effect disagree (sign flip, or a gap above {comparison.gap_threshold}). The dashed line is agreement."
    )
    rows = "".join(
        f"<tr><td>{html.escape(d.site)}</td><td>{'' if d.position is None else d.position}</td>"
        f"<td>{'' if d.head is None else d.head}</td><td>{d.estimate:.3f}</td><td>{d.exact:.3f}</td>"
        f"<td>{d.kind}</td></tr>"
        for d in comparison.disagreements
    )
    table = (
        "<h2 style='font-size:14px'>disagreements</h2><table><thead><tr><th>site</th><th>position</th><th>head</th>"
        f"<th>estimate</th><th>exact</th><th>kind</th></tr></thead><tbody>{rows or '<tr><td>none</td></tr>'}"
        "</tbody></table>"
    )
    title = f"{comparison.method} vs exact patching ({comparison.kind})"
    return _page(title, f'<div class="meta">{html.escape(meta)}</div>{_scatter(comparison)}{table}')


def write_verify_html(comparison: Comparison, out: str | Path) -> Path:
    return write_text_atomic(out, verify_html(comparison))
