// One queued file as the queue list shows it: its name (text, whatever characters it holds), its
// modality, and its verdict, state or error, with a retry button on an error.
import { errorMessage } from "./errors.js";
import { t } from "./i18n.js";
import { verdictIcon } from "./icons.js";
import { verdictState } from "./results.js";

function span(className, text) {
  const node = document.createElement("span");
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function statusCell(item) {
  const cell = span("q-status");
  if (item.state === "done") {
    const verdict = verdictState(item.result);
    cell.dataset.state = verdict;
    cell.append(verdictIcon(verdict), span("word", t(`verdict.${verdict}`)));
  } else if (item.state === "error") {
    cell.dataset.state = "error";
    cell.textContent = t("queue.error");
  } else {
    cell.dataset.state = item.state;
    cell.textContent = t(item.state === "sending" ? "queue.sending" : "queue.waiting");
  }
  return cell;
}

/** The row's children: the item's button, and for an error its message and a retry button. */
export function queueRowParts(item, { onSelect, onRetry }) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "queue-item";
  button.dataset.id = item.id;
  button.append(span("q-name", item.name), span("q-modality muted small", t(`modality.${item.modality}`)), statusCell(item));
  button.addEventListener("click", () => onSelect(item));
  if (item.state !== "error") return [button];
  const message = document.createElement("p");
  message.className = "q-error";
  message.textContent = errorMessage(item.error);
  const retry = document.createElement("button");
  retry.type = "button";
  retry.className = "small q-retry";
  retry.textContent = t("queue.retry");
  retry.addEventListener("click", () => onRetry(item));
  return [button, message, retry];
}
