// dynface page: upload a photo, poll the job, show before/after, faces and downloads.
// Server text is only ever set with textContent (never innerHTML). Results are fetched with the
// API key header (when keys are on) and shown from blob: URLs.
"use strict";

const KEY_STORAGE = "dynface.apiKey";
// What an HTTP header value can carry and the server can match; anything else makes fetch() throw.
const API_KEY_PATTERN = /^[\x21-\x7e]+$/;
const JOB_ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
// Where the API takes submissions, relative to the page (see pageUrl).
const JOBS_PATH = "v1/restorations";
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
// A submission whose answer does not come (network, 5xx) is sent again with the same Idempotency-Key,
// which gets the job it may have made instead of a second one: these waits between tries.
const SUBMIT_RETRY_MS = [1000, 2000, 4000];
// Once the whole photo is sent, the API answers as soon as it has checked and stored it (the page sends
// no `Prefer: wait`): within seconds. A POST still unanswered this long after its body went out is
// given up and tried again with its Idempotency-Key. 60 s is the API's own bound on a submission's
// time from claiming its key to storing its job (IDEMPOTENCY_TAKEOVER_SECONDS): past it the API, too,
// takes that request to have failed. Counted from the end of the upload, not from send() as
// `xhr.timeout` would be: a 20 MB photo on a slow link takes minutes to upload.
const ANSWER_TIMEOUT_MS = 60000;
// Refusals of a submission that the first try with its Idempotency-Key got too, had it arrived: they
// answer the photo and options themselves (invalid, too large, an unsupported format). Any other
// refusal (401, 429, a full queue) may come and go, so after a try that went unanswered it does not
// tell whether that try stored a job.
const REFUSED_FOR_GOOD = new Set([400, 413, 415, 422]);
// The box drawing of the faces is at most this wide and high: a canvas of the photo's full size (up to
// 40 MP) is over what some browsers draw (iOS Safari leaves it blank).
const BOXES_MAX_SIDE = 2048;
// What an error answer that is not our JSON (a proxy's HTML 413 or 502) means, by its status.
const STATUS_CODE = {
  401: "unauthorized",
  404: "not_found",
  413: "too_large",
  429: "rate_limited",
  502: "unavailable",
  503: "unavailable",
  504: "unavailable",
};

// A clear sentence for every error code the API (or a failed job) can report.
const ERROR_TEXT = {
  network: "The server could not be reached. Check your connection and try again.",
  too_large: "The photo is too large to upload. Try a smaller file.",
  too_many_pixels: "The photo has too many pixels. Try a smaller image.",
  invalid_image: "This file is not an image that can be read. Pick a photo in PNG, JPEG, WebP, BMP, TIFF " +
    "or GIF format.",
  unsupported_format: "This image format is not supported (nor is HEIC, the format of many phone photos). " +
    "Save the photo as JPEG or PNG and pick that file; WebP, BMP, TIFF and GIF work too.",
  not_square: "“Already an aligned 512×512 face” needs a square face crop, and this photo is not square. " +
    "Untick it to restore the faces in a whole photo.",
  no_face: "No face was found in the photo. Try one with a larger, clearer face " +
    "(or tick “already an aligned 512×512 face” for a face crop).",
  queue_full: "The service is busy: the queue is full.",
  rate_limited: "Too many photos submitted in the last minute.",
  too_many_active_jobs: "This API key has too many photos waiting or being restored. Submit again once one " +
    "has finished.",
  too_many_stored_bytes: "This API key's photos and results take all the room it has on the server. " +
    "Try again once earlier results have expired.",
  unauthorized: "This service needs a valid API key. Enter it above.",
  invalid_option: "One of the options was not accepted.",
  invalid_request: "The request was not understood.",
  idempotency_conflict: "This request conflicts with an earlier one. Submit again.",
  idempotency_in_progress: "An identical request is still being submitted. Wait a moment, then try again.",
  output_too_large: "The result would be too large. Choose a smaller upscale, or a smaller photo.",
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
  unavailable: "The service is unavailable right now. Try again shortly.",
  internal: "Something went wrong on the server. Try again later.",
  page_error: "Something went wrong in this page. Reload it and try again.",
  display_failed: "This browser cannot display the restored photo. Use “Download restored photo” to save it.",
  upload_canceled: "The upload was canceled.",
  cancel_unconfirmed: "The server did not answer, so the page cannot tell whether it stored your photo: " +
    "a job may still run. Restore the same photo with the same options to find that job (no second one " +
    "is made), then cancel it.",
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
  fileSize: null, // a promise of the picked photo's {width, height}, null if the browser cannot read it
  // The last submission whose outcome is unknown (no answer, a 5xx): submitting the same photo (the
  // same file, picked again or not) and options again reuses its Idempotency-Key, so a job it did make
  // is found rather than made twice.
  unsure: null,
  // The API key when sessionStorage cannot be used (it throws where the browser blocks site data).
  memoryKey: null,
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

// ---------------------------------------------------------------- API key storage

// sessionStorage throws (SecurityError) where the browser blocks site data: the key is then kept in
// memory only, until the page is left.
function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? state.memoryKey;
  } catch {
    return state.memoryKey;
  }
}

