"""A self-contained HTML evaluation report: no scripts, no external files, opens anywhere.

Curves are inline SVG drawn here (no plotting dependency); the worst errors are inline base64 PNGs of
the model input beside its class activation map (counterfeit minus genuine evidence) as an overlay.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from verity.inference.card import WEAK_RUN
from verity.training.metrics import precision_recall_curve, reliability_bins, roc_curve

PLOT_SIZE = 300
MARGIN = 42
MAX_CURVE_POINTS = 1500
THUMBNAIL = 144

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 4px 10px; border: 1px solid #ddd; }
.warnings { border: 2px solid #b00020; background: #fdecee; padding: 4px 16px; margin: 12px 0; }
.warnings h2 { color: #b00020; border: none; margin-top: 8px; }
th { background: #f4f4f4; text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.headline { font-size: 28px; font-weight: 600; } .plots svg { margin-right: 18px; }
.errors { display: flex; flex-wrap: wrap; gap: 14px; }
.error { border: 1px solid #ddd; padding: 6px; width: 300px; }
.error img { width: 144px; height: 144px; image-rendering: auto; } .caption { font-size: 12px; }
.bad { color: #b00020; font-weight: 600; } pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Keeps at most MAX_CURVE_POINTS points (always the last) so the report stays small."""
    if len(xs) <= MAX_CURVE_POINTS:
        return list(xs), list(ys)
    keep = np.unique(np.r_[np.linspace(0, len(xs) - 1, MAX_CURVE_POINTS).astype(int), len(xs) - 1])
    return [xs[i] for i in keep], [ys[i] for i in keep]


def _axes(title: str, xlabel: str, ylabel: str) -> list[str]:
    size, m = PLOT_SIZE, MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + m + 10}" height="{size + m + 24}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{m + size / 2}" y="14" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
        f'<rect x="{m}" y="20" width="{size}" height="{size}" fill="none" stroke="#999"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = m + tick * size, 20 + (1 - tick) * size
        parts.append(f'<text x="{x}" y="{size + 34}" text-anchor="middle" font-size="10">{tick:g}</text>')
        parts.append(f'<text x="{m - 4}" y="{y + 3}" text-anchor="end" font-size="10">{tick:g}</text>')
        parts.append(f'<line x1="{x}" y1="20" x2="{x}" y2="{20 + size}" stroke="#eee"/>')
        parts.append(f'<line x1="{m}" y1="{y}" x2="{m + size}" y2="{y}" stroke="#eee"/>')
    parts.append(
        f'<text x="{m + size / 2}" y="{size + 50}" text-anchor="middle" font-size="11">{xlabel}</text>'
    )
    parts.append(
        f'<text x="10" y="{20 + size / 2}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 10 {20 + size / 2})">{ylabel}</text>'
    )
    return parts


def _point(x: float, y: float) -> str:
    return f"{MARGIN + x * PLOT_SIZE:.1f},{20 + (1 - y) * PLOT_SIZE:.1f}"


def svg_curve(
    title: str, xs: Sequence[float], ys: Sequence[float], xlabel: str, ylabel: str, diagonal: bool = False
) -> str:
    """A unit-square line plot as inline SVG."""
    parts = _axes(title, xlabel, ylabel)
    if diagonal:
        parts.append(
            f'<polyline points="{_point(0, 0)} {_point(1, 1)}" stroke="#bbb" '
            'stroke-dasharray="4" fill="none"/>'
        )
    xs, ys = _thin(xs, ys)
    points = " ".join(_point(x, y) for x, y in zip(xs, ys, strict=True))
    parts.append(f'<polyline points="{points}" stroke="#1f5fbf" stroke-width="2" fill="none"/>')
    parts.append("</svg>")
    return "".join(parts)


def svg_reliability(bins: list[dict[str, Any]]) -> str:
    """Observed counterfeit share per score bin (bars) against the diagonal of perfect calibration."""
    parts = _axes("Reliability", "mean score (P counterfeit)", "observed counterfeit share")
    parts.append(
        f'<polyline points="{_point(0, 0)} {_point(1, 1)}" stroke="#bbb" stroke-dasharray="4" fill="none"/>'
    )
    total = sum(b["count"] for b in bins) or 1
    for b in bins:
        if not b["count"]:
            continue
        width = (b["high"] - b["low"]) * PLOT_SIZE
        height = b["fraction_counterfeit"] * PLOT_SIZE
        x, y = MARGIN + b["low"] * PLOT_SIZE, 20 + PLOT_SIZE - height
        opacity = 0.35 + 0.65 * min(1.0, 5 * b["count"] / total)  # faint bars hold few images
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{width - 2:.1f}" height="{height:.1f}" fill="#1f5fbf" '
            f'fill-opacity="{opacity:.2f}"><title>{b["count"]} images, mean score {b["mean_score"]:.3f}, '
            f"counterfeit share {b['fraction_counterfeit']:.3f}</title></rect>"
        )
        cx, cy = MARGIN + b["mean_score"] * PLOT_SIZE, 20 + (1 - b["fraction_counterfeit"]) * PLOT_SIZE
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="#d62728"/>')
    parts.append("</svg>")
    return "".join(parts)


