"""Progress bars draw on a terminal only: in a CI log every redraw would be a line of its own."""

from __future__ import annotations

import io
import sys

import pytest

from verity.datasets.progress import NoBar, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_off_a_terminal_and_a_bar_on_one(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    quiet = progress_bar(True, range(3), desc="epoch 1/2")
    assert isinstance(quiet, NoBar) and list(quiet) == [0, 1, 2]
    quiet.update()
    quiet.close()
    assert sys.stderr.getvalue() == ""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress_bar(True, range(3), desc="epoch 1/2")
    assert not isinstance(bar, NoBar) and list(bar) == [0, 1, 2]
    bar.close()
    assert "epoch 1/2" in terminal.getvalue()
    assert isinstance(progress_bar(False, total=3), NoBar)  # --no-progress wins on a terminal too


@pytest.mark.torch
def test_training_log_has_one_line_per_epoch_off_a_terminal(tmp_path, capfd) -> None:
    from tests.test_trainer import FAST, make_folder
    from verity.training.trainer import train_from_options

    options = {**FAST, "progress": True}
    train_from_options(data=str(make_folder(tmp_path / "d", per_class=8)), model="resnet18", pretrained=False,
                       epochs=2, out=str(tmp_path), name="log", **options)  # fmt: skip
    captured = capfd.readouterr()
    epoch_lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and "it/s" not in captured.err and "batch/s" not in captured.err
