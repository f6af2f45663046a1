// dynface page: upload a photo, poll the job, show before/after, faces and downloads.
// Server text is only ever set with textContent (never innerHTML). Results are fetched with the
// API key header (when keys are on) and shown from blob: URLs.
"use strict";

const KEY_STORAGE = "dynface.apiKey";
// What an HTTP header value can carry and the server can match; anything else makes fetch() throw.
const API_KEY_PATTERN = /^[\x21-\x7e]+$/;
const JOB_ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

// Poll cadence: fast only while the worker reports steps; a queued GET reads the queue position from
// Redis, so back off there; a background tab has nobody watching.
const POLL_PROCESSING_MS = 500;
const POLL_QUEUED_MS = [1000, 2000, 4000];
const POLL_HIDDEN_MS = 10000;
// Outages (network, 5xx, 429): retry with backoff (or Retry-After) for this long before giving up.
const RETRY_BASE_MS = 500;
const RETRY_CAP_MS = 10000;
const RETRY_BUDGET_MS = 120000;

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
  idempotency_in_progress: "An identical request is still being submitted. Wait a moment, then try again.",
  output_too_large: "The result would be too large. Choose a smaller upscale, or PNG as the format.",
  queue_timeout: "No worker picked up this photo in time (the service may be short of workers). " +
    "Submit it again later.",
  method_not_allowed: "The server does not accept this kind of request here.",
  http_error: "The server refused the request.",
  not_found: "The job was not found: it may have expired.",
  not_ready: "The result is not ready yet.",
  job_failed: "The job failed, so it has no result. Submit the photo again.",
  job_canceled: "The job was canceled, so it has no result.",
  expired: "The results have expired. Submit the photo again.",
  not_cancelable: "The job has already finished and cannot be canceled.",
  canceled: "The job was canceled.",
  no_result: "The job finished without a result this page can show (it asked for none, or found no face).",
  cuda_oom: "The GPU ran out of memory on this photo. Try a smaller photo or a lower upscale.",
  timeout: "The job took too long and was stopped. Try a smaller photo.",
  worker_lost: "The worker processing this photo stopped. Submit it again.",
  redis_unavailable: "The job store is unavailable. Try again shortly.",
  internal: "Something went wrong on the server. Try again later.",
  reconnecting: "The server is not answering right now. Still retrying…",
  lost_contact: "The server did not answer for two minutes, so the page stopped watching the job. " +
    "Reload the page to look at it again (it is remembered in the address).",
  invalid_key: "That is not a valid API key: it must be printable ASCII with no spaces or accents.",
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
  file: null, // the photo picked for the next submission
  inputUrl: null,
  // The submission being watched (see startRun). Every async continuation checks it is still this
  // object, so a stale response or poll can never act on a newer submission.
  run: null,
  blobUrls: [],
};

class ApiFailure extends Error {
  constructor(code, message, retryAfter = null, status = 0) {
    super(message);
    this.code = code;
    this.retryAfter = retryAfter;
    this.status = status; // 0: no HTTP response
  }
}

// ---------------------------------------------------------------- API

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  // a key fetch() cannot send would fail as "unreachable": send none and let the server ask for one
  return key && API_KEY_PATTERN.test(key) ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...options.headers } });
  } catch (err) {
    if (err.name === "AbortError") throw err; // a superseded submission: its caller ignores it
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
  throw new ApiFailure(code, message, response.headers.get("Retry-After"), response.status);
}

async function blobUrl(path, signal) {
  const blob = await (await api(path, { signal })).blob();
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
  // the running job keeps showing its own photo as "before": revoke only a URL no run uses
  if (state.inputUrl && state.inputUrl !== (state.run && state.run.inputUrl)) {
    URL.revokeObjectURL(state.inputUrl);
  }
  state.file = file;
  state.inputUrl = URL.createObjectURL(file);
  $("drop-text").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB)`;
  // A photo may be picked while a job runs, but it is only submitted once that job has ended: one job
  // and one poll loop at a time, and Cancel always means the job on screen.
  updateControls();
  if (!running()) clearMessage();
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

function running() {
  return Boolean(state.run && !state.run.done);
}

function isCurrent(run) {
  return run === state.run;
}

function updateControls() {
  $("submit").disabled = running() || !state.file;
  $("cancel").hidden = !running();
}

function resetResults() {
  state.blobUrls.forEach((url) => URL.revokeObjectURL(url));
  state.blobUrls = [];
  $("results").hidden = true;
  delete $("results").dataset.loaded;
  $("faces").replaceChildren();
  $("after").removeAttribute("src");
  $("before").removeAttribute("src");
  $("boxes").width = 0;
  $("boxes").hidden = true;
  $("compare").classList.remove("no-before");
}

// Supersede whatever was watched before: its timer is cleared and its requests aborted, and being no
// longer state.run, none of its pending continuations will act.
function startRun(inputUrl, jobId = null) {
  const old = state.run;
  if (old) {
    clearTimeout(old.timer);
    old.abort.abort();
    if (old.inputUrl && old.inputUrl !== state.inputUrl) URL.revokeObjectURL(old.inputUrl);
  }
  resetResults();
  state.run = {
    jobId,
    inputUrl, // null when resumed after a reload: there is no "before" photo then
    abort: new AbortController(),
    timer: null,
    inFlight: false,
    done: false,
    queuedPolls: 0,
    failingSince: null,
    retries: 0,
    cancelRequested: false,
    stoppedBy: null, // the error code that ended polling, if one did
  };
  updateControls();
  return state.run;
}

function finishRun(run) {
  run.done = true;
  clearTimeout(run.timer);
  updateControls();
}

// The job id lives in the address (#job=…) so a reload resumes watching it.
function rememberJob(id) {
  history.replaceState(null, "", `#job=${encodeURIComponent(id)}`);
}

