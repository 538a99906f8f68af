"""Where a model's maps lie over its input (inference.heatmap.over_input): cell j of a convolutional
backbone's map is centred over input pixel stride * j, not where an image resize puts it. Drawn as a
resize, every heatmap and every threat report region had been shifted half a cell down and right."""

from __future__ import annotations

import numpy as np
import pytest

from verity.inference.heatmap import CENTRE, CORNER, feature_alignment, over_input, upsample


def test_a_corner_map_puts_each_cell_on_stride_times_j() -> None:
    grid = np.zeros((5, 5), np.float32)
    grid[2, 3] = 1.0
    mapped = over_input(grid, 160, CORNER)
    assert mapped.shape == (160, 160)
    assert np.unravel_index(mapped.argmax(), mapped.shape) == (64, 96)  # 32 * 2, 32 * 3
    assert mapped[64, 96] == pytest.approx(1.0) and mapped[64 + 32, 96] == pytest.approx(0.0)
    # Beyond the outermost cells' centres the map stays flat, never extrapolated.
    ramp = np.arange(25, dtype=np.float32).reshape(5, 5)
    corner = over_input(ramp, 160, CORNER)
    assert corner[0, 0] == 0.0 and corner[159, 159] == 24.0 and (corner[128:, 128:] == 24.0).all()
    # A 200 px input has 7 cells of the network's 32 px stride, the last one partly outside.
    last = np.zeros((7, 7), np.float32)
    last[6, 6] = 1.0
    assert np.unravel_index(over_input(last, 200, CORNER).argmax(), (200, 200)) == (192, 192)


def test_a_centre_map_is_an_image_resize() -> None:
    grid = np.random.default_rng(0).normal(size=(5, 5)).astype(np.float32)
    np.testing.assert_allclose(over_input(grid, 160, CENTRE), upsample(grid, 160, 160), atol=1e-5)


def test_each_backbone_has_its_alignment() -> None:
    convolutional = ("efficientnet_lite0", "resnet18", "mobilenet_v3_large")
    assert [feature_alignment(name) for name in convolutional] == [CORNER] * 3
    assert feature_alignment("convnext_tiny") == CENTRE and feature_alignment(None) == CORNER


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "convnext_tiny"])
def test_the_backbones_cells_lie_where_the_alignment_says(backbone: str) -> None:
    """The input pixels the middle cell of a 640 px input's map responds to, weighted by its gradient
    (random weights and inputs; at 640 px the image cuts its field alike on both sides): their centre is
    where `over_input` draws the cell, within 3 px, and 15.5 px from where the other alignment would."""
    import torch

    from verity.training.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, num_classes=2, in_chans=3, pretrained=False).eval()
    image = torch.rand(2, 3, 640, 640, requires_grad=True)
    cams = model(image)[1]  # N x 2 x 20 x 20
    assert cams.shape[-2:] == (20, 20)
    cams[:, 1, 10, 10].sum().backward()
    weight = image.grad.abs().sum(dim=(0, 1)).numpy().astype(np.float64)
    rows, columns = np.indices(weight.shape)
    centre = np.array([(rows * weight).sum(), (columns * weight).sum()]) / weight.sum()
    middle = np.zeros((20, 20), np.float32)
    middle[10, 10] = 1.0
    drawn = over_input(middle, 640, feature_alignment(backbone))
    peak = np.argwhere(drawn == drawn.max()).mean(axis=0)
    assert np.abs(centre - peak).max() < 3.0, (centre, peak)
