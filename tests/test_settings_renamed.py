"""A renamed setting left in a deployment's environment stops `verity serve` with the new name."""

from __future__ import annotations

import pytest

from verity.api.settings import load_settings
from verity.cli import main as verity_main


def test_old_tiling_setting_names_its_replacement(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("VERITY_XRAY_TILING", "true")
    with pytest.raises(ValueError, match="VERITY_TILING=auto"):
        load_settings()
    assert verity_main(["serve", "--port", "0"]) == 1
    assert "VERITY_XRAY_TILING is no longer read; use VERITY_TILING" in capsys.readouterr().err
