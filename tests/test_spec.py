"""PreprocessSpec: validation, JSON round trip and the one precedence rule."""

import pytest

from verity.inference.spec import PreprocessSpec, SpecError, default_spec, resolve_spec


@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_defaults_round_trip_through_json(modality: str) -> None:
    spec = default_spec(modality)
    assert PreprocessSpec.from_json(spec.to_json()) == spec


def test_default_channels_per_modality() -> None:
    assert default_spec("photo").in_chans == 3
    assert default_spec("xray").in_chans == 1


def test_precedence_override_beats_stored_beats_defaults() -> None:
    stored = default_spec("photo").to_dict() | {"image_size": 160}
    assert resolve_spec("photo").image_size == 224
    assert resolve_spec("photo", stored=stored).image_size == 160
    assert resolve_spec("photo", stored=stored, override={"image_size": 96}).image_size == 96


def test_override_of_channels_adapts_statistics() -> None:
    spec = resolve_spec("xray", override={"in_chans": 2})
    assert spec.in_chans == 2 and len(spec.mean) == 2 and len(spec.std) == 2


def test_stored_spec_of_other_modality_is_refused() -> None:
    with pytest.raises(SpecError, match="xray"):
        resolve_spec("photo", stored=default_spec("xray"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"modality": "infrared"}, "Only photo, xray"),
        ({"in_chans": 4}, "in_chans"),
        ({"resize_mode": "crop"}, "stretch, letterbox"),
        ({"window": (10.0, 5.0)}, "window"),
        ({"mean": (0.5,)}, "mean and std"),
    ],
)
def test_invalid_specs_name_the_problem(change: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        PreprocessSpec.from_dict(default_spec("photo").to_dict() | change)


def test_unknown_fields_are_errors() -> None:
    with pytest.raises(SpecError, match="Unknown spec fields: colour"):
        PreprocessSpec.from_dict(default_spec("photo").to_dict() | {"colour": 1})
