// cbir's page: pick or drop an image, POST /search, show the top k; "more like this" and "why?" per result.
// Plain DOM (textContent only: names and labels come from other people's files), no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, queryName: null, info: null, index: null };

function setError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

async function api(url, options) {
  const r = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
  if (r.status === 401) {
    $("auth").hidden = false;
    throw new Error("this service needs its API token (enter it above)");
  }
  const type = r.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await r.json() : null;
  if (!r.ok) {
    let msg = body && body.error ? body.error : `HTTP ${r.status}`;
    if (r.status === 503 && r.headers.get("retry-after")) msg += ` (retry after ${r.headers.get("retry-after")} s)`;
    throw new Error(msg);
  }
  return body;
}

function pathOf(name) {
  return name.split("/").map(encodeURIComponent).join("/");
}

function indexParam(sep) {
  return state.info && Object.keys(state.info.indexes).length > 1 ? `${sep}index=${encodeURIComponent(state.index)}` : "";
}

function params() {
  const p = new URLSearchParams();
  p.set("top_k", String(Math.max(1, Math.min(100, parseInt($("topk").value, 10) || 12))));
  if ($("label").value) p.set("label", $("label").value);
  if ($("rerank").checked) p.set("rerank", "true");
  if (!$("graph").checked) p.set("expand", "false");
  if (state.info && Object.keys(state.info.indexes).length > 1) p.set("index", state.index);
  return p.toString();
}

async function loadInfo() {
  try {
    const info = await api("/info");
    state.info = info;
    state.index = state.index || info.default;
    const sel = $("index");
    sel.replaceChildren();
    for (const name of Object.keys(info.indexes)) {
      const o = document.createElement("option");
      o.value = name; o.textContent = name; o.selected = name === state.index;
      sel.appendChild(o);
    }
    sel.parentElement.hidden = Object.keys(info.indexes).length < 2;
    showIndex();
    $("auth").hidden = true;
    showSample();
  } catch (e) {
    setError(e.message);
  }
}

function showIndex() {
  const ix = state.info.indexes[state.index];
  $("summary").textContent = `${ix.name}: ${ix.count} images, ${ix.extractor} (${ix.dim}-d, ${ix.metric})`;
  const sel = $("label");
  sel.replaceChildren();
  const any = document.createElement("option");
  any.value = ""; any.textContent = "any";
  sel.appendChild(any);
  for (const l of ix.labels) {
    const o = document.createElement("option");
    o.value = l; o.textContent = (ix.label_names && ix.label_names[l]) || l;
    sel.appendChild(o);
  }
  $("rerank").disabled = !ix.local_features;
  $("rerank").parentElement.title = ix.local_features
    ? `re-rank by geometric verification (${ix.local_features} + ${ix.rerank_matcher})`
    : "the index holds no local features (build it with --local to verify results)";
}

function showQuery(src, caption) {
  $("sample").hidden = true;
  $("query-panel").hidden = false;
  $("query-img").src = src;
  $("query-img").hidden = false;
  $("query-caption").textContent = caption;
}

// before the first query: a sample of the gallery (GET /sample), each thumbnail a "more like this"
async function showSample() {
  if (state.file || state.queryName) return;
  try {
    const res = await api(`/sample?n=24${indexParam("&")}`);
    if (state.file || state.queryName) return;  // a query started meanwhile
    const grid = $("sample-grid");
    grid.replaceChildren();
    for (const r of res.images) {
      const fig = document.createElement("figure");
      fig.className = "pick";
      fig.dataset.name = r.name;
      const img = document.createElement("img");
      img.src = r.thumb; img.alt = r.name; img.loading = "lazy"; img.title = `more like this: ${r.name}`;
      img.addEventListener("click", () => similar(r));
      const cap = document.createElement("figcaption");
      cap.textContent = r.label_name || r.label || r.name;
      fig.append(img, cap);
      grid.appendChild(fig);
    }
    $("sample-caption").textContent = res.images.length
      ? `${res.images.length} of the ${res.count} images of ${res.index}: click one for more like it`
      : `${res.index} holds no images yet`;
    $("sample").hidden = false;
  } catch (e) {
    setError(e.message);
  }
}

function pickFile(file) {
  if (!file) return;
  state.file = file;
  state.queryName = null;
  showQuery(URL.createObjectURL(file), file.name);
  search();
}

async function search() {
  setError("");
  $("status").textContent = "searching…";
  try {
    let res;
    if (state.queryName) {
      res = await api(`/search/similar/${pathOf(state.queryName)}?${params()}`);
    } else if (state.file) {
      const form = new FormData();
      form.append("image", state.file, state.file.name);
      res = await api(`/search?${params()}`, { method: "POST", body: form });
    } else {
      $("status").textContent = "";
      return;
    }
    render(res);
  } catch (e) {
    $("results").replaceChildren();
    $("status").textContent = "";
    setError(e.message);
  }
}

