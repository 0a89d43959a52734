"use strict";
// mmembed playground: embeds the items and the query through this server's DashScope route and
// ranks the items by cosine similarity (the vectors are L2-normalised: a dot product).
// The API key stays in this browser (localStorage); it is sent only to this server.

const EMBED = "/api/v1/services/embeddings/multimodal-embedding/multimodal-embedding";
// Rerank mode: the query and every item go to the rerank route in one request; the scores
// are its relevance scores (0..1), one per item.
const RERANK = "/api/v1/services/rerank/text-rerank/text-rerank";
const mode = () => $("mode").value;
const $ = (id) => document.getElementById(id);
const state = { models: [], items: [], nextId: 1, query: null, vectors: new Map() };

// -- API -------------------------------------------------------------------------------------
function headers() {
  const key = $("key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function api(path, body) {
  const resp = await fetch(path, body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const error = data.error || data; // OpenAI-shaped (/v1/...) or DashScope-shaped
    throw new Error(`${error.code || resp.status}: ${error.message || resp.statusText}`);
  }
  return data;
}

async function embed(content) {
  const model = $("model").value;
  const dimension = Number($("dimension").value);
  const key = `${model}|${dimension}|${content.key}`;
  if (state.vectors.has(key)) return state.vectors.get(key);
  const body = { model, input: { contents: [content.value] }, parameters: { dimension } };
  const data = await api(EMBED, body);
  const vector = data.output.embeddings[0].embedding;
  state.vectors.set(key, vector);
  return vector;
}

const dot = (a, b) => a.reduce((sum, x, i) => sum + x * b[i], 0);

// -- models ----------------------------------------------------------------------------------
// On load the page asks /health (no key needed) whether the server wants a key, and lists
// models only when it does not or once a key is typed: no request is refused on load.
async function start() {
  if ($("key").value.trim()) return loadModels();
  try {
    const health = await (await fetch("/health")).json();
    if (health.keys_required === false) return loadModels();
  } catch (err) { /* fall through: ask for the key */ }
  setStatus("Enter the API key to list the models.");
}

async function loadModels() {
  try {
    // /v1/models: the names this key may use; /models: their dimensions and tasks
    const [allowed, data] = await Promise.all([api("/v1/models"), api("/models")]);
    const usable = new Set(allowed.data.map((m) => m.id));
    const task = mode() === "rerank" ? "rerank" : "embedding";
    state.models = data.models.filter((m) => usable.has(m.name) && (m.task || "embedding") === task);
    const select = $("model");
    const previous = select.value || localStorage.getItem("mmembed.model");
    select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
    if (state.models.some((m) => m.name === previous)) select.value = previous;
    fillDimensions();
    setStatus(state.models.length ? `${state.models.length} models` : "This API key may use none of the models.", !state.models.length);
  } catch (err) {
    setStatus(`Could not list models (${err.message}). Is the API key right?`, true);
  }
}

function fillDimensions() {
  const model = state.models.find((m) => m.name === $("model").value);
  if (!model) return;
  const select = $("dimension");
  select.disabled = mode() === "rerank";  // scores, not vectors
  if (!model.dimensions) { select.replaceChildren(); localStorage.setItem("mmembed.model", model.name); return; }
  const previous = select.dataset.model === model.name ? select.value : null;
  select.replaceChildren(...model.dimensions.map((d) => new Option(String(d), String(d))));
  select.value = model.dimensions.includes(Number(previous)) ? previous : String(model.default_dimension);
  select.dataset.model = model.name;
  localStorage.setItem("mmembed.model", model.name);
}

// -- items -----------------------------------------------------------------------------------
function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) { setStatus(`${file.name}: not an image or a video`, true); continue; }
    const dataUrl = await readDataUrl(file);
    addItem({ kind, name: file.name, preview: URL.createObjectURL(file), content: { key: dataUrl, value: { [kind]: dataUrl } } });
  }
}

function addTexts(lines) {
  for (const line of lines.map((l) => l.trim()).filter(Boolean)) {
    addItem({ kind: "text", name: line, content: { key: `text:${line}`, value: { text: line } } });
  }
}

function addItem(item) {
  item.id = state.nextId++;
  item.score = null;
  item.error = null;
  state.items.push(item);
  if ($("status").className === "error") setStatus(""); // an old problem, not about this item
  render();
}

function render() {
  const list = $("items");
  const ranked = state.items.some((i) => i.score !== null);
  const order = ranked ? [...state.items].sort((a, b) => (b.score ?? -2) - (a.score ?? -2)) : state.items;
  const scores = state.items.map((i) => i.score).filter((s) => s !== null);
  // bars show where each score lies between the lowest and the highest of this ranking
  state.low = Math.min(...scores);
  state.high = Math.max(...scores);
  // (failed items sort last and get no rank)
  list.replaceChildren(...order.map((item, n) => card(item, ranked && item.score !== null ? n + 1 : null)));
  $("count").textContent = String(state.items.length);
}

