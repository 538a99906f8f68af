// One table per language (strings/*.js); every visible string, title, aria-label, placeholder and alt
// text comes from it. Markup names its strings with data-i18n (text) and data-i18n-<attribute>.
import en from "./strings/en.js";
import kk from "./strings/kk.js";
import ky from "./strings/ky.js";
import ru from "./strings/ru.js";
import tg from "./strings/tg.js";
import tk from "./strings/tk.js";
import uz from "./strings/uz.js";

// English, Russian and the region's languages: Kazakh, Kyrgyz, Tajik, Turkmen, Uzbek (Latin script).
const TABLES = { en, ru, kk, ky, tg, tk, uz };
const LOCALES = { en: "en-GB", ru: "ru-RU", kk: "kk-KZ", ky: "ky-KG", tg: "tg-TJ", tk: "tk-TM", uz: "uz-Latn-UZ" };
// The page's lang attribute: the language, with its script where the language is written in more than one.
const PAGE_LANG = { uz: "uz-Latn" };
const ATTRIBUTES = ["aria-label", "placeholder", "title", "alt"];
const listeners = [];
let language = "en";

/** The first of the browser's languages that the console has (by its primary subtag); else English. */
export function chooseLanguage(preferred) {
  for (const tag of preferred || []) {
    if (typeof tag !== "string") continue;
    const primary = tag.toLowerCase().split("-")[0];
    if (primary in TABLES) return primary;
  }
  return "en";
}

export function currentLanguage() {
  return language;
}

export function languages() {
  return Object.keys(TABLES);
}

export function t(key, params = {}) {
  const text = TABLES[language][key] ?? TABLES.en[key];
  if (text === undefined) {
    // A missing key is a bug in this page; show the key so it is seen, never a blank.
    console.warn(`missing string ${key}`);
    return key;
  }
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in params ? String(params[name]) : whole));
}

/** Fills every marked element under root from the current table. */
export function localize(root) {
  for (const element of root.querySelectorAll("[data-i18n]")) {
    element.textContent = t(element.dataset.i18n);
  }
  for (const attribute of ATTRIBUTES) {
    const marker = `data-i18n-${attribute}`;
    for (const element of root.querySelectorAll(`[${marker}]`)) {
      element.setAttribute(attribute, t(element.getAttribute(marker)));
    }
  }
}

export function setLanguage(next) {
  language = next in TABLES ? next : "en";
  document.documentElement.lang = PAGE_LANG[language] || language;
  document.title = t("app.title");
  localize(document);
  for (const listener of listeners) listener(language);
}

/** Called after every language change, so views built from data re-render in the new language. */
export function onLanguageChange(listener) {
  listeners.push(listener);
}

function locale() {
  return LOCALES[language];
}

export function formatNumber(value, digits = 2) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return new Intl.NumberFormat(locale(), {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  }).format(value);
}

export function formatPercent(fraction) {
  return new Intl.NumberFormat(locale(), { style: "percent", maximumFractionDigits: 0 }).format(fraction);
}

/** Megabytes (MiB, as the server's limits are set) to two significant digits: a 20 MiB upload limit
 * plus the form's allowance reads "20", a small test limit "0.25". */
export function formatMegabytes(bytes) {
  return new Intl.NumberFormat(locale(), { maximumSignificantDigits: 2 }).format(bytes / (1024 * 1024));
}

export function formatInteger(value) {
  return new Intl.NumberFormat(locale(), { maximumFractionDigits: 0 }).format(value);
}

export function formatDate(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "–";
  return new Intl.DateTimeFormat(locale(), { dateStyle: "short", timeStyle: "medium" }).format(date);
}