def confusion_table(metrics: dict[str, Any]) -> str:
    """True label x verdict counts, shaded by row share."""
    matrix = metrics["confusion_matrix"]
    head = "".join(f"<th>verdict {html.escape(c)}</th>" for c in matrix["columns"])
    rows = []
    for label, counts in zip(matrix["rows"], matrix["counts"], strict=True):
        total = sum(counts) or 1
        cells = "".join(
            f'<td class="num" style="background: rgba(31,95,191,{0.08 + 0.6 * n / total:.2f})">{n}</td>'
            for n in counts
        )
        rows.append(f"<tr><th>true {html.escape(label)}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map for values in [0, 1] -> HxWx3 float in [0, 1]."""
    channels = [np.clip(1.5 - np.abs(4 * values - offset), 0, 1) for offset in (3, 2, 1)]
    return np.stack(channels, axis=-1)


def image_to_rgb(image: np.ndarray) -> np.ndarray:
    """A CxSxS model input in [0, 1] as HxWx3 uint8 (one channel as grey; dual-energy shows its first)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    rgb = (
        image[:3].transpose(1, 2, 0)
        if image.shape[0] == 3
        else np.repeat(image[:1].transpose(1, 2, 0), 3, axis=2)
    )
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def cam_overlay(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blends a min-max scaled CAM over the image (red: counterfeit evidence). The CAM comes already
    placed over the model input (heatmap.over_input), so resizing it to the image moves nothing."""
    cam = np.asarray(cam, dtype=np.float32)
    low, high = float(cam.min()), float(cam.max())
    scaled = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
    height, width = rgb.shape[:2]
    upsampled = np.asarray(Image.fromarray(scaled).resize((width, height), Image.Resampling.BILINEAR))
    heat = _jet(np.clip(upsampled, 0, 1)) * 255
    return (rgb * (1 - alpha) + heat * alpha + 0.5).astype(np.uint8)


def png_data_uri(rgb: np.ndarray, size: int = THUMBNAIL) -> str:
    """An HxWx3 uint8 image as a data: URI PNG, downscaled to at most `size` pixels."""
    image = Image.fromarray(rgb)
    if max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _example_html(example: dict[str, Any]) -> str:
    rgb = image_to_rgb(example["image"])
    images = f'<img src="{png_data_uri(rgb)}" alt="input">'
    if example.get("cam") is not None:
        images += f'<img src="{png_data_uri(cam_overlay(rgb, example["cam"]))}" alt="class activation map">'
    wrong = example["verdict"] != example["label"]
    verdict_class = ' class="bad"' if wrong else ""
    return (
        f'<div class="error">{images}<div class="caption">{html.escape(str(example.get("caption", "")))}<br>'
        f"true <b>{html.escape(example['label'])}</b>, verdict <span{verdict_class}>"
        f"{html.escape(example['verdict'])}</span>, score {example['score']:.4f}</div></div>"
    )


def _ci(bounds: Sequence[float] | None, digits: int = 4) -> str:
    """The " (95% CI lo to hi)" that follows a figure; nothing without an interval."""
    return "" if not bounds else f" (95% CI {bounds[0]:.{digits}f} to {bounds[1]:.{digits}f})"


def _summary_table(metrics: dict[str, Any]) -> str:
    rows = [
        ("ROC AUC", _fmt(metrics.get("roc_auc")) + _ci(metrics.get("roc_auc_ci"))),
        ("PR AUC (average precision)", _fmt(metrics.get("pr_auc"))),
        ("accuracy (uncertain counts as not correct)", _fmt(metrics.get("accuracy"))),
        ("accuracy of decided verdicts", _fmt(metrics.get("accuracy_decided"))),
        ("uncertain rate", _fmt(metrics.get("uncertain_rate"))),
        ("false-alarm rate", _fmt(metrics.get("false_alarm_rate"))),
        ("miss rate", _fmt(metrics.get("miss_rate"))),
        ("expected calibration error", _fmt(metrics.get("ece"))),
        (
            "thresholds",
            f"alarm {_fmt(metrics.get('alarm'))}, clear {_fmt(metrics.get('clear'))} "
            f"({_fmt(metrics.get('operating_point'))})",
        ),
        (
            "images",
            f"{metrics.get('n')} ({metrics.get('n_genuine')} genuine, "
            f"{metrics.get('n_counterfeit')} counterfeit)",
        ),
    ]
    for rate, entry in metrics.get("recall_at_false_alarm_rate", {}).items():
        rows.append(
            (
                f"recall at false-alarm rate {100 * float(rate):g}%",
                f"{_fmt(entry['recall'])}{_ci(entry.get('recall_ci'))} "
                f"(threshold {_fmt(entry['threshold'])}, "
                f"achieved rate {_fmt(entry['achieved_false_alarm_rate'])})",
            )
        )
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>{_interval_legend(metrics)}"


def _interval_legend(metrics: dict[str, Any]) -> str:
    """Says how the intervals were made, so a reader can judge them (and re-derive them)."""
    bootstrap = metrics.get("bootstrap")
    if not bootstrap or not metrics.get("roc_auc_ci"):
        return ""
    return (
        f"<p>Intervals: {100 * bootstrap['confidence']:g}% percentile bootstrap, "
        f"{bootstrap['resamples']} resamples (seed {bootstrap['seed']}), genuine and counterfeit images "
        "resampled separately so each resample keeps both classes. They show how much the figures could "
        "move on another test set of this size.</p>"
    )


def _groups_html(metrics: dict[str, Any]) -> str:
    parts = []
    for group, values in metrics.get("groups", {}).items():
        head = (
            f"<tr><th>{html.escape(group)}</th><th>n</th><th>genuine</th><th>counterfeit</th>"
            "<th>ROC AUC</th><th>accuracy</th><th>uncertain</th><th>false alarms</th><th>misses</th></tr>"
        )
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td class=num>{f['n']}</td><td class=num>{f['n_genuine']}</td>"
            f"<td class=num>{f['n_counterfeit']}</td><td class=num>{_fmt(f['roc_auc'])}</td>"
            f"<td class=num>{_fmt(f['accuracy'])}</td><td class=num>{_fmt(f['uncertain_rate'])}</td>"
            f"<td class=num>{_fmt(f['false_alarm_rate'])}</td><td class=num>{_fmt(f['miss_rate'])}</td></tr>"
            for name, f in values.items()
        )
        parts.append(f"<h3>per {html.escape(group)}</h3><table>{head}{rows}</table>")
    return "".join(parts)


