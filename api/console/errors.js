// An ApiError as a sentence the officer can act on, in the page's language (by error.code, with the
// numbers the server sends); a code this page does not know shows the server's own message.
import { TIMEOUT_S } from "./api.js";
import { formatInteger, formatMegabytes, t } from "./i18n.js";

const BY_CODE = {
  unsupported_media_type: () => t("error.not_image"),
  undecodable_image: () => t("error.undecodable"),
  bad_request: () => t("error.undecodable"),
  image_too_large: () => t("error.image_too_large"),
  decoded_too_large: () => t("error.image_too_large"),
  too_many_tiles: () => t("error.image_too_large"),
  too_many_segments: () => t("error.image_too_large"),
  too_many_jpeg_scans: () => t("error.image_too_large"),
  forbidden: () => t("error.forbidden"),
  unknown_product: () => t("error.unknown_product"),
  invalid_product: () => t("error.unknown_product"),
  unknown_request_id: () => t("error.unknown_request"),
  request_timeout: () => t("error.slow_upload"),
  no_model: () => t("error.no_model"),
  unauthorized: () => t("signin.again"),
};

function busy(error) {
  return error.retryAfterS === null
    ? t("error.busy_plain")
    : t("error.busy", { seconds: formatInteger(error.retryAfterS) });
}

export function errorMessage(error) {
  if (!error || error.kind === undefined) return t("error.server", { status: "?" });
  if (error.kind === "network") return t("error.unreachable");
  if (error.kind === "timeout") return t("error.timeout", { seconds: formatInteger(TIMEOUT_S) });
  if (error.status === 413) {
    // A byte limit (the upload, or the file itself) comes with its size; a pixel or tile limit does not.
    if (error.limitBytes !== null) return t("error.too_large", { mb: formatMegabytes(error.limitBytes) });
    if (error.code === "request_too_large") return t("error.too_large_plain");
  }
  if (error.status === 503 || error.status === 429) return busy(error);
  const known = BY_CODE[error.code];
  if (known) return known();
  if (error.status === 422 && error.serverMessage) return t("error.fields", { message: error.serverMessage });
  return error.serverMessage || t("error.server", { status: error.status });
}
