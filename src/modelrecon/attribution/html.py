"""A self-contained HTML page (inline CSS, no script, no network) for the logit lens. (Patching sweeps and the
causal-vs-correlational report are views of the viewer, `modelrecon.web`.)"""

from __future__ import annotations

import html
from pathlib import Path

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
