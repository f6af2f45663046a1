// dynface page: upload a photo, poll the job, show before/after, faces and downloads.
// Server text is only ever set with textContent (never innerHTML). Results are fetched with the
// API key header (when keys are on) and shown from blob: URLs.
"use strict";

const KEY_STORAGE = "dynface.apiKey";
const POLL_MS = 500;
const MAX_POLL_FAILURES = 10;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// A clear sentence for every error code the API (or a failed job) can report.
const ERROR_TEXT = {
  network: "The server could not be reached. Check your connection and try again.",
  too_large: "The photo is too large to upload. Try a smaller file.",
  too_many_pixels: "The photo has too many pixels. Try a smaller image.",
  invalid_image: "This file is not an image that can be read. Pick a PNG, JPEG or WebP photo.",
  unsupported_format: "This image format is not supported. Use PNG, JPEG or WebP.",
  no_face: "No face was found in the photo. Try one with a larger, clearer face " +
    "(or tick “already an aligned 512×512 face” for a face crop).",
  queue_full: "The service is busy: the queue is full.",
  rate_limited: "Too many photos submitted in the last minute.",
  unauthorized: "This service needs a valid API key. Enter it above.",
  invalid_option: "One of the options was not accepted.",
  invalid_request: "The request was not understood.",
  idempotency_conflict: "This request conflicts with an earlier one. Submit again.",
  not_found: "The job was not found: it may have expired.",
  not_ready: "The result is not ready yet.",
  expired: "The results have expired. Submit the photo again.",
  not_cancelable: "The job has already finished and cannot be canceled.",
  canceled: "The job was canceled.",
  cuda_oom: "The GPU ran out of memory on this photo. Try a smaller photo or a lower upscale.",
  timeout: "The job took too long and was stopped. Try a smaller photo.",
  worker_lost: "The worker processing this photo stopped. Submit it again.",
  redis_unavailable: "The job store is unavailable. Try again shortly.",
  internal: "Something went wrong on the server. Try again later.",
};

const STAGE_TEXT = {
  decode: "reading the photo",
  detect: "finding faces",
  dblm: "estimating blur",
  sample: "diffusion sampling",
  paste: "pasting faces back",
  encode: "saving the result",
};

const $ = (id) => document.getElementById(id);

const state = {
  file: null,
  inputUrl: null,
  jobId: null,
  timer: null,
  failures: 0,
  blobUrls: [],
};

class ApiFailure extends Error {
  constructor(code, message, retryAfter = null) {
    super(message);
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// ---------------------------------------------------------------- API

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch {
    throw new ApiFailure("network", "No response from the server.");
  }
  if (response.ok) return response;
  let code = `http_${response.status}`;
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error) {
      code = String(body.error.code);
      message = String(body.error.message);
    }
  } catch {
    // not our JSON error shape: keep the HTTP status
  }
  throw new ApiFailure(code, message, response.headers.get("Retry-After"));
}

async function blobUrl(path) {
  const blob = await (await api(path)).blob();
  const url = URL.createObjectURL(blob);
  state.blobUrls.push(url);
  return { url, type: blob.type };
}

// ---------------------------------------------------------------- messages

function showMessage(code, detail, retryAfter = null, kind = "error") {
  const box = $("message");
  let title = ERROR_TEXT[code] || `The request failed (${code}).`;
  if (retryAfter) title += ` Try again in ${retryAfter} s.`;
  box.className = `message ${kind}`;
  box.dataset.code = code;
  $("message-title").textContent = title;
  $("message-detail").textContent = detail ? `Details: ${detail}` : "";
  box.hidden = false;
  if (code === "unauthorized") showKeyPanel(true);
}

function showFailure(err) {
  if (err instanceof ApiFailure) showMessage(err.code, err.message, err.retryAfter);
  else showMessage("internal", String(err));
}

function clearMessage() {
  $("message").hidden = true;
  delete $("message").dataset.code;
}

// ---------------------------------------------------------------- API key

function showKeyPanel(focus = false) {
  $("key-panel").hidden = false;
  const hasKey = Boolean(sessionStorage.getItem(KEY_STORAGE));
  $("key-state").textContent = hasKey ? "A key is set for this tab." : "No key set.";
  if (focus) $("api-key").focus();
}

async function checkService() {
  try {
    const response = await fetch("/readyz");
    const ready = await response.json();
    if (ready.auth === "api_key") showKeyPanel();
    if (!ready.ready && Array.isArray(ready.reasons)) {
      const box = $("message");
      box.className = "message info";
      $("message-title").textContent = "The service is not ready: jobs will wait in the queue.";
      $("message-detail").textContent = ready.reasons.map(String).join("; ");
      box.hidden = false;
    }
  } catch {
    // the page still works; errors show on submit
  }
}

// ---------------------------------------------------------------- photo and options

