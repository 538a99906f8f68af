// The image as the model saw it (view_png: a 16-bit X-ray arrives windowed, never black), an overlay laid
// exactly over it (same pixel size, same box): the heatmap, or where a product's suspect differs from its
// genuine references (difference_png), and zoom and pan for large scans. Geometry is set through CSS
// custom properties from script; the CSP allows no style attributes in markup.
import { formatNumber, formatPercent, t } from "./i18n.js";

const MIN_ZOOM = 1;
const MAX_ZOOM = 16;
const PAN_STEP = 40;

export class Viewer {
  constructor(root) {
    this.root = root;
    this.stage = root.querySelector(".stage");
    this.frame = root.querySelector(".frame");
    this.image = root.querySelector(".view-image");
    this.heat = root.querySelector(".heat-image");
    this.empty = root.querySelector(".viewer-empty");
    this.toggle = root.querySelector(".heat-toggle");
    this.diffToggle = root.querySelector(".diff-toggle");
    this.note = root.querySelector(".overlay-note");
    this.opacity = root.querySelector(".heat-opacity");
    this.zoomLabel = root.querySelector(".zoom-level");
    this.tiles = root.querySelector(".tiles");
    this.zoom = 1;
    this.x = 0;
    this.y = 0;
    this.showHeat = true; // the overlay shown, whichever it is
    this.overlay = "heat"; // "heat" or "difference"
    this.urls = { heat: null, difference: null };
    this.differenceMax = null;
    this.tileCount = null;
    this.hasImage = false;
    this.#wire();
    this.setOpacity(Number(this.opacity.value) / 100);
    this.clear();
  }

  #wire() {
    this.toggle.addEventListener("click", () => this.toggleHeat());
    this.diffToggle.addEventListener("click", () => this.toggleDifference());
    this.opacity.addEventListener("input", () => this.setOpacity(Number(this.opacity.value) / 100));
    this.root.querySelector(".zoom-in").addEventListener("click", () => this.zoomBy(1.5));
    this.root.querySelector(".zoom-out").addEventListener("click", () => this.zoomBy(1 / 1.5));
    this.root.querySelector(".zoom-fit").addEventListener("click", () => this.fit());
    this.stage.addEventListener("wheel", (event) => {
      if (!this.hasImage) return;
      event.preventDefault();
      this.zoomBy(event.deltaY < 0 ? 1.25 : 1 / 1.25);
    }, { passive: false });
    this.stage.addEventListener("keydown", (event) => this.#onKey(event));
    let drag = null;
    this.stage.addEventListener("pointerdown", (event) => {
      if (!this.hasImage || this.zoom === 1) return;
      drag = { id: event.pointerId, x: event.clientX - this.x, y: event.clientY - this.y };
      this.stage.setPointerCapture(event.pointerId);
      this.stage.classList.add("dragging");
    });
    this.stage.addEventListener("pointermove", (event) => {
      if (!drag || drag.id !== event.pointerId) return;
      this.#moveTo(event.clientX - drag.x, event.clientY - drag.y);
    });
    const end = () => {
      drag = null;
      this.stage.classList.remove("dragging");
    };
    this.stage.addEventListener("pointerup", end);
    this.stage.addEventListener("pointercancel", end);
    new ResizeObserver(() => this.#layout()).observe(this.stage);
    for (const img of [this.image, this.heat]) img.addEventListener("load", () => this.#layout());
  }

  #onKey(event) {
    const moves = { ArrowLeft: [PAN_STEP, 0], ArrowRight: [-PAN_STEP, 0], ArrowUp: [0, PAN_STEP], ArrowDown: [0, -PAN_STEP] };
    if (moves[event.key] && this.hasImage) {
      event.preventDefault();
      event.stopPropagation(); // the arrows pan here; elsewhere they move through the queue
      this.#moveTo(this.x + moves[event.key][0], this.y + moves[event.key][1]);
    }
  }

  /** Shows an image: `view`, `heat` and `difference` are URLs (data: or blob:), any may be null;
   * `differenceMax` the largest difference drawn, in genuine limits. */
  show(view, heat, tiles, difference = null, differenceMax = null) {
    this.hasImage = Boolean(view || heat);
    this.tileCount = tiles || null;
    this.urls = { heat, difference };
    this.differenceMax = difference ? differenceMax : null;
    if (!this.urls[this.overlay]) this.overlay = "heat"; // the officer's choice holds while there is one
    this.#setSource(this.image, view);
    this.#setSource(this.heat, this.urls[this.overlay]);
    this.empty.hidden = this.hasImage;
    this.frame.hidden = !this.hasImage;
    this.toggle.disabled = !heat;
    this.diffToggle.disabled = !difference;
    this.opacity.disabled = !(heat || difference);
    this.fit();
    this.#render();
  }

  clear(key = "viewer.empty") {
    this.empty.dataset.i18n = key;
    this.empty.textContent = t(key);
    this.show(null, null, null);
    this.empty.hidden = false;
  }

  #setSource(img, url) {
    if (url) {
      img.src = url;
      img.hidden = false;
    } else {
      img.removeAttribute("src");
      img.hidden = true;
    }
  }

