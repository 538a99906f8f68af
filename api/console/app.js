// The inspection console: wires sign-in, the queue, the verdict panel, the viewer, history, feedback
// and the shortcuts together. Modules hold the parts; this file holds only what joins them.
import { ApiError, request, setUnauthorizedHandler } from "./api.js";
import { Camera, cameraAvailable } from "./camera.js";
import { errorMessage } from "./errors.js";
import { HistoryPanel } from "./history.js";
import { chooseLanguage, currentLanguage, onLanguageChange, setLanguage, t } from "./i18n.js";
import { installShortcuts } from "./keys.js";
import { LifecyclePanel } from "./lifecycle.js";
import { Queue } from "./queue.js";
import { queueRowParts } from "./queue-view.js";
import { drawReferences, forgetReferenceImages } from "./references.js";
import { fromHistory, fromPrediction, verdictState } from "./results.js";
import { session } from "./session.js";
import { inferModality } from "./sniff.js";
import { renderEmpty, renderError, renderVerdict } from "./verdict.js";
import { Viewer } from "./viewer.js";

const $ = (selector) => document.querySelector(selector);
const PROBE_RETRY_MS = 5000;
const BROWSER_IMAGES = new Set(["image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"]);

const ui = {
  signin: $("#signin"),
  signinForm: $("#signin-form"),
  signinKey: $("#signin-key"),
  signinIntro: $("#signin-intro"),
  signinMessage: $("#signin-message"),
  signinCancel: $("#signin-cancel"),
  signinOpen: $("#signin-open"),
  signout: $("#signout"),
  signedState: $("#signed-state"),
  console: $("#console"),
  language: $("#language"),
  help: $("#help"),
  fileInput: $("#file-input"),
  captureInput: $("#capture-input"),
  dropzone: $("#dropzone"),
  station: $("#station"),
  stationField: $("#station-field"),
  caseId: $("#case"),
  product: $("#product"),
  modality: $("#modality"),
  queueList: $("#queue"),
  queueEmpty: $("#queue-empty"),
  queueCount: $("#queue-count"),
  verdictBody: $("#verdict-body"),
  verdictDetails: $("#verdict-details"),
  note: $("#note"),
  feedbackStatus: $("#feedback-status"),
  announcer: $("#announcer"),
  references: $("#references"),
};

const state = {
  mode: "unknown", // "open": no key needed; "keyed": signed in with a key; "signin": waiting for a key
  selected: null, // { item } (a queued file) or { result } (a record reopened from history)
  follow: true, // select each result as it arrives, until the officer picks one by hand
  signed: null, // { key, name }: the signed-in line's string and the name it shows
};

const viewer = new Viewer($("#viewer"));
const history = new HistoryPanel($("#history"), (requestId) => openRecord(requestId));
const lifecycle = new LifecyclePanel($("#lifecycle"), $("#lifecycle-open"));
const queue = new Queue(sendItem, drawItem);

// ---- Sign-in ---------------------------------------------------------------------------------------

function showSignin(messageKey, optional) {
  state.mode = optional ? state.mode : "signin";
  ui.signin.hidden = false;
  ui.console.hidden = !optional;
  ui.signinIntro.dataset.i18n = optional ? "signin.optional" : "signin.intro";
  ui.signinIntro.textContent = t(ui.signinIntro.dataset.i18n);
  ui.signinCancel.hidden = !optional;
  setMessage(ui.signinMessage, messageKey);
  ui.signinKey.value = "";
  ui.signinKey.focus();
}

function setMessage(node, key) {
  if (key) node.dataset.i18n = key;
  else delete node.dataset.i18n;
  node.textContent = key ? t(key) : "";
}

/** Who is signed in, in the page's language (re-drawn when it changes: the right holder's name is data). */
function drawSigned() {
  if (state.signed) ui.signedState.textContent = t(state.signed.key, { name: state.signed.name });
}

/** caller: /v1/models' "caller" ({station_id, role}); an admin key is offered the models panel. */
function enterConsole(mode, caller) {
  const admin = caller?.role === "admin";
  const holder = caller?.role === "rightholder";
  state.mode = mode;
  lifecycle.offer(admin);
  ui.signin.hidden = true;
  ui.console.hidden = false;
  // A right holder's key reads its products' seizures: the page shows history, verdicts and guides, and
  // hides what that key may not do (submitting images, confirming outcomes).
  ui.console.dataset.role = caller?.role || "anonymous";
  const signed = mode !== "keyed" ? "signed.open" : admin ? "signed.admin" : holder ? "signed.rightholder" : "signed.key";
  state.signed = { key: signed, name: caller?.station_id || "" };
  drawSigned();
  ui.signout.hidden = mode !== "keyed";
  ui.signinOpen.hidden = mode !== "open";
  ui.stationField.hidden = mode === "keyed"; // a key names its station; the server knows it
  history.reload();
}

