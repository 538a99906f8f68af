// Files waiting for a verdict: one POST /v1/predict each, at most two in flight (an officer's batch
// must not crowd out the other lanes on a shared server), each item ending in a result or an error.
const IN_FLIGHT = 2;
let counter = 0;

export class Queue {
  /** send(item) resolves to the item's result or rejects with its error; changed(item) redraws. */
  constructor(send, changed) {
    this.send = send;
    this.changed = changed;
    this.items = [];
    this.active = 0;
  }

  add(file, modality) {
    const item = { id: `q${++counter}`, file, name: file.name || "", modality, state: "waiting", result: null, error: null, url: null };
    this.items.push(item);
    this.changed(item);
    this.#pump();
    return item;
  }

  retry(item) {
    if (item.state !== "error") return;
    item.state = "waiting";
    item.error = null;
    this.changed(item);
    this.#pump();
  }

  clear() {
    for (const item of this.items) if (item.url) URL.revokeObjectURL(item.url);
    this.items = [];
  }

  counts() {
    const done = this.items.filter((item) => item.state === "done" || item.state === "error").length;
    return { done, total: this.items.length };
  }

  #pump() {
    while (this.active < IN_FLIGHT) {
      const next = this.items.find((item) => item.state === "waiting");
      if (!next) return;
      this.#run(next);
    }
  }

  async #run(item) {
    this.active += 1;
    item.state = "sending";
    this.changed(item);
    try {
      item.result = await this.send(item);
      item.state = "done";
    } catch (error) {
      item.error = error;
      item.state = "error";
    } finally {
      this.active -= 1;
    }
    if (!this.items.includes(item)) return; // signed out meanwhile: the result belongs to no one here
    this.changed(item);
    this.#pump();
  }
}
