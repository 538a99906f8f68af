// The verdict panel: the word, icon and colour (Okabe-Ito, so colour-blind officers see four distinct
// states, and the word and icon carry the meaning alone), the score against both thresholds, reasons,
// and what identifies the answer. Built with createElement and textContent only: file names, case
// numbers and station names are data, never markup.
import { attachGuide } from "./guide.js";
import { formatDate, formatNumber, t } from "./i18n.js";
import { verdictIcon } from "./icons.js";
import { verdictState } from "./results.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function clamp(value) {
  return Math.min(1, Math.max(0, Number(value) || 0));
}

function scoreBar(result) {
  const wrap = element("div", "score");
  const head = element("div", "score-head");
  head.append(element("span", "score-label", t("score.label")), element("span", "score-value", formatNumber(result.score, 3)));
  wrap.append(head);
  if (!result.thresholds) return wrap;
  const { alarm, clear } = result.thresholds;
  const bar = element("div", "score-bar");
  bar.setAttribute("role", "img");
  bar.setAttribute(
    "aria-label",
    t("score.bar", { score: formatNumber(result.score, 3), clear: formatNumber(clear, 2), alarm: formatNumber(alarm, 2) }),
  );
  // Positions as custom properties set through the CSSOM (the CSP allows no style attributes in markup).
  bar.style.setProperty("--clear", String(clamp(clear)));
  bar.style.setProperty("--alarm", String(clamp(alarm)));
  bar.style.setProperty("--score", String(clamp(result.score)));
  bar.append(element("span", "zone zone-clear"), element("span", "zone zone-between"), element("span", "zone zone-alarm"));
  bar.append(element("span", "tick tick-clear"), element("span", "tick tick-alarm"), element("span", "marker"));
  const legend = element("div", "score-legend");
  legend.append(
    element("span", "legend-clear", t("score.clear", { value: formatNumber(clear, 2) })),
    element("span", "legend-alarm", t("score.alarm", { value: formatNumber(alarm, 2) })),
  );
  wrap.append(bar, legend);
  return wrap;
}

function detailRow(list, label, value, className) {
  if (value === null || value === undefined || value === "") return null;
  const term = element("dt", null, label);
  const definition = element("dd", className || null);
  if (value instanceof Node) definition.append(value);
  else definition.textContent = value;
  list.append(term, definition);
  return definition;
}

function copyButton(text) {
  const wrap = element("span", "copyable");
  const code = element("code", "request-id", text);
  const button = element("button", "small copy", t("copy"));
  button.type = "button";
  button.setAttribute("aria-label", t("copy.label"));
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      // No clipboard permission: select the text so Ctrl+C copies it.
      window.getSelection()?.selectAllChildren(code);
    }
    button.textContent = t("copy.done");
  });
  wrap.append(code, button);
  return wrap;
}

function referenceText(reference) {
  const status = t(`reference.${reference.status}`);
  if (reference.distance === null || reference.distance === undefined || reference.threshold === null) return status;
  const numbers = t("reference.distance", {
    distance: formatNumber(reference.distance, 3),
    threshold: formatNumber(reference.threshold, 3),
  });
  return `${status}; ${numbers}`;
}

/** Replaces both panels' content with this result: the verdict in `summary` (word, hint, score),
 * reasons and identifiers in `details`; the file name is shown when this tab sent it. */
export function renderVerdict(summary, details, result, fileName) {
  const state = verdictState(result);
  const banner = element("div", "verdict-word");
  banner.dataset.state = state;
  banner.append(verdictIcon(state), element("span", "word", t(`verdict.${state}`)));
  const hint = element("p", "verdict-hint", t(`hint.${state}`));

  const reasons = element("div", "reasons");
  reasons.append(element("h3", null, t("reasons.label")));
  if (result.reasons.length === 0) {
    reasons.append(element("p", "muted", t("reasons.none")));
  } else {
    const list = element("ul");
    for (const reason of result.reasons) list.append(element("li", null, t(`reason.${reason}`)));
    reasons.append(list);
  }

  const list = element("dl", "details");
  detailRow(list, t("detail.file"), fileName, "file-name");
  detailRow(list, t("detail.modality"), result.modality ? t(`modality.${result.modality}`) : null);
  detailRow(list, t("detail.model"), result.model ? modelText(result) : null, "model");
  detailRow(list, t("detail.request"), result.requestId ? copyButton(result.requestId) : null);
  detailRow(list, t("detail.novelty"), result.novelty === null ? null : formatNumber(result.novelty, 4));
  if (result.reference) detailRow(list, t("detail.reference"), referenceText(result.reference));
  detailRow(list, t("detail.product"), result.product);
  detailRow(list, t("detail.case"), result.caseId);
  detailRow(list, t("detail.station"), result.stationId);
  detailRow(list, t("detail.time"), result.created ? formatDate(result.created) : null);
  if (result.feedback) {
    detailRow(list, t("detail.outcome"), t(`outcome.${result.feedback.confirmed_label}`), "outcome");
  }
  summary.replaceChildren(banner, hint, scoreBar(result));
  details.replaceChildren(reasons, list);
  attachGuide(details, result.product);  // the right holder's points to check, when it published them
}

/** A queued file that ended in an error: the message, never a spinner left turning. */
export function renderError(summary, details, message, fileName) {
  const box = element("div", "verdict-error");
  box.setAttribute("role", "alert");
  box.append(element("p", "error-text", message));
  const list = element("dl", "details");
  detailRow(list, t("detail.file"), fileName, "file-name");
  summary.replaceChildren(box);
  details.replaceChildren(list);
}

export function renderEmpty(summary, details, key = "verdict.empty") {
  summary.replaceChildren(element("p", "muted empty", t(key)));
  details.replaceChildren();
}

/** "photo-default 1.1.0 (production)": which version answered, and the aliases that name it. */
function modelText(result) {
  const aliases = (result.modelAliases || []).length ? ` (${result.modelAliases.join(", ")})` : "";
  return `${result.model.name} ${result.model.version}${aliases}`;
}