  /** h: the heatmap on or off (back to the heatmap, shown, from the difference). */
  toggleHeat() {
    if (this.overlay !== "heat") {
      this.#choose("heat");
      return;
    }
    this.showHeat = !this.showHeat;
    this.#render();
  }

  /** d: the difference from the genuine references, shown; again: back to the heatmap. */
  toggleDifference() {
    if (!this.urls.difference) return;
    this.#choose(this.overlay === "difference" && this.showHeat ? "heat" : "difference");
  }

  #choose(overlay) {
    this.overlay = overlay;
    this.showHeat = true;
    this.#setSource(this.heat, this.urls[overlay]);
    this.#render();
  }

  setOpacity(value) {
    const clamped = Math.min(1, Math.max(0, value));
    this.opacity.value = String(Math.round(clamped * 100));
    this.heat.style.opacity = String(clamped);
    this.opacity.setAttribute("aria-valuetext", formatPercent(clamped));
  }

  stepOpacity(delta) {
    this.setOpacity(Number(this.opacity.value) / 100 + delta);
  }

  zoomBy(factor) {
    if (!this.hasImage) return;
    const next = Math.min(MAX_ZOOM, Math.max(MIN_ZOOM, this.zoom * factor));
    // Keep the stage's centre on the same point of the image.
    this.x *= next / this.zoom;
    this.y *= next / this.zoom;
    this.zoom = next;
    this.#moveTo(this.x, this.y);
  }

  fit() {
    this.zoom = 1;
    this.x = 0;
    this.y = 0;
    this.#render();
  }

  #moveTo(x, y) {
    // Never further than the zoomed image's own overhang: the image cannot be lost off-stage.
    const limitX = (this.frame.offsetWidth * (this.zoom - 1)) / 2;
    const limitY = (this.frame.offsetHeight * (this.zoom - 1)) / 2;
    this.x = Math.min(limitX, Math.max(-limitX, x));
    this.y = Math.min(limitY, Math.max(-limitY, y));
    this.#render();
  }

  /** Fits the frame (both images) to the stage, keeping the image's aspect ratio. */
  #layout() {
    const source = this.image.naturalWidth ? this.image : this.heat;
    if (!source.naturalWidth || !this.stage.clientWidth) return;
    const scale = Math.min(this.stage.clientWidth / source.naturalWidth, this.stage.clientHeight / source.naturalHeight);
    this.frame.style.setProperty("--frame-w", `${Math.max(1, Math.floor(source.naturalWidth * scale))}px`);
    this.frame.style.setProperty("--frame-h", `${Math.max(1, Math.floor(source.naturalHeight * scale))}px`);
  }

  #render() {
    this.frame.style.setProperty("--zoom", String(this.zoom));
    this.frame.style.setProperty("--pan-x", `${this.x}px`);
    this.frame.style.setProperty("--pan-y", `${this.y}px`);
    const difference = this.overlay === "difference";
    this.heat.classList.toggle("off", !this.showHeat);
    this.heat.alt = t(difference ? "viewer.difference.alt" : "viewer.heat.alt");
    this.toggle.setAttribute("aria-pressed", String(this.showHeat && !difference));
    this.diffToggle.setAttribute("aria-pressed", String(this.showHeat && difference));
    // Said while the difference is shown; its line kept whenever there is one, so the image stays put.
    const known = Number.isFinite(this.differenceMax);
    this.note.hidden = !known;
    this.note.classList.toggle("off", !(difference && this.showHeat));
    // Beyond 1, some part lies further from the genuine references than genuine items' parts do.
    const key = this.differenceMax > 1 ? "viewer.difference.beyond" : "viewer.difference.within";
    this.note.textContent = known ? t(key, { value: formatNumber(this.differenceMax, 2) }) : "";
    this.stage.classList.toggle("zoomed", this.zoom > 1);
    this.zoomLabel.textContent = t("viewer.zoom", { value: formatPercent(this.zoom) });
    this.tiles.hidden = !this.tileCount;
    this.tiles.textContent = this.tileCount ? t("viewer.tiles", { count: this.tileCount }) : "";
  }

  /** Re-renders the words after a language change. */
  relabel() {
    if (this.empty.dataset.i18n) this.empty.textContent = t(this.empty.dataset.i18n);
    this.setOpacity(Number(this.opacity.value) / 100);
    this.#render();
  }
}
