// HiLoRA Serve playground: plain JS over the public HTTP API only (the same calls any client makes).
"use strict";

// The API lives where the page does: /ui -> "", /prefix/ui -> "/prefix".
const BASE = location.pathname.replace(/\/ui\/?$/, "");
const SVGNS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2e6fdb", "#d9480f", "#2b8a3e", "#9c36b5", "#c2255c", "#0b7285", "#e8590c", "#5c940d"];
const $ = (id) => document.getElementById(id);
const PAGE = 50;  // adapters per page of the pool table
const state = { pool: null, token: sessionStorage.getItem("hilora-admin-token") || "", admin: null, request: null,
  view: { q: "", tag: "", offset: 0 } };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// One call to the API; an error response becomes ApiError with the API's own message.
async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json", ...(options.headers || {}) };
  const response = await fetch(BASE + path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

function adminHeaders() { return state.token ? { Authorization: `Bearer ${state.token}` } : {}; }

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node[k] = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// Tags get palette colours in sorted order, so the pool's clusters never share a colour (up to 8).
function colourOf(tag) {
  if (!tag) return "#667085";
  const tags = Object.keys(state.pool ? state.pool.tags : {}).sort();
  const i = tags.indexOf(tag);
  return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
}

// ---- health and pool -------------------------------------------------------------------------

async function refreshHealth() {
  const badge = $("health");
  try {
    const r = await fetch(BASE + "/readyz");
    const body = await r.json();
    const degraded = r.status !== 200;
    badge.textContent = degraded ? "degraded" : "ready";
    badge.className = "badge " + (degraded ? "bad" : "ok");
    $("degraded").hidden = !degraded;
    if (degraded) {
      const why = body.registry && body.registry.error ? `: ${body.registry.error}` : "";
      $("degraded").textContent = "Routing is degraded: the registry cannot reach Redis, so the router serves " +
        `its last copy of the pool and registration is unavailable${why}`;
    }
  } catch (err) {
    badge.textContent = "unreachable";
    badge.className = "badge bad";
  }
}

async function refreshPool() {
  const v = state.view;
  const query = new URLSearchParams({ limit: PAGE, offset: v.offset });
  if (v.q) query.set("q", v.q);
  if (v.tag) query.set("tag", v.tag);
  try {
    state.pool = await api(`/v1/pool?${query}`);
  } catch (err) {
    $("map-note").textContent = `pool unavailable: ${err.message}`;
    return;
  }
  const p = state.pool;
  $("epoch").textContent = `pool epoch ${p.epoch} - ${p.total} adapters` + (p.degraded ? " (degraded)" : "");
  renderFilters();
  renderTable();
  renderPicker();
  renderMap();
}

// The search box, the tag filter and the pager: the table shows one page of the matching adapters.
function renderFilters() {
  const p = state.pool, select = $("pool-tag"), current = state.view.tag;
  select.replaceChildren(el("option", { value: "" }, "all tags"),
    ...Object.entries(p.tags).map(([t, n]) => el("option", { value: t }, `${t} (${n})`)));
  select.value = current in p.tags ? current : "";
  const first = p.matching ? p.offset + 1 : 0, last = p.offset + p.adapters.length;
  $("pool-page").textContent = `${first}-${last} of ${p.matching}` + (p.matching < p.total ? ` (${p.total} in all)` : "");
  $("pool-prev").disabled = p.offset === 0;
  $("pool-next").disabled = p.next_offset === null;
}

function setView(change) {
  Object.assign(state.view, change);
  refreshPool();
}

function renderTable() {
  const body = $("adapters").querySelector("tbody");
  body.replaceChildren();
  for (const a of state.pool.adapters) {
    const tags = el("td");
    for (const t of a.tags) tags.append(el("span", { class: "tag", style: `background:${colourOf(t)}` }, t), " ");
    const actions = el("td");
    if (state.admin === "enabled") {
      actions.append(el("button", { class: "delete", type: "button", "data-id": a.id, onclick: () => remove(a.id) },
        "delete"));
    }
    body.append(el("tr", { "data-adapter": a.id }, el("td", {}, a.id), tags, el("td", {}, a.rank),
      el("td", {}, a.targets.join(", ")), el("td", {}, a.sample_count), el("td", {}, a.residency), actions));
  }
}

function renderPicker() {
  const select = $("picked");
  const current = select.value;
  const ids = state.pool.points.map((pt) => pt[0]);
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (current && ids.includes(current)) select.value = current;
}

// The adapters' means in the pool map's 2-D coordinates; the last request as a cross among them.
function renderMap() {
  const map = $("map");
  map.replaceChildren();
  const points = state.pool.points;  // every adapter: [id, x, y, first tag]
  const pts = points.map((pt) => [pt[1], pt[2]]);
  if (state.request) pts.push(state.request.position);
  if (!pts.length) { $("map-note").textContent = "the pool is empty"; return; }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 20 + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * 300;
  const sy = (y) => 270 - (y1 > y0 ? (y - y0) / (y1 - y0) : 0.5) * 240;
  const chosen = new Set(state.request ? state.request.adapters : []);
  // a large pool: small dots, each named on hover; labels only for the last request's candidates (and for all
  // in a pool small enough to read)
  const labelAll = points.length <= 24, radius = points.length > 200 ? 2.5 : 5;
  for (const [id, x, y, tag] of points) {
    const g = svg("g", { "data-adapter": id });
    const dot = svg("circle", { cx: sx(x), cy: sy(y), r: chosen.has(id) ? 8 : radius, fill: colourOf(tag),
      stroke: chosen.has(id) ? "#1d2430" : "none", "stroke-width": 2 });
    dot.append(svg("title", {}, id));
    g.append(dot);
    if (labelAll || chosen.has(id)) {
      g.append(svg("text", { x: sx(x) + 8, y: sy(y) + 4, "font-size": 10, fill: "#344054", class: "label" }, id));
    }
    map.append(g);
  }
  if (state.request) {
    const [x, y] = [sx(state.request.position[0]), sy(state.request.position[1])];
    map.append(svg("path", { d: `M${x - 7},${y - 7}L${x + 7},${y + 7}M${x - 7},${y + 7}L${x + 7},${y - 7}`,
      stroke: "#b42318", "stroke-width": 3, id: "request-mark" }));
    map.append(svg("text", { x: x + 9, y: y - 6, "font-size": 10, fill: "#b42318" }, "your request"));
  }
  $("map-note").textContent = `adapter means projected on the pool's ${state.pool.map.method}` +
    (state.request ? "; the cross is the last request" : "");
}

// ---- try it ------------------------------------------------------------------------------------

// Stream one chat completion into `out`; resolves with the final chunk's extras (routing, timing, usage).
async function streamChat(model, text, maxTokens, out, meta) {
  out.textContent = "";
  out.classList.remove("error");
  meta.textContent = "";
  const started = performance.now();
  let first = null, final = {};
  const body = { model, messages: [{ role: "user", content: text }], max_tokens: maxTokens, stream: true,
    stream_options: { include_usage: true } };
  try {
    const response = await fetch(BASE + "/v1/chat/completions",
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message = (await response.json()).error.message; } catch (_) { /* keep the status */ }
      throw new ApiError(response.status, message);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
        if (chunk.usage && !chunk.choices.length) final.usage = chunk.usage;
        for (const c of chunk.choices) {
          const delta = c.delta.content || "";
          if (delta && first === null) first = performance.now();
          out.textContent += delta;
        }
        if (chunk.routing) final.routing = chunk.routing;
        if (chunk.timing) final.timing = chunk.timing;
      }
    }
  } catch (err) {
    out.textContent = err.message;
    out.classList.add("error");
    return null;
  }
  const total = (performance.now() - started) / 1000;
  const tokens = final.usage ? final.usage.completion_tokens : "?";
  meta.textContent = `${tokens} tokens, first token ${first === null ? "-" : ((first - started) / 1000).toFixed(2)} s,` +
    ` total ${total.toFixed(2)} s`;
  return final;
}

