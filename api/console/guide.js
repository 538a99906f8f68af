// The right holder's guide to the product a verdict names (GET /v1/products/{product}): the points to
// check in the officer's language (else English, else Russian, else the first given), a photo of each
// genuine feature, contacts and how long it is valid. Plain data: text nodes and data: images only.
import { request } from "./api.js";
import { currentLanguage, formatDate, t } from "./i18n.js";

const cache = new Map(); // product -> Promise of the answer's body, or null when there is none to show

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

/** The product's guide, fetched once per product and page; null without one (or on any error). */
export function guideFor(product) {
  if (!cache.has(product)) {
    const path = `/v1/products/${encodeURIComponent(product)}`;
    cache.set(product, request(path).then((body) => (body && body.guide ? body : null), () => null));
  }
  return cache.get(product);
}

/** The text in the officer's language, matched by primary subtag (uz for uz-Latn); else en, ru, any. */
export function pickText(texts) {
  const entries = Object.entries(texts || {});
  const primary = (tag) => tag.toLowerCase().split("-")[0];
  for (const wanted of [currentLanguage(), "en", "ru"]) {
    const found = entries.find(([tag]) => primary(tag) === wanted);
    if (found) return found[1];
  }
  return entries.length ? entries[0][1] : "";
}

const PHOTO_TYPES = [["/9j/", "image/jpeg"], ["iVBORw0KGgo", "image/png"], ["UklGR", "image/webp"]];

function photo(base64) {
  const type = PHOTO_TYPES.find(([prefix]) => base64.startsWith(prefix));
  if (!type) return null;
  const image = element("img", "guide-photo");
  image.alt = t("guide.photo");
  image.src = `data:${type[1]};base64,${base64}`;
  return image;
}

/** The guide as a section of the details panel. */
export function guideSection(body) {
  const { guide, expired } = body;
  const section = element("section", "guide");
  section.dataset.product = body.product;
  section.append(element("h3", null, t("guide.title")));
  const validity = element("p", expired ? "guide-validity expired" : "guide-validity muted",
    t(expired ? "guide.expired" : "guide.valid", { date: guide.valid_until }));
  section.append(validity);
  const points = element("ol", "guide-points");
  for (const point of guide.points || []) {
    const item = element("li", "guide-point");
    item.append(element("span", "guide-text", pickText(point.text)));
    const image = point.photo ? photo(point.photo) : null;
    if (image) item.append(image);
    points.append(item);
  }
  section.append(points);
  if ((guide.contacts || []).length) {
    section.append(element("h4", null, t("guide.contacts")));
    const contacts = element("ul", "guide-contacts");
    for (const contact of guide.contacts) {
      const parts = [contact.name, contact.email, contact.phone].filter(Boolean);
      contacts.append(element("li", null, parts.join(" · ")));
    }
    section.append(contacts);
  }
  section.append(element("p", "muted guide-version", t("guide.version", { version: guide.version, date: formatDate(guide.created) })));
  return section;
}

/** A placeholder in `details` filled with the product's guide when it arrives (nothing without one). */
export function attachGuide(details, product) {
  if (!product) return;
  const slot = element("div", "guide-slot");
  details.append(slot);
  guideFor(product).then((body) => {
    if (body && slot.isConnected) slot.replaceWith(guideSection(body));
    else slot.remove();
  });
}
