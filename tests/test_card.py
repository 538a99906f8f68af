"""ModelCard: its validation, its JSON round trip, and the shipped models' cards loading unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from verity.inference.card import CardError, ModelCard
from verity.inference.spec import resolve_spec

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
SHIPPED_RUNS = sorted(path.parent for path in SHIPPED.glob("*/*/card.json"))


def make_card(**changes: object) -> ModelCard:
    fields = dict(
        name="tiny",
        version="0.0.1",
        modality="photo",
        backbone="tinynet",
        spec=resolve_spec("photo", override={"image_size": 32}),
        thresholds={"alarm": 0.7, "clear": 0.3, "val_recall": np.float32(0.5), "val_miss_rate": np.nan},
        temperature=np.float64(1.5),
        metrics={"val": {"roc_auc": np.float64(0.9), "counts": np.array([3, 4])}},
        data_fingerprint="abc123",
        data_counts={"val": {"genuine": np.int64(12), "counterfeit": 12}},
        code_version="test",
        warnings=("too few genuine images",),
    )
    return ModelCard(**{**fields, **changes})  # type: ignore[arg-type]


def test_card_json_round_trip_keeps_every_field() -> None:
    card = make_card(int8={"passed": True}, precision="int8", quantization={"method": "minmax"})
    text = card.to_json(indent=2)
    assert ModelCard.from_json(text) == card
    data = json.loads(text)
    # The JSON form of the contract: grouped keys, plain types (numpy gone, NaN as null).
    assert data["calibration"] == {"temperature": 1.5}
    assert data["data"] == {"fingerprint": "abc123", "counts": {"val": {"genuine": 12, "counterfeit": 12}}}
    assert data["thresholds"]["val_recall"] == 0.5 and data["thresholds"]["val_miss_rate"] is None
    assert data["metrics"]["val"]["counts"] == [3, 4]
    assert data["spec"]["mean"] == [0.485, 0.456, 0.406] and data["created"].endswith("+00:00")
    assert data["warnings"] == ["too few genuine images"]
    assert "int8_gate" not in data  # optional keys appear only when set


def test_card_without_warnings_stays_without_them() -> None:
    """Cards written before cards carried warnings omit the key; reading and writing keeps it out."""
    data = make_card().to_dict()
    del data["warnings"]
    card = ModelCard.from_dict(data)
    assert card.warnings is None and card.to_dict() == data


def test_card_validation() -> None:
    with pytest.raises(CardError, match="differs from the spec"):
        make_card(modality="xray")
    with pytest.raises(CardError, match="temperature must be a positive number"):
        make_card(temperature=0.0)
    with pytest.raises(CardError, match="temperature"):
        make_card(temperature=float("nan"))
    with pytest.raises(CardError, match="thresholds lack alarm"):
        make_card(thresholds={"clear": 0.3})
    with pytest.raises(CardError, match="thresholds lack alarm"):
        replace(make_card(), thresholds={"clear": 0.3})  # a changed copy is checked again
    data = make_card().to_dict()
    with pytest.raises(CardError, match="Unknown card fields: colour"):
        ModelCard.from_dict({**data, "colour": "red"})
    with pytest.raises(CardError, match="lacks calibration, thresholds"):
        ModelCard.from_dict({k: v for k, v in data.items() if k not in ("calibration", "thresholds")})
    with pytest.raises(CardError, match="malformed"):
        ModelCard.from_dict({**data, "calibration": {}})
    with pytest.raises(CardError, match="JSON object"):
        ModelCard.from_json("[1, 2]")


def test_changing_the_dict_leaves_the_card_alone() -> None:
    card = make_card()
    data = card.to_dict()
    data["thresholds"]["alarm"] = 0.99
    data["metrics"]["val"]["roc_auc"] = 0.0
    assert card.thresholds["alarm"] == 0.7 and card.metrics["val"]["roc_auc"] == 0.9


def test_shipped_models_are_there() -> None:
    assert {path.parent.name for path in SHIPPED_RUNS} == {"photo-default", "xray-default"}


@pytest.mark.parametrize("run", SHIPPED_RUNS, ids=lambda path: path.parent.name)
def test_shipped_cards_round_trip_unchanged(run: Path) -> None:
    """card.json, the ONNX metadata and model.pt's card of the shipped models read and write back as
    they are on disk: card.json to the byte, the ONNX metadata as the same JSON."""
    text = (run / "card.json").read_text(encoding="utf-8")
    assert ModelCard.from_json(text).to_json(indent=2) + "\n" == text
    for model in sorted(run.glob("model*.onnx")):
        metadata = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        card = ModelCard.from_json(metadata["verity.card"])
        assert json.loads(card.to_json()) == json.loads(metadata["verity.card"]), model.name
        assert card.spec.to_json() == metadata["verity.spec"]
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    assert ModelCard.from_dict(checkpoint["card"]).to_dict() == checkpoint["card"]