function drawDecision(routing, timing) {
  const summary = $("decision-summary");
  const bars = $("scores");
  bars.replaceChildren();
  const off = routing.off_pool;
  const used = routing.adapters;
  let line = used.length ? `routed to ${used.join(", ")}` : "answered by the base model";
  if (off && off.fallback) {
    line = `no adapter covers this request: answered by the base model (best score ${off.best_score.toFixed(2)}` +
      ` below the threshold ${off.threshold.toFixed(2)})`;
  }
  if (timing) line += ` - routing ${(timing.routing_s * 1000).toFixed(0)} ms, generation ${timing.generation_s.toFixed(2)} s`;
  summary.textContent = line;
  summary.classList.remove("muted");

  const names = routing.candidates || [];
  const scores = routing.candidate_scores || [];
  if (names.length) {
    const threshold = off && off.enabled ? off.threshold : null;
    const values = threshold === null ? scores : scores.concat([threshold]);
    const lo = Math.min(...values), hi = Math.max(...values);
    const span = hi > lo ? hi - lo : 1;
    const width = (v) => 20 + ((v - lo) / span) * 260;
    bars.setAttribute("height", names.length * 20 + 24);
    bars.setAttribute("viewBox", `0 0 460 ${names.length * 20 + 24}`);
    names.forEach((name, i) => {
      const picked = used.includes(name);
      const g = svg("g", { class: "candidate", "data-adapter": name });
      g.append(svg("text", { x: 0, y: i * 20 + 14, "font-size": 11 }, name));
      g.append(svg("rect", { x: 130, y: i * 20 + 4, width: width(scores[i]), height: 13,
        fill: picked ? "#2e6fdb" : "#b8c2d1" }));
      g.append(svg("text", { x: 135 + width(scores[i]), y: i * 20 + 14, "font-size": 10 }, scores[i].toFixed(2)));
      bars.append(g);
    });
    if (threshold !== null) {
      const x = 130 + width(threshold);
      bars.append(svg("line", { x1: x, x2: x, y1: 0, y2: names.length * 20 + 6, stroke: "#b42318",
        "stroke-dasharray": "4 3", id: "threshold" }));
      bars.append(svg("text", { x: x + 3, y: names.length * 20 + 18, "font-size": 10, fill: "#b42318" },
        "off-pool threshold: below it, the base model answers"));
    }
  }
  const table = $("rocs");
  table.replaceChildren();
  if (used.length) {
    table.append(el("tr", {}, el("th", {}, "adapter"), el("th", {}, "ROCs per token"), el("th", {}, "score")));
    used.forEach((name, i) => table.append(el("tr", { "data-adapter": name }, el("td", {}, name),
      el("td", {}, routing.rocs ? routing.rocs[i] : "all (plain LoRA)"),
      el("td", {}, routing.scores ? routing.scores[i].toFixed(2) : "-"))));
  }
}

