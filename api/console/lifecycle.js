// The admin's panel (GET /v1/lifecycle): which version each model's production alias names, the other
// versions loaded with their last comparison against production, the last promotions and rollbacks, the
// shadow model's agreement and each station's drift. Shown only to an admin key: /v1/models says who
// the caller is, so a station's page never asks for what it would be refused.
import { request } from "./api.js";
import { errorMessage } from "./errors.js";
import { formatDate, formatNumber, t } from "./i18n.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

function signed(value) {
  const text = formatNumber(Math.abs(value), 3);
  return value < 0 ? `−${text}` : `+${text}`;
}

function percent(share) {
  return share === null || share === undefined ? "–" : `${formatNumber(share * 100, 1)} %`;
}

/** "ROC AUC −0.012 (95 %: −0.030 to +0.004), 200 images: worse beyond noise". */
export function comparisonText(comparison) {
  if (!comparison || !Number.isFinite(comparison.roc_auc_difference)) return t("lifecycle.no_comparison");
  const [low, high] = comparison.roc_auc_difference_interval || [NaN, NaN];
  const judged = comparison.worse_beyond_noise
    ? "lifecycle.worse"
    : comparison.better_beyond_noise
      ? "lifecycle.better"
      : "lifecycle.within_noise";
  return t("lifecycle.comparison", {
    difference: signed(comparison.roc_auc_difference),
    confidence: formatNumber((comparison.confidence ?? 0.95) * 100, 0),
    low: signed(low),
    high: signed(high),
    images: String(comparison.images ?? "–"),
    judged: t(judged),
  });
}

function eventText(event) {
  const action = t(`lifecycle.action.${event.action}`);
  const parts = [`${action} ${event.version}`, formatDate(event.created)];
  if (event.actor) parts.push(event.actor);
  if (event.why) parts.push(`“${event.why}”`);
  if (event.comparison) parts.push(comparisonText(event.comparison));
  return parts.join(" · ");
}

export class LifecyclePanel {
  constructor(dialog, opener) {
    this.dialog = dialog;
    this.opener = opener;
    this.models = dialog.querySelector(".lifecycle-models tbody");
    this.shadow = dialog.querySelector(".lifecycle-shadow");
    this.drift = dialog.querySelector(".lifecycle-drift");
    this.status = dialog.querySelector(".lifecycle-status");
    this.body = null;
    this.error = null;
    this.loading = 0;
    opener.addEventListener("click", () => {
      dialog.showModal();
      this.load();
    });
    dialog.querySelector(".lifecycle-refresh").addEventListener("click", () => this.load());
    dialog.querySelector(".lifecycle-close").addEventListener("click", () => dialog.close());
  }

  /** Offered to an admin only; anyone else never sees the button (and the server would refuse). */
  offer(isAdmin) {
    this.opener.hidden = !isAdmin;
    if (!isAdmin && this.dialog.open) this.dialog.close();
    if (!isAdmin) this.body = null;
  }

  async load() {
    const ticket = ++this.loading;
    this.status.textContent = t("history.loading");
    try {
      const body = await request("/v1/lifecycle");
      if (ticket !== this.loading) return;
      this.body = body;
      this.error = null;
    } catch (error) {
      if (ticket !== this.loading) return;
      this.body = null;
      this.error = error;
    }
    this.render();
  }

  render() {
    if (this.error) {
      this.status.textContent = errorMessage(this.error);
      this.models.replaceChildren();
      this.shadow.textContent = "";
      this.drift.replaceChildren();
      return;
    }
    if (!this.body) return;
    this.status.textContent = "";
    this.models.replaceChildren(...(this.body.models || []).map((model) => this.#modelRow(model)));
    this.shadow.textContent = this.#shadowText(this.body.shadow || {});
    const windows = this.body.drift || [];
    this.drift.replaceChildren(
      ...(windows.length ? windows.map((w) => this.#driftRow(w)) : [element("li", "muted", t("lifecycle.no_drift"))]),
    );
  }

  #modelRow(model) {
    const row = element("tr");
    row.dataset.model = model.name;
    const production = model.aliases?.production ?? "–";
    const others = (model.loaded || []).filter((entry) => entry.version !== production);
    const candidates = element("td", "lc-candidates");
    if (others.length === 0) candidates.textContent = "–";
    for (const entry of others) {
      const line = element("div", "lc-candidate");
      line.dataset.version = entry.version;
      const aliases = (entry.aliases || []).filter((alias) => alias !== "production");
      const label = [entry.version, ...aliases.map((alias) => `(${alias})`)].join(" ");
      line.append(element("strong", null, label));
      if (entry.weak) line.append(" ", element("span", "lc-weak", t("lifecycle.weak")));
      line.append(" ", element("span", "lc-comparison", comparisonText(entry.comparison)));
      candidates.append(line);
    }
    const events = model.events || [];
    const last = events.length ? eventText(events[events.length - 1]) : "–";
    row.append(
      element("th", "lc-name", model.name),
      element("td", "lc-modality", t(`modality.${model.modality}`)),
      element("td", "lc-production", production),
      candidates,
      element("td", "lc-event", last),
    );
    row.querySelector("th").scope = "row";
    return row;
  }

  #shadowText(shadow) {
    if (!shadow.model) return t("lifecycle.no_shadow");
    return t("lifecycle.shadow_figures", {
      model: shadow.model,
      agreement: percent(shadow.agreement),
      answers: String(shadow.answers ?? 0),
      differ: String(shadow.disagreement_count ?? 0),
      since: formatDate(shadow.since),
    });
  }

  #driftRow(window) {
    const li = element("li", "lc-drift");
    li.dataset.alert = window.alert ? "true" : "false";
    // The drift monitor names answers without a station "-".
    const station = !window.station || window.station === "-" ? t("lifecycle.no_station") : window.station;
    const where = `${station} · ${t(`modality.${window.modality}`)} · ${window.model}`;
    const figures = t("lifecycle.drift_figures", {
      score: window.score_psi === null ? "–" : formatNumber(window.score_psi, 2),
      brightness: window.brightness_psi === null ? "–" : formatNumber(window.brightness_psi, 2),
      rate: percent(window.not_recognised_rate),
      validation: percent(window.val_not_recognised_rate),
      window: String(window.window ?? 0),
    });
    li.append(element("strong", null, where), " ", element("span", null, figures));
    if (window.alert) li.append(" ", element("span", "lc-alert", t("lifecycle.alert")));
    return li;
  }
}