function storeKey(key) {
  state.memoryKey = key;
  try {
    if (key === null) sessionStorage.removeItem(KEY_STORAGE);
    else sessionStorage.setItem(KEY_STORAGE, key);
  } catch {
    // kept in memory only
  }
}

// ---------------------------------------------------------------- API

// The page's URLs are relative to its base (document.baseURI), never to the host's root: served
// behind a proxy under a path prefix (uvicorn --root-path), the API is under that prefix too.
function pageUrl(path) {
  return new URL(path, document.baseURI).href;
}

function authHeaders() {
  const key = storedKey();
  // a key fetch() cannot send would fail as "unreachable": send none and let the server ask for one
  return key && API_KEY_PATTERN.test(key) ? { Authorization: `Bearer ${key}` } : {};
}

// An error answer as an ApiFailure: our JSON error's code, else one for its HTTP status.
function failureFrom(status, statusText, text, retryAfter) {
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: a proxy's own page
  }
  if (body && body.error && body.error.code) {
    return new ApiFailure(String(body.error.code), String(body.error.message), retryAfter, status);
  }
  return new ApiFailure(STATUS_CODE[status] || `http_${status}`, statusText, retryAfter, status);
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...options.headers };
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err; // a superseded submission: its caller ignores it
    throw new ApiFailure("network", "No response from the server.");
  }
  if (response.ok) return response;
  const text = await response.text().catch(() => "");
  throw failureFrom(response.status, response.statusText, text, response.headers.get("Retry-After"));
}

function abortError() {
  return new DOMException("Canceled.", "AbortError");
}

// POST a submission with XMLHttpRequest, not fetch: only it reports upload progress, and when the
// whole body has been sent (from then on, aborting may no longer stop the job being stored).
function postForm(run, path, form, headers) {
  return new Promise((resolve, reject) => {
    const signal = run.abort.signal;
    if (signal.aborted) return reject(abortError());
    const xhr = new XMLHttpRequest();
    const stop = () => xhr.abort();
    let answerTimer = null;
    let timedOut = false;
    xhr.open("POST", path);
    for (const [name, value] of Object.entries({ ...authHeaders(), ...headers })) {
      xhr.setRequestHeader(name, value);
    }
    xhr.upload.onprogress = (e) => {
      if (isCurrent(run)) showUpload(e.lengthComputable ? e.loaded / e.total : null);
    };
    xhr.upload.onload = () => {
      run.mayHaveJob = true; // whatever becomes of the answer, the API may store the job now
      answerTimer = setTimeout(() => {
        timedOut = true;
        xhr.abort();
      }, ANSWER_TIMEOUT_MS);
    };
    xhr.onload = () => {
      if (xhr.status < 200 || xhr.status > 299) {
        const retryAfter = xhr.getResponseHeader("Retry-After");
        return reject(failureFrom(xhr.status, xhr.statusText, xhr.responseText, retryAfter));
      }
      try {
        resolve(JSON.parse(xhr.responseText));
      } catch (err) {
        reject(err);
      }
    };
    xhr.onerror = () => reject(new ApiFailure("network", "No response from the server."));
    xhr.onabort = () => {
      if (!timedOut) return reject(abortError());
      reject(new ApiFailure("network", `No answer from the server within ${ANSWER_TIMEOUT_MS / 1000} s.`));
    };
    xhr.onloadend = () => {
      clearTimeout(answerTimer);
      signal.removeEventListener("abort", stop);
    };
    signal.addEventListener("abort", stop);
    xhr.send(form);
  });
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(abortError());
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError());
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort);
  });
}