function card(item, rank) {
  const li = document.createElement("li");
  li.className = "card" + (rank === 1 ? " best" : "");
  li.dataset.name = item.name;
  li.dataset.kind = item.kind;
  const thumb = document.createElement("div");
  thumb.className = "thumb";
  if (item.kind === "image") {
    const img = document.createElement("img");
    img.src = item.preview; img.alt = item.name;
    thumb.append(img);
  } else if (item.kind === "video") {
    const video = document.createElement("video");
    video.src = item.preview; video.muted = true; video.preload = "metadata";
    thumb.append(video);
  } else {
    const text = document.createElement("div");
    text.className = "text"; text.textContent = item.name;
    thumb.append(text);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const name = document.createElement("span");
  name.className = "name"; name.textContent = `${item.kind} · ${item.name}`; name.title = item.name;
  const score = document.createElement("span");
  score.className = "score"; score.textContent = item.score === null ? "" : item.score.toFixed(4);
  meta.append(name, score);
  const bar = document.createElement("div");
  const spread = state.high - state.low;
  const share = item.score === null ? 0 : spread > 0 ? 0.1 + 0.9 * (item.score - state.low) / spread : 1;
  bar.className = "bar"; bar.style.width = `${Math.round(share * 100)}%`;
  const remove = document.createElement("button");
  remove.className = "remove"; remove.type = "button"; remove.textContent = "×"; remove.title = "remove";
  remove.onclick = () => { state.items = state.items.filter((i) => i.id !== item.id); render(); };
  const parts = [thumb, bar, meta];
  if (item.error) { // beside the item it is about
    li.classList.add("failed");
    const error = document.createElement("div");
    error.className = "item-error"; error.textContent = item.error; error.title = item.error;
    parts.push(error);
  }
  li.append(...parts, remove);
  if (rank !== null) {
    const badge = document.createElement("span");
    badge.className = "rank"; badge.textContent = `#${rank}`;
    li.append(badge);
  }
  return li;
}

// -- query and ranking -------------------------------------------------------------------------
async function setQueryImage(file) {
  const dataUrl = await readDataUrl(file);
  state.query = { key: dataUrl, value: { image: dataUrl } };
  $("query-image").src = URL.createObjectURL(file);
  $("query-image").hidden = false;
  $("query-hint").hidden = true;
  $("query-clear").hidden = false;
}

function clearQueryImage() {
  state.query = null;
  $("query-image").hidden = true;
  $("query-hint").hidden = false;
  $("query-clear").hidden = true;
  $("query-file").value = "";
}

// The server's messages name the one item of each request ("input.contents[0].image: ...");
// say which item of the page that was instead.
const named = (message, name) => message.replace(/input\.contents\[0\](\.\w+)?/g, name);

async function rank() {
  const text = $("query-text").value.trim();
  const query = state.query || (text ? { key: `text:${text}`, value: { text } } : null);
  if (!query) { setStatus("Type a query or choose a query image.", true); return; }
  if (!state.items.length) { setStatus("Add some items first.", true); return; }
  $("rank").disabled = true;
  for (const item of state.items) { item.score = null; item.error = null; } // no stale scores
  render();
  setStatus(mode() === "rerank" ? "Reranking…" : "Embedding…");
  const started = performance.now();
  try {
    if (mode() === "rerank") {
      await rerankItems(query);
      render();
      setStatus(`Reranked ${state.items.length} items in ${Math.round(performance.now() - started)} ms`);
      return;
    }
    let q;
    try {
      q = await embed(query);
    } catch (err) {
      setStatus(named(err.message, "the query"), true);
      return;
    }
    // a few requests at a time (the server batches them); an item that fails gets its own
    // message and the others are ranked
    const queue = [...state.items];
    const worker = async () => {
      for (let item = queue.shift(); item; item = queue.shift()) {
        try {
          item.score = dot(q, await embed(item.content));
        } catch (err) {
          item.error = named(err.message, item.name);
        }
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    render();
    const failed = state.items.filter((i) => i.error).length;
    const ms = Math.round(performance.now() - started);
    if (!failed) setStatus(`Ranked ${state.items.length} items in ${ms} ms`);
    else setStatus(`Ranked ${state.items.length - failed} of ${state.items.length} items in ${ms} ms; ${failed} failed (see the item${failed > 1 ? "s" : ""})`, true);
  } finally {
    $("rank").disabled = false;
  }
}

async function rerankItems(query) {
  const items = [...state.items];
  const body = {
    model: $("model").value,
    input: { query: query.value, documents: items.map((item) => item.content.value) },
  };
  const data = await api(RERANK, body);
  for (const result of data.output.results) items[result.index].score = result.relevance_score;
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// -- wiring ----------------------------------------------------------------------------------
function dropZone(zone, onFiles, onText) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFiles([...e.dataTransfer.files]);
    else if (onText) onText(e.dataTransfer.getData("text/plain"));
  });
}

function init() {
  $("key").value = localStorage.getItem("mmembed.key") || "";
  $("key").addEventListener("change", () => { localStorage.setItem("mmembed.key", $("key").value.trim()); start(); });
  $("model").addEventListener("change", () => { fillDimensions(); resetScores(); });
  $("mode").addEventListener("change", () => { resetScores(); loadModels(); });
  $("dimension").addEventListener("change", resetScores);
  $("files").addEventListener("change", (e) => { addFiles([...e.target.files]); e.target.value = ""; });
  $("add-texts").addEventListener("click", () => { addTexts($("texts").value.split("\n")); $("texts").value = ""; });
  $("clear-all").addEventListener("click", () => { state.items = []; render(); });
  $("query-file").addEventListener("change", (e) => { if (e.target.files[0]) setQueryImage(e.target.files[0]); });
  $("query-clear").addEventListener("click", clearQueryImage);
  $("query-text").addEventListener("keydown", (e) => { if (e.key === "Enter") rank(); });
  $("rank").addEventListener("click", rank);
  dropZone($("drop"), addFiles, (text) => addTexts(text.split("\n")));
  dropZone($("query-drop"), (files) => setQueryImage(files[0]));
  document.addEventListener("paste", (e) => {
    const target = e.target;
    if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement) return;
    const files = [...e.clipboardData.files];
    if (files.length) addFiles(files);
    else addTexts(e.clipboardData.getData("text/plain").split("\n"));
    e.preventDefault();
  });
  start();
}

function resetScores() {
  for (const item of state.items) { item.score = null; item.error = null; }
  render();
}

init();
