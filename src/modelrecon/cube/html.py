"""A self-contained, offline HTML view of one prompt of a cube: token × layer heatmap and a per-token line."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from modelrecon.cube import layout
from modelrecon.cube.reader import Cube
from modelrecon.errors import CubeError
from modelrecon.files import atomic_target

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 16px; } .meta { color: #666; margin-bottom: 12px; }
#heat { border-collapse: collapse; } #heat td { width: 22px; height: 16px; padding: 0; }
#heat th { font-weight: normal; font-family: monospace; white-space: pre; padding: 0 4px; }
#heat thead th { writing-mode: vertical-rl; transform: rotate(180deg); height: 80px; text-align: left; }
#heat thead th.sel { background: #ffe08a; }
#heat td.sel { box-shadow: inset 1px 0 0 #000, inset -1px 0 0 #000; }
#tip { position: fixed; background: #fff; border: 1px solid #999; padding: 2px 6px; pointer-events: none;
       display: none; font-family: monospace; }
#line { margin-top: 16px; }
</style></head><body>
<h1>__TITLE__</h1>
<div class="meta">__META__</div>
<label>colour scale <select id="scale"><option value="log">log</option><option value="linear">linear</option>
<option value="layer">per layer</option></select></label>
<table id="heat"><thead></thead><tbody></tbody></table>
<div id="tip"></div>
<h2 style="font-size:14px">per-token <span id="metric-name"></span> across layers: <code id="line-token"></code></h2>
<svg id="line" width="640" height="220"></svg>
<script id="cube-data" type="application/json">__DATA__</script>
<script>
const D = JSON.parse(document.getElementById("cube-data").textContent);
// Colour: log scale by default (one token, often the first, can be 100x larger than the rest), linear, or
// normalised within each layer.
const scaleSelect = document.getElementById("scale");
const allValues = D.values.flat().filter(v => v !== null);
if (Math.min(...allValues) <= 0) scaleSelect.value = "linear";
function unit(v, i) {
  const mode = scaleSelect.value;
  const pool = mode === "layer" ? D.values.map(row => row[i]).filter(x => x !== null) : allValues;
  const f = mode === "log" ? (x => Math.log(Math.max(x, 1e-12))) : (x => x);
  const lo = Math.min(...pool.map(f)), hi = Math.max(...pool.map(f));
  return hi > lo ? (f(v) - lo) / (hi - lo) : 0.5;
}
function color(v, i) {
  if (v === null) return "#eee";
  const t = unit(v, i);
  return `rgb(${Math.round(255 - 200 * t)},${Math.round(255 - 120 * t)},255)`;
}
function paint() {
  document.querySelectorAll("#heat td").forEach(td => {
    td.style.background = color(D.values[td.dataset.token][td.dataset.layer], +td.dataset.layer); });
}
scaleSelect.onchange = paint;
const head = document.querySelector("#heat thead"), body = document.querySelector("#heat tbody");
const hr = document.createElement("tr"); hr.appendChild(document.createElement("th"));
D.tokens.forEach((tok, j) => { const th = document.createElement("th"); th.textContent = JSON.stringify(tok);
  th.dataset.token = j; th.onclick = () => showLine(j); hr.appendChild(th); });
head.appendChild(hr);
const tip = document.getElementById("tip");
D.layers.forEach((layer, i) => {
  const tr = document.createElement("tr"); const th = document.createElement("th"); th.textContent = layer;
  tr.appendChild(th);
  D.tokens.forEach((tok, j) => {
    const td = document.createElement("td"); const v = D.values[j][i];
    td.dataset.token = j; td.dataset.layer = i;
    td.onmousemove = e => { tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px";
      tip.style.top = (e.clientY + 12) + "px";
      tip.textContent = `${JSON.stringify(tok)} @ ${layer}: ${D.metric} = ${v === null ? "n/a" : v.toPrecision(5)}`; };
    td.onmouseleave = () => { tip.style.display = "none"; };
    td.onclick = () => showLine(j);
    tr.appendChild(td);
  });
  body.appendChild(tr);
});
function showLine(j) {
  document.querySelectorAll(".sel").forEach(e => e.classList.remove("sel"));
  document.querySelectorAll(`[data-token="${j}"]`).forEach(e => e.classList.add("sel"));
  document.getElementById("line-token").textContent = JSON.stringify(D.tokens[j]);
  document.getElementById("metric-name").textContent = D.metric;
  const svg = document.getElementById("line"), W = 640, H = 220, P = 30, ys = D.values[j];
  const ok = ys.filter(v => v !== null), a = Math.min(...ok), b = Math.max(...ok);
  const x = i => P + (W - 2 * P) * (ys.length > 1 ? i / (ys.length - 1) : 0.5);
  const y = v => H - P - (H - 2 * P) * (b > a ? (v - a) / (b - a) : 0.5);
  const pts = ys.map((v, i) => v === null ? null : `${x(i)},${y(v)}`).filter(p => p).join(" ");
  svg.innerHTML = `<polyline points="${pts}" fill="none" stroke="#36c" stroke-width="2"/>` +
    ys.map((v, i) => v === null ? "" : `<circle cx="${x(i)}" cy="${y(v)}" r="3" fill="#36c"><title>` +
      `${D.layers[i]}: ${v.toPrecision(5)}</title></circle>`).join("") +
    `<text x="${P}" y="${H - 8}">${D.layers[0]}</text>` +
    `<text x="${W - P}" y="${H - 8}" text-anchor="end">${D.layers[D.layers.length - 1]}</text>` +
    `<text x="4" y="${P}">${b.toPrecision(4)}</text><text x="4" y="${H - P}">${a.toPrecision(4)}</text>`;
}
paint();
showLine(D.tokens.length - 1);
</script></body></html>
"""


def view_data(cube: Cube, prompt: int, kind: str, metric: str = "norm") -> dict:
    """The numbers the view shows: values[token][layer] of one summary statistic."""
    values = cube.summaries(kind, metric, prompt=prompt)
    layers = [kind if layer is None else f"L{layer}" for layer in cube.layers(kind)]
    return {
        "metric": metric,
        "kind": kind,
        "prompt": prompt,
        "tokens": cube.str_tokens(prompt),
        "layers": layers,
        "values": [[None if np.isnan(v) else float(v) for v in row] for row in values],
    }


def write_html(cube: Cube, out: str | Path, prompt: int = 0, kind: str | None = None, metric: str = "norm") -> Path:
    kind = kind or cube.site_kinds[0]
    if metric not in layout.STATS:
        raise CubeError(f"unknown metric '{metric}'; choose one of {', '.join(layout.STATS)}")
    data = view_data(cube, prompt, kind, metric)
    title = f"{cube.metadata['model']['name']}: {kind} {metric}, prompt {prompt}"
    meta = (
        f"{html.escape(repr(cube.prompt_text(prompt))[:300])} · cube <code>{html.escape(str(cube.path))}</code> · "
        f"hover a cell for its value, click a token for its line across layers"
    )
    page = (
        _PAGE.replace("__TITLE__", html.escape(title))
        .replace("__META__", meta)
        .replace("__DATA__", json.dumps(data).replace("</", "<\\/"))
    )
    with atomic_target(out, ".html") as temp:
        temp.write_text(page, encoding="utf-8")
    return Path(out)