// A random Idempotency-Key (crypto.randomUUID needs a secure context: plain http is not one).
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
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
  const wait = retryAfterMs(retryAfter);
  if (wait > 0) title += ` Try again in ${Math.ceil(wait / 1000)} s.`;
  // role=alert reads every rewrite out again (an outage retries some 20 times, each with its own
  // details): the same sentence is left as it is. A new one (another "Try again in N s") is shown.
  if (box.hidden || box.dataset.code !== code || $("message-title").textContent !== title) {
    box.className = `message ${kind}`;
    box.dataset.code = code;
    $("message-title").textContent = title;
    $("message-detail").textContent = detail ? `Details: ${detail}` : "";
    box.hidden = false;
  }
  if (code === "unauthorized") showKeyPanel(true); // every time: the key is what the user must fix
}

function showFailure(err) {
  if (err instanceof ApiFailure) showMessage(err.code, err.message, err.retryAfter);
  else showMessage("page_error", String(err)); // a bug here, not the server's
}

function clearMessage() {
  $("message").hidden = true;
  delete $("message").dataset.code;
}

// ---------------------------------------------------------------- API key

function showKeyPanel(focus = false) {
  $("key-panel").hidden = false;
  const hasKey = Boolean(storedKey());
  $("key-state").textContent = hasKey ? "A key is set for this tab." : "No key set.";
  if (focus) $("api-key").focus();
}

// What /readyz's reasons (app/routers/health.py) mean for a photo submitted now.
function readinessNotice(reasons) {
  if (reasons.some((r) => r.startsWith("redis unreachable"))) {
    return ["redis_unreachable", "The service cannot reach its job store: submitting a photo will fail " +
      "until it is back."];
  }
  if (reasons.includes("no worker is running")) {
    return ["no_worker", "No worker is running: a photo you submit will wait in the queue until one starts."];
  }
  if (reasons.includes("no worker has its model loaded")) {
    return ["no_model", "No worker has its model loaded yet: a photo you submit will wait in the queue " +
      "until one has."];
  }
  return ["not_ready", "The service is not ready."];
}

// Its own box, not #message: it answers at any time and must not hide an error shown there.
async function checkService() {
  const box = $("notice");
  try {
    // with the key (when one is set) the reasons are the detailed ones
    const response = await fetch(pageUrl("readyz"), { headers: authHeaders() });
    const ready = await response.json();
    if (ready.auth === "api_key") showKeyPanel();
    const reasons = Array.isArray(ready.reasons) ? ready.reasons.map(String) : [];
    if (ready.ready || !reasons.length) {
      box.hidden = true;
      return;
    }
    const [code, title] = readinessNotice(reasons);
    box.dataset.code = code;
    $("notice-title").textContent = title;
    $("notice-detail").textContent = `Details: ${reasons.join("; ")}`;
    box.hidden = false;
  } catch {
    // the page still works; errors show on submit
  }
}