/** GET /v1/models decides: 200 without a key means a loopback server that needs none. */
async function probe() {
  const key = session.key();
  try {
    const models = await request("/v1/models", { key, quiet401: true });
    enterConsole(key ? "keyed" : "open", models.caller);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      session.clearKey();
      showSignin(key ? "signin.again" : null, false);
    } else {
      // Unreachable or failing: say so rather than leave the page blank, and ask again shortly.
      ui.signin.hidden = false;
      ui.signinMessage.removeAttribute("data-i18n");
      ui.signinMessage.textContent = errorMessage(error);
      window.setTimeout(probe, PROBE_RETRY_MS);
    }
  }
}

async function signIn(event) {
  event.preventDefault();
  const key = ui.signinKey.value.trim();
  if (!key) {
    ui.signinKey.focus();
    return;
  }
  setMessage(ui.signinMessage, "signin.checking");
  let models;
  try {
    models = await request("/v1/models", { key, quiet401: true });
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) setMessage(ui.signinMessage, "signin.bad");
    else {
      delete ui.signinMessage.dataset.i18n;
      ui.signinMessage.textContent = errorMessage(error);
    }
    ui.signinKey.select();
    return;
  }
  session.setKey(key);
  ui.signinKey.value = "";
  forgetResults();
  enterConsole("keyed", models.caller);
  $("#choose").focus();
}

function signOut() {
  session.clearKey();
  lifecycle.offer(false);
  forgetResults();
  state.mode = "unknown";
  ui.console.hidden = true;
  probe();
}

/** A station's results stay with that station: nothing of them survives a change of key. */
function forgetResults() {
  queue.clear();
  state.selected = null;
  state.follow = true;
  ui.queueList.replaceChildren();
  drawCounts();
  renderEmpty(ui.verdictBody, ui.verdictDetails);
  viewer.clear();
  forgetReferenceImages();
  drawReferences(ui.references, null);
  ui.note.value = "";
  setMessage(ui.feedbackStatus, null);
}

setUnauthorizedHandler(() => {
  if (state.mode === "signin") return;
  session.clearKey();
  lifecycle.offer(false);
  forgetResults();
  showSignin("signin.again", false);
});

// ---- Submitting ------------------------------------------------------------------------------------

async function addFiles(files) {
  const list = Array.from(files || []);
  if (list.length === 0) return;
  state.follow = true;
  for (const file of list) {
    const chosen = ui.modality.value;
    const modality = chosen === "auto" ? await inferModality(file) : chosen;
    queue.add(file, modality);
  }
}

function formFor(item) {
  const form = new FormData();
  form.append("file", item.file, item.name || "image");
  form.append("modality", item.modality);
  form.append("return_heatmap", "true");
  form.append("return_view", "true");
  const caseId = ui.caseId.value.trim();
  const product = ui.product.value.trim();
  const station = ui.station.value.trim();
  if (caseId) form.append("case_id", caseId);
  if (product) form.append("product", product); // an empty product would be an unknown product
  if (station && !session.key()) form.append("station_id", station);
  return form;
}

async function sendItem(item) {
  const body = await request("/v1/predict", { method: "POST", form: formFor(item) });
  const result = fromPrediction(body);
  if (!result.viewPng && BROWSER_IMAGES.has(item.file.type)) item.url = URL.createObjectURL(item.file);
  return result;
}

