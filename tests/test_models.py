"""The model registry: every backbone, every channel count, the CAM contract, the packaged weights."""

from __future__ import annotations

import pytest
import torch

from verity.training.models import (
    MODELS,
    ModelError,
    Normalize,
    VerityNet,
    adapt_first_conv,
    build_model,
    packaged_efficientnet_lite0,
    read_state_dict,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.torch


@pytest.mark.parametrize("name", list(MODELS))
def test_every_backbone_builds_for_1_2_3_channels_with_logits_and_cam(name: str) -> None:
    for in_chans in (1, 2, 3):
        torch.manual_seed(0)
        model = build_model(name, num_classes=2, in_chans=in_chans, pretrained=False).eval()
        assert isinstance(next(iter(model.children())), Normalize), "Normalize must be the first layer"
        assert model.normalize.mean.shape == (1, in_chans, 1, 1)
        with torch.no_grad():
            logits, cam = model(torch.rand(2, in_chans, 64, 64))
        assert logits.shape == (2, 2)
        assert cam.ndim == 4 and cam.shape[:2] == (2, 2) and cam.shape[2] >= 1 and cam.shape[3] >= 1
        # The cam is the linear head at every position: its spatial mean is the logits.
        torch.testing.assert_close(cam.mean(dim=(2, 3)), logits, rtol=1e-4, atol=1e-4)


def test_efficientnet_lite0_loads_the_packaged_imagenet_weights() -> None:
    path = packaged_efficientnet_lite0()
    stored = read_state_dict(path)
    model = build_model("efficientnet_lite0", in_chans=3, pretrained=True)
    timm_model = model.features.model
    torch.testing.assert_close(timm_model.conv_stem.weight, stored["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(timm_model.bn2.running_var, stored["_bn1.running_var"], rtol=0, atol=0)
    # Stage 4 starts at block 8 (stages of 1, 2, 2, 3, 3, 4, 1 blocks).
    torch.testing.assert_close(
        timm_model.blocks[4][0].conv_pw.weight, stored["_blocks.8._expand_conv.weight"], rtol=0, atol=0
    )
    # Every backbone tensor equals the file's, in order (the classifier is replaced by our head).
    backbone = list(timm_model.state_dict().values())
    for ours, theirs in zip(backbone, list(stored.values())[: len(backbone)], strict=True):
        assert torch.equal(ours, theirs)
    # A grey (1-channel) model keeps the RGB stem's response: the kernels are summed over RGB.
    grey = build_model("efficientnet_lite0", in_chans=1, pretrained=True)
    expected = stored["_conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(grey.features.model.conv_stem.weight, expected)


def test_adapted_first_conv_gives_the_rgb_response_for_grey_input() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    grey = torch.rand(1, 1, 16, 16)
    reference = conv(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(adapt_first_conv(conv, 1)(grey), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        adapt_first_conv(conv, 2)(grey.repeat(1, 2, 1, 1)), reference, rtol=1e-5, atol=1e-5
    )


def test_weights_file_loads_for_any_backbone_and_wrong_weights_are_refused(tmp_path) -> None:
    import torchvision

    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("resnet18", in_chans=3, weights_path=tmp_path / "resnet18.pth")
    torch.testing.assert_close(model.features[0].weight, source.conv1.weight, rtol=0, atol=0)
    with pytest.raises(ModelError, match="another architecture|tensors"):
        build_model("resnet18", weights_path=packaged_efficientnet_lite0())


def test_unknown_model_and_missing_pretrained_weights_name_the_options() -> None:
    with pytest.raises(ModelError, match="efficientnet_lite0, mobilenet_v3_large"):
        build_model("efficientnet_b9")
    with pytest.raises(ModelError, match="--weights PATH"):
        build_model("resnet50", pretrained=True)


def test_model_follows_the_spec_normalization() -> None:
    from verity.inference.spec import default_spec
    from verity.training.models import build_for_spec

    spec = default_spec("xray")
    model = build_for_spec("resnet18", spec)
    assert isinstance(model, VerityNet)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(list(spec.mean))
    assert model.normalize.std.flatten().tolist() == pytest.approx(list(spec.std))