// What a job shows of the service outdates a notice that said otherwise: one accepted proves the job
// store answers, one a worker took (processing, succeeded) that a worker runs with its model loaded.
function noticeDisproved(codes) {
  const box = $("notice");
  if (!box.hidden && codes.includes(box.dataset.code)) box.hidden = true;
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
  state.fileSize = imageSize(state.inputUrl);
  $("drop-text").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KB)`;
  // A photo may be picked while a job runs, but it is only submitted once that job has ended: one job
  // and one poll loop at a time, and Cancel always means the job on screen.
  updateControls();
  if (!running()) clearMessage();
}

function imageSize(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve({ width: img.naturalWidth, height: img.naturalHeight });
    img.onerror = () => resolve(null); // a format this browser cannot show (TIFF): the server checks it
    img.src = url;
  });
}

function chosenOptions() {
  const options = {
    mode: $("mode").value,
    upscale: $("upscale").value,
    aligned: $("aligned").checked ? "true" : "false",
    outputs: "image,faces",
  };
  if (!$("fidelity-auto").checked) options.fidelity = $("fidelity").value;
  return options;
}

function formData(file, options) {
  const form = new FormData();
  form.append("image", file, file.name);
  Object.entries(options).forEach(([name, value]) => form.append(name, value));
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
  $("cancel").disabled = running() && state.run.cancelRequested;
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
  $("results").classList.remove("no-before");
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
    // A try's whole photo has been sent, or a try ended with no answer saying what became of it: the
    // API may have stored the job, so Cancel must find it (and delete it) rather than only stop.
    mayHaveJob: false,
    // A try with this submission's Idempotency-Key (here, or in the earlier unsure submission whose key
    // it reuses) got no answer saying what became of it.
    unanswered: false,
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

function jobUrl(id) {
  return pageUrl(`${JOBS_PATH}/${encodeURIComponent(id)}`);
}

async function submit() {
  if (!state.file || running()) return;
  const { file, fileSize } = state;
  const options = chosenOptions();
  clearMessage();
  forgetJob(); // until the new job has an id, a reload must not resume the previous one
  const run = startRun(state.inputUrl);
  showUpload(null);
  try {
    if (options.aligned === "true") {
      const size = await fileSize; // known within moments of the pick
      if (size && size.width !== size.height) {
        throw new ApiFailure("not_square", `The photo is ${size.width}×${size.height} pixels.`);
      }
    }
    // The same photo is the same file, not the same File object: picked again, it is a new one. Not
    // by its date, which iOS sets to the time of the pick; another photo of the same name, size and
    // type is told apart by the API, whose 409 idempotency_conflict then sends it with a key of its own.
    const signature = JSON.stringify([file.name, file.size, file.type, options]);
    const unsure = state.unsure;
    const same = Boolean(unsure) && unsure.signature === signature;
    state.unsure = { signature, key: same ? unsure.key : newIdempotencyKey() }; // until an answer comes
    run.unanswered = same;
    let job;
    try {
      job = await submitWithRetries(run, formData(file, options), state.unsure.key);
    } catch (err) {
      if (!(same && err instanceof ApiFailure && err.code === "idempotency_conflict")) throw err;
      state.unsure = { signature, key: newIdempotencyKey() };
      run.unanswered = false;
      job = await submitWithRetries(run, formData(file, options), state.unsure.key);
    }
    if (!isCurrent(run)) return;
    state.unsure = null;
    if ($("message").dataset.code === "reconnecting") clearMessage();
    noticeDisproved(["redis_unreachable"]);
    run.jobId = job.id;
    rememberJob(job.id);
    // Cancel came once a try's photo was all sent: this is that job (answered, or replayed for the
    // same Idempotency-Key), or one made just now because none had been stored; either way it goes.
    if (run.cancelRequested) requestCancel(run);
    handleJob(run, job);
  } catch (err) {
    if (!isCurrent(run)) return;
    finishRun(run);
    clearStatus();
    if (err.name === "AbortError") return showMessage("upload_canceled", "", null, "info");
    if (err instanceof ApiFailure && retryableSubmit(err)) {
      // the job may exist: state.unsure keeps its key, so submitting again finds it
      if (run.cancelRequested) return showMessage("cancel_unconfirmed", err.message);
    } else if (err instanceof ApiFailure && err.status > 0) {
      // The API answered, refusing the photo: this try stored no job, and no earlier one did when none
      // went unanswered or when it would have been refused the same. Otherwise state.unsure keeps the
      // key. (A refusal of the page's own, such as not_square, sent nothing, and leaves an earlier
      // unsure submission's key as it was.)
      const noJob = !run.unanswered || REFUSED_FOR_GOOD.has(err.status);
      if (noJob) state.unsure = null;
      if (run.cancelRequested && noJob) return showMessage("upload_canceled", err.message, null, "info");
      if (run.cancelRequested) return showMessage("cancel_unconfirmed", err.message);
    }
    return showFailure(err);
  }
}

// No answer, or one that says the job may yet be stored: trying again with the same key is safe.
function retryableSubmit(err) {
  if (err.code === "network" || err.code === "idempotency_in_progress") return true;
  return err.status >= 500 && err.code !== "queue_full"; // a full queue says when to come back
}

async function submitWithRetries(run, form, key) {
  for (let attempt = 0; ; attempt += 1) {
    try {
      return await postForm(run, pageUrl(JOBS_PATH), form, { "Idempotency-Key": key });
    } catch (err) {
      if (err instanceof ApiFailure && retryableSubmit(err)) {
        run.mayHaveJob = true;
        run.unanswered = true;
      }
      const retry = err instanceof ApiFailure && retryableSubmit(err) && attempt < SUBMIT_RETRY_MS.length;
      if (!retry || !isCurrent(run)) throw err;
      showMessage("reconnecting", err.message, null, "info");
      showUpload(null); // not once Cancel is requested: the next try only learns the job's id, to delete it
      const wait = Math.max(SUBMIT_RETRY_MS[attempt], retryAfterMs(err.retryAfter) ?? 0);
      await sleep(Math.min(wait, RETRY_CAP_MS), run.abort.signal); // Cancel ends the wait
    }
  }
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
    job = await (await api(jobUrl(run.jobId), { signal: run.abort.signal })).json();
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

// Retry-After as milliseconds from now (seconds, or an HTTP-date), or null.
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
    // never sooner than the backoff: "Retry-After: 0" (or a past date) must not make a busy loop
    const wait = Math.max(backoff, retryAfterMs(err.retryAfter) ?? 0);
    return schedulePoll(run, Math.min(left, wait));
  }
  finishRun(run);
  run.stoppedBy = err.code;
  if (err.code === "not_found") forgetJob();
  if (transient) showMessage("lost_contact", err.message);
  else showFailure(err);
}

function handleJob(run, job) {
  renderStatus(run, job);
  if (job.status === "processing" || job.status === "succeeded") {
    noticeDisproved(["no_worker", "no_model", "redis_unreachable", "not_ready"]);
  }
  if (!TERMINAL.has(job.status)) return schedulePoll(run, pollDelay(run, job));
  finishRun(run);
  checkService(); // the notice says what holds now that the job has ended
  // a Cancel that came too late: the end state shown now says what became of the job
  if ($("message").dataset.code === "not_cancelable") clearMessage();
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

function cancel() {
  const run = state.run;
  if (!running() || run.cancelRequested) return;
  run.cancelRequested = true;
  updateControls();
  if (!run.jobId && !run.mayHaveJob) {
    // the first try is still uploading: the API stores no job from an unfinished upload
    run.abort.abort();
    return;
  }
  setStatusLine("Cancel requested…", "");
  // With no id yet, the submission goes on only to learn it (the answer awaited, or the next try with
  // the same Idempotency-Key, which replays a stored job): submit() then deletes the job.
  if (run.jobId) requestCancel(run);
}

async function requestCancel(run) {
  try {
    await api(jobUrl(run.jobId), { method: "DELETE", signal: run.abort.signal });
  } catch (err) {
    if (!isCurrent(run) || err.name === "AbortError") return;
    run.cancelRequested = false; // the job goes on: Cancel may be tried again
    updateControls();
    if (err.code === "not_cancelable") {
      // the job has ended: its end state, polled now, shows what became of it (and clears this)
      if (run.done) return;
      if (!run.inFlight) schedulePoll(run, 0);
    }
    showFailure(err);
    return;
  }
  // show the outcome now rather than at the next (possibly slow, queued) poll
  if (isCurrent(run) && !run.done && !run.inFlight) schedulePoll(run, 0);
}

// The status line is a sentence (read out by screen readers when it changes) and a counter (not read
// out: it changes on every poll).
function setStatusLine(sentence, count) {
  // Rewriting the same text would still replace the live region's text node, and be read out again.
  if ($("status-text").textContent !== sentence) $("status-text").textContent = sentence;
  $("status-count").textContent = count;
}

// The panel is never hidden, only emptied: a live region shown in the same step as its first text
// is not read out (style.css keeps an empty one out of sight).
function clearStatus() {
  delete $("status-panel").dataset.status;
  setStatusLine("", "");
  $("progress").value = 0;
  $("warnings").replaceChildren();
}

function showUpload(fraction) {
  if (state.run && state.run.cancelRequested) return; // "Cancel requested…" stays
  $("status-panel").dataset.status = "uploading";
  const bar = $("progress");
  if (fraction === null) bar.removeAttribute("value"); // indeterminate
  else bar.value = fraction;
  setStatusLine("Uploading the photo", fraction === null ? "…" : `: ${Math.floor(fraction * 100)}%`);
}

function renderStatus(run, job) {
  $("status-panel").dataset.status = job.status;
  const bar = $("progress");
  let sentence;
  let count = "";
  if (run.cancelRequested && !TERMINAL.has(job.status)) {
    sentence = "Cancel requested…"; // until the job ends (a running one stops at its next check)
  } else if (job.status === "queued") {
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
  setStatusLine(sentence, count);
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
    img.onerror = () => reject(new ApiFailure("display_failed", "The browser cannot display this image."));
    img.src = src;
  });
}

// A result URL from the job JSON, fetched where this page fetches the job itself (`jobUrl`): its part
// from JOBS_PATH on, on the page's base. The job's URLs carry the API's public base URL (maybe another
// origin, or a path prefix the API does not know of), which need not be this page's (connect-src 'self').
function resultUrl(url) {
  const parsed = new URL(url, document.baseURI);
  const at = parsed.pathname.indexOf(`/${JOBS_PATH}/`);
  return pageUrl((at >= 0 ? parsed.pathname.slice(at + 1) : parsed.pathname) + parsed.search);
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
  const image = await blobUrl(resultUrl(main), signal);
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
  const beforeShown = await beforeLoaded;
  if (!isCurrent(run)) return;
  // resumed after a reload, or a format this browser cannot show
  if (!beforeShown) $("results").classList.add("no-before");

  const faces = Array.isArray(outputs.faces) ? outputs.faces : [];
  for (const [k, url] of faces.entries()) {
    const face = await blobUrl(resultUrl(url), signal);
    if (!isCurrent(run)) return;
    $("faces").append(faceItem(job.id, k, face));
  }
  // last: should drawing fail, the faces are listed all the same
  if (beforeShown) drawBoxes(before, job.faces || []);
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

// Shown once drawn: a drawing that fails half way is not left on screen.
function drawBoxes(img, faces) {
  const canvas = $("boxes");
  const n = faces.length;
  canvas.setAttribute("aria-label", `Your photo with its ${n} detected face${n === 1 ? "" : "s"} outlined and numbered`);
  const scale = Math.min(1, BOXES_MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const line = Math.max(2, Math.round(canvas.width / 300));
  ctx.lineWidth = line;
  ctx.strokeStyle = "#34e07a";
  ctx.fillStyle = "#34e07a";
  ctx.font = `bold ${line * 8}px sans-serif`;
  faces.forEach((face, k) => {
    const [x0, y0, x1, y1] = face.box.map((v) => Number(v) * scale);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.fillText(String(k + 1), x0 + line * 2, y0 + line * 9);
  });
  canvas.hidden = false;
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
    const file = e.dataTransfer.files[0];
    if (!file) return;
    setFile(file);
    // The input shows the dropped photo too: it fires "change" only for a new value, so picking the
    // photo it held before the drop would otherwise be ignored.
    const picked = new DataTransfer();
    picked.items.add(file);
    $("file").files = picked.files;
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

  // back in view: poll now instead of waiting out the slow background-tab delay (not a retry's wait)
  document.addEventListener("visibilitychange", () => {
    const run = state.run;
    if (!document.hidden && running() && run.timer !== null && !run.inFlight && run.failingSince === null) {
      schedulePoll(run, 0);
    }
  });

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!API_KEY_PATTERN.test(key)) {
      showMessage("invalid_key", "");
      return;
    }
    storeKey(key);
    $("api-key").value = "";
    showKeyPanel();
    clearMessage();
    checkService(); // with a key, /readyz gives its detailed reasons
    // watch again a job (e.g. from the address after a reload) that the missing key stopped
    if (state.run && state.run.stoppedBy === "unauthorized") resumeFromAddress();
  });
  $("forget-key").addEventListener("click", () => {
    storeKey(null);
    showKeyPanel();
  });

  if (storedKey()) showKeyPanel();
  checkService();
  resumeFromAddress();
}

init();
