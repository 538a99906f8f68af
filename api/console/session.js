// What the console remembers for this tab only: sessionStorage, never localStorage or a URL, so the key
// and the officer's fields are gone when the tab closes.
const PREFIX = "verity.";
const FIELDS = ["station", "case", "product", "modality"];

function read(name) {
  try {
    return window.sessionStorage.getItem(PREFIX + name);
  } catch {
    return null; // storage disabled: the page still works, it just forgets
  }
}

function write(name, value) {
  try {
    if (value === null || value === "") window.sessionStorage.removeItem(PREFIX + name);
    else window.sessionStorage.setItem(PREFIX + name, value);
  } catch {
    // storage disabled or full: nothing to remember it in
  }
}

export const session = {
  key: () => read("key"),
  setKey: (value) => write("key", value),
  clearKey: () => write("key", null),
  language: () => read("lang"),
  setLanguage: (value) => write("lang", value),
  field: (name) => (FIELDS.includes(name) ? read(`field.${name}`) || "" : ""),
  setField: (name, value) => FIELDS.includes(name) && write(`field.${name}`, value),
};