function setFile(file) {
  if (!file) return;
  if (state.inputUrl) URL.revokeObjectURL(state.inputUrl);
  state.file = file;
  state.inputUrl = URL.createObjectURL(file);
  $("drop-text").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB)`;
  $("submit").disabled = false;
  clearMessage();
}

function formData() {
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("mode", $("mode").value);
  form.append("upscale", $("upscale").value);
  form.append("aligned", $("aligned").checked ? "true" : "false");
  form.append("outputs", "image,faces");
  if (!$("fidelity-auto").checked) form.append("fidelity", $("fidelity").value);
  return form;
}

// ---------------------------------------------------------------- job lifecycle

function resetResults() {
  clearTimeout(state.timer);
  state.blobUrls.forEach((url) => URL.revokeObjectURL(url));
  state.blobUrls = [];
  $("results").hidden = true;
  $("faces").replaceChildren();
  $("after").removeAttribute("src");
  $("compare").classList.remove("no-before");
}

function setBusy(busy) {
  $("submit").disabled = busy || !state.file;
  $("cancel").hidden = !busy;
}

async function submit() {
  if (!state.file) return;
  resetResults();
  clearMessage();
  setBusy(true);
  try {
    const job = await (await api("/v1/restorations", { method: "POST", body: formData() })).json();
    state.jobId = job.id;
    state.failures = 0;
    renderStatus(job);
    schedulePoll();
  } catch (err) {
    setBusy(false);
    $("status-panel").hidden = true;
    showFailure(err);
  }
}

function schedulePoll() {
  state.timer = setTimeout(poll, POLL_MS);
}

async function poll() {
  const id = state.jobId;
  let job;
  try {
    job = await (await api(`/v1/restorations/${encodeURIComponent(id)}`)).json();
  } catch (err) {
    if (id !== state.jobId) return;
    if (err.code === "network" && ++state.failures < MAX_POLL_FAILURES) return schedulePoll();
    setBusy(false);
    return showFailure(err);
  }
  if (id !== state.jobId) return; // a newer submission took over
  state.failures = 0;
  renderStatus(job);
  if (!TERMINAL.has(job.status)) return schedulePoll();
  setBusy(false);
  if (job.status === "succeeded") {
    await showResults(job).catch(showFailure);
  } else if (job.status === "canceled") {
    showMessage("canceled", "", null, "info");
  } else {
    const error = job.error || { code: "internal", message: "" };
    showMessage(String(error.code), String(error.message));
  }
}

async function cancel() {
  if (!state.jobId) return;
  try {
    await api(`/v1/restorations/${encodeURIComponent(state.jobId)}`, { method: "DELETE" });
  } catch (err) {
    showFailure(err);
  }
}

function renderStatus(job) {
  $("status-panel").hidden = false;
  $("status-panel").dataset.status = job.status;
  const bar = $("progress");
  let line;
  if (job.status === "queued") {
    const ahead = job.queue_position;
    line = ahead == null ? "Queued." : ahead === 0 ? "Queued: next in line." : `Queued: ${ahead} ahead of you.`;
    bar.value = 0;
  } else if (job.status === "processing") {
    line = `Processing: ${STAGE_TEXT[job.stage] || "starting"}`;
    if (job.progress && job.progress.total) {
      if (job.stage === "sample") line += ` (step ${job.progress.step} of ${job.progress.total})`;
      bar.value = job.progress.step / job.progress.total;
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
  } else {
    line = { succeeded: "Done.", failed: "Failed.", canceled: "Canceled." }[job.status] || job.status;
    bar.value = job.status === "succeeded" ? 1 : 0;
  }
  $("status-line").textContent = line;
  const items = (job.warnings || []).map((text) => {
    const li = document.createElement("li");
    li.textContent = String(text);
    return li;
  });
  $("warnings").replaceChildren(...items);
}

// ---------------------------------------------------------------- results

function extension(type) {
  return { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" }[type] || "img";
}

function loadImage(img, src) {
  return new Promise((resolve, reject) => {
    img.onload = () => resolve(img);
    img.onerror = () => reject(new ApiFailure("invalid_image", "The browser cannot display this image."));
    img.src = src;
  });
}

async function showResults(job) {
  const base = `/v1/restorations/${encodeURIComponent(job.id)}`;
  const image = await blobUrl(`${base}/image`);
  const link = $("download-image");
  link.href = image.url;
  link.download = `restored-${job.id}.${extension(image.type)}`;
  $("results").hidden = false;

  const before = $("before");
  const beforeLoaded = loadImage(before, state.inputUrl).catch(() => null);
  await loadImage($("after"), image.url);
  $("results").dataset.loaded = "true";
  if (await beforeLoaded) drawBoxes(before, job.faces || []);
  else $("compare").classList.add("no-before"); // e.g. a format this browser cannot show

  const count = job.outputs && Array.isArray(job.outputs.faces) ? job.outputs.faces.length : 0;
  for (let k = 0; k < count; k++) {
    const face = await blobUrl(`${base}/faces/${k}`);
    $("faces").append(faceItem(job.id, k, face));
  }
}

function faceItem(jobId, k, face) {
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.src = face.url;
  img.alt = `Restored face ${k + 1}`;
  const link = document.createElement("a");
  link.className = "button";
  link.href = face.url;
  link.download = `face-${k + 1}-${jobId}.${extension(face.type)}`;
  link.textContent = `Download face ${k + 1}`;
  li.append(img, link);
  return li;
}

function drawBoxes(img, faces) {
  const canvas = $("boxes");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const line = Math.max(2, Math.round(canvas.width / 300));
  ctx.lineWidth = line;
  ctx.strokeStyle = "#34e07a";
  ctx.fillStyle = "#34e07a";
  ctx.font = `bold ${line * 8}px sans-serif`;
  faces.forEach((face, k) => {
    const [x0, y0, x1, y1] = face.box.map(Number);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillText(String(k + 1), x0 + line * 2, y0 + line * 9);
  });
}

// ---------------------------------------------------------------- wiring

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    setFile(e.dataTransfer.files[0]);
  });

  const slider = $("fidelity");
  $("fidelity-auto").addEventListener("change", (e) => {
    slider.disabled = e.target.checked;
  });
  slider.addEventListener("input", () => {
    $("fidelity-value").textContent = Number(slider.value).toFixed(2);
  });

  $("split").addEventListener("input", (e) => {
    $("compare").style.setProperty("--split", `${e.target.value}%`);
  });

  $("submit").addEventListener("click", submit);
  $("cancel").addEventListener("click", cancel);

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    showKeyPanel();
    clearMessage();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyPanel();
  });

  if (sessionStorage.getItem(KEY_STORAGE)) showKeyPanel();
  checkService();
}

init();
