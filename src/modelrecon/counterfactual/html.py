"""A self-contained HTML heatmap of a patching sweep: layer x position (tokens on the axis) or layer x head.

Static HTML and inline CSS only (no script, no network): the normalised effect is coloured on a diverging scale
(red: restores the clean answer, blue: pushes the other way), and each cell's tooltip gives value, effect and CI.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from modelrecon.counterfactual.sweep import SweepResult
from modelrecon.files import write_text_atomic

_STYLE = """
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 16px; } .meta { color: #555; margin-bottom: 12px; }
table { border-collapse: collapse; } td { width: 34px; height: 18px; padding: 0; text-align: center;
  font-size: 10px; color: #333; border: 1px solid #fff; }
th { font-weight: normal; font-family: monospace; white-space: pre; padding: 0 4px; }
thead th { writing-mode: vertical-rl; transform: rotate(180deg); height: 90px; text-align: left; }
.legend span { display: inline-block; width: 34px; height: 12px; }
"""


def _colour(effect: float | None, limit: float) -> str:
    if effect is None:
        return "#ddd"
    t = max(-1.0, min(1.0, effect / limit))
    fade = round(255 * (1 - abs(t)))
    return f"rgb(255,{fade},{fade})" if t >= 0 else f"rgb({fade},{fade},255)"


def sweep_html(result: SweepResult) -> str:
    grid = result.effect.numpy()
    limit = max(1.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0)
    by_head = result.cells[0].head is not None
    whole = not by_head and result.cells[0].position is None  # MLP senders of path patching: all positions at once
    if by_head:
        columns, axis = [f"head {h}" for h in range(result.shape[1])], "head"
    elif whole:
        columns, axis = ["all positions"], "all positions"
    else:
        columns, axis = result.tokens, "position (token)"
    rows_html = []
    means = result.to_dict()["results"]
    for layer in range(result.shape[0]):
        cells = []
        for col in range(result.shape[1]):
            k = layer * result.shape[1] + col
            r = means[k]
            where = columns[col] if by_head or whole else f"position {col} {result.tokens[col]!r}"
            if r["effect"] is None:
                tip, text = f"{r['site']} {where}\nvalue {r['value']:.4g}  effect undefined (clean == corrupt)", ""
            else:
                tip = (
                    f"{r['site']} {where}\nvalue {r['value']:.4g}  effect {r['effect']:.3f}  "
                    f"95% CI [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                )
                text = f"{r['effect']:.2f}".replace("-0.00", "0.00")
            cells.append(f'<td style="background:{_colour(r["effect"], limit)}" title="{html.escape(tip)}">{text}</td>')
        rows_html.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    site_kind = result.cells[0].site.split(".", 2)[2]
    what = site_kind if not result.receivers else f"{site_kind}, path to {', '.join(result.receivers)}"
    title = f"{result.direction} patching of {what}: effect on {result.metric}"
    meta = (
        f"rows: layers; columns: {axis}. effect = (patched - corrupt) / (clean - corrupt); "
        f"{result.metric} clean {result.clean:.4g}, corrupt {result.corrupt:.4g}; "
        f"{result.values.shape[0]} pair(s); colour limit ±{limit:.2f}."
    )
    legend = "".join(
        f'<span style="background:{_colour(v, 1.0)}" title="{v:+.1f}"></span>' for v in np.linspace(-1, 1, 9)
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f'<div class="meta">{html.escape(meta)}</div>\n'
        f'<div class="legend">-1 {legend} +1</div>\n'
        f'<table id="sweep"><thead><tr><th></th>{header}</tr></thead><tbody>\n'
        + "\n".join(rows_html)
        + "\n</tbody></table>\n</body></html>\n"
    )


def write_sweep_html(result: SweepResult, out: str | Path) -> Path:
    return write_text_atomic(out, sweep_html(result))
