// The product's closest genuine references beside the suspect (`closest` in a /v1/predict answer): each
// image fetched through GET /v1/references/{id}/image with the caller's key (an <img> could not send it)
// and shown from a blob: URL, with its distance. Images and text nodes only.
import { request } from "./api.js";
import { currentLanguage, formatNumber, t } from "./i18n.js";

// Types a browser draws; a TIFF or DICOM reference (an X-ray as enrolled) is named, not shown.
const DRAWN = new Set(["image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp"]);
const images = new Map(); // "<model>\n<reference id>" -> Promise of a blob: URL, or null when not shown

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

/** The reference's image as a blob: URL, fetched once per model, id and key; null on any error. */
function imageUrl(model, referenceId) {
  const key = `${model}\n${referenceId}`;
  if (!images.has(key)) {
    const path = `/v1/references/${encodeURIComponent(referenceId)}/image?model=${encodeURIComponent(model)}`;
    const url = request(path, { blob: true }).then((blob) => (DRAWN.has(blob.type) ? URL.createObjectURL(blob) : null), () => null);
    images.set(key, url);
  }
  return images.get(key);
}

/** Forgets every fetched image: after a change of key, what one key could see another may not. */
export function forgetReferenceImages() {
  for (const pending of images.values()) pending.then((url) => url && URL.revokeObjectURL(url));
  images.clear();
}

function referenceItem(model, near, rank, product) {
  const item = element("li", "reference");
  item.dataset.referenceId = near.referenceId;
  const slot = element("div", "reference-slot");
  const distance = t("references.distance", { distance: formatNumber(near.distance, 3) });
  item.append(slot, element("span", "reference-distance", distance));
  imageUrl(model, near.referenceId).then((url) => {
    if (!url) {
      slot.replaceChildren(element("span", "reference-missing small", t("references.missing")));
      return;
    }
    const image = element("img", "reference-image");
    image.alt = t("references.alt", { rank, product: product || "" });
    image.src = url;
    slot.replaceChildren(image);
  });
  return item;
}

/** Shows the result's closest genuine references in `root` (the viewer's aside), or hides it: no result,
 * no product named, or a result read back from the history (which keeps no references). */
export function drawReferences(root, result) {
  const closest = (result && result.closest) || [];
  const model = result && result.model ? result.model.name : null;
  const list = root.querySelector(".reference-list");
  if (!closest.length || !model) {
    root.hidden = true;
    delete root.dataset.shown;
    list.replaceChildren();
    return;
  }
  // Drawn again only for another result or language: the page redraws the selected result often.
  const shown = `${result.requestId}\n${currentLanguage()}`;
  root.hidden = false;
  if (root.dataset.shown === shown) return;
  root.dataset.shown = shown;
  list.replaceChildren(...closest.map((near, index) => referenceItem(model, near, index + 1, result.product)));
}