def curves_html(metrics: dict[str, Any], scores: np.ndarray, targets: np.ndarray) -> str:
    """ROC and PR curves (when both classes are present) and the reliability diagram, with a legend."""
    plots = []
    if targets.any() and not targets.all():
        roc = roc_curve(scores, targets)
        title = f"ROC (AUC {_fmt(metrics.get('roc_auc'))})"
        plots.append(svg_curve(title, roc["fpr"], roc["tpr"], "false-alarm rate", "recall", diagonal=True))
        pr = precision_recall_curve(scores, targets)
        # The curve starts at recall 0 with the precision of the highest threshold.
        recall, precision = [0.0, *pr["recall"]], [pr["precision"][0], *pr["precision"]]
        title = f"Precision-recall (AP {_fmt(metrics.get('pr_auc'))})"
        plots.append(svg_curve(title, recall, precision, "recall", "precision"))
    plots.append(svg_reliability(reliability_bins(scores, targets)))
    note = "" if len(plots) == 3 else "<p>ROC and PR curves need both genuine and counterfeit images.</p>"
    legend = (
        "<p>Reliability: bars show the observed counterfeit share in each score bin, red dots sit at the "
        "bin's mean score; on the dashed diagonal scores are exact probabilities "
        f"(ECE {_fmt(metrics.get('ece'))}).</p>"
    )
    return f'{note}<div class="plots">{"".join(plots)}</div>{legend}'


def _warnings_html(warnings: Sequence[str]) -> str:
    """The card's warnings first, where a reader cannot miss them; a weak run says so in its title."""
    if not warnings:
        return ""
    weak = any(warning.startswith(WEAK_RUN) for warning in warnings)
    title = "Weak run: this model did not learn, do not serve it" if weak else "Read before trusting it"
    items = "".join(f"<li>{html.escape(warning)}</li>" for warning in warnings)
    return f'<div class="warnings" role="alert"><h2>{html.escape(title)}</h2><ul>{items}</ul></div>'


def write_report(
    path: str | Path,
    metrics: dict[str, Any],
    scores: Sequence[float] | np.ndarray,
    targets: Sequence[int] | np.ndarray,
    examples: list[dict[str, Any]] | None = None,
    title: str = "Verity evaluation",
    details: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Writes the HTML report; returns its path.

    `metrics` is `compute_metrics`' result for `scores`/`targets` (the curves are drawn from the scores).
    `examples`: dicts with "image" (CxSxS in [0, 1]), "cam" (SxS over the image, or None), "score",
    "label", "verdict", "caption", shown as thumbnails with their heatmaps. `details` is shown as JSON
    (model, data).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    errors = "".join(_example_html(example) for example in examples or [])
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="headline">ROC AUC {_fmt(metrics.get("roc_auc"))}{_ci(metrics.get("roc_auc_ci"), 3)}</p>',
        _warnings_html(warnings),
        "<h2>Summary</h2>",
        _summary_table(metrics),
        "<h2>Curves</h2>",
        curves_html(metrics, scores, targets),
        "<h2>Confusion matrix (true label x verdict)</h2>",
        confusion_table(metrics),
        "<h2>Breakdown</h2>",
        _groups_html(metrics),
        "<h2>Worst errors (most confident mistakes, with class activation maps)</h2>",
        f'<div class="errors">{errors}</div>' if errors else "<p>No examples.</p>",
    ]
    if details:
        sections += [
            "<h2>Details</h2>",
            f"<pre>{html.escape(json.dumps(details, indent=2, default=str))}</pre>",
        ]
    document = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
