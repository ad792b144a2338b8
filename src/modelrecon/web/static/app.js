// modelrecon viewer: plain JS drawing with d3 (vendored in static/vendor: d3 7.9.0, ISC licence), nothing loaded
// from the network but this app's own API. The same code runs served (`modelrecon serve`: data from /api) and
// embedded (a notebook or a standalone page: window.MR_EMBED = {routes: {apiPath: response}, start: "#/graph/ID"}).
// File contents are untrusted: they are only ever put into the page as text (textContent, d3's .text, SVG
// attributes), never as HTML.
"use strict";

const EMBED = window.MR_EMBED || null;
const MAX_EDGES = 4000; // edges drawn in the overview (strongest first); a click shows a node's own
const RASTER_CELLS = 40000; // larger heatmaps are drawn as one image, not one SVG rect per cell
const NULL_FILL = "#e4e4e4"; // a cell with no value (NaN in the file)

async function api(path, options) {
  if (EMBED) {
    if (path in EMBED.routes) return EMBED.routes[path];
    throw new Error("not available in this embedded view: " + path);
  }
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick" || k === "onchange" || k === "oninput") node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const tip = () => document.getElementById("tip");
function showTip(event, text) {
  const t = tip(); t.textContent = text; t.style.display = "block";
  t.style.left = (event.clientX + 14) + "px"; t.style.top = (event.clientY + 14) + "px";
}
function hideTip() { tip().style.display = "none"; }
const apiPath = (prefix, id) => prefix + id.split("/").map(encodeURIComponent).join("/");
const fmt = v => (v === null || v === undefined) ? "n/a" : (typeof v === "number" ? +v.toPrecision(4) : v);
// A token as a label: its JSON escapes (so newlines show) without the quotes, spaces as "␣", cut to `max` chars
function tokText(t, max = 12) {
  const s = JSON.stringify(String(t)).slice(1, -1).replace(/ /g, "\u2423");
  return s.length > max ? s.slice(0, max - 1) + "…" : s;
}
// Indices 0..n-1 spaced so that labels `size` pixels apart each get at least `gap` pixels (the last one always shown)
function spacedTicks(n, size, gap) {
  const step = Math.max(1, Math.ceil(gap / Math.max(size, 1e-9)));
  const ticks = d3.range(0, n, step);
  if (n && ticks[ticks.length - 1] !== n - 1 && (n - 1 - ticks[ticks.length - 1]) * size >= gap) ticks.push(n - 1);
  return ticks;
}

// --- routing --------------------------------------------------------------------------------------------------------
let route = EMBED ? EMBED.start : (location.hash || "#/");
window.addEventListener("hashchange", () => { if (!EMBED) { route = location.hash || "#/"; render(); } });

async function render() {
  const main = document.getElementById("main");
  main.replaceChildren(el("p", { class: "muted" }, "loading…"));
  const [, view, ...rest] = route.split("/");
  const id = decodeURIComponent(rest.join("/"));
  document.getElementById("crumb").textContent = view ? `${view} ${id}` : "";
  try {
    if (view === "graph") await graphView(main, id);
    else if (view === "cube") await cubeView(main, id);
    else if (view === "experiment") await experimentView(main, id);
    else if (view === "lens") await lensView(main, id);
    else await indexView(main);
  } catch (err) {
    main.replaceChildren(el("p", { class: "error" }, String(err.message || err)));
  }
}

// --- colour scales, legends and heatmaps (shared by every view) -----------------------------------------------------
const SCALE_MODES = [["robust", "robust (1st–99th percentile)"], ["linear", "linear (min to max)"],
  ["log", "symlog"]];

// The colour scale of some values. "robust" clips the domain at the 1st and 99th percentiles, so a few huge cells
// (the first token's norm) cannot wash out the rest; "log" is a symlog scale (linear within `constant` of 0, so it
// takes signed values and zeros); `fixed` pins the domain (probabilities). Signed data get a diverging scale centred
// on 0 (blue positive, red negative); the rest a sequential one. Values outside the domain clamp to its ends.
function colourScale(values, { mode = "robust", fixed = null, signed = null,
  interpolator = d3.interpolateViridis } = {}) {
  const v = values.filter(Number.isFinite).sort(d3.ascending);
  let lo = 0, hi = 1;
  if (fixed) [lo, hi] = fixed;
  else if (v.length && mode === "robust") [lo, hi] = [d3.quantileSorted(v, 0.01), d3.quantileSorted(v, 0.99)];
  else if (v.length) [lo, hi] = [v[0], v[v.length - 1]];
  const diverging = signed === null ? lo < 0 && hi > 0 : signed;
  const log = mode === "log";
  const abs = v.map(Math.abs).filter(x => x > 0).sort(d3.ascending);
  const constant = abs.length ? Math.max(1e-12, d3.quantileSorted(abs, 0.1)) : 1;
  let colour, ends;
  if (diverging) {
    const m = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    colour = (log ? d3.scaleDivergingSymlog().constant(constant) : d3.scaleDiverging()).domain([-m, 0, m])
      .interpolator(d3.interpolateRdBu).clamp(true);
    ends = [-m, m];
  } else {
    if (!(hi > lo)) hi = lo + (Math.abs(lo) || 1);
    colour = (log ? d3.scaleSequentialSymlog().constant(constant) : d3.scaleSequential()).domain([lo, hi])
      .interpolator(interpolator).clamp(true);
    ends = [lo, hi];
  }
  return { colour, ends, log, constant, diverging, mode: fixed ? "fixed" : mode };
}

let gradients = 0;
// A colour bar with a tick axis and its title (the quantity and its unit), drawn into `parent` at (x, y)
function legend(parent, x, y, width, scale, title) {
  const axisScale = (scale.log ? d3.scaleSymlog().constant(scale.constant) : d3.scaleLinear())
    .domain(scale.ends).range([0, width]);
  const g = parent.append("g").attr("class", "legend").attr("transform", `translate(${x},${y})`);
  const id = `mr-gradient-${++gradients}`;
  g.append("defs").append("linearGradient").attr("id", id).selectAll("stop").data(d3.range(0, 1.0001, 1 / 32))
    .join("stop").attr("offset", t => t).attr("stop-color", t => scale.colour(axisScale.invert(t * width)));
  g.append("text").attr("class", "legend-title").attr("y", -5).text(title);
  g.append("rect").attr("width", width).attr("height", 10).attr("fill", `url(#${id})`).attr("stroke", "#999");
  g.append("g").attr("class", "axis").attr("transform", "translate(0,10)")
    .call(d3.axisBottom(axisScale).ticks(Math.max(2, Math.floor(width / 60)), "~g"));
  return g;
}

function scaleNote(scale, skipped) {
  const how = { robust: "clipped at the 1st and 99th percentiles", linear: "min to max", log: "symlog",
    fixed: "fixed" }[scale.mode];
  return `colour: ${how}${scale.diverging ? ", centred on 0" : ""}` +
    (skipped ? "; position 0 left out of the scale (its cells clamp to the ends)" : "") + "; hover for values";
}

// The colour-scale controls of a heatmap view: the scale and whether to leave position 0 out of its domain
function scaleControls(prefix, state, redraw, skipLabel = "leave position 0 out of the colour scale") {
  const mode = el("select", { id: `${prefix}-scale`, onchange: e => { state.mode = e.target.value; redraw(); } },
    ...SCALE_MODES.map(([v, text]) => {
      const o = el("option", { value: v }, text); o.selected = v === state.mode; return o;
    }));
  const skip = el("input", { type: "checkbox", id: `${prefix}-skip-first`,
    onchange: e => { state.skipFirst = e.target.checked; redraw(); } });
  skip.checked = state.skipFirst;
  return [el("label", {}, "colour scale ", mode), el("label", {}, skip, " " + skipLabel)];
}

// A heatmap with axes, tick labels and a colour legend. rows go down the y axis, cols along x; value(r, c) is a
// number or null (grey). Options: id, scale (colourScale), legendTitle, xTitle, yTitle, tip(r, c, v) -> text,
// onClick(r, c), text(r, c) -> a short text drawn in the cell where it fits, cell: [[min w, max w], [min h, max h]].
function heatmap(o) {
  const rows = o.rows, cols = o.cols, nR = rows.length, nC = cols.length;
  const [[w0, w1], [h0, h1]] = o.cell || [[4, 32], [4, 20]];
  const cw = Math.max(w0, Math.min(w1, 900 / Math.max(1, nC))), ch = Math.max(h0, Math.min(h1, 420 / Math.max(1, nR)));
  const longest = d3.max(rows, r => String(r).length) || 1;
  const xLabels = 14 + 5.2 * (d3.max(cols, c => String(c).length) || 1); // the rotated tick labels' height
  const m = { left: 26 + Math.min(110, 7 * longest), top: 12, bottom: xLabels + 74, right: 20 };
  const plotW = cw * nC, plotH = ch * nR;
  const width = Math.max(m.left + Math.max(plotW, 320) + m.right, m.left + 6 * String(o.legendTitle).length + 10);
  const height = m.top + plotH + m.bottom;
  const svg = d3.create("svg").attr("id", o.id).attr("class", "heatmap").attr("width", width).attr("height", height);
  const x = d3.scaleBand().domain(d3.range(nC)).range([0, plotW]);
  const y = d3.scaleBand().domain(d3.range(nR)).range([0, plotH]);
  const fill = (r, c) => {
    const v = o.value(r, c); return v === null || v === undefined ? NULL_FILL : o.scale.colour(v);
  };
  const plot = svg.append("g").attr("class", "plot").attr("transform", `translate(${m.left},${m.top})`);
  if (nR * nC <= RASTER_CELLS) {
    plot.append("g").attr("class", "cells").selectAll("rect").data(d3.cross(d3.range(nR), d3.range(nC))).join("rect")
      .attr("class", "cell").attr("x", ([, c]) => x(c)).attr("y", ([r]) => y(r)).attr("width", cw).attr("height", ch)
      .attr("data-row", ([r]) => r).attr("data-col", ([, c]) => c).attr("fill", ([r, c]) => fill(r, c));
    if (o.text && cw >= 18) {
      const chars = Math.floor((cw - 2) / 5.6);
      plot.append("g").attr("class", "cell-text").selectAll("text").data(d3.cross(d3.range(nR), d3.range(nC)))
        .join("text")
        .attr("x", ([, c]) => x(c) + cw / 2).attr("y", ([r]) => y(r) + ch / 2 + 3).attr("text-anchor", "middle")
        .attr("fill", ([r, c]) => d3.hsl(fill(r, c)).l < 0.55 ? "#fff" : "#000")
        .text(([r, c]) => tokText(o.text(r, c), chars));
    }
  } else {  // one pixel per cell, scaled up without smoothing
    const canvas = document.createElement("canvas");
    canvas.width = nC; canvas.height = nR;
    const ctx = canvas.getContext("2d");
    for (let r = 0; r < nR; r++) for (let c = 0; c < nC; c++) { ctx.fillStyle = fill(r, c); ctx.fillRect(c, r, 1, 1); }
    plot.append("image").attr("class", "cells-raster").attr("width", plotW).attr("height", plotH)
      .attr("preserveAspectRatio", "none").attr("style", "image-rendering: pixelated").attr("href", canvas.toDataURL());
  }
  const cellAt = event => {
    const [px, py] = d3.pointer(event, plot.node());
    const c = Math.floor(px / cw), r = Math.floor(py / ch);
    return r >= 0 && r < nR && c >= 0 && c < nC ? [r, c] : null;
  };
  plot.on("mousemove", event => {
    const at = cellAt(event);
    if (at && o.tip) showTip(event, o.tip(at[0], at[1], o.value(at[0], at[1]))); else hideTip();
  }).on("mouseleave", hideTip).on("click", event => {
    const at = cellAt(event); if (at && o.onClick) o.onClick(...at);
  });
  const xAxis = plot.append("g").attr("class", "axis x-axis").attr("transform", `translate(0,${plotH})`)
    .call(d3.axisBottom(x).tickValues(spacedTicks(nC, cw, 12)).tickFormat(c => cols[c]));
  xAxis.selectAll(".tick").attr("data-col", c => c);
  xAxis.selectAll(".tick text").attr("transform", "rotate(-60)").attr("text-anchor", "end").attr("dx", "-0.6em")
    .attr("dy", "0.1em");
  if (o.onClick) xAxis.selectAll(".tick").style("cursor", "pointer").on("click", (e, c) => o.onClick(0, c));
  plot.append("g").attr("class", "axis y-axis").call(d3.axisLeft(y).tickValues(spacedTicks(nR, ch, 11))
    .tickFormat(r => rows[r]));
  plot.append("text").attr("class", "axis-title").attr("x", plotW / 2).attr("y", plotH + xLabels + 14)
    .attr("text-anchor", "middle")
    .text(o.xTitle || "");
  plot.append("text").attr("class", "axis-title")
    .attr("transform", `translate(${-m.left + 10},${plotH / 2}) rotate(-90)`)
    .attr("text-anchor", "middle").text(o.yTitle || "");
  legend(svg, m.left, m.top + plotH + xLabels + 46, Math.min(300, Math.max(200, plotW)), o.scale, o.legendTitle);
  // the selected column, outlined
  const mark = plot.append("rect").attr("class", "sel").attr("y", 0).attr("height", plotH).attr("width", cw)
    .attr("fill", "none").attr("stroke", "#000").attr("stroke-width", 1.5).style("display", "none");
  return {
    node: svg.node(),
    select(c) {
      mark.attr("x", x(c)).style("display", null);
      xAxis.selectAll(".tick").classed("sel", d => d === c);
    },
  };
}

// A line (or scatter) chart with axes and titles: points [[x, y]], x drawn on a point scale of `xLabels`
function lineChart({ id, xLabels, ys, xTitle, yTitle, width = 640, height = 230 }) {
  const m = { left: 64, right: 16, top: 12, bottom: 44 };
  const svg = d3.create("svg").attr("id", id).attr("class", "line-chart").attr("width", width).attr("height", height);
  const x = d3.scalePoint().domain(d3.range(xLabels.length)).range([m.left, width - m.right]).padding(0.3);
  const ok = ys.filter(Number.isFinite);
  const y = d3.scaleLinear().domain(d3.extent(ok.length ? ok : [0, 1])).nice().range([height - m.bottom, m.top]);
  svg.append("g").attr("class", "axis x-axis").attr("transform", `translate(0,${height - m.bottom})`)
    .call(d3.axisBottom(x).tickValues(spacedTicks(xLabels.length, x.step(), 28)).tickFormat(i => xLabels[i]));
  svg.append("g").attr("class", "axis y-axis").attr("transform", `translate(${m.left},0)`)
    .call(d3.axisLeft(y).ticks(5));
  const points = ys.map((v, i) => [i, v]).filter(p => Number.isFinite(p[1]));
  svg.append("path").attr("fill", "none").attr("stroke", "#36c").attr("stroke-width", 2)
    .attr("d", d3.line().x(p => x(p[0])).y(p => y(p[1]))(points));
  svg.append("g").selectAll("circle").data(points).join("circle").attr("cx", p => x(p[0])).attr("cy", p => y(p[1]))
    .attr("r", 3).attr("fill", "#36c").on("mousemove", (e, p) => showTip(e, `${xLabels[p[0]]}: ${fmt(p[1])}`))
    .on("mouseleave", hideTip);
  svg.append("text").attr("class", "axis-title").attr("x", (m.left + width - m.right) / 2).attr("y", height - 6)
    .attr("text-anchor", "middle").text(xTitle);
  svg.append("text").attr("class", "axis-title")
    .attr("transform", `translate(14,${(height - m.bottom) / 2}) rotate(-90)`)
    .attr("text-anchor", "middle").text(yTitle);
  return svg.node();
}

// --- index ----------------------------------------------------------------------------------------------------------
async function indexView(main) {
  const index = await api("/api/index");
  const kinds = { graph: "Attribution graphs", cube: "Activation cubes", sweep: "Patching sweeps",
    verify: "Attribution vs patching", experiment: "Experiments", lens: "Logit lens" };
  main.replaceChildren(el("h2", {}, `Results in ${index.root}`));
  for (const [kind, title] of Object.entries(kinds)) {
    const items = index.artifacts.filter(a => a.kind === kind);
    if (!items.length) continue;
    const view = ["sweep", "verify", "experiment"].includes(kind) ? "experiment" : kind;
    main.append(el("h3", {}, title), el("ul", { class: "index-list" }, ...items.map(a =>
      el("li", {}, el("a", { href: `#/${view}/${encodeURIComponent(a.id)}`, "data-kind": kind }, a.id)))));
  }
  if (!index.artifacts.length) main.append(el("p", { class: "muted" }, "nothing to show in this folder yet"));
  if (index.truncated) main.append(el("p", { class: "muted" }, "(the folder is large: only part of it was indexed)"));
}

// --- graph ----------------------------------------------------------------------------------------------------------
function layerRow(node, nLayers) {
  if (node.layer === "E") return 0;
  return Math.min(parseInt(node.layer, 10) + 1, nLayers + 1);
}

const PAD = 40, PAD_LEFT = 56; // room for the axes

function layout(graph, width, height) {
  const tokens = graph.metadata.prompt_tokens;
  const nLayers = graph.metadata.modelrecon ? graph.metadata.modelrecon.n_layers : 0;
  const rows = nLayers + 2, colW = (width - PAD_LEFT - PAD) / Math.max(1, tokens.length);
  const rowH = (height - 2 * PAD) / Math.max(1, rows - 1);
  const cells = new Map();
  graph.nodes.forEach((n, i) => {
    // heads and MLPs of a component graph span every position; so do the logits (all read at the last position),
    // which gives each room for its token
    const spread = n.ctx_idx === null || n.ctx_idx === undefined || n.feature_type === "logit";
    const key = spread ? `c${layerRow(n, nLayers)}` : `${n.ctx_idx}:${layerRow(n, nLayers)}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  });
  const pos = new Array(graph.nodes.length);
  for (const [key, members] of cells) {
    members.sort((a, b) => (graph.nodes[a].influence ?? 1) - (graph.nodes[b].influence ?? 1));
    members.forEach((i, k) => {
      const n = graph.nodes[i], row = layerRow(n, nLayers);
      const spread = key.startsWith("c");
      const x = spread ? PAD_LEFT + (width - PAD_LEFT - PAD) * (k + 0.5) / members.length
        : PAD_LEFT + colW * n.ctx_idx + colW * (k + 1) / (members.length + 1);
      pos[i] = [x, height - PAD - row * rowH];
    });
  }
  return { pos, tokens, nLayers, colW, rowH };
}

// The room (in graph units) each node has for a label: the gap to its nearest neighbour in the same row
function labelRoom(pos) {
  const room = new Array(pos.length).fill(Infinity), byRow = d3.group(d3.range(pos.length), i => pos[i][1]);
  for (const members of byRow.values()) {
    members.sort((a, b) => pos[a][0] - pos[b][0]);
    members.forEach((i, k) => {
      if (k > 0) room[i] = Math.min(room[i], pos[i][0] - pos[members[k - 1]][0]);
      if (k + 1 < members.length) room[i] = Math.min(room[i], pos[members[k + 1]][0] - pos[i][0]);
    });
  }
  return room;
}

function nodeRadius(n) {
  if (n.feature_type === "logit") return 4 + 8 * (n.token_prob || 0);
  const influence = n.influence === null || n.influence === undefined ? 0.5 : n.influence;
  return 2.5 + 6 * (1 - Math.min(1, Math.max(0, influence)));
}

const COLOURS = { "cross layer transcoder": "#3b6fc4", "mlp reconstruction error": "#9a9a9a", embedding: "#2f9e44",
  logit: "#e08a00", "attention head": "#8a4fd0", mlp: "#d04f8a" };
const KIND_NAMES = { "cross layer transcoder": "transcoder feature", "mlp reconstruction error": "error (residual)",
  embedding: "token embedding", logit: "output logit", "attention head": "attention head", mlp: "MLP" };
const EDGE_COLOURS = { positive: "#2b6cb0", negative: "#c53030" };

// A feature's label: the user's own (saved in the annotations) over the explanation the graph file carries (clerp)
function nodeLabel(n, labels = {}) {
  const type = n.feature_type;
  if (type === "cross layer transcoder") {
    const text = labels[n.node_id] || n.clerp;
    return `L${n.layer} F${n.mr_index} @${n.ctx_idx} ${JSON.stringify(n.token)}` + (text ? ` · ${text}` : "");
  }
  if (type === "embedding") return `token ${JSON.stringify(n.token)} @${n.ctx_idx}`;
  if (type === "logit") return n.clerp || `logit ${n.token}`;
  if (type === "mlp reconstruction error") return `error L${n.layer} @${n.ctx_idx}`;
  if (type === "attention head" || type === "mlp") return n.clerp;
  return `L${n.layer} F${n.mr_index} @${n.ctx_idx} ${JSON.stringify(n.token)}`;
}

// The short text drawn beside a node: its token, the feature's label or index, the logit's token
function shortLabel(n, labels = {}) {
  const type = n.feature_type;
  if (labels[n.node_id]) return labels[n.node_id];
  if (type === "embedding") return tokText(n.token, 40);
  if (type === "logit") return "→" + tokText(n.token, 40);
  if (type === "mlp reconstruction error") return "err";
  if (type === "cross layer transcoder") return n.clerp || `F${n.mr_index}`;
  return n.clerp || String(n.node_id);
}

async function graphView(main, id) {
  const payload = await api(apiPath("/api/graph/", id));
  const graph = payload.graph, nodes = graph.nodes;
  const notes = { pinned: [], supernodes: [], labels: {}, ...payload.annotations };
  const index = new Map(nodes.map((n, i) => [n.node_id, i]));
  const links = graph.links.map(l => [index.get(l.source), index.get(l.target), l.weight])
    .filter(l => l[0] !== undefined && l[1] !== undefined);
  const inputs = nodes.map(() => []), outputs = nodes.map(() => []);
  links.forEach((l, k) => { inputs[l[1]].push(k); outputs[l[0]].push(k); });
  // as wide as the page allows beside the panel (drawn at 1:1, so text keeps its size; zoom for more room)
  const width = Math.max(600, (main.clientWidth || 1300) - 430), height = 640;
  const L = layout(graph, width, height);
  const room = labelRoom(L.pos);
  const svg = d3.create("svg").attr("class", "graph-svg").attr("width", width).attr("height", height)
    .attr("viewBox", `0 0 ${width} ${height}`);
  const root = svg.node();
  const viewport = svg.append("g").attr("class", "viewport");
  // overview edges: the strongest, batched into a few paths by sign and width
  const maxW = Math.max(1e-12, ...links.map(l => Math.abs(l[2])));
  const order = links.map((l, k) => k).sort((a, b) => Math.abs(links[b][2]) - Math.abs(links[a][2]))
    .slice(0, MAX_EDGES);
  const buckets = new Map();
  for (const k of order) {
    const [s, t, w] = links[k], band = Math.min(3, Math.floor(4 * Math.abs(w) / maxW));
    const key = `${w >= 0 ? "p" : "n"}${band}`;
    if (!buckets.has(key)) buckets.set(key, []);
    buckets.get(key).push(`M${L.pos[s][0].toFixed(1)} ${L.pos[s][1].toFixed(1)}L${L.pos[t][0].toFixed(1)} ` +
      `${L.pos[t][1].toFixed(1)}`);
  }
  const edgeWidth = key => 0.4 + 0.8 * Number(key[1]);
  const edgePaths = viewport.append("g").attr("class", "edges").selectAll("path").data([...buckets]).join("path")
    .attr("d", ([, segments]) => segments.join("")).attr("fill", "none")
    .attr("stroke", ([key]) => key[0] === "p" ? EDGE_COLOURS.positive : EDGE_COLOURS.negative)
    .attr("stroke-width", ([key]) => edgeWidth(key)).attr("stroke-opacity", 0.35);
  const highlight = viewport.append("g").attr("class", "highlight");
  const circleSel = viewport.append("g").attr("class", "nodes").selectAll("circle").data(nodes).join("circle")
    .attr("cx", (n, i) => L.pos[i][0].toFixed(1)).attr("cy", (n, i) => L.pos[i][1].toFixed(1))
    .attr("r", n => nodeRadius(n).toFixed(1)).attr("fill", n => COLOURS[n.feature_type] || "#555")
    .attr("class", "node").attr("data-id", n => n.node_id).attr("data-kind", n => n.feature_type)
    .attr("data-index", (n, i) => i);
  const circles = circleSel.nodes();
  // nodes grow with the zoom up to 3x their size, then keep their size on screen (so zooming in separates them)
  const growth = k => Math.min(k, 3);
  const labelLayer = svg.append("g").attr("class", "node-labels");
  // axes (outside the zoomed group, rescaled on zoom so the ticks keep their size): tokens along the bottom, layers
  // up the side, on white bands so nodes panned under them do not hide them
  svg.append("rect").attr("class", "axis-band").attr("x", 0).attr("y", height - 24).attr("width", width)
    .attr("height", 24);
  svg.append("rect").attr("class", "axis-band").attr("x", 0).attr("y", 0).attr("width", 34).attr("height", height);
  const xAxis = svg.append("g").attr("class", "axis x-axis").attr("transform", `translate(0,${height - 24})`);
  const yAxis = svg.append("g").attr("class", "axis y-axis").attr("transform", "translate(34,0)");
  const base = d3.scaleLinear().domain([0, width]).range([0, width]);
  const baseY = d3.scaleLinear().domain([0, height]).range([0, height]);
  const rowName = r => r === 0 ? "emb" : (r === L.nLayers + 1 ? "out" : `L${r - 1}`);
  let transform = d3.zoomIdentity;
  function drawAxes() {
    const x = transform.rescaleX(base), y = transform.rescaleY(baseY);
    const centres = L.tokens.map((t, p) => PAD_LEFT + L.colW * (p + 0.5));
    const xs = spacedTicks(L.tokens.length, L.colW * transform.k, 64)
      .filter(p => x(centres[p]) > 34 && x(centres[p]) < width);
    xAxis.call(d3.axisBottom(x).tickValues(xs.map(p => centres[p])).tickFormat((v, k) => tokText(L.tokens[xs[k]])));
    const rows = spacedTicks(L.nLayers + 2, L.rowH * transform.k, 13);
    const ys = rows.map(r => height - PAD - r * L.rowH).filter(v => y(v) > 0 && y(v) < height - 24);
    yAxis.call(d3.axisLeft(y).tickValues(ys).tickFormat(v => rowName(Math.round((height - PAD - v) / L.rowH))));
  }
  // node labels where there is room at this zoom: only nodes on screen, each cut to the room it has
  function drawLabels() {
    const k = transform.k, [x0, y0] = transform.invert([34, 0]), [x1, y1] = transform.invert([width, height - 24]);
    const shown = [];
    if (L.rowH * k >= 14) {
      for (let i = 0; i < nodes.length && shown.length < 600; i++) {
        const [px, py] = L.pos[i];
        const chars = Math.floor((Math.min(room[i] * k, 160) - 4) / 6);
        if (px >= x0 && px <= x1 && py >= y0 && py <= y1 && chars >= 3) shown.push([i, chars]);
      }
    }
    labelLayer.selectAll("text").data(shown, d => d[0]).join("text")
      .attr("class", d => "node-label " + (nodes[d[0]].feature_type || "").replace(/ /g, "-"))
      .attr("data-index", d => d[0])
      .attr("x", d => transform.applyX(L.pos[d[0]][0]))
      .attr("y", d => transform.applyY(L.pos[d[0]][1]) - nodeRadius(nodes[d[0]]) * growth(k) - 3)
      .text(d => {
        const s = shortLabel(nodes[d[0]], notes.labels); return s.length > d[1] ? s.slice(0, d[1] - 1) + "…" : s;
      });
  }
  let pending = false, drawnK = 1;
  function redraw() {
    pending = false;
    if (transform.k !== drawnK) {
      drawnK = transform.k;
      circleSel.attr("r", n => (nodeRadius(n) * growth(drawnK) / drawnK).toFixed(2));
    }
    drawLabels();
  }
  const zoom = d3.zoom().scaleExtent([0.5, 60]).on("zoom", event => {
    transform = event.transform;
    viewport.attr("transform", transform);
    edgePaths.attr("stroke-width", ([key]) => edgeWidth(key) / transform.k); // edges keep their width on screen
    drawAxes();
    if (!pending) { pending = true; requestAnimationFrame(redraw); }
  });
  svg.call(zoom).on("dblclick.zoom", null);
  drawAxes(); drawLabels();

  const kinds = [...new Set(nodes.map(n => n.feature_type))];
  const swatch = (colour, line) => { const s = d3.create("svg").attr("width", 16).attr("height", 10);
    if (line) {
      s.append("line").attr("x1", 1).attr("x2", 15).attr("y1", 5).attr("y2", 5).attr("stroke", colour)
        .attr("stroke-width", 2.5);
    }
    else s.append("circle").attr("cx", 8).attr("cy", 5).attr("r", 4.5).attr("fill", colour);
    return s.node(); };
  const legendBox = el("div", { id: "graph-legend", class: "legend-row" },
    ...kinds.map(k => el("span", { "data-kind": k }, swatch(COLOURS[k] || "#555"), " " + (KIND_NAMES[k] || k))),
    el("span", { "data-edge": "positive" }, swatch(EDGE_COLOURS.positive, true), " positive edge"),
    el("span", { "data-edge": "negative" }, swatch(EDGE_COLOURS.negative, true), " negative edge"),
    el("span", { class: "muted" }, "node size: influence (bigger = more influential); edge width: |weight|; " +
      "scroll to zoom, drag to pan"));
  const zoomButtons = el("span", { class: "zoom-buttons" },
    el("button", { id: "zoom-in", onclick: () => svg.call(zoom.scaleBy, 2) }, "zoom in"),
    el("button", { id: "zoom-out", onclick: () => svg.call(zoom.scaleBy, 0.5) }, "zoom out"),
    el("button", { id: "zoom-reset", onclick: () => svg.call(zoom.transform, d3.zoomIdentity) }, "reset"));

  const panel = el("div", { id: "panel" }, el("p", { class: "muted" }, "click a node"));
  const status = el("span", { id: "save-status", class: "muted" });
  const pinBox = el("div", { id: "pins" });
  const head = el("div", {},
    el("h2", {}, graph.metadata.prompt, " ", el("span", { class: "muted" },
      `${nodes.length} nodes, ${links.length} edges` + (payload.has_dashboards ? "" : " (no feature dashboards)"))),
    pinBox, legendBox, zoomButtons);
  main.replaceChildren(head, el("div", { class: "graph-wrap" }, root, panel));

  const top = (list, n) => list.slice().sort((a, b) => Math.abs(links[b][2]) - Math.abs(links[a][2])).slice(0, n);
  let selected = -1;
  function refreshPins() {
    const pinned = new Set(notes.pinned);
    circles.forEach(c => c.classList.toggle("pinned", pinned.has(c.dataset.id)));
    const name = el("input", { id: "supernode-name", placeholder: "supernode name", size: 16 });
    pinBox.replaceChildren(
      el("b", {}, `Pinned (${notes.pinned.length}): `),
      el("span", { class: "chips", id: "pinned-list" }, ...notes.pinned.map(pid =>
        el("span", { onclick: () => select(index.get(pid)) }, notes.labels[pid] || pid))),
      el("br"), name,
      el("button", { id: "group-pins", onclick: () => {
        if (!notes.pinned.length || !name.value.trim()) { status.textContent = "pin nodes and name the group"; return; }
        notes.supernodes.push({ name: name.value.trim().slice(0, 100), nodes: notes.pinned.slice() });
        refreshPins();
      } }, "group pinned into a supernode"),
      el("button", { id: "save-annotations", onclick: save }, "save"), status,
      el("div", { class: "chips", id: "supernodes" }, ...notes.supernodes.map(g =>
        el("span", { title: g.nodes.join(" ") }, `${g.name} (${g.nodes.length})`))));
  }
  async function save() {
    if (EMBED) { status.textContent = "saving needs modelrecon serve"; return; }
    try {
      // If-Match: the version loaded, so a save over someone else's newer one is refused (409), not silently lost
      const headers = { "Content-Type": "application/json" };
      if (payload.annotations_version) headers["If-Match"] = payload.annotations_version;
      const saved = await api(apiPath("/api/annotations/", id), { method: "POST", headers,
        body: JSON.stringify(notes) });
      payload.annotations_version = saved.annotations_version;
      status.textContent = "saved";
    } catch (err) { status.textContent = "not saved: " + err.message; }
  }
  function select(i) {
    if (i === undefined || i < 0) return;
    if (selected >= 0) circles[selected].classList.remove("selected");
    selected = i;
    circles.forEach(c => c.classList.remove("hl"));
    circles[i].classList.add("selected");
    root.classList.add("focus");
    const ins = top(inputs[i], 8), outs = top(outputs[i], 8);
    // the node's strongest edges, each its own line so hovering one shows its weight
    highlight.selectAll("line").data([...ins, ...outs]).join("line").attr("class", "edge")
      .attr("x1", k => L.pos[links[k][0]][0]).attr("y1", k => L.pos[links[k][0]][1])
      .attr("x2", k => L.pos[links[k][1]][0]).attr("y2", k => L.pos[links[k][1]][1])
      .attr("stroke", k => links[k][2] >= 0 ? EDGE_COLOURS.positive : EDGE_COLOURS.negative)
      .attr("stroke-width", k => 1 + 3 * Math.abs(links[k][2]) / maxW).attr("stroke-opacity", 0.9)
      .attr("vector-effect", "non-scaling-stroke").attr("data-weight", k => links[k][2]);
    for (const k of [...ins, ...outs]) {
      circles[links[k][0]].classList.add("hl"); circles[links[k][1]].classList.add("hl");
    }
    showPanel(i, ins, outs);
  }
  async function showPanel(i, ins, outs) {
    const n = nodes[i], pinned = notes.pinned.includes(n.node_id);
    const label = el("input", { id: "node-label", value: notes.labels[n.node_id] || "", placeholder: "label", size: 24,
      oninput: e => { if (e.target.value) notes.labels[n.node_id] = e.target.value.slice(0, 200);
        else delete notes.labels[n.node_id];
        drawLabels(); } });
    const linkList = (list, end) => el("ul", { class: "link-list" }, ...list.map(k => {
      const other = links[k][end];
      return el("li", { onclick: () => select(other) }, `${fmt(links[k][2])}  ${nodeLabel(nodes[other], notes.labels)}`);
    }));
    panel.replaceChildren(
      el("h3", { id: "panel-title" }, nodeLabel(n, notes.labels)),
      el("table", {}, ...[["id", n.node_id], ["type", n.feature_type], ["layer", n.layer], ["position", n.ctx_idx],
        ["token", JSON.stringify(n.token)], ["activation", fmt(n.activation)],
        ["influence (cumulative)", fmt(n.influence)]].map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)))),
      el("button", { id: "pin-node", onclick: () => {
        notes.pinned = pinned ? notes.pinned.filter(p => p !== n.node_id) : [...notes.pinned, n.node_id];
        refreshPins(); select(i);
      } }, pinned ? "unpin" : "pin"), label,
      el("h3", {}, "strongest inputs (edge weight, source)"), linkList(ins, 0),
      el("h3", {}, "strongest outputs (edge weight, target)"), linkList(outs, 1),
      el("div", { id: "dashboard" }));
    if (n.feature_type !== "cross layer transcoder") return;
    const box = panel.querySelector("#dashboard");
    box.replaceChildren(el("p", { class: "muted" }, "loading dashboard…"));
    try {
      const detail = await api(apiPath("/api/feature/", id) + "?node=" + encodeURIComponent(n.node_id));
      if (selected === i) box.replaceChildren(...dashboardView(detail.dashboard));
    } catch (err) { box.replaceChildren(el("p", { class: "muted" }, err.message)); }
  }
  root.addEventListener("mouseover", e => {
    const i = e.target.dataset && e.target.dataset.index;
    if (i !== undefined) {
      const n = nodes[+i];
      showTip(e, `${nodeLabel(n, notes.labels)}\n${n.node_id}\nactivation ${fmt(n.activation)}  influence ${fmt(n.influence)}` +
        `\ninputs ${inputs[+i].length}, outputs ${outputs[+i].length}` +
        (notes.labels[n.node_id] ? `\n${notes.labels[n.node_id]}` : ""));
    } else if (e.target.dataset && e.target.dataset.weight !== undefined) {
      const k = d3.select(e.target).datum();
      showTip(e, `${nodeLabel(nodes[links[k][0]], notes.labels)}\n→ ${nodeLabel(nodes[links[k][1]], notes.labels)}` +
        `\nedge weight ${fmt(links[k][2])}`);
    }
  });
  root.addEventListener("mouseout", hideTip);
  root.addEventListener("click", e => {
    const i = e.target.dataset && e.target.dataset.index;
    if (i !== undefined) select(+i);
    else if (!(e.target.dataset && e.target.dataset.weight !== undefined)) {
      root.classList.remove("focus"); highlight.selectAll("line").remove();
    }
  });
  refreshPins();
}

function exampleView(example, max) {
  return el("div", { class: "example" }, ...example.tokens.map((t, k) => {
    const a = example.acts[k], alpha = max > 0 ? Math.max(0, a) / max : 0;
    return el("span", { class: "tok" + (k === example.focus ? " focus" : ""), title: `${fmt(a)}`,
      style: `background: rgba(255, 140, 0, ${alpha.toFixed(3)})` }, t);
  }));
}

// Each score beside its control (another feature's explanation, same scorer): a score means something above it
function scoresView(d) {
  const scores = d.explanation_scores || {};
  const names = Object.keys(scores).filter(k => scores[k] && scores[k].score !== null);
  if (!names.length) return el("span");
  return el("p", { id: "explanation-scores", class: "muted" }, (d.explainer ? `by ${d.explainer}; ` : "") +
    names.map(k => `${k} ${fmt(scores[k].score)} (control ${fmt(scores[k].control)})`).join(", "));
}

// The histogram of a feature's non-zero activations: bins on an activation axis, counts up the side
function histogramView(h) {
  const W = 360, H = 150, m = { left: 44, right: 10, top: 8, bottom: 36 };
  const counts = h.counts;
  const edges = h.edges && h.edges.length === counts.length + 1 ? h.edges : d3.range(counts.length + 1);
  const svg = d3.create("svg").attr("id", "histogram").attr("width", W).attr("height", H);
  const x = d3.scaleLinear().domain([edges[0], edges[edges.length - 1]]).range([m.left, W - m.right]);
  const y = d3.scaleLinear().domain([0, Math.max(1, d3.max(counts))]).nice().range([H - m.bottom, m.top]);
  svg.append("g").selectAll("rect").data(counts).join("rect").attr("x", (c, k) => x(edges[k]) + 0.5)
    .attr("width", (c, k) => Math.max(0.5, x(edges[k + 1]) - x(edges[k]) - 1)).attr("y", c => y(c))
    .attr("height", c => y(0) - y(c)).attr("fill", "#3b6fc4")
    .on("mousemove", function (e, c) {
      const k = Array.prototype.indexOf.call(this.parentNode.children, this);
      showTip(e, `${fmt(edges[k])}–${fmt(edges[k + 1])}: ${c}`);
    })
    .on("mouseleave", hideTip);
  svg.append("g").attr("class", "axis x-axis").attr("transform", `translate(0,${H - m.bottom})`)
    .call(d3.axisBottom(x).ticks(5, "~g"));
  svg.append("g").attr("class", "axis y-axis").attr("transform", `translate(${m.left},0)`)
    .call(d3.axisLeft(y).ticks(4, "~s"));
  svg.append("text").attr("class", "axis-title").attr("x", (m.left + W) / 2).attr("y", H - 4)
    .attr("text-anchor", "middle")
    .text("activation");
  svg.append("text").attr("class", "axis-title").attr("transform", `translate(11,${(H - m.bottom) / 2}) rotate(-90)`)
    .attr("text-anchor", "middle").text("tokens");
  return svg.node();
}

function dashboardView(d) {
  if (!d) return [el("p", { class: "muted", id: "no-dashboard" },
    "no dashboard for this feature (trace with --cube to build them)")];
  const logits = list => el("span", {}, list.map(([t, v]) => `${JSON.stringify(t)} ${fmt(v)}`).join("  "));
  return [
    el("h3", {}, `feature L${d.layer}/${d.feature}`),
    el("p", {}, `fires on ${(100 * d.frequency).toFixed(2)}% of tokens, max ${fmt(d.max)}`),
    el("p", { id: "explanation" }, el("b", {}, "explanation: "),
      d.explanation || el("span", { class: "muted" }, "none yet (modelrecon explain, or trace --explain)")),
    scoresView(d),
    el("h3", {}, "top activations"),
    el("p", { class: "muted", id: "example-legend" }, "shade: the feature's activation on each token, from 0 (white) ",
      el("span", { class: "tok", style: "background: rgba(255, 140, 0, 1)" }, `to ${fmt(d.max)}`),
      " (its max); the activating token is outlined; hover a token for its value"),
    el("div", { id: "top-examples" }, ...d.top_examples.map(x => exampleView(x, d.max))),
    el("h3", {}, "activation histogram (non-zero activations)"), histogramView(d.histogram),
    el("h3", {}, "by quantile"),
    ...d.quantile_examples.map(q => el("div", {}, el("span", { class: "muted" },
      `${fmt(q.low)}–${fmt(q.high)}`), ...q.examples.map(x => exampleView(x, d.max)))),
    el("h3", {}, "promotes (logit weight)"), logits(d.top_logits),
    el("h3", {}, "suppresses (logit weight)"), logits(d.bottom_logits),
  ];
}

// --- cube -----------------------------------------------------------------------------------------------------------
const METRIC_UNITS = { norm: "L2 norm over the site's units", mean: "mean over units", std: "std over units",
  max: "max over units", frac_active: "fraction of units > 0" };
// By default the first position is left out of the colour scale: in real models its norm is tens of times the rest
// (the attention sink), and with it in the domain every other cell is one colour
const cubeScale = { mode: "robust", skipFirst: true };
const attentionScale = { mode: "robust", skipFirst: true };

async function cubeView(main, id, query = {}) {
  const params = new URLSearchParams(query).toString();
  const data = await api(apiPath("/api/cube/", id) + (params ? "?" + params : ""));
  const view = data.view;
  const select = (sid, options, value, onchange) => el("select", { id: sid, onchange }, ...options.map(([v, text]) => {
    const o = el("option", { value: v }, text); if (String(v) === String(value)) o.selected = true; return o; }));
  const again = change => cubeView(main, id, { kind: view.kind, metric: view.metric, prompt: view.prompt, ...change });
  const box = el("div", { id: "cube-heat-box" });
  const note = el("p", { class: "muted scale-note", id: "cube-scale-note" });
  const controls = el("div", { class: "controls" },
    el("label", {}, "site ", select("cube-kind", data.kinds.map(k => [k, k]), view.kind,
      e => again({ kind: e.target.value }))),
    el("label", {}, "metric ", select("cube-metric", data.metrics.map(m => [m, m]), view.metric,
      e => again({ metric: e.target.value }))),
    el("label", {}, "prompt ", select("cube-prompt", data.prompts.map((p, k) => [k, `${k}: ${p}`]), view.prompt,
      e => again({ prompt: e.target.value }))),
    el("br"), ...scaleControls("cube", cubeScale, draw));
  const lineBox = el("div", {});
  const lineTitle = el("h3", {});
  let chosen = view.tokens.length - 1, map = null;
  function draw() {
    const skip = cubeScale.skipFirst && view.tokens.length > 1;
    const domain = view.values.slice(skip ? 1 : 0).flat().filter(v => v !== null);
    const scale = colourScale(domain, { mode: cubeScale.mode });
    map = heatmap({ id: "cube-heat", rows: view.layers, cols: view.tokens.map(t => tokText(t)),
      value: (r, c) => view.values[c][r], scale,
      legendTitle: `${view.metric} (${METRIC_UNITS[view.metric] || view.metric})`,
      xTitle: "token (position)", yTitle: "layer",
      tip: (r, c, v) => `${JSON.stringify(view.tokens[c])} @${c}, ${view.layers[r]}: ${view.metric} = ${fmt(v)}`,
      onClick: (r, c) => line(c) });
    map.node.setAttribute("data-metric", view.metric);
    box.replaceChildren(map.node);
    note.textContent = scaleNote(scale, skip);
    line(chosen);
  }
  function line(j) {
    chosen = j;
    map.select(j);
    lineTitle.textContent = `${view.metric} of ${JSON.stringify(view.tokens[j])} (position ${j}) across layers`;
    lineBox.replaceChildren(lineChart({ id: "cube-line", xLabels: view.layers, ys: view.values[j].map(v => v ?? NaN),
      xTitle: "layer", yTitle: view.metric }));
  }
  main.replaceChildren(el("h2", {}, `${data.model}: ${view.kind} ${view.metric}`), controls, box, note, lineTitle,
    lineBox);
  draw();
  if (data.attention_layers.length) main.append(await attentionView(id, view.prompt, data.attention_layers));
}

async function attentionView(id, prompt, layers) {
  const box = el("div", { id: "attention" });
  const layerSelect = el("select", { id: "attn-layer" }, ...layers.map(l => el("option", { value: l }, `layer ${l}`)));
  const headSelect = el("select", { id: "attn-head" });
  const chart = el("div", { id: "attn-box" }), note = el("p", { class: "muted scale-note" });
  let pattern = null;
  async function load() {
    pattern = await api(apiPath("/api/attention/", id) + `?prompt=${prompt}&layer=${layerSelect.value}`);
    const keep = headSelect.value || "0";
    headSelect.replaceChildren(...pattern.heads.map((h, k) => el("option", { value: k }, `head ${k}`)));
    headSelect.value = Math.min(+keep, pattern.heads.length - 1);
    draw();
  }
  function draw() {
    const grid = pattern.heads[+headSelect.value], skip = attentionScale.skipFirst && grid.length > 1;
    // the domain: the causal (lower) triangle only, without the first key when asked (it soaks up attention)
    const domain = grid.flatMap((row, q) => row.filter((v, k) => k <= q && (!skip || k > 0)));
    const scale = colourScale(domain, { mode: attentionScale.mode, signed: false, interpolator: d3.interpolateBlues });
    const labels = pattern.tokens.map(t => tokText(t));
    // keys after the query are masked (grey), not zeros of the pattern
    chart.replaceChildren(heatmap({ id: "attn-heat", rows: labels, cols: labels,
      value: (q, k) => k > q ? null : grid[q][k], scale,
      legendTitle: "attention weight (probability, rows sum to 1)", xTitle: "key token (attended to)",
      yTitle: "query token", cell: [[3, 24], [3, 24]],
      tip: (q, k, v) => `${JSON.stringify(pattern.tokens[q])} @${q} -> ${JSON.stringify(pattern.tokens[k])} @${k}: ` +
        fmt(v) }).node);
    note.textContent = scaleNote(scale, skip).replace("position 0", "the first key");
  }
  layerSelect.onchange = load; headSelect.onchange = draw;
  box.append(el("h3", {}, "attention pattern"), el("div", { class: "controls" }, layerSelect, headSelect, " ",
    ...scaleControls("attn", attentionScale, () => draw(), "leave the first key out of the colour scale")),
  chart, note);
  await load();
  return box;
}

// --- experiments ----------------------------------------------------------------------------------------------------
const sweepScale = { mode: "robust", skipFirst: false };

async function experimentView(main, id) {
  const payload = await api(apiPath("/api/experiment/", id));
  const d = payload.data;
  if (payload.kind === "verify") return verifyView(main, d);
  if (payload.kind === "experiment") return experimentReportView(main, d);
  const [rows, cols] = d.shape, grid = Array.from({ length: rows }, () => new Array(cols).fill(null));
  d.results.forEach((r, k) => { grid[Math.floor(k / cols)][k % cols] = r; });
  const first = d.results[0] || {}, byHead = first.head !== undefined, whole = !byHead && first.position === null;
  // heads, every position at once (path patching of MLPs), or the tokens
  const colNames = d3.range(cols).map(c => byHead ? `H${c}` : whole ? "all positions" :
    tokText(d.tokens && d.tokens[c] !== undefined ? d.tokens[c] : c));
  const box = el("div", { id: "sweep-box" }), note = el("p", { class: "muted scale-note" });
  function draw() {
    const skip = sweepScale.skipFirst && cols > 1 && !byHead;
    const domain = grid.flatMap(row => row.slice(skip ? 1 : 0)).map(c => c ? c.effect : null).filter(v => v !== null);
    const scale = colourScale(domain, { mode: sweepScale.mode, signed: true });
    box.replaceChildren(heatmap({ id: "sweep-heat", rows: d3.range(rows).map(r => `L${r}`), cols: colNames,
      value: (r, c) => grid[r][c] ? grid[r][c].effect : null, scale,
      legendTitle: `effect on ${d.metric} (1 = clean answer restored, 0 = no change)`,
      xTitle: byHead ? "head" : "token (position) patched", yTitle: "layer",
      tip: (r, c) => { const cell = grid[r][c]; if (!cell) return "no cell";
        return `${cell.site}${cell.position !== undefined && cell.position !== null ? " @" + cell.position : ""}` +
          `${cell.head !== undefined ? " head " + cell.head : ""}\neffect ${fmt(cell.effect)}  ` +
          `95% CI [${fmt(cell.ci_low)}, ${fmt(cell.ci_high)}]`; } }).node);
    note.textContent = scaleNote(scale, skip);
  }
  const what = d.receivers ? `${d.kind}, path to ${d.receivers.join(", ")}` : d.kind;
  main.replaceChildren(el("h2", {}, `${d.direction} patching of ${what}: effect on ${d.metric} (${d.n_pairs} pairs)`),
    el("p", { class: "muted" }, `clean ${JSON.stringify(d.clean)} · corrupt ${JSON.stringify(d.corrupt)} · ` +
      "blue restores the clean answer, red moves away; hover for the effect and its confidence interval"),
    el("div", { class: "controls" }, ...scaleControls("sweep", sweepScale, draw)), box, note);
  draw();
}

function verifyView(main, d) {
  const W = 460, H = 420, m = { left: 60, right: 16, top: 16, bottom: 46 };
  const all = [...d.estimate, ...d.exact].filter(v => v !== null);
  const ext = d3.extent(all.length ? [0, ...all] : [0, 1]);
  const x = d3.scaleLinear().domain(ext).nice().range([m.left, W - m.right]);
  const y = d3.scaleLinear().domain(ext).nice().range([H - m.bottom, m.top]);
  const svg = d3.create("svg").attr("width", W).attr("height", H).attr("id", "scatter");
  const [lo, hi] = x.domain();
  svg.append("line").attr("x1", x(lo)).attr("y1", y(lo)).attr("x2", x(hi)).attr("y2", y(hi)).attr("stroke", "#999")
    .attr("stroke-dasharray", "4 3");
  svg.append("g").attr("class", "axis x-axis").attr("transform", `translate(0,${H - m.bottom})`)
    .call(d3.axisBottom(x).ticks(6, "~g"));
  svg.append("g").attr("class", "axis y-axis").attr("transform", `translate(${m.left},0)`)
    .call(d3.axisLeft(y).ticks(6, "~g"));
  svg.append("text").attr("class", "axis-title").attr("x", (m.left + W) / 2).attr("y", H - 8)
    .attr("text-anchor", "middle")
    .text("exact patching effect");
  svg.append("text").attr("class", "axis-title").attr("transform", `translate(14,${(H - m.bottom) / 2}) rotate(-90)`)
    .attr("text-anchor", "middle").text(`${d.method} estimate`);
  const flagged = new Set(d.disagreements.map(g => `${g.site}|${g.position}|${g.head}`));
  const points = d.cells
    .map((c, k) => ({ c, k, bad: flagged.has(`${c.site}|${c.position ?? null}|${c.head ?? null}`) }))
    .filter(p => d.estimate[p.k] !== null && d.exact[p.k] !== null);
  svg.append("g").selectAll("circle").data(points).join("circle").attr("class", "point")
    .attr("cx", p => x(d.exact[p.k])).attr("cy", p => y(d.estimate[p.k])).attr("r", p => p.bad ? 4 : 2.5)
    .attr("fill", p => p.bad ? "#c53030" : "#2b6cb0")
    .on("mousemove", (e, p) => showTip(e, `${p.c.site} ${p.c.position ?? ""}${p.c.head ?? ""}\n` +
      `exact ${fmt(d.exact[p.k])}  ${d.method} ${fmt(d.estimate[p.k])}`)).on("mouseleave", hideTip);
  const key = svg.append("g").attr("class", "legend").attr("transform", `translate(${m.left + 10},${m.top + 6})`);
  [["#2b6cb0", "agrees"], ["#c53030", "disagreement"]].forEach(([colour, text], k) => {
    key.append("circle").attr("cx", 4).attr("cy", k * 15).attr("r", 4).attr("fill", colour);
    key.append("text").attr("x", 12).attr("y", k * 15 + 4).text(text);
  });
  key.append("line").attr("x1", 0).attr("x2", 10).attr("y1", 30).attr("y2", 30).attr("stroke", "#999")
    .attr("stroke-dasharray", "4 3");
  key.append("text").attr("x", 12).attr("y", 34).text("agreement (y = x)");
  main.replaceChildren(el("h2", {}, `${d.method} against exact patching (${d.kind})`),
    el("p", {}, `Spearman ${fmt(d.spearman)}, Kendall ${fmt(d.kendall)}, Pearson ${fmt(d.pearson)}; ` +
      `${d.disagreements.length} disagreements (red). x: exact effect, y: the estimate; the dashed line is agreement.`),
    svg.node(),
    el("h3", {}, "disagreements"),
    el("table", { id: "disagreements" }, el("tr", {}, ...["site", "position", "head", "estimate", "exact", "kind"]
      .map(h => el("th", {}, h))), ...d.disagreements.map(g => el("tr", {}, ...[g.site, g.position ?? "",
      g.head ?? "", fmt(g.estimate), fmt(g.exact), g.kind].map(v => el("td", {}, v))))));
}

// --- experiment reports -------------------------------------------------------------------------------------------
// `ExperimentResult.to_dict()`: each component's mean effect with its interval and tests, the per-item effects as a
// component x item heatmap, and the experiment's own sanity checks
function experimentReportView(main, d) {
  const comps = d.components, nItems = d.clean.length, sanity = d.sanity || {};
  const table = el("table", { id: "experiment-components" },
    el("tr", {}, ...["component", "effect", "95% CI", "p", "p (Holm)", `mean ${d.metric}`].map(h => el("th", {}, h))),
    ...comps.map(c => el("tr", {}, ...[c.name, fmt(c.effect), `[${fmt(c.ci_low)}, ${fmt(c.ci_high)}]`, fmt(c.p_value),
      fmt(c.p_adjusted), fmt(c.value)].map(v => el("td", {}, v)))));
  const scale = colourScale(comps.flatMap(c => c.effects).filter(v => v !== null), { mode: "linear", signed: true });
  const map = heatmap({ id: "experiment-heat", rows: comps.map(c => c.name), cols: d3.range(nItems).map(String),
    value: (r, c) => comps[r].effects[c] ?? null, scale, xTitle: "item (prompt pair)", yTitle: "component",
    legendTitle: `effect on ${d.metric} (1 = like the clean input, 0 = like the counterfactual)`,
    tip: (r, c, v) => `${comps[r].name}, item ${c}\neffect ${fmt(v)}, ${d.metric} ${fmt(comps[r].values[c])}\n` +
      `clean ${fmt(d.clean[c])}, counterfactual ${fmt(d.counterfactual[c])}` });
  const checks = [`no-op intervention exact: ${sanity.noop_exact}`, `full patch exact: ${sanity.full_patch_exact}`,
    `items without an effect (clean = counterfactual): ${fmt(sanity.items_without_effect)}`, ...(sanity.notes || [])];
  main.replaceChildren(el("h2", {}, `experiment: effect on ${d.metric} (${nItems} items, interventions on the ` +
      `${d.base} input)`), table, el("h3", {}, "per item"), map.node,
    el("h3", {}, "sanity checks"), el("ul", { id: "experiment-sanity" }, ...checks.map(t => el("li", {}, t))));
}

// --- logit lens -----------------------------------------------------------------------------------------------------
// `LensResult.to_dict()`: the top next tokens after every layer at every position, shaded by probability
async function lensView(main, id) {
  const payload = await api(apiPath("/api/lens/", id));
  const d = payload.data, hasTarget = d.target !== undefined && d.target !== null;
  const box = el("div", { id: "lens-box" });
  const choice = el("select", { id: "lens-colour", onchange: draw },
    el("option", { value: "top" }, "probability of the top token"),
    ...(hasTarget ? [el("option", { value: "target" }, `probability of ${JSON.stringify(d.target)}`)] : []));
  function draw() {
    const target = choice.value === "target";
    const value = (r, c) => target ? d.target_prob[r][c] : d.top[r][c][0].prob;
    const scale = colourScale([], { fixed: [0, 1], interpolator: d3.interpolateBlues });
    box.replaceChildren(heatmap({ id: "lens-heat", rows: d.rows, cols: d.tokens.map(t => tokText(t)), value, scale,
      legendTitle: target ? `probability of ${JSON.stringify(d.target)}` : "probability of the top next token",
      xTitle: "token (position)", yTitle: "residual stream after", cell: [[26, 48], [14, 22]],
      text: (r, c) => d.top[r][c][0].token,
      tip: (r, c) => d.top[r][c].map(t => `${JSON.stringify(t.token)} ${fmt(t.prob)}`).join("\n") +
        (hasTarget ? `\n${JSON.stringify(d.target)}: p=${fmt(d.target_prob[r][c])}, rank ${d.target_rank[r][c]}` : "")
    }).node);
  }
  main.replaceChildren(el("h2", {}, `logit lens: ${d.prompt}`),
    el("p", { class: "muted" }, "the top next token after each position, read off the residual stream after each " +
      "layer; hover for the top-k" + (hasTarget ? " and the target's probability and rank" : "")),
    el("div", { class: "controls" }, el("label", {}, "colour ", choice)), box);
  draw();
}

render();