function forgetJob() {
  history.replaceState(null, "", location.pathname + location.search);
}

function jobFromAddress() {
  const match = /^#job=(.+)$/.exec(location.hash);
  return match && JOB_ID_PATTERN.test(match[1]) ? match[1] : null;
}

function jobPath(id) {
  return `/v1/restorations/${encodeURIComponent(id)}`;
}

async function submit() {
  if (!state.file || running()) return;
  clearMessage();
  $("status-panel").hidden = true;
  forgetJob(); // until the new job has an id, a reload must not resume the previous one
  const run = startRun(state.inputUrl);
  let job;
  try {
    const form = formData();
    job = await (await api("/v1/restorations", { method: "POST", body: form, signal: run.abort.signal })).json();
  } catch (err) {
    if (!isCurrent(run)) return;
    finishRun(run);
    return showFailure(err);
  }
  if (!isCurrent(run)) return;
  run.jobId = job.id;
  rememberJob(job.id);
  if (run.cancelRequested) cancel();
  handleJob(run, job);
}

function resumeFromAddress() {
  const id = jobFromAddress();
  if (!id || running()) return;
  poll(startRun(null, id));
}

function schedulePoll(run, delay) {
  clearTimeout(run.timer);
  run.timer = setTimeout(() => poll(run), delay);
}

async function poll(run) {
  run.timer = null;
  run.inFlight = true;
  let job;
  try {
    job = await (await api(jobPath(run.jobId), { signal: run.abort.signal })).json();
  } catch (err) {
    if (!isCurrent(run)) return;
    run.inFlight = false;
    return pollFailed(run, err instanceof ApiFailure ? err : new ApiFailure("network", String(err)));
  }
  if (!isCurrent(run)) return;
  run.inFlight = false;
  if (run.failingSince !== null) {
    run.failingSince = null;
    run.retries = 0;
    if ($("message").dataset.code === "reconnecting") clearMessage();
  }
  handleJob(run, job);
}

function pollDelay(run, job) {
  let delay = POLL_PROCESSING_MS;
  if (job.status === "queued") {
    delay = POLL_QUEUED_MS[Math.min(run.queuedPolls, POLL_QUEUED_MS.length - 1)];
    run.queuedPolls += 1;
  }
  return document.hidden ? Math.max(delay, POLL_HIDDEN_MS) : delay;
}

function retryAfterMs(value) {
  if (value == null) return null;
  if (/^\d+$/.test(value.trim())) return Number(value) * 1000;
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
}

function pollFailed(run, err) {
  const now = Date.now();
  if (run.failingSince === null) run.failingSince = now;
  const left = RETRY_BUDGET_MS - (now - run.failingSince);
  // an outage (no answer, a proxy's 502/504, redis_unavailable, a restart, rate limiting) passes
  const transient = err.code === "network" || err.status === 429 || err.status >= 500;
  if (transient && left > 0) {
    const backoff = Math.min(RETRY_CAP_MS, RETRY_BASE_MS * 2 ** run.retries);
    run.retries += 1;
    showMessage("reconnecting", err.message, null, "info");
    return schedulePoll(run, Math.min(left, retryAfterMs(err.retryAfter) ?? backoff));
  }
  finishRun(run);
  run.stoppedBy = err.code;
  if (err.code === "not_found") forgetJob();
  if (transient) showMessage("lost_contact", err.message);
  else showFailure(err);
}

function handleJob(run, job) {
  renderStatus(job);
  if (!TERMINAL.has(job.status)) return schedulePoll(run, pollDelay(run, job));
  finishRun(run);
  if (job.status === "succeeded") {
    showResults(run, job).catch((err) => {
      if (isCurrent(run) && err.name !== "AbortError") showFailure(err);
    });
  } else if (job.status === "canceled") {
    showMessage("canceled", "", null, "info");
  } else {
    const error = job.error || { code: "internal", message: "" };
    showMessage(String(error.code), String(error.message));
  }
}

