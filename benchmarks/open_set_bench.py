"""The shipped models on images that are no product: how many come back `recognised: false`.

Starts `verity serve` on the shipped models (checkpoints/), sends every image of `benchmarks.ood_images`
(scikit-image's photographs, 200 LFW faces, drawn flat colours, noise and gradients) to POST /v1/predict
once as `photo` and once as `xray`, and counts the answers by group. Two probe groups (the faces enlarged
to 100 px, the photographs grey at 48 px: `ood_images.probe_images`) show the novelty gate's limits
where the training envelope's size rule does not decide; they are kept out of the totals. Then, for
each shipped model, the share of its own in-distribution test images the gate flags and its test ROC
AUC next to the card's (the gate must not have changed the scores), from `verity eval`'s code path.

    .venv/bin/python benchmarks/open_set_bench.py [--models checkpoints] [--faces 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.ood_images import PROBE, ood_images  # noqa: E402
from benchmarks.server_bench import Server  # noqa: E402
from verity.inference.vocabulary import MODALITIES  # noqa: E402


def _thresholds(models: Path, defaults: dict[str, str]) -> dict[str, float]:
    """The novelty threshold of each modality's served model, from its card."""
    found = {}
    for modality, key in defaults.items():
        card = json.loads((models / key / "card.json").read_text(encoding="utf-8"))
        found[modality] = float(card["novelty"]["threshold"])
    return found


def served_answers(models: Path, faces: int, probes: bool = True) -> dict[str, Any]:
    """{modality: {group: {"images", "not_recognised", "beyond_threshold", "verdicts"}}} from a running
    server. beyond_threshold counts the answers whose novelty alone is past the gate; the others of
    not_recognised were caught by the training envelope's size (`inference.open_set.outside_envelope`)."""
    import httpx

    images = ood_images(faces, probes)

    def empty() -> dict[str, Any]:
        return {"images": 0, "not_recognised": 0, "beyond_threshold": 0, "verdicts": Counter()}

    tally: dict[str, dict[str, Any]] = {m: defaultdict(empty) for m in MODALITIES}
    with (
        tempfile.TemporaryDirectory(prefix="verity-open-set-") as folder,
        Server(models, Path(folder), {}) as server,
        httpx.Client(timeout=60) as client,
    ):
        thresholds = _thresholds(models, client.get(server.url + "/v1/models").json()["defaults"])
        for modality in MODALITIES:
            for image in images:
                response = client.post(
                    server.url + "/v1/predict",
                    data={"modality": modality},
                    files={"file": (image.name, image.data)},
                )
                response.raise_for_status()
                body = response.json()
                row = tally[modality][image.group]
                row["images"] += 1
                row["not_recognised"] += body["recognised"] is False
                row["beyond_threshold"] += body["novelty"] > thresholds[modality]
                row["verdicts"][body["verdict"]] += 1
    return {
        m: {g: {**r, "verdicts": dict(r["verdicts"])} for g, r in groups.items()}
        for m, groups in tally.items()
    }


def in_distribution(models: Path) -> dict[str, Any]:
    """Each shipped model's gate on its own test split, and its test ROC AUC against the card's."""
    from verity.inference.artifacts import resolve_model
    from verity.training.evaluate import evaluate

    figures = {}
    for folder in sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith("_")):
        model = resolve_model(folder)
        data = model.parent / "data.jsonl"
        if not data.is_file() or not Path(json.loads(data.open().readline())["path"]).exists():
            figures[folder.name] = {"skipped": f"the training images of {data} are not on this machine"}
            continue
        with tempfile.TemporaryDirectory() as out:
            result = evaluate(model, data, "test", out, progress=False, report=False)
        card = json.loads((model.parent / "card.json").read_text())
        figures[folder.name] = {
            "test_roc_auc": result["metrics"]["roc_auc"],
            "card_test_roc_auc": card["metrics"]["test"]["roc_auc"],
            "not_recognised": result.get("open_set", {}).get("evaluated"),
        }
    return figures


def summary(answers: dict[str, Any]) -> list[str]:
    lines = []
    for modality, groups in answers.items():
        headline = [g for name, g in groups.items() if not name.startswith(PROBE)]
        total = sum(g["images"] for g in headline)
        flagged = sum(g["not_recognised"] for g in headline)
        lines.append(f"sent as {modality}: {flagged}/{total} not recognised ({flagged / total:.1%})")
        for group, row in groups.items():
            lines.append(
                f"  {group:<22} {row['not_recognised']:>4}/{row['images']:<4} "
                f"({row['beyond_threshold']} by novelty, {row['not_recognised'] - row['beyond_threshold']} "
                f"by size) verdicts {row['verdicts']}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="checkpoints")
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    models = Path(args.models).resolve()
    result = {"ood": served_answers(models, args.faces), "in_distribution": in_distribution(models)}
    print("\n".join(summary(result["ood"])))
    for name, figures in result["in_distribution"].items():
        print(f"{name}: {json.dumps(figures)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
