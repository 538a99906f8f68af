// Every call to the server goes through request(): the station key in X-API-Key (from this tab's
// session only), a time limit so nothing spins for ever, and one error type the page can translate.
import { session } from "./session.js";

export const TIMEOUT_S = 60;

export class ApiError extends Error {
  /** kind: "http" (the server answered non-2xx), "network" (no answer) or "timeout". */
  constructor(kind, { status = 0, code = "", message = "", limitBytes = null, retryAfterS = null } = {}) {
    super(message || code || kind);
    this.kind = kind;
    this.status = status;
    this.code = code;
    this.serverMessage = message;
    this.limitBytes = limitBytes;
    this.retryAfterS = retryAfterS;
  }
}

let onUnauthorized = () => {};

/** The page's handler for a 401: back to sign-in. */
export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

async function errorFrom(response) {
  let detail = {};
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error !== null) detail = body.error;
  } catch {
    // not JSON (a proxy's page): the status alone must do
  }
  const header = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  const retry = Number.isFinite(detail.retry_after_s) ? detail.retry_after_s : header;
  return new ApiError("http", {
    status: response.status,
    code: typeof detail.code === "string" ? detail.code : "",
    message: typeof detail.message === "string" ? detail.message : "",
    limitBytes: Number.isFinite(detail.limit_bytes) ? detail.limit_bytes : null,
    retryAfterS: Number.isFinite(retry) ? retry : null,
  });
}

/**
 * fetch() of a same-origin API path; resolves to the parsed JSON body (with `blob`, the body as a Blob:
 * an image, which an <img> could not fetch with the key), rejects with ApiError.
 * `key` overrides the session's key (sign-in checks a key before storing it); null sends none.
 */
export async function request(path, { method = "GET", json, form, key, quiet401 = false, blob = false } = {}) {
  const headers = { Accept: blob ? "image/*" : "application/json" };
  const presented = key === undefined ? session.key() : key;
  if (presented) headers["X-API-Key"] = presented;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const controller = new AbortController();
  const timer = window.setTimeout(() => controller.abort(), TIMEOUT_S * 1000);
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body,
      signal: controller.signal,
      credentials: "omit",
      cache: "no-store",
    });
  } catch (error) {
    throw new ApiError(controller.signal.aborted ? "timeout" : "network", { message: String(error) });
  } finally {
    window.clearTimeout(timer);
  }
  if (!response.ok) {
    const error = await errorFrom(response);
    if (error.status === 401 && !quiet401) onUnauthorized(error);
    throw error;
  }
  try {
    return await (blob ? response.blob() : response.json());
  } catch {
    throw new ApiError("http", { status: response.status, code: "bad_response" });
  }
}
