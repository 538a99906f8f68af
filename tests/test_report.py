"""The evaluation report's pieces: images of any channel count, CAM overlays, escaped captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from verity.training.metrics import compute_metrics


def test_report_images_for_every_channel_count(tmp_path: Path) -> None:
    from verity.training.report import cam_overlay, image_to_rgb, write_report

    for channels in (1, 2, 3):
        image = np.random.default_rng(channels).random((channels, 20, 20), dtype=np.float32)
        rgb = image_to_rgb(image)
        assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
        assert np.array_equal(rgb[..., 0], (np.clip(image[0], 0, 1) * 255 + 0.5).astype(np.uint8))
        overlay = cam_overlay(rgb, np.arange(25, dtype=np.float32).reshape(5, 5))
        assert overlay.shape == rgb.shape
        # The strongest evidence (bottom right) is tinted red, the weakest (top left) blue.
        assert overlay[-1, -1, 0] > overlay[-1, -1, 2] and overlay[0, 0, 2] > overlay[0, 0, 0]
    example = {
        "image": np.zeros((1, 8, 8)),
        "cam": None,
        "score": 0.2,
        "label": "counterfeit",
        "verdict": "genuine",
        "caption": "<script>x</script>.png",
    }
    metrics = compute_metrics([0.2, 0.9], [1, 0])
    path = write_report(tmp_path / "r.html", metrics, [0.2, 0.9], [1, 0], examples=[example])
    text = path.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text  # captions are escaped
    assert "ROC AUC 0.0000" in text


def test_the_cards_warnings_come_first_and_a_weak_run_says_so(tmp_path: Path) -> None:
    from verity.inference.card import WEAK_RUN
    from verity.training.report import write_report

    metrics = compute_metrics([0.2, 0.9], [0, 1])
    weak = f"{WEAK_RUN}validation ROC AUC 0.48 is not above chance"
    small = "only 20 genuine <validation> images"
    warnings = (weak, small)
    text = write_report(tmp_path / "w.html", metrics, [0.2, 0.9], [0, 1], warnings=warnings).read_text()
    assert "Weak run: this model did not learn" in text and "&lt;validation&gt;" in text
    assert text.index('class="warnings"') < text.index("<h2>Summary</h2>")
    plain = write_report(tmp_path / "p.html", metrics, [0.2, 0.9], [0, 1], warnings=warnings[1:]).read_text()
    assert "Read before trusting it" in plain and "Weak run" not in plain
    bare = write_report(tmp_path / "n.html", metrics, [0.2, 0.9], [0, 1]).read_text()
    assert 'class="warnings"' not in bare