async function run(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  const maxTokens = parseInt($("max-tokens").value, 10) || 32;
  const picked = $("picked").value;
  $("picked-name").textContent = picked || "(none)";
  $("run").disabled = true;
  try {
    try {
      const route = await api("/v1/route", { method: "POST", body: JSON.stringify({ input: text, position: true }) });
      const d = route.data[0];
      state.request = { position: d.position, adapters: d.adapters };
      renderMap();
    } catch (err) {
      $("map-note").textContent = `routing unavailable: ${err.message}`;
    }
    const jobs = [streamChat("hilora", text, maxTokens, $("out-routed"), $("meta-routed")),
      streamChat("base", text, maxTokens, $("out-base"), $("meta-base"))];
    if (picked) jobs.push(streamChat(picked, text, maxTokens, $("out-picked"), $("meta-picked")));
    const [routed] = await Promise.all(jobs);
    if (routed && routed.routing) drawDecision(routed.routing, routed.timing);
  } finally {
    $("run").disabled = false;
  }
}

// ---- admin -------------------------------------------------------------------------------------

function setAdmin(mode, message) {
  state.admin = mode;
  const box = $("admin-state");
  box.textContent = message;
  box.className = mode === "enabled" ? "" : mode === "disabled" ? "error" : "muted";
  const off = mode === "disabled";
  for (const id of ["token", "token-check", "register"]) $(id).disabled = off;
  if (state.pool) renderTable();
}

async function checkAdmin() {
  try {
    const page = await api("/admin/adapters?limit=1", { headers: adminHeaders() });
    setAdmin("enabled", `admin enabled: ${page.total} adapters registered`);
  } catch (err) {
    if (err.status === 403) setAdmin("disabled", `admin is disabled on this service: ${err.message}`);
    else if (err.status === 401) setAdmin("locked", state.token ? `token refused: ${err.message}` :
      "enter the admin token to register or delete adapters");
    else setAdmin("locked", `admin unavailable: ${err.message}`);
  }
}

async function register(event) {
  event.preventDefault();
  const result = $("admin-result");
  const body = { id: $("reg-id").value.trim(), source: $("reg-source").value.trim(),
    samples: $("reg-samples").value.split("\n").map((s) => s.trim()).filter(Boolean) };
  const revision = $("reg-revision").value.trim();
  if (revision) body.revision = revision;
  const tags = $("reg-tags").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (tags.length) body.tags = tags;
  result.className = "muted";
  result.textContent = "registering...";
  try {
    const rec = await api("/admin/adapters", { method: "POST", headers: adminHeaders(), body: JSON.stringify(body) });
    result.className = "";
    result.textContent = `registered ${rec.id}: rank ${rec.rank}, ${rec.sample_count} samples, epoch ${rec.epoch}`;
    await refreshPool();
  } catch (err) {
    result.className = "error";
    result.textContent = `HTTP ${err.status}: ${err.message}`;
  }
}

async function remove(id) {
  const result = $("admin-result");
  try {
    await api(`/admin/adapters/${encodeURIComponent(id)}`, { method: "DELETE", headers: adminHeaders() });
    result.className = "";
    result.textContent = `deleted ${id}`;
    await refreshPool();
  } catch (err) {
    result.className = "error";
    result.textContent = `HTTP ${err.status}: ${err.message}`;
  }
}

// ---- start ---------------------------------------------------------------------------------------

$("prompt-form").addEventListener("submit", run);
$("pool-search").addEventListener("input", (e) => setView({ q: e.target.value.trim(), offset: 0 }));
$("pool-tag").addEventListener("change", (e) => setView({ tag: e.target.value, offset: 0 }));
$("pool-prev").addEventListener("click", () => setView({ offset: Math.max(0, state.view.offset - PAGE) }));
$("pool-next").addEventListener("click", () => {
  if (state.pool && state.pool.next_offset !== null) setView({ offset: state.pool.next_offset });
});
$("register-form").addEventListener("submit", register);
$("token").value = state.token;
$("token-check").addEventListener("click", async () => {
  state.token = $("token").value.trim();
  sessionStorage.setItem("hilora-admin-token", state.token);
  await checkAdmin();
});
(async () => {
  await Promise.all([refreshHealth(), checkAdmin()]);
  await refreshPool();
  setInterval(() => { refreshHealth(); refreshPool(); }, 5000);
})();
