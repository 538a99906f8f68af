// One shape for a verdict, whether it came back from /v1/predict or was read from /v1/history.

/** genuine, counterfeit, uncertain or not_recognised: what the page shows. */
export function verdictState(result) {
  if (result.recognised === false) return "not_recognised";
  return ["genuine", "counterfeit", "uncertain"].includes(result.verdict) ? result.verdict : "uncertain";
}

export function fromPrediction(body) {
  return {
    requestId: body.request_id,
    verdict: body.verdict,
    score: body.score,
    thresholds: body.thresholds || null,
    modality: body.modality,
    model: body.model || null,
    modelAliases: Array.isArray(body.model_aliases) ? body.model_aliases : [],
    recognised: body.recognised ?? null,
    novelty: body.novelty ?? null,
    reasons: Array.isArray(body.reasons) ? body.reasons : [],
    product: body.product ?? null,
    reference: body.reference
      ? { status: body.reference.status, distance: body.reference.distance, threshold: body.reference.threshold }
      : null,
    caseId: body.case_id ?? null,
    stationId: body.station_id ?? null,
    tiles: body.tiles ?? null,
    created: new Date().toISOString(),
    feedback: null,
    viewPng: body.view_png || null,
    heatmapPng: body.heatmap_png || null,
    ...comparison(body.reference),
  };
}

/** The genuine references nearest the image and the difference overlay, from an answer's `reference`. */
function comparison(reference) {
  const closest = reference && Array.isArray(reference.closest) ? reference.closest : [];
  return {
    closest: closest.map((near) => ({ referenceId: near.reference_id, distance: near.distance })),
    differencePng: (reference && reference.difference_png) || null,
    differenceMax: reference ? reference.difference_max ?? null : null,
  };
}

export function fromHistory(item) {
  return {
    requestId: item.request_id,
    verdict: item.verdict,
    score: item.score,
    thresholds: item.thresholds || null,
    modality: item.modality,
    model: item.model || null,
    recognised: item.recognised ?? null,
    novelty: item.novelty ?? null,
    reasons: Array.isArray(item.reasons) ? item.reasons : [],
    product: item.product ?? null,
    reference: item.reference_status
      ? { status: item.reference_status, distance: item.reference_distance, threshold: item.reference_threshold }
      : null,
    caseId: item.case_id ?? null,
    stationId: item.station_id ?? null,
    tiles: null,
    created: item.created,
    feedback: item.feedback || null,
    viewPng: null,
    heatmapPng: null,
    ...comparison(null), // the history keeps the check's figures, not what the answer showed
  };
}
