// The station's recent verdicts from the audit log (GET /v1/history): newest first, a page at a time
// by the server's cursor, filtered by verdict and date. Each row is a button: click or Enter reopens it.
import { request } from "./api.js";
import { errorMessage } from "./errors.js";
import { formatDate, formatNumber, t } from "./i18n.js";
import { verdictIcon } from "./icons.js";
import { fromHistory, verdictState } from "./results.js";

const PAGE = 20;

function cell(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text ?? "";
  return span;
}

export class HistoryPanel {
  constructor(root, onOpen) {
    this.root = root;
    this.onOpen = onOpen;
    this.list = root.querySelector(".history-list");
    this.status = root.querySelector(".history-status");
    this.verdict = root.querySelector(".history-verdict");
    this.since = root.querySelector(".history-since");
    this.until = root.querySelector(".history-until");
    this.older = root.querySelector(".history-older");
    this.newer = root.querySelector(".history-newer");
    this.cursors = [null]; // the `before` of each page shown so far; the last is the current page's
    this.next = null;
    this.items = [];
    this.loading = 0;
    for (const control of [this.verdict, this.since, this.until]) {
      control.addEventListener("change", () => this.reload());
    }
    root.querySelector(".history-refresh").addEventListener("click", () => this.load());
    this.older.addEventListener("click", () => {
      if (!this.next) return;
      this.cursors.push(this.next);
      this.load();
    });
    this.newer.addEventListener("click", () => {
      if (this.cursors.length < 2) return;
      this.cursors.pop();
      this.load();
    });
  }

  /** Back to the newest page (after a filter change). */
  reload() {
    this.cursors = [null];
    return this.load();
  }

  #query() {
    const params = new URLSearchParams({ limit: String(PAGE) });
    const before = this.cursors[this.cursors.length - 1];
    if (before) params.set("before", before);
    if (this.verdict.value) params.set("verdict", this.verdict.value);
    if (this.since.value) params.set("since", this.since.value);
    if (this.until.value) params.set("until", this.until.value);
    return params;
  }

  async load() {
    const ticket = ++this.loading; // only the latest answer is drawn, whatever order they arrive in
    this.status.textContent = t("history.loading");
    try {
      const page = await request(`/v1/history?${this.#query()}`);
      if (ticket !== this.loading) return;
      this.items = Array.isArray(page.items) ? page.items : [];
      this.next = page.next || null;
      this.error = null;
    } catch (error) {
      if (ticket !== this.loading) return;
      this.items = [];
      this.next = null;
      this.error = error;
    }
    this.render();
  }

  /** Shows a confirmation on the row it belongs to at once, before the next reload. */
  markFeedback(requestId, feedback) {
    const item = this.items.find((entry) => entry.request_id === requestId);
    if (item) {
      item.feedback = feedback;
      this.render();
    }
  }

  render() {
    this.older.disabled = !this.next;
    this.newer.disabled = this.cursors.length < 2;
    if (this.error) {
      this.status.textContent = errorMessage(this.error);
      this.list.replaceChildren();
      return;
    }
    this.status.textContent = this.items.length ? "" : t("history.empty");
    const rows = this.items.map((item) => this.#row(item));
    this.list.replaceChildren(...rows);
  }

  #row(item) {
    const result = fromHistory(item);
    const state = verdictState(result);
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "history-row";
    button.dataset.requestId = item.request_id;
    button.dataset.state = state;
    const time = formatDate(item.created);
    const verdict = cell("h-verdict", "");
    verdict.dataset.state = state;
    verdict.append(verdictIcon(state), cell("word", t(`verdict.${state}`)));
    const outcome = item.feedback ? t(`outcome.${item.feedback.confirmed_label}`) : "";
    button.append(
      cell("h-time", time),
      verdict,
      cell("h-score", formatNumber(item.score, 3)),
      cell("h-case", item.case_id),
      cell("h-product", item.product),
      cell("h-outcome", outcome),
    );
    button.addEventListener("click", () => this.onOpen(item.request_id));
    li.append(button);
    return li;
  }
}
