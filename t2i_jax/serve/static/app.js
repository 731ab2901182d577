// The page: talks to the same A1111 API as any client (POST /sdapi/v1/txt2img with force_task_id)
// and follows its task over server-sent events (/t2i/events), read with fetch so the API key can
// travel as a bearer header. No dependencies, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let previews = 0;

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api_key").value || localStorage.getItem("t2i_api_key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({ detail: r.statusText }));
  if (r.status === 401) $("keyrow").hidden = false;
  if (!r.ok) throw new Error(data.detail || r.statusText);
  return data;
}

async function init() {
  try {
    const info = await api("/t2i/info");
    $("model").textContent = `model: ${info.model} (${info.native} px)`;
    $("sampler_name").length = 0;
    $("style").length = 1;
    $("error").textContent = "";
    for (const s of info.samplers) $("sampler_name").add(new Option(s, s, false, s === info.default_sampler));
    for (const s of info.styles) $("style").add(new Option(s, s));
    for (const k of ["width", "height"]) { $(k).value = info.native; $(k).step = info.vae_scale; $(k).max = info.limits.max_size; }
    $("steps").value = info.steps; $("steps").max = info.limits.max_steps;
    $("batch_size").max = info.limits.max_images;
    document.body.dataset.ready = "1";
  } catch (e) { $("error").textContent = String(e.message || e); }
}

async function follow(taskId, signal) {
  // Server-sent events over fetch: "event: NAME\ndata: JSON\n\n" blocks.
  const r = await fetch("/t2i/events?id_task=" + encodeURIComponent(taskId), { headers: headers(false), signal });
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const ev = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
      if (!ev || !data) continue;
      if (ev[1] === "end") return;
      show(JSON.parse(data[1]));
    }
  }
}

function show(p) {
  $("fill").style.width = Math.round(100 * p.progress) + "%";
  $("status").textContent = `${p.textinfo || ""} (${Math.round(100 * p.progress)}%` +
    (p.eta_relative ? `, ETA ${p.eta_relative.toFixed(1)} s)` : ")");
  if (p.current_image) {
    $("preview").src = "data:image/png;base64," + p.current_image;
    $("preview").hidden = false;
    previews += 1;
    document.body.dataset.previews = String(previews);
  }
}

function addToGallery(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((b64, i) => {
    const card = document.createElement("div");
    card.className = "card";
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.className = "result";
    const text = document.createElement("pre");
    text.textContent = info.infotexts[i];
    const a = document.createElement("a");
    a.href = img.src;
    a.download = `t2i-${info.all_seeds[i]}.png`;
    a.textContent = "download";
    card.append(img, text, a);
    $("gallery").prepend(card);
  });
}

async function generate(ev) {
  ev.preventDefault();
  if ($("api_key").value) localStorage.setItem("t2i_api_key", $("api_key").value);
  $("error").textContent = "";
  $("generate").disabled = true;
  const taskId = "page-" + Math.random().toString(36).slice(2, 12);
  const body = { force_task_id: taskId };
  for (const k of ["prompt", "negative_prompt", "sampler_name"]) body[k] = $(k).value;
  for (const k of ["steps", "seed", "width", "height", "batch_size"]) body[k] = parseInt($(k).value, 10);
  body.cfg_scale = parseFloat($("cfg_scale").value);
  body.styles = $("style").value ? [$("style").value] : [];
  const stop = new AbortController();
  const following = follow(taskId, stop.signal).catch(() => {});
  try {
    const result = await api("/sdapi/v1/txt2img", body);
    await Promise.race([following, new Promise((r) => setTimeout(r, 2000))]);
    addToGallery(result);
    $("fill").style.width = "100%";
    $("status").textContent = "done";
    document.body.dataset.done = String((parseInt(document.body.dataset.done || "0", 10)) + 1);
  } catch (e) {
    $("error").textContent = String(e.message || e);
  } finally {
    stop.abort();
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
// A server started with --api-key answers 401 until the key is typed; then the page loads its settings.
$("api_key").addEventListener("change", () => { localStorage.setItem("t2i_api_key", $("api_key").value); init(); });
init();