async function cancel() {
  const run = state.run;
  if (!running()) return;
  if (!run.jobId) {
    run.cancelRequested = true; // still uploading: cancel as soon as the job has an id
    return;
  }
  try {
    await api(jobPath(run.jobId), { method: "DELETE", signal: run.abort.signal });
  } catch (err) {
    if (isCurrent(run) && err.name !== "AbortError") showFailure(err);
    return;
  }
  // show the outcome now rather than at the next (possibly slow, queued) poll
  if (isCurrent(run) && !run.done && !run.inFlight) schedulePoll(run, 0);
}

function renderStatus(job) {
  $("status-panel").hidden = false;
  $("status-panel").dataset.status = job.status;
  const bar = $("progress");
  // The line is a sentence (read out by screen readers when it changes) and a counter (not read out:
  // it changes on every poll).
  let sentence;
  let count = "";
  if (job.status === "queued") {
    const ahead = job.queue_position;
    sentence = "Queued";
    count = ahead == null ? "." : ahead === 0 ? ": next in line." : `: ${ahead} ahead of you.`;
    bar.value = 0;
  } else if (job.status === "processing") {
    sentence = `Processing: ${STAGE_TEXT[job.stage] || "starting"}`;
    if (job.progress && job.progress.total) {
      if (job.stage === "sample") count = ` (step ${job.progress.step} of ${job.progress.total})`;
      bar.value = job.progress.step / job.progress.total;
    } else {
      bar.removeAttribute("value"); // indeterminate
    }
  } else {
    sentence = { succeeded: "Done.", failed: "Failed.", canceled: "Canceled." }[job.status] || job.status;
    bar.value = job.status === "succeeded" ? 1 : 0;
  }
  // Rewriting the same text would still replace the live region's text node, and be read out again.
  if ($("status-text").textContent !== sentence) $("status-text").textContent = sentence;
  $("status-count").textContent = count;
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

// A result URL from the job JSON, fetched where this page fetches the job itself (`jobPath`): the
// job's URLs carry the public base URL (maybe another origin, or a path prefix a proxy strips), which
// need not be this page's (connect-src 'self').
function ownPath(url) {
  const parsed = new URL(url, location.href);
  const at = parsed.pathname.indexOf(jobPath(""));
  return (at >= 0 ? parsed.pathname.slice(at) : parsed.pathname) + parsed.search;
}

async function showResults(run, job) {
  const signal = run.abort.signal;
  const outputs = job.outputs || {};
  // A job submitted elsewhere (resumed from the address) may not have the `image` output: show the
  // result the API names instead (comparison, or a face).
  const main = outputs.image || (job.urls && job.urls.result);
  if (!main) {
    showMessage("no_result", "", null, "info");
    return;
  }
  const image = await blobUrl(ownPath(main), signal);
  if (!isCurrent(run)) return;
  const link = $("download-image");
  link.href = image.url;
  link.download = `restored-${job.id}.${extension(image.type)}`;
  $("results").hidden = false;

  const before = $("before");
  const beforeLoaded = run.inputUrl ? loadImage(before, run.inputUrl).catch(() => null) : null;
  await loadImage($("after"), image.url);
  if (!isCurrent(run)) return;
  $("results").dataset.loaded = "true";
  if (await beforeLoaded) {
    if (!isCurrent(run)) return;
    drawBoxes(before, job.faces || []);
  } else {
    $("compare").classList.add("no-before"); // resumed after a reload, or a format this browser cannot show
  }

  const faces = Array.isArray(outputs.faces) ? outputs.faces : [];
  for (const [k, url] of faces.entries()) {
    const face = await blobUrl(ownPath(url), signal);
    if (!isCurrent(run)) return;
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
  canvas.hidden = false;
  const n = faces.length;
  canvas.setAttribute("aria-label", `Your photo with its ${n} detected face${n === 1 ? "" : "s"} outlined and numbered`);
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

function hasFiles(e) {
  return Boolean(e.dataTransfer) && Array.from(e.dataTransfer.types).includes("Files");
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => setFile(e.target.files[0]));
  // A file dropped anywhere on the page is taken as the photo: the browser's default would open it
  // and leave the page (losing the job being watched). Text drags keep their default (e.g. into inputs).
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) drop.classList.remove("over"); // left the window
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
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

  // back in view: poll now instead of waiting out the slow background-tab delay
  document.addEventListener("visibilitychange", () => {
    const run = state.run;
    if (!document.hidden && running() && run.timer !== null && !run.inFlight) schedulePoll(run, 0);
  });

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!API_KEY_PATTERN.test(key)) {
      showMessage("invalid_key", "");
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    showKeyPanel();
    clearMessage();
    // watch again a job (e.g. from the address after a reload) that the missing key stopped
    if (state.run && state.run.stoppedBy === "unauthorized") resumeFromAddress();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    showKeyPanel();
  });

  if (sessionStorage.getItem(KEY_STORAGE)) showKeyPanel();
  checkService();
  resumeFromAddress();
}

init();
