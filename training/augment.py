"""Augmentation presets, one per modality (albumentations 2.x), applied to the decoded HxWxC array.

They sit between `decode_image` and `to_model_input`, for training only; evaluation and serving see the
plain decoded image. What each preset leaves alone matters as much as what it does:

- photo: the counterfeit cues are colour shifts, blurred reprints, altered text and missing holograms,
  so hue moves by at most 1% of the colour wheel (3.6 degrees; a medium synthetic colour-shift cue is 22),
  blur is light and rare (sigma <= 0.4, 5%), and nothing mirrors the text.
- xray: a transmission image has no colour; it varies in exposure (gamma, intensity), detector noise,
  bag orientation (flips, 90-degree turns) and the clutter packed around the item (overlapping objects
  multiply the transmission).

X-ray arrays may be uint16 or float: they are mapped to float32 [0, 1] through the spec's window first
(the mapping `to_model_input` would apply), augmented in float, and handed on with the window cleared.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import albumentations as A
import numpy as np

from verity.inference.preprocess import match_channels
from verity.inference.spec import PreprocessSpec
from verity.inference.vocabulary import MODALITIES
from verity.training.config import AUGMENT_PRESETS


class Glare(A.ImageOnlyTransform):
    """A specular highlight: a soft elliptical white blob blended over the image (glossy packaging).

    Hand-written because albumentations' RandomSunFlare draws lens-flare circles across the frame,
    several times slower and unlike the glare of a phone flash on foil or film.
    """

    def __init__(
        self,
        strength: tuple[float, float] = (0.3, 0.8),
        size: tuple[float, float] = (0.1, 0.35),
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.strength = strength
        self.size = size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng = self.random_generator
        return {
            "center": (rng.uniform(0, height), rng.uniform(0, width)),
            "radii": (rng.uniform(*self.size) * height, rng.uniform(*self.size) * width),
            "strength": rng.uniform(*self.strength),
        }

    def apply(
        self, img: np.ndarray, center=(0.0, 0.0), radii=(1.0, 1.0), strength=0.5, **params
    ) -> np.ndarray:
        height, width = img.shape[:2]
        ys = ((np.arange(height, dtype=np.float32) - center[0]) / radii[0]) ** 2
        xs = ((np.arange(width, dtype=np.float32) - center[1]) / radii[1]) ** 2
        alpha = (strength * np.exp(-(ys[:, None] + xs[None, :]) * 2.0))[..., None]
        top = 255.0 if img.dtype == np.uint8 else 1.0
        blended = img.astype(np.float32) * (1.0 - alpha) + top * alpha
        return (
            blended.astype(img.dtype)
            if img.dtype != np.uint8
            else np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        )

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("strength", "size")


class OverlapClutter(A.ImageOnlyTransform):
    """Overlapping objects in a transmission image: each ellipse multiplies the transmission it covers.

    Beer-Lambert: I = I0 * exp(-mu * t), so stacked items multiply; with 2 channels (dual-energy) the
    low-energy channel attenuates more than the high-energy one, by a random material ratio.
    Works on float32 images in [0, 1].
    """

    def __init__(
        self,
        count: tuple[int, int] = (1, 4),
        attenuation: tuple[float, float] = (0.05, 0.6),
        size: tuple[float, float] = (0.08, 0.35),
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.count = count
        self.attenuation = attenuation
        self.size = size

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        rng = self.random_generator
        objects = []
        for _ in range(int(rng.integers(self.count[0], self.count[1] + 1))):
            objects.append(
                (
                    rng.uniform(0, height),
                    rng.uniform(0, width),
                    rng.uniform(*self.size) * height,
                    rng.uniform(*self.size) * width,
                    rng.uniform(*self.attenuation),
                    rng.uniform(1.1, 1.8),  # mu, low/high energy ratio
                )
            )
        return {"objects": objects}

    def apply(self, img: np.ndarray, objects=(), **params) -> np.ndarray:
        height, width = img.shape[:2]
        thickness = np.zeros((height, width, img.shape[2]), dtype=np.float32)
        ys = np.arange(height, dtype=np.float32)[:, None]
        xs = np.arange(width, dtype=np.float32)[None, :]
        for cy, cx, ry, rx, mu, ratio in objects:
            inside = (((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2) <= 1.0
            for channel in range(img.shape[2]):
                # Channel 0 is the high-energy image; later channels (low energy) attenuate more.
                thickness[..., channel] += inside * mu * (ratio if channel > 0 else 1.0)
        return (img.astype(np.float32) * np.exp(-thickness)).astype(np.float32)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("count", "attenuation", "size")


def photo_preset(variant: str = "full") -> A.Compose:
    """Phone photos of labels: viewpoint, light, focus, compression and sensor noise.

    The "patch" variant, for photos smaller than the model input (32 px crops of a part), keeps the
    viewpoint and the light and drops what acts per pixel or per block: upsampled 7 times, a pixel of
    noise, a JPEG block of 8 pixels, a glare spot or a 3-pixel blur is the size of the defect it should
    neither hide nor imitate (the X-ray preset's reason for its own patch variant).
    """
    viewpoint_and_light = [
        A.Perspective(scale=(0.02, 0.06), p=0.5),
        A.Affine(scale=(0.9, 1.1), rotate=(-8, 8), translate_percent=(-0.04, 0.04), p=0.5),
        # Brightness and contrast vary with the light; hue barely moves (a colour shift is a cue).
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.01, p=0.6),
    ]
    if variant == "patch":
        return A.Compose(viewpoint_and_light)
    return A.Compose(
        [
            *viewpoint_and_light,
            Glare(p=0.25),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.1, 0.4), p=0.05),
            A.ImageCompression(quality_range=(70, 100), p=0.4),
            A.GaussNoise(std_range=(0.005, 0.03), p=0.3),
        ]
    )


def xray_preset(variant: str = "full") -> A.Compose:
    """Transmission scans: orientation and exposure always; clutter and detector noise on full scans.

    The "patch" variant is for images smaller than the model input (defect patches, tiny crops): they
    are upsampled, so per-pixel noise and clutter ellipses become blobs the size of the evidence and
    erase or imitate it (measured in README.md, "Training defaults").
    """
    geometric = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    exposure = [
        A.RandomGamma(gamma_limit=(75, 135), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.15, p=0.5),
    ]
    if variant == "patch":
        return A.Compose([*geometric, *exposure])
    return A.Compose(
        [*geometric, OverlapClutter(p=0.4), *exposure, A.GaussNoise(std_range=(0.005, 0.03), p=0.4)]
    )


def build_preset(modality: str, variant: str = "full") -> A.Compose:
    """The augmentation pipeline for a modality, in its "full" or "patch" variant."""
    if modality not in MODALITIES:
        raise ValueError(
            f"Invalid augmentation preset {modality!r}. Only {', '.join(MODALITIES)} are supported."
        )
    if variant not in AUGMENT_PRESETS:
        supported = ", ".join(AUGMENT_PRESETS)
        raise ValueError(f"Invalid preset variant {variant!r}. Only {supported} are supported.")
    return photo_preset(variant) if modality == "photo" else xray_preset(variant)


def describe_preset(modality: str, variant: str = "full") -> dict[str, Any]:
    """The preset as plain data (albumentations' own serialization), saved with each run."""
    return A.to_dict(build_preset(modality, variant))


def to_unit_float(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Maps a uint16 or float image to float32 [0, 1] with the spec's window, as to_model_input would."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if spec.window is None:
        low, high = (0.0, 65535.0) if image.dtype == np.uint16 else (0.0, 1.0)
    else:
        low, high = spec.window
    return np.clip((image.astype(np.float32) - low) / (high - low), 0.0, 1.0)


class Augmenter:
    """Applies a preset to a decoded array and returns it with the spec to preprocess it with.

    Photos (uint8 RGB) are augmented in uint8, the fast path of every transform. Everything else goes
    to float32 [0, 1] first, so the returned spec has its window cleared (the window was applied here).
    """

    def __init__(self, modality: str, spec: PreprocessSpec, variant: str = "full") -> None:
        self.pipeline = build_preset(modality, variant)
        self.spec = spec
        self.float_spec = replace(spec, window=None)

    def set_seed(self, seed: int) -> None:
        """Seeds the pipeline: the trainer seeds per sample, so augmentations do not depend on workers."""
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, PreprocessSpec]:
        # The channels the model will see (grey collapsed, colour kept or made luma, see match_channels),
        # so training augments what evaluation and serving preprocess.
        image = match_channels(image, self.spec)
        if image.dtype == np.uint8 and image.shape[2] == 3:
            return self.pipeline(image=image)["image"], self.spec
        unit = to_unit_float(image, self.spec)
        augmented = self.pipeline(image=np.ascontiguousarray(unit))["image"]
        if augmented.ndim == 2:  # some cv2 paths drop a single channel axis
            augmented = augmented[..., None]
        return np.clip(augmented, 0.0, 1.0).astype(np.float32), self.float_spec
