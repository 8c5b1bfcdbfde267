// Bone Detect – AI Prediction: the web page. Plain JavaScript, no build step,
// no third-party code; it talks only to this API, with the key the user entered
// (kept in sessionStorage: gone when the browser session ends).
"use strict";

(() => {
  const KEY_STORE = "bonedetect.apiKey";
  const POLL_MS = 1000;
  const IMAGES_PAGE = 60;
  const FINISHED = new Set(["done", "done_with_errors", "cancelled"]);
  // A drop past either limit goes as one job in parts (open, parts, close): the workers start on the
  // first part while the rest uploads, and no single request carries the whole night.
  const PART_FILES = 64;
  const PART_BYTES = 256 * 1024 * 1024;
  const VIEWABLE = new Set(["image/png", "image/jpeg"]);

  const $ = (id) => document.getElementById(id);
  const state = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    pending: [],          // File objects waiting for "Analyze"
    jobId: null,
    job: null,
    pollTimer: null,
    images: new Map(),    // image_id -> {data, card, view}
    imagesCursor: null,   // next page of the open job's images
    imagesLoaded: 0,
    lastFinished: -1,
    jobsCursor: null,
    blobs: new Map(),     // "imageId/view" -> object URL (revoked when the job closes)
    observer: null,
  };

  // -- the API -------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path, options = {}) {
    const headers = Object.assign({ Authorization: `Bearer ${state.key}` }, options.headers || {});
    let response;
    try {
      response = await fetch(path, Object.assign({}, options, { headers }));
    } catch (err) {
      throw new ApiError(0, "the server cannot be reached");
    }
    if (response.status === 401) {
      signOut("Your API key was not accepted (missing, invalid or revoked).");
      throw new ApiError(401, "invalid API key");
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, message);
    }
    return response;
  }

  const getJson = async (path) => (await api(path)).json();

  async function blobUrl(imageId, view) {
    const cacheKey = `${imageId}/${view}`;
    if (!state.blobs.has(cacheKey)) {
      const path = view === "source" ? `/v1/images/${imageId}/source` : `/v1/images/${imageId}/${view}.png`;
      const promise = api(path).then((r) => r.blob()).then((b) => URL.createObjectURL(b));
      state.blobs.set(cacheKey, promise);
      promise.catch(() => state.blobs.delete(cacheKey));
    }
    return state.blobs.get(cacheKey);
  }

  function releaseBlobs() {
    for (const promise of state.blobs.values()) promise.then((url) => URL.revokeObjectURL(url), () => {});
    state.blobs.clear();
  }

  // -- key and session ---------------------------------------------------------------

  function show(el, visible) { el.hidden = !visible; }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    stopPolling();
    show($("app"), false);
    show($("session"), false);
    show($("login"), true);
    const error = $("key-error");
    error.textContent = message || "";
    show(error, Boolean(message));
    $("key-input").value = "";
    $("key-input").focus();
  }

  async function signIn(key) {
    state.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    try {
      await loadJobs(true);
    } catch (err) {
      if (err.status !== 401) signOut(`Could not check the key: ${err.message}`);
      return;
    }
    $("key-chip").textContent = `key ${key.slice(0, 10)}…`;
    show($("login"), false);
    show($("session"), true);
    show($("app"), true);
    const match = location.hash.match(/job=([0-9a-f-]{36})/);
    if (match) openJob(match[1]);
  }

  // -- upload --------------------------------------------------------------------------

  function addFiles(fileList) {
    for (const file of fileList) {
      if (!state.pending.some((f) => f.name === file.name && f.size === file.size)) state.pending.push(file);
    }
    renderPending();
  }

  function renderPending() {
    const list = $("pending");
    list.replaceChildren();
    state.pending.forEach((file, i) => {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = file.name;
      const size = document.createElement("span");
      size.className = "muted small";
      size.textContent = formatBytes(file.size);
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "link";
      remove.textContent = "remove";
      remove.addEventListener("click", () => { state.pending.splice(i, 1); renderPending(); });
      item.append(name, size, remove);
      list.append(item);
    });
    const n = state.pending.length;
    $("submit-files").disabled = n === 0;
    $("submit-files").textContent = n ? `Analyze ${n} file${n === 1 ? "" : "s"}` : "Analyze";
  }

  // One POST with upload progress (XMLHttpRequest, not fetch: it reports upload progress, which a large
  // batch needs). Resolves to {status, body}; rejects when the server cannot be reached.
  function post(path, form, onProgress, headers = {}) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", path);
      xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      if (onProgress) xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) onProgress(e.loaded); });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
        resolve({ status: xhr.status, body });
      });
      xhr.addEventListener("error", () => reject(new Error("the server cannot be reached")));
      xhr.send(form);
    });
  }

  function splitParts(files) {
    const parts = [];
    let part = [], bytes = 0;
    for (const file of files) {
      if (part.length && (part.length >= PART_FILES || bytes + file.size > PART_BYTES)) {
        parts.push(part);
        part = [];
        bytes = 0;
      }
      part.push(file);
      bytes += file.size;
    }
    if (part.length) parts.push(part);
    return parts;
  }

  function filesForm(files) {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    return form;
  }

  async function submitFiles() {
    const files = state.pending.slice();
    if (!files.length) return;
    const label = $("label-input").value.trim();
    const status = $("upload-status");
    const error = $("upload-error");
    show(error, false);
    $("submit-files").disabled = true;
    const total = files.reduce((n, f) => n + f.size, 0) || 1;
    let sent = 0;
    const progress = (loaded) => { status.textContent = `Uploading… ${Math.round((100 * (sent + loaded)) / total)} %`; };
    const fail = (message) => {
      status.textContent = "";
      error.textContent = message;
      show(error, true);
      $("submit-files").disabled = false;
    };
    const refused = (r) => {
      if (r.status === 401) { signOut("Your API key was not accepted."); return true; }
      return r.status !== 202 && r.status !== 200;
    };
    const parts = splitParts(files);
    const rejected = [];
    let jobId = null;
    status.textContent = "Uploading…";
    try {
      if (parts.length === 1) {
        const form = filesForm(files);
        if (label) form.append("label", label);
        const r = await post("/v1/jobs", form, progress);
        if (refused(r)) { if (r.status !== 401) fail(`Upload refused: ${r.body.error || r.status}`); return; }
        jobId = r.body.job_id;
        rejected.push(...(r.body.rejected || []));
      } else {
        const form = new FormData();
        form.append("open", "true");
        if (label) form.append("label", label);
        const key = `page-${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
        const opened = await post("/v1/jobs", form, null, { "Idempotency-Key": key });
        if (refused(opened)) { if (opened.status !== 401) fail(`Upload refused: ${opened.body.error || opened.status}`); return; }
        jobId = opened.body.job_id;
        openJob(jobId);  // its results appear while the rest uploads
        for (const [i, part] of parts.entries()) {
          const r = await post(`/v1/jobs/${jobId}/images`, filesForm(part), progress, { "Idempotency-Key": `${key}-part-${i}` });
          if (refused(r)) {
            if (r.status !== 401) {
              fail(`Upload stopped at part ${i + 1} of ${parts.length}: ${r.body.error || r.status}. ` +
                   `Job ${jobId} keeps the ${parts.slice(0, i).flat().length} files sent before; cancel it, or send the rest as a new job.`);
            }
            return;
          }
          rejected.push(...(r.body.rejected || []));
          sent += part.reduce((n, f) => n + f.size, 0);
        }
        const closed = await post(`/v1/jobs/${jobId}/close`, null, null);
        if (refused(closed)) { if (closed.status !== 401) fail(`Could not close job ${jobId}: ${closed.body.error || closed.status}`); return; }
      }
    } catch (err) {
      fail(`Upload failed: ${err.message}.` + (jobId ? ` Job ${jobId} keeps the parts sent before.` : ""));
      return;
    }
    status.textContent = `Submitted ${files.length} file(s)` + (parts.length > 1 ? ` in ${parts.length} parts` : "") +
      (rejected.length ? `; ${rejected.length} rejected: ${rejected.map((r) => `${r.filename}: ${r.error}`).join("; ")}` : ".");
    state.pending = [];
    $("label-input").value = "";
    renderPending();
    if (jobId !== state.jobId) openJob(jobId);
    loadJobs(true).catch(() => {});
  }

  // -- jobs list -------------------------------------------------------------------------

  async function loadJobs(reset) {
    const cursor = reset ? null : state.jobsCursor;
    const page = await getJson(`/v1/jobs?limit=20${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    const body = $("jobs-body");
    if (reset) body.replaceChildren();
    for (const job of page.jobs) body.append(jobRow(job));
    state.jobsCursor = page.next_cursor;
    show($("more-jobs"), Boolean(page.next_cursor));
    show($("jobs-empty"), body.children.length === 0);
  }

  function jobRow(job) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = job.job_id;
    tr.tabIndex = 0;
    if (job.job_id === state.jobId) tr.classList.add("selected");
    const cells = [formatTime(job.created_at), job.label || "—", String(job.total)];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const td = document.createElement("td");
    td.append(pill(job.status));
    tr.append(td);
    const open = () => openJob(job.job_id);
    tr.addEventListener("click", open);
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return tr;
  }

  function markSelectedJob() {
    for (const tr of $("jobs-body").children) tr.classList.toggle("selected", tr.dataset.jobId === state.jobId);
  }

  // -- one job: progress and gallery ------------------------------------------------------------

  function stopPolling() {
    if (state.pollTimer) clearTimeout(state.pollTimer);
    state.pollTimer = null;
  }

  function openJob(jobId) {
    stopPolling();
    releaseBlobs();
    state.jobId = jobId;
    state.job = null;
    state.images.clear();
    state.imagesCursor = null;
    state.imagesLoaded = 0;
    state.lastFinished = -1;
    $("gallery").replaceChildren();
    show($("more-images"), false);
    show($("job"), true);
    $("job-id").textContent = jobId;
    history.replaceState(null, "", `#job=${jobId}`);
    markSelectedJob();
    poll();
    $("job").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  async function poll() {
    const jobId = state.jobId;
    let job;
    try {
      job = await getJson(`/v1/jobs/${jobId}`);
    } catch (err) {
      if (jobId !== state.jobId) return;
      $("counts").textContent = `Could not read the job: ${err.message}. Retrying…`;
      if (err.status !== 401 && err.status !== 404) state.pollTimer = setTimeout(poll, 3 * POLL_MS);
      return;
    }
    if (jobId !== state.jobId) return;  // another job was opened meanwhile
    state.job = job;
    renderJob(job);
    const finished = job.counts.done + job.counts.failed + job.counts.cancelled;
    if (finished !== state.lastFinished) {
      state.lastFinished = finished;
      await refreshImages();
    }
    if (!FINISHED.has(job.status)) {
      state.pollTimer = setTimeout(poll, POLL_MS);
    } else {
      const row = $("jobs-body").querySelector(`tr[data-job-id="${jobId}"]`);
      if (row) row.lastElementChild.replaceChildren(pill(job.status));
    }
  }

  function renderJob(job) {
    $("job-title").textContent = job.label ? `Job · ${job.label}` : "Job";
    const status = $("job-status");
    status.textContent = statusText(job.status);
    status.dataset.status = job.status;
    const pct = Math.round(100 * job.progress);
    $("progress-bar").style.width = `${pct}%`;
    $("progress").setAttribute("aria-valuenow", String(pct));
    const finished = job.counts.done + job.counts.failed + job.counts.cancelled;
    $("progress-text").textContent = `${finished} / ${job.total} · ${pct} %`;
    const c = job.counts;
    const parts = [`${c.done} done`, `${c.failed} failed`, `${c.processing} processing`, `${c.queued} queued`];
    if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
    let times = "";
    if (job.finished_at && job.created_at) {
      times = ` · finished in ${formatDuration((Date.parse(job.finished_at) - Date.parse(job.created_at)) / 1000)}`;
    }
    $("counts").textContent = parts.join(" · ") + times;
    const model = $("model-line");
    model.replaceChildren();
    if (job.model_versions.length) {
      model.append("Model ");
      for (const version of job.model_versions) {
        const code = document.createElement("code");
        code.textContent = version;
        model.append(code, " ");
      }
      const warn = document.createElement("span");
      warn.className = "warn";
      warn.textContent = job.model_versions.some((v) => /synthetic/i.test(v))
        ? "synthetic, not for clinical use"
        : "not for clinical use";
      model.append("— ", warn);
    }
    show(model, job.model_versions.length > 0);
    show($("cancel-job"), !FINISHED.has(job.status));
  }

  async function refreshImages() {
    // Reload the pages already shown (statuses change), then the first page if none yet.
    const want = Math.max(state.imagesLoaded, IMAGES_PAGE);
    let cursor = null;
    let loaded = 0;
    do {
      const limit = Math.min(IMAGES_PAGE, want - loaded);
      const page = await getJson(`/v1/jobs/${state.jobId}/images?limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      for (const image of page.images) upsertCard(image);
      loaded += page.images.length;
      cursor = page.next_cursor;
    } while (cursor && loaded < want);
    state.imagesLoaded = loaded;
    state.imagesCursor = cursor;
    show($("more-images"), Boolean(cursor));
  }

  async function moreImages() {
    if (!state.imagesCursor) return;
    const page = await getJson(`/v1/jobs/${state.jobId}/images?limit=${IMAGES_PAGE}&cursor=${encodeURIComponent(state.imagesCursor)}`);
    for (const image of page.images) upsertCard(image);
    state.imagesLoaded += page.images.length;
    state.imagesCursor = page.next_cursor;
    show($("more-images"), Boolean(page.next_cursor));
  }

  function upsertCard(image) {
    let entry = state.images.get(image.image_id);
    if (!entry) {
      const card = $("card-template").content.firstElementChild.cloneNode(true);
      card.dataset.imageId = image.image_id;
      entry = { data: null, card, view: null, visible: false };
      state.images.set(image.image_id, entry);
      for (const button of card.querySelectorAll(".views button")) {
        button.addEventListener("click", () => setView(entry, button.dataset.view));
      }
      card.querySelector(".seg-link").addEventListener("click", () => downloadSeg(entry));
      $("gallery").append(card);
      observer().observe(card);
    }
    const changed = !entry.data || entry.data.status !== image.status;
    entry.data = image;
    renderCard(entry, changed);
  }

  function hasSource(image) { return VIEWABLE.has(image.content_type) && image.status !== "failed"; }

  function isDicom(image) { return image.content_type === "application/dicom" || image.source_format === "DICOM"; }

  function renderCard(entry, statusChanged) {
    const { card, data: im } = entry;
    card.dataset.status = im.status;
    card.querySelector(".filename").textContent = im.filename || im.image_id;
    card.querySelector(".filename").title = im.filename || "";
    const p = card.querySelector(".card-title .pill");
    p.textContent = statusText(im.status);
    p.dataset.status = im.status;
    const error = card.querySelector(".image-error");
    error.textContent = im.error || "";
    show(error, Boolean(im.error));
    const done = im.status === "done";
    const buttons = card.querySelectorAll(".views button");
    for (const b of buttons) {
      const v = b.dataset.view;
      b.disabled = v === "source" ? !hasSource(im) : !done;
      if (v === "source" && isDicom(im)) {
        b.title = "DICOM: the browser cannot show it; the overlay shows the radiograph as the model saw it";
      }
    }
    renderStats(card.querySelector(".stats"), im);
    const seg = card.querySelector(".seg-link");
    show(seg, Boolean(done && im.seg_url));
    if (statusChanged) {
      entry.view = null;
      const initial = done ? "overlay" : (hasSource(im) ? "source" : null);
      setView(entry, initial);
    }
  }

  function setView(entry, view) {
    entry.view = view;
    for (const b of entry.card.querySelectorAll(".views button")) {
      b.classList.toggle("active", b.dataset.view === view);
      b.setAttribute("aria-pressed", String(b.dataset.view === view));
    }
    loadView(entry);
  }

  async function loadView(entry) {
    const img = entry.card.querySelector(".view-img");
    const note = entry.card.querySelector(".viewer-note");
    const im = entry.data;
    if (!entry.view) {
      img.removeAttribute("src");
      img.hidden = true;
      note.textContent = im.status === "failed" ? "No image" : statusText(im.status) + "…";
      show(note, true);
      return;
    }
    if (!entry.visible) return;  // fetched once the card scrolls into view
    const view = entry.view;
    try {
      const url = await blobUrl(im.image_id, view);
      if (entry.view !== view) return;
      img.src = url;
      img.alt = `${view === "source" ? "original" : view} of ${im.filename || im.image_id}`;
      img.hidden = false;
      show(note, false);
    } catch (err) {
      note.textContent = `Could not load: ${err.message}`;
      show(note, true);
    }
  }

  function observer() {
    if (!state.observer) {
      state.observer = new IntersectionObserver((entries) => {
        for (const e of entries) {
          if (!e.isIntersecting) continue;
          const entry = state.images.get(e.target.dataset.imageId);
          if (entry && !entry.visible) { entry.visible = true; loadView(entry); }
        }
      }, { rootMargin: "400px" });
    }
    return state.observer;
  }

  function renderStats(dl, im) {
    dl.replaceChildren();
    const add = (name, value, cls) => {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      if (cls) dd.className = cls;
      dl.append(dt, dd);
    };
    if (im.status !== "done") {
      if (im.width) add("Size", `${im.width} × ${im.height} px`);
      return;
    }
    add("Tumor detected", im.tumor_detected ? "Yes" : "No", im.tumor_detected ? "stat-detected yes" : "stat-detected no");
    add("Area", `${formatInt(im.area_px)} px (${(100 * im.area_fraction).toFixed(2)} %)`, "stat-area-px");
    add("Area (mm²)", im.area_mm2 == null ? "— no pixel spacing" : `${im.area_mm2.toFixed(1)} mm²${spacingNote(im)}`, "stat-area-mm2");
    add("Box x, y, w × h", im.bbox_x == null ? "—" : `${im.bbox_x}, ${im.bbox_y}, ${im.bbox_w} × ${im.bbox_h}`, "stat-bbox");
    if (im.bbox_w_mm != null && im.bbox_h_mm != null) {
      add("Box size", `${im.bbox_w_mm.toFixed(1)} × ${im.bbox_h_mm.toFixed(1)} mm${spacingNote(im)}`);
    }
    add("Confidence", im.prob_max == null ? "—" : `max ${im.prob_max.toFixed(2)} · mean ${im.prob_mean.toFixed(2)}`, "stat-confidence");
    add("Regions", String(im.n_regions ?? "—"));
    add("Image", `${im.width} × ${im.height} px`);
    add("Processing", `${formatInt(Math.round(im.processing_ms || 0))} ms`);
  }

  function spacingNote(im) {
    return im.spacing_source && /imager/i.test(im.spacing_source) ? " at detector" : "";
  }

  // Downloads carry the key too: fetch, then save the blob under a file name.
  async function download(path, filename) {
    const blob = await (await api(path)).blob();
    const url = URL.createObjectURL(blob);
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  async function downloadCsv() {
    const button = $("download-csv");
    button.disabled = true;
    try {
      await download(`/v1/jobs/${state.jobId}/results.csv`, `bonedetect-${state.jobId}.csv`);
    } catch (err) {
      $("counts").textContent = `CSV download failed: ${err.message}`;
    } finally {
      button.disabled = false;
    }
  }

  async function downloadSeg(entry) {
    const im = entry.data;
    const stem = (im.filename || im.image_id).replace(/\.[^.]*$/, "");
    try {
      await download(im.seg_url, `${stem}-seg.dcm`);
    } catch (err) {
      const error = entry.card.querySelector(".image-error");
      error.textContent = `SEG download failed: ${err.message}`;
      show(error, true);
    }
  }

  async function cancelJob() {
    if (!confirm("Cancel the images of this job that are not processed yet?")) return;
    try {
      await api(`/v1/jobs/${state.jobId}`, { method: "DELETE" });
    } catch (err) {
      $("counts").textContent = `Cancel failed: ${err.message}`;
    }
    stopPolling();
    poll();
  }

  // -- formatting --------------------------------------------------------------------

  function pill(status) {
    const span = document.createElement("span");
    span.className = "pill small-pill";
    span.dataset.status = status;
    span.textContent = statusText(status);
    return span;
  }

  function statusText(status) {
    return { done_with_errors: "done, with errors", receiving: "receiving files" }[status] || status || "–";
  }

  function formatInt(n) { return n == null ? "—" : Number(n).toLocaleString("en-US"); }

  function formatBytes(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function formatTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  }

  function formatDuration(s) {
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  // -- wiring --------------------------------------------------------------------------

  function wire() {
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const key = $("key-input").value.trim();
      if (key) signIn(key);
    });
    $("sign-out").addEventListener("click", () => signOut(""));

    const zone = $("dropzone");
    const input = $("file-input");
    zone.addEventListener("click", (e) => { if (e.target !== input) input.click(); });
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
    }
    for (const type of ["dragleave", "drop"]) {
      zone.addEventListener(type, () => zone.classList.remove("over"));
    }
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
    });
    // A file dropped beside the zone must not make the browser leave the page.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => e.preventDefault());

    $("submit-files").addEventListener("click", submitFiles);
    $("refresh-jobs").addEventListener("click", () => loadJobs(true).catch(() => {}));
    $("more-jobs").addEventListener("click", () => loadJobs(false).catch(() => {}));
    $("more-images").addEventListener("click", () => moreImages().catch(() => {}));
    $("download-csv").addEventListener("click", downloadCsv);
    $("cancel-job").addEventListener("click", cancelJob);
  }

  wire();
  if (state.key) signIn(state.key); else signOut("");
})();
