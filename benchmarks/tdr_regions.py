"""Where a DICOS threat report's regions lie: on synthetic X-ray scans, whose generator knows where it put
the goods, the share of alarmed counterfeit scans whose best region overlaps the goods with an
intersection over union of at least 0.3 (issue 26's target: 80%).

Each scan goes through what `/v1/predict?format=dicos` runs (inference.dicos_report.report_for, on the
scan sent as a DICOS DX file), and the report is read back: the polygons measured are the ones written.

    .venv/bin/python benchmarks/tdr_regions.py [--model checkpoints/xray-default] [--n 120]
        [--seeds 5 7 11 13]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verity.datasets.encode import encode_dicom  # noqa: E402
from verity.datasets.synth import DIFFICULTIES, ImageJob, cue_policy, generator_for, plan_cases  # noqa: E402
from verity.datasets.synth_xray import scan_and_goods  # noqa: E402
from verity.inference.artifacts import resolve_model  # noqa: E402
from verity.inference.dicos_report import ReportFacts, new_report_uid, report_for  # noqa: E402
from verity.inference.engine import OnnxEngine  # noqa: E402
from verity.inference.pipeline import score_bytes  # noqa: E402

TARGET_IOU, TARGET_SHARE = 0.3, 0.8


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def polygons(report: bytes) -> list[tuple[float, float, float, float]]:
    """Each threat's bounding polygon, as (left, top, right, bottom)."""
    from pydicom import dcmread

    dataset = dcmread(io.BytesIO(report))
    boxes = []
    for threat in dataset.get("ThreatSequence", []):
        values = np.array(threat.PTORepresentationSequence[0].BoundingPolygon, np.float64).reshape(-1, 3)
        boxes.append((values[:, 0].min(), values[:, 1].min(), values[:, 0].max(), values[:, 1].max()))
    return boxes


def measure(engine: OnnxEngine, n: int, seed: int) -> list[float]:
    """The best IoU of each alarmed counterfeit scan among n generated (whole scans, medium difficulty)."""
    cases = plan_cases(seed, n, cue_policy(generator_for("xray"), (), ()))
    best = []
    for index, case in enumerate(cases):
        if case.label != "counterfeit":
            continue
        planes, goods = scan_and_goods(ImageJob(index, seed, case, DIFFICULTIES["medium"], 256))
        data = encode_dicom(planes[0])
        scored = score_bytes(data, engine)
        if scored.verdict != "counterfeit":
            continue
        thresholds = scored.thresholds
        facts = ReportFacts(new_report_uid(), scored.verdict, scored.score, scored.model, scored.version,
                            thresholds.alarm, thresholds.clear, datetime.now(UTC), 1.0)  # fmt: skip
        boxes = polygons(report_for(data, scored, engine.spec, facts, f"case-{index}"))
        best.append(max((iou(box, tuple(map(float, goods))) for box in boxes), default=0.0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "xray-default"))
    parser.add_argument("--n", type=int, default=120, help="scans per seed (about half counterfeit)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[5, 7, 11, 13])
    args = parser.parse_args()
    engine = OnnxEngine(resolve_model(Path(args.model)), warmup=False)
    rows, pooled = [], []
    for seed in args.seeds:
        scores = measure(engine, args.n, seed)
        pooled += scores
        share = float(np.mean([s >= TARGET_IOU for s in scores])) if scores else float("nan")
        rows.append({"seed": seed, "alarmed": len(scores), "share_iou_at_least_0.3": share,
                     "median_iou": float(np.median(scores)) if scores else None})  # fmt: skip
        print(json.dumps(rows[-1]))
    per_seed = ", ".join(f"{row['share_iou_at_least_0.3']:.0%}" for row in rows)
    share = float(np.mean([score >= TARGET_IOU for score in pooled])) if pooled else float("nan")
    print(f"TDR regions against the goods box ({engine.name} {engine.version}): IoU >= {TARGET_IOU} on "
          f"{share:.0%} of {len(pooled)} alarmed counterfeit scans (per seed {per_seed}; target "
          f"{TARGET_SHARE:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