function render(res) {
  const s = res.seconds || {};
  const parts = [`${res.results.length} results in ${Math.round((s.total || 0) * 1000)} ms`];
  if (s.extract !== undefined) parts.push(`extract ${Math.round(s.extract * 1000)} ms (batch of ${res.batch})`);
  if (s.rerank !== undefined) parts.push(`verified in ${Math.round(s.rerank * 1000)} ms`);
  $("status").textContent = parts.join(" · ");
  const grid = $("results");
  grid.replaceChildren();
  for (const r of res.results) {
    const card = document.createElement("article");
    card.className = "result";
    card.dataset.name = r.name;
    const img = document.createElement("img");
    img.src = r.thumb; img.alt = r.name; img.loading = "lazy"; img.title = "more like this";
    img.addEventListener("click", () => similar(r));
    const meta = document.createElement("div");
    meta.className = "meta";
    const rank = document.createElement("span");
    rank.className = "rank"; rank.textContent = `#${r.rank}`;
    const label = document.createElement("span");
    label.className = "label"; label.textContent = r.label_name || r.label || "–";
    const score = document.createElement("span");
    score.className = "score"; score.textContent = r.score.toFixed(3);
    meta.append(rank, label, score);
    const name = document.createElement("div");
    name.className = "name"; name.textContent = r.name; name.title = r.name;
    card.append(img, meta, name);
    if (r.verified !== undefined) {
      const v = document.createElement("div");
      v.className = r.verified ? "verified" : "unverified";
      v.textContent = r.verified ? `✓ verified (${r.inliers} inliers)` : `${r.inliers} inliers`;
      card.appendChild(v);
    }
    const actions = document.createElement("div");
    actions.className = "actions";
    const more = document.createElement("button");
    more.type = "button"; more.className = "more"; more.textContent = "more like this";
    more.addEventListener("click", () => similar(r));
    const why = document.createElement("button");
    why.type = "button"; why.className = "why"; why.textContent = "why?";
    why.addEventListener("click", () => explain(r));
    actions.append(more, why);
    card.appendChild(actions);
    grid.appendChild(card);
  }
}

function similar(r) {
  state.queryName = r.name;
  state.file = null;
  showQuery(r.image, `${r.name} (gallery)`);
  search();
}

async function explain(r) {
  setError("");
  const dlg = $("match");
  $("match-title").textContent = `why ${r.name}?`;
  $("match-text").textContent = "matching local features…";
  $("match-img").removeAttribute("src");
  if (!dlg.open) dlg.showModal();
  try {
    const q = new URLSearchParams({ name1: r.name });
    let res;
    if (state.queryName) {
      q.set("name0", state.queryName);
      res = await api(`/match?${q}${indexParam("&")}`, { method: "POST" });
    } else {
      const form = new FormData();
      form.append("image0", state.file, state.file.name);
      res = await api(`/match?${q}${indexParam("&")}`, { method: "POST", body: form });
    }
    $("match-text").textContent = `${res.n_inliers} inliers of ${res.n_matches} matches (${res.features} + ${res.matcher}, ${res.model}` +
      `${res.model_matrix ? "" : ": no model found"}), ${Math.round(res.seconds.total * 1000)} ms`;
    $("match-img").src = res.overlay;
  } catch (e) {
    $("match-text").textContent = e.message;
  }
}

// the gallery's groups of duplicates (GET /duplicates, paged): one row of thumbnails a group, the one to keep first
async function showDuplicates(offset) {
  setError("");
  $("dups").hidden = false;
  $("dups-status").textContent = offset ? "loading more groups…" : "finding duplicates (verified by local features)…";
  if (!offset) $("dups-groups").replaceChildren();
  try {
    const res = await api(`/duplicates?offset=${offset}&limit=20${indexParam("&")}`);
    for (const g of res.groups) {
      const row = document.createElement("div");
      row.className = "dup-group";
      const files = g.files.slice().sort((a, b) => (b.name === g.keep) - (a.name === g.keep));
      for (const f of files) {
        const fig = document.createElement("figure");
        fig.className = f.name === g.keep ? "dup keep" : "dup";
        const img = document.createElement("img");
        img.src = f.thumb; img.alt = f.name; img.loading = "lazy"; img.title = f.name;
        const cap = document.createElement("figcaption");
        cap.textContent = (f.name === g.keep ? "keep: " : "") + f.name;
        fig.append(img, cap);
        row.appendChild(fig);
      }
      $("dups-groups").appendChild(row);
    }
    const shown = offset + res.groups.length;
    state.dupsNext = shown;
    $("dups-more").hidden = shown >= res.n_groups;
    $("dups-status").textContent = `${res.n_groups} groups, ${res.n_redundant} redundant images of ${res.n_images} ` +
      `(threshold ${res.threshold}${res.verify ? ", verified" : ""}; nothing is changed) — ${shown} shown`;
  } catch (e) {
    $("dups-status").textContent = "";
    setError(e.message);
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (ev) => pickFile(ev.target.files[0]));
  for (const t of ["dragenter", "dragover"]) drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  for (const t of ["dragleave", "drop"]) drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (ev) => pickFile(ev.dataTransfer.files[0]));
  $("index").addEventListener("change", (ev) => { state.index = ev.target.value; showIndex(); search(); showSample(); });
  for (const id of ["label", "rerank", "graph"]) $(id).addEventListener("change", search);
  $("dups-button").addEventListener("click", () => showDuplicates(0));
  $("dups-more").addEventListener("click", () => showDuplicates(state.dupsNext || 0));
  $("topk").addEventListener("change", search);
  $("options").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    document.cookie = `cbir_token=${encodeURIComponent($("token").value)}; path=/; SameSite=Strict`;
    loadInfo();
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
