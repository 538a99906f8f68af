// Keyboard-first: one table of shortcuts. Letters match the physical key (event.code) as well as the
// character, so they work on a Russian layout too. Nothing fires while the officer types in a field.

const TYPING = new Set(["INPUT", "TEXTAREA", "SELECT"]);

function typing(target) {
  if (!(target instanceof HTMLElement)) return false;
  if (target.isContentEditable) return true;
  if (!TYPING.has(target.tagName)) return false;
  // Buttons-like inputs (checkbox, range, file) take no text: shortcuts still apply there.
  return target.tagName !== "INPUT" || !["checkbox", "radio", "range", "button", "submit", "file"].includes(target.type);
}

// Punctuation shortcuts by physical key, for layouts where that key types a letter (Russian: х and ъ).
const CODES = { BracketLeft: "[", BracketRight: "]" };

function keyName(event) {
  if (CODES[event.code] && !/^[\x20-\x7e]$/.test(event.key)) return CODES[event.code];
  if (/^Key[A-Z]$/.test(event.code) && event.key.length === 1 && !/[a-z]/i.test(event.key)) {
    return event.code.slice(3).toLowerCase(); // a letter key on a non-Latin layout
  }
  return event.key.length === 1 ? event.key.toLowerCase() : event.key;
}

/** bindings: key name -> handler(event). Returns nothing; listens on the document for the page's life. */
export function installShortcuts(bindings, { blocked = () => false } = {}) {
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    if (typing(event.target)) {
      // Esc leaves the field, so the next key is a shortcut again; inside a dialog Esc closes it.
      if (event.key === "Escape" && !event.target.closest("dialog")) event.target.blur();
      return;
    }
    if (blocked()) return;
    const handler = bindings[keyName(event)];
    if (!handler) return;
    if (handler(event) !== false) event.preventDefault();
  });
}
