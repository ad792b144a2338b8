// modelrecon viewer: plain JS and SVG, no third-party code, nothing loaded from the network but this app's own API.
// The same code runs served (`modelrecon serve`: data from /api) and embedded (a notebook or a standalone page:
// window.MR_EMBED = {routes: {apiPath: response}, start: "#/graph/ID"}). File contents are untrusted: they are only
// ever put into the page as text (textContent, SVG attributes), never as HTML.
"use strict";

const EMBED = window.MR_EMBED || null;
const SVGNS = "http://www.w3.org/2000/svg";
const MAX_EDGES = 4000; // edges drawn in the overview (strongest first); a click shows a node's own

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

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
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
    else await indexView(main);
  } catch (err) {
    main.replaceChildren(el("p", { class: "error" }, String(err.message || err)));
  }
}

// --- index ----------------------------------------------------------------------------------------------------------
async function indexView(main) {
  const index = await api("/api/index");
  const kinds = { graph: "Attribution graphs", cube: "Activation cubes", sweep: "Patching sweeps",
    verify: "Attribution vs patching" };
  main.replaceChildren(el("h2", {}, `Results in ${index.root}`));
  for (const [kind, title] of Object.entries(kinds)) {
    const items = index.artifacts.filter(a => a.kind === kind);
    if (!items.length) continue;
    const view = kind === "sweep" || kind === "verify" ? "experiment" : kind;
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

function layout(graph, width, height) {
  const tokens = graph.metadata.prompt_tokens;
  const nLayers = graph.metadata.modelrecon ? graph.metadata.modelrecon.n_layers : 0;
  const rows = nLayers + 2, pad = 40, colW = (width - 2 * pad) / Math.max(1, tokens.length);
  const rowH = (height - 2 * pad) / Math.max(1, rows - 1);
  const cells = new Map();
  graph.nodes.forEach((n, i) => {
    const spread = n.ctx_idx === null || n.ctx_idx === undefined;
    const key = spread ? `c${layerRow(n, nLayers)}` : `${n.ctx_idx}:${layerRow(n, nLayers)}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  });
  const pos = new Array(graph.nodes.length);
  for (const [key, members] of cells) {
    members.sort((a, b) => (graph.nodes[a].influence ?? 1) - (graph.nodes[b].influence ?? 1));
    members.forEach((i, k) => {
      const n = graph.nodes[i], row = layerRow(n, nLayers);
      const spread = key.startsWith("c"); // heads and MLPs of a component graph span every position
      const x = spread ? pad + (width - 2 * pad) * (k + 0.5) / members.length
        : pad + colW * n.ctx_idx + colW * (k + 1) / (members.length + 1);
      pos[i] = [x, height - pad - row * rowH];
    });
  }
  return { pos, tokens, nLayers, colW, rowH, pad };
}

function nodeRadius(n) {
  if (n.feature_type === "logit") return 4 + 8 * (n.token_prob || 0);
  const influence = n.influence === null || n.influence === undefined ? 0.5 : n.influence;
  return 2.5 + 6 * (1 - Math.min(1, Math.max(0, influence)));
}

const COLOURS = { "cross layer transcoder": "#3b6fc4", "mlp reconstruction error": "#9a9a9a", embedding: "#2f9e44",
  logit: "#e08a00", "attention head": "#8a4fd0", mlp: "#d04f8a" };

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

async function graphView(main, id) {
  const payload = await api(apiPath("/api/graph/", id));
  const graph = payload.graph, nodes = graph.nodes;
  const notes = { pinned: [], supernodes: [], labels: {}, ...payload.annotations };
  const index = new Map(nodes.map((n, i) => [n.node_id, i]));
  const links = graph.links.map(l => [index.get(l.source), index.get(l.target), l.weight])
    .filter(l => l[0] !== undefined && l[1] !== undefined);
  const inputs = nodes.map(() => []), outputs = nodes.map(() => []);
  links.forEach((l, k) => { inputs[l[1]].push(k); outputs[l[0]].push(k); });
  const width = Math.max(900, Math.min(2400, 70 * graph.metadata.prompt_tokens.length + 200));
  const height = 640;
  const L = layout(graph, width, height);
  const root = svg("svg", { class: "graph-svg", width, height, viewBox: `0 0 ${width} ${height}` });
  // axes: tokens along the bottom, layers up the side
  L.tokens.forEach((t, p) => {
    const label = svg("text", { x: L.pad + L.colW * (p + 0.5), y: height - 8, "text-anchor": "middle", class: "axis" });
    label.textContent = JSON.stringify(t).slice(0, 14); root.append(label);
  });
  for (let r = 0; r <= L.nLayers + 1; r += Math.max(1, Math.ceil(L.nLayers / 12))) {
    const label = svg("text", { x: 4, y: height - L.pad - r * L.rowH + 3, class: "axis" });
    label.textContent = r === 0 ? "emb" : (r === L.nLayers + 1 ? "out" : `L${r - 1}`); root.append(label);
  }
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
  const edgeLayer = svg("g", { class: "edges" });
  for (const [key, segments] of buckets) {
    edgeLayer.append(svg("path", { d: segments.join(""), fill: "none", stroke: key[0] === "p" ? "#2b6cb0" : "#c53030",
      "stroke-width": 0.4 + 0.8 * Number(key[1]), "stroke-opacity": 0.35 }));
  }
  root.append(edgeLayer);
  const highlight = svg("g", { class: "highlight" });
  root.append(highlight);
  const circles = nodes.map((n, i) => {
    const c = svg("circle", { cx: L.pos[i][0].toFixed(1), cy: L.pos[i][1].toFixed(1), r: nodeRadius(n).toFixed(1),
      fill: COLOURS[n.feature_type] || "#555", class: "node", "data-id": n.node_id, "data-kind": n.feature_type,
      "data-index": i });
    root.append(c);
    return c;
  });
  const panel = el("div", { id: "panel" }, el("p", { class: "muted" }, "click a node"));
  const status = el("span", { id: "save-status", class: "muted" });
  const pinBox = el("div", { id: "pins" });
  const head = el("div", {},
    el("h2", {}, graph.metadata.prompt, " ", el("span", { class: "muted" },
      `${nodes.length} nodes, ${links.length} edges` + (payload.has_dashboards ? "" : " (no feature dashboards)"))),
    pinBox);
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
      await api(apiPath("/api/annotations/", id), { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(notes) });
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
    highlight.replaceChildren();
    const ins = top(inputs[i], 8), outs = top(outputs[i], 8);
    for (const k of [...ins, ...outs]) {
      const [s, t, w] = links[k];
      highlight.append(svg("line", { x1: L.pos[s][0], y1: L.pos[s][1], x2: L.pos[t][0], y2: L.pos[t][1],
        stroke: w >= 0 ? "#2b6cb0" : "#c53030", "stroke-width": 1 + 3 * Math.abs(w) / maxW, "stroke-opacity": 0.9 }));
      circles[s].classList.add("hl"); circles[t].classList.add("hl");
    }
    showPanel(i, ins, outs);
  }
  async function showPanel(i, ins, outs) {
    const n = nodes[i], pinned = notes.pinned.includes(n.node_id);
    const label = el("input", { id: "node-label", value: notes.labels[n.node_id] || "", placeholder: "label", size: 24,
      oninput: e => { if (e.target.value) notes.labels[n.node_id] = e.target.value.slice(0, 200);
        else delete notes.labels[n.node_id]; } });
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
      el("h3", {}, "strongest inputs"), linkList(ins, 0),
      el("h3", {}, "strongest outputs"), linkList(outs, 1),
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
    }
  });
  root.addEventListener("mouseout", hideTip);
  root.addEventListener("click", e => {
    const i = e.target.dataset && e.target.dataset.index;
    if (i !== undefined) select(+i);
    else { root.classList.remove("focus"); highlight.replaceChildren(); }
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

function dashboardView(d) {
  if (!d) return [el("p", { class: "muted", id: "no-dashboard" },
    "no dashboard for this feature (trace with --cube to build them)")];
  const hist = svg("svg", { width: 340, height: 70, id: "histogram" });
  const counts = d.histogram.counts, peak = Math.max(1, ...counts);
  counts.forEach((c, k) => hist.append(svg("rect", { x: k * 340 / counts.length, width: 340 / counts.length - 1,
    y: 65 - 60 * c / peak, height: 60 * c / peak, fill: "#3b6fc4" })));
  const logits = list => el("span", {}, list.map(([t, v]) => `${JSON.stringify(t)} ${fmt(v)}`).join("  "));
  return [
    el("h3", {}, `feature L${d.layer}/${d.feature}`),
    el("p", {}, `fires on ${(100 * d.frequency).toFixed(2)}% of tokens, max ${fmt(d.max)}`),
    el("p", { id: "explanation" }, el("b", {}, "explanation: "),
      d.explanation || el("span", { class: "muted" }, "none yet (modelrecon explain, or trace --explain)")),
    scoresView(d),
    el("h3", {}, "top activations"),
    el("div", { id: "top-examples" }, ...d.top_examples.map(x => exampleView(x, d.max))),
    el("h3", {}, "activation histogram (non-zero)"), hist,
    el("h3", {}, "by quantile"),
    ...d.quantile_examples.map(q => el("div", {}, el("span", { class: "muted" },
      `${fmt(q.low)}–${fmt(q.high)}`), ...q.examples.map(x => exampleView(x, d.max)))),
    el("h3", {}, "promotes"), logits(d.top_logits),
    el("h3", {}, "suppresses"), logits(d.bottom_logits),
  ];
}

// --- cube -----------------------------------------------------------------------------------------------------------
function heatColour(t) { return `rgb(${Math.round(255 - 200 * t)},${Math.round(255 - 120 * t)},255)`; }

async function cubeView(main, id, query = {}) {
  const params = new URLSearchParams(query).toString();
  const data = await api(apiPath("/api/cube/", id) + (params ? "?" + params : ""));
  const view = data.view;
  const select = (sid, options, value, onchange) => el("select", { id: sid, onchange }, ...options.map(([v, text]) => {
    const o = el("option", { value: v }, text); if (String(v) === String(value)) o.selected = true; return o; }));
  const again = change => cubeView(main, id, { kind: view.kind, metric: view.metric, prompt: view.prompt, ...change });
  const controls = el("div", { class: "controls" },
    el("label", {}, "site ", select("cube-kind", data.kinds.map(k => [k, k]), view.kind,
      e => again({ kind: e.target.value }))),
    el("label", {}, "metric ", select("cube-metric", data.metrics.map(m => [m, m]), view.metric,
      e => again({ metric: e.target.value }))),
    el("label", {}, "prompt ", select("cube-prompt", data.prompts.map((p, k) => [k, `${k}: ${p}`]), view.prompt,
      e => again({ prompt: e.target.value }))));
  const values = view.values.flat().filter(v => v !== null);
  const lo = Math.min(...values), hi = Math.max(...values);
  const table = el("table", { class: "heat", id: "cube-heat", "data-metric": view.metric });
  const headRow = el("tr", {}, el("th"));
  view.tokens.forEach((t, j) => headRow.append(el("th", { "data-token": j, onclick: () => line(j) },
    JSON.stringify(t))));
  table.append(el("thead", {}, headRow));
  const body = el("tbody");
  view.layers.forEach((layer, i) => {
    const tr = el("tr", {}, el("th", {}, layer));
    view.tokens.forEach((t, j) => {
      const v = view.values[j][i];
      const td = el("td", { "data-token": j, style: `background: ${v === null ? "#eee" :
        heatColour(hi > lo ? (v - lo) / (hi - lo) : 0.5)}` });
      td.onmousemove = e => showTip(e, `${JSON.stringify(t)} @ ${layer}: ${view.metric} = ${fmt(v)}`);
      td.onmouseleave = hideTip; td.onclick = () => line(j);
      tr.append(td);
    });
    body.append(tr);
  });
  table.append(body);
  const chart = svg("svg", { width: 640, height: 200, id: "cube-line" });
  const lineTitle = el("h3", {});
  function line(j) {
    table.querySelectorAll(".sel").forEach(e => e.classList.remove("sel"));
    table.querySelectorAll(`[data-token="${j}"]`).forEach(e => e.classList.add("sel"));
    lineTitle.textContent = `${view.metric} of ${JSON.stringify(view.tokens[j])} across layers`;
    const ys = view.values[j], ok = ys.filter(v => v !== null), a = Math.min(...ok), b = Math.max(...ok);
    const x = i => 30 + 580 * (ys.length > 1 ? i / (ys.length - 1) : 0.5);
    const y = v => 180 - 160 * (b > a ? (v - a) / (b - a) : 0.5);
    chart.replaceChildren(svg("polyline", { points: ys.map((v, i) => v === null ? "" : `${x(i)},${y(v)}`).join(" "),
      fill: "none", stroke: "#36c", "stroke-width": 2 }));
  }
  main.replaceChildren(el("h2", {}, `${data.model}: ${view.kind} ${view.metric}`), controls, table, lineTitle, chart);
  line(view.tokens.length - 1);
  if (data.attention_layers.length) main.append(await attentionView(id, view.prompt, data.attention_layers));
}

async function attentionView(id, prompt, layers) {
  const box = el("div", { id: "attention" });
  const layerSelect = el("select", { id: "attn-layer" }, ...layers.map(l => el("option", { value: l }, `layer ${l}`)));
  const headSelect = el("select", { id: "attn-head" });
  const canvas = el("canvas", { id: "attn-canvas", width: 420, height: 420 });
  let pattern = null;
  async function load() {
    pattern = await api(apiPath("/api/attention/", id) + `?prompt=${prompt}&layer=${layerSelect.value}`);
    const keep = headSelect.value || "0";
    headSelect.replaceChildren(...pattern.heads.map((h, k) => el("option", { value: k }, `head ${k}`)));
    headSelect.value = Math.min(+keep, pattern.heads.length - 1);
    draw();
  }
  function draw() {
    const grid = pattern.heads[+headSelect.value], n = grid.length, cell = 420 / n, ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, 420, 420);
    grid.forEach((row, q) => row.forEach((v, k) => {
      ctx.fillStyle = heatColour(Math.min(1, Math.max(0, v))); ctx.fillRect(k * cell, q * cell, cell, cell);
    }));
  }
  canvas.onmousemove = e => {
    if (!pattern) return;
    const n = pattern.tokens.length, q = Math.floor(e.offsetY / (420 / n)), k = Math.floor(e.offsetX / (420 / n));
    const v = pattern.heads[+headSelect.value][q] && pattern.heads[+headSelect.value][q][k];
    if (v !== undefined) showTip(e, `${JSON.stringify(pattern.tokens[q])} -> ${JSON.stringify(pattern.tokens[k])}: ` +
      fmt(v));
  };
  canvas.onmouseleave = hideTip;
  layerSelect.onchange = load; headSelect.onchange = draw;
  box.append(el("h3", {}, "attention (rows: query, columns: key)"), layerSelect, headSelect, el("br"), canvas);
  await load();
  return box;
}

// --- experiments ----------------------------------------------------------------------------------------------------
async function experimentView(main, id) {
  const payload = await api(apiPath("/api/experiment/", id));
  const d = payload.data;
  if (payload.kind === "verify") return verifyView(main, d);
  const [rows, cols] = d.shape, grid = Array.from({ length: rows }, () => new Array(cols).fill(null));
  d.results.forEach((r, k) => { grid[Math.floor(k / cols)][k % cols] = r; });
  const limit = Math.max(1e-12, ...d.results.map(r => Math.abs(r.effect ?? 0)));
  const colour = e => e === null ? "#eee" : (e >= 0 ? `rgba(43,108,176,${Math.abs(e) / limit})`
    : `rgba(197,48,48,${Math.abs(e) / limit})`);
  const table = el("table", { class: "heat", id: "sweep-heat" });
  const first = d.results[0] || {}, byHead = first.head !== undefined, whole = !byHead && first.position === null;
  const headRow = el("tr", {}, el("th"));
  for (let c = 0; c < cols; c++) {  // heads, every position at once (path patching of MLPs), or the tokens
    headRow.append(el("th", {}, byHead ? `H${c}` : whole ? "all positions" :
      JSON.stringify(d.tokens && d.tokens[c] !== undefined ? d.tokens[c] : c)));
  }
  table.append(el("thead", {}, headRow));
  grid.forEach((row, r) => {
    const tr = el("tr", {}, el("th", {}, `L${r}`));
    row.forEach(cell => {
      const td = el("td", { style: `background: ${colour(cell ? cell.effect : null)}` });
      if (cell) td.onmousemove = e => showTip(e, `${cell.site}${cell.position !== undefined ? " @" + cell.position : ""}` +
        `${cell.head !== undefined ? " head " + cell.head : ""}\neffect ${fmt(cell.effect)}  ` +
        `95% CI [${fmt(cell.ci_low)}, ${fmt(cell.ci_high)}]`);
      td.onmouseleave = hideTip;
      tr.append(td);
    });
    table.append(tr);
  });
  const what = d.receivers ? `${d.kind}, path to ${d.receivers.join(", ")}` : d.kind;
  main.replaceChildren(el("h2", {}, `${d.direction} patching of ${what}: effect on ${d.metric} (${d.n_pairs} pairs)`),
    el("p", { class: "muted" }, `clean ${JSON.stringify(d.clean)} · corrupt ${JSON.stringify(d.corrupt)} · ` +
      "blue restores the clean answer, red moves away; hover for the effect and its confidence interval"), table);
}

function verifyView(main, d) {
  const W = 420, P = 40, all = [...d.estimate, ...d.exact].filter(v => v !== null);
  const lo = Math.min(0, ...all), hi = Math.max(1e-12, ...all);
  const s = v => P + (W - 2 * P) * (v - lo) / (hi - lo), y = v => W - s(v);
  const plot = svg("svg", { width: W, height: W, id: "scatter" });
  plot.append(svg("line", { x1: s(lo), y1: y(lo), x2: s(hi), y2: y(hi), stroke: "#999", "stroke-dasharray": "4 3" }));
  const flagged = new Set(d.disagreements.map(g => `${g.site}|${g.position}|${g.head}`));
  d.cells.forEach((c, k) => {
    if (d.estimate[k] === null || d.exact[k] === null) return;
    const bad = flagged.has(`${c.site}|${c.position ?? null}|${c.head ?? null}`);
    const dot = svg("circle", { cx: s(d.exact[k]), cy: y(d.estimate[k]), r: bad ? 4 : 2.5,
      fill: bad ? "#c53030" : "#2b6cb0", class: "point" });
    dot.addEventListener("mousemove", e => showTip(e, `${c.site} ${c.position ?? ""}${c.head ?? ""}\n` +
      `exact ${fmt(d.exact[k])}  ${d.method} ${fmt(d.estimate[k])}`));
    dot.addEventListener("mouseleave", hideTip);
    plot.append(dot);
  });
  main.replaceChildren(el("h2", {}, `${d.method} against exact patching (${d.kind})`),
    el("p", {}, `Spearman ${fmt(d.spearman)}, Kendall ${fmt(d.kendall)}, Pearson ${fmt(d.pearson)}; ` +
      `${d.disagreements.length} disagreements (red). x: exact effect, y: the estimate; the dashed line is agreement.`),
    plot,
    el("h3", {}, "disagreements"),
    el("table", { id: "disagreements" }, el("tr", {}, ...["site", "position", "head", "estimate", "exact", "kind"]
      .map(h => el("th", {}, h))), ...d.disagreements.map(g => el("tr", {}, ...[g.site, g.position ?? "",
      g.head ?? "", fmt(g.estimate), fmt(g.exact), g.kind].map(v => el("td", {}, v))))));
}

render();