function itemRow(item) {
  let li = ui.queueList.querySelector(`[data-id="${item.id}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.id = item.id;
    ui.queueList.append(li);
  }
  return li;
}

function drawItem(item) {
  const li = itemRow(item);
  li.dataset.state = item.state;
  const parts = queueRowParts(item, { onSelect: (chosen) => select({ item: chosen }, true), onRetry: (failed) => queue.retry(failed) });
  const button = parts[0];
  const hadFocus = li.contains(document.activeElement);
  li.replaceChildren(...parts);
  if (hadFocus) button.focus();
  markSelected();
  drawCounts();
  if (item.state === "done" || item.state === "error") finished(item);
  else if (state.selected && state.selected.item === item) drawSelected(false);
}

function finished(item) {
  const message = item.state === "done"
    ? t("announce.verdict", { file: item.name, verdict: t(`verdict.${verdictState(item.result)}`) })
    : t("announce.error", { file: item.name, message: errorMessage(item.error) });
  ui.announcer.textContent = message;
  const current = state.selected && state.selected.item;
  if (state.follow || current === item || !state.selected) select({ item }, false);
  if (item.state === "done") history.load();
}

function drawCounts() {
  const { done, total } = queue.counts();
  ui.queueEmpty.hidden = total > 0;
  ui.queueCount.textContent = total ? t("queue.count", { done, total }) : "";
}

function markSelected() {
  const id = state.selected && state.selected.item ? state.selected.item.id : null;
  for (const button of ui.queueList.querySelectorAll(".queue-item")) {
    if (button.dataset.id === id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// ---- Showing one result ----------------------------------------------------------------------------

function dataUrl(base64) {
  return base64 ? `data:image/png;base64,${base64}` : null;
}

/** byHand: the officer chose it (stop following new results). */
function select(selection, byHand) {
  if (byHand) state.follow = false;
  state.selected = selection;
  setMessage(ui.feedbackStatus, null);
  markSelected();
  drawSelected(true);
}

function drawSelected(newImage) {
  const selection = state.selected;
  const shown = selection && (selection.item ? (selection.item.state === "done" ? selection.item.result : null) : selection.result);
  drawReferences(ui.references, shown); // the product's closest genuine references, beside the image
  if (!selection) {
    renderEmpty(ui.verdictBody, ui.verdictDetails);
    if (newImage) viewer.clear();
    return;
  }
  const { item } = selection;
  if (item && item.state === "error") {
    renderError(ui.verdictBody, ui.verdictDetails, errorMessage(item.error), item.name);
    if (newImage) viewer.clear();
    return;
  }
  if (item && item.state !== "done") {
    renderEmpty(ui.verdictBody, ui.verdictDetails, item.state === "sending" ? "queue.sending" : "queue.waiting");
    if (newImage) viewer.clear();
    return;
  }
  const result = item ? item.result : selection.result;
  renderVerdict(ui.verdictBody, ui.verdictDetails, result, item ? item.name : selection.name || null);
  if (!newImage) return;
  const view = dataUrl(result.viewPng) || (item && item.url) || null;
  const heat = dataUrl(result.heatmapPng);
  if (view || heat) viewer.show(view, heat, result.tiles, dataUrl(result.differencePng), result.differenceMax);
  else viewer.clear(item ? "viewer.empty" : "viewer.missing");
}

function move(step) {
  const done = queue.items;
  if (done.length === 0) return;
  const current = state.selected && state.selected.item ? done.indexOf(state.selected.item) : -1;
  const next = current === -1 ? (step > 0 ? 0 : done.length - 1) : Math.min(done.length - 1, Math.max(0, current + step));
  select({ item: done[next] }, true);
  return done[next];
}

async function openRecord(requestId) {
  const held = queue.items.find((item) => item.state === "done" && item.result.requestId === requestId);
  try {
    const record = fromHistory(await request(`/v1/history/${encodeURIComponent(requestId)}`));
    if (held) {
      const { viewPng, heatmapPng, tiles, closest, differencePng, differenceMax } = held.result;
      held.result = { ...held.result, ...record, viewPng, heatmapPng, tiles, closest, differencePng, differenceMax };
      select({ item: held }, true);
    } else {
      select({ result: record }, true);
    }
  } catch (error) {
    state.selected = null;
    state.follow = false;
    markSelected();
    renderError(ui.verdictBody, ui.verdictDetails, errorMessage(error), null);
    viewer.clear();
  }
  $("#verdict-panel").focus();
}

// ---- Feedback --------------------------------------------------------------------------------------

function selectedResult() {
  const selection = state.selected;
  if (!selection) return null;
  if (selection.item) return selection.item.state === "done" ? selection.item.result : null;
  return selection.result;
}

async function sendFeedback(label) {
  const result = selectedResult();
  if (!result) {
    setMessage(ui.feedbackStatus, "feedback.nothing");
    return;
  }
  const body = { request_id: result.requestId, confirmed_label: label };
  const caseId = result.caseId || ui.caseId.value.trim();
  if (caseId) body.case_id = caseId;
  const notes = ui.note.value.trim();
  if (notes) body.notes = notes;
  setMessage(ui.feedbackStatus, "feedback.sending");
  let answer;
  try {
    answer = await request("/v1/feedback", { method: "POST", json: body });
  } catch (error) {
    delete ui.feedbackStatus.dataset.i18n;
    ui.feedbackStatus.textContent = errorMessage(error);
    return;
  }
  ui.note.value = ""; // a note goes with one confirmation only
  const feedback = { confirmed_label: label, created: new Date().toISOString(), notes: notes || null };
  result.feedback = feedback;
  if (state.selected && selectedResult() === result) {
    drawSelected(false);
    delete ui.feedbackStatus.dataset.i18n;
    const outcome = t(`outcome.${label}`);
    const alerts = (answer && answer.alerts) || 0; // signed seizure alerts to the right holder, the agency
    ui.feedbackStatus.textContent = alerts
      ? t("feedback.recordedAlerted", { outcome, count: alerts })
      : t("feedback.recorded", { outcome });
  }
  history.markFeedback(result.requestId, feedback);
  history.load();
}

// ---- Wiring ----------------------------------------------------------------------------------------

function wire() {
  ui.signinForm.addEventListener("submit", signIn);
  ui.signinCancel.addEventListener("click", () => {
    ui.signin.hidden = true;
    $("#choose").focus();
  });
  ui.signinOpen.addEventListener("click", () => showSignin(null, true));
  ui.signout.addEventListener("click", signOut);
  ui.language.addEventListener("change", () => {
    session.setLanguage(ui.language.value);
    setLanguage(ui.language.value);
  });
  $("#help-open").addEventListener("click", () => ui.help.showModal());
  $("#help-close").addEventListener("click", () => ui.help.close());
  $("#choose").addEventListener("click", () => ui.fileInput.click());
  $("#capture").addEventListener("click", () => ui.captureInput.click());
  for (const input of [ui.fileInput, ui.captureInput]) {
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = ""; // the same file chosen again is a new submission
    });
  }
  if (cameraAvailable()) {
    const camera = new Camera($("#camera-dialog"), (file) => addFiles([file]));
    const button = $("#camera");
    button.hidden = false;
    button.addEventListener("click", () => camera.open());
  }
  wireDrop();
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    if (files.length === 0 || ui.console.hidden) return; // text pasted into a field stays text
    event.preventDefault();
    addFiles(files);
  });
  for (const [field, name] of [[ui.station, "station"], [ui.caseId, "case"], [ui.product, "product"], [ui.modality, "modality"]]) {
    const saved = session.field(name);
    if (saved) field.value = saved;
    field.addEventListener("change", () => session.setField(name, field.value.trim()));
    field.addEventListener("input", () => session.setField(name, field.value.trim()));
  }
  for (const button of document.querySelectorAll(".fb")) {
    button.addEventListener("click", () => sendFeedback(button.dataset.label));
  }
  ui.queueList.addEventListener("keydown", (event) => {
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    event.preventDefault();
    event.stopPropagation();
    const item = move(event.key === "ArrowDown" ? 1 : -1);
    if (item) ui.queueList.querySelector(`.queue-item[data-id="${item.id}"]`)?.focus();
  });
  wireShortcuts();
  onLanguageChange(() => {
    ui.language.value = currentLanguage();
    for (const item of queue.items) drawItem(item);
    drawSelected(false);
    viewer.relabel();
    history.render();
    lifecycle.render();
    drawSigned();
    drawCounts();
  });
}

function wireDrop() {
  const zone = ui.dropzone;
  const over = (event) => {
    event.preventDefault();
    zone.classList.add("active");
  };
  zone.addEventListener("dragenter", over);
  zone.addEventListener("dragover", over);
  zone.addEventListener("dragleave", () => zone.classList.remove("active"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("active");
    addFiles(event.dataTransfer ? event.dataTransfer.files : []);
  });
  // A file dropped beside the zone must not make the browser leave the page to show it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

function wireShortcuts() {
  const inConsole = () => !ui.console.hidden && ui.signin.hidden;
  const dialogOpen = () => ui.help.open || $("#camera-dialog").open || $("#lifecycle").open;
  installShortcuts(
    {
      o: () => inConsole() && ui.fileInput.click(),
      g: () => inConsole() && sendFeedback("genuine"),
      c: () => inConsole() && sendFeedback("counterfeit"),
      u: () => inConsole() && sendFeedback("unsure"),
      n: () => inConsole() && ui.note.focus(),
      j: () => inConsole() && move(1),
      k: () => inConsole() && move(-1),
      ArrowDown: () => (inConsole() && document.activeElement === document.body ? move(1) : false),
      ArrowUp: () => (inConsole() && document.activeElement === document.body ? move(-1) : false),
      h: () => viewer.toggleHeat(),
      d: () => viewer.toggleDifference(),
      "[": () => viewer.stepOpacity(-0.1),
      "]": () => viewer.stepOpacity(0.1),
      "+": () => viewer.zoomBy(1.5),
      "=": () => viewer.zoomBy(1.5),
      "-": () => viewer.zoomBy(1 / 1.5),
      "?": () => ui.help.showModal(),
    },
    { blocked: dialogOpen },
  );
}

function start() {
  wire(); // first, so the language's listener re-renders the parts built before it was chosen
  setLanguage(session.language() || chooseLanguage(navigator.languages));
  renderEmpty(ui.verdictBody, ui.verdictDetails);
  drawCounts();
  probe();
}

start();
