"""The `verity` dispatcher: help, unknown commands, and user errors as one line with a non-zero exit."""

import subprocess
import sys

import pytest

from verity import cli as verity_cli


def test_help_lists_every_command(capsys) -> None:
    assert verity_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in verity_cli.COMMANDS:
        assert name in out


def test_no_command_is_a_usage_error(capsys) -> None:
    assert verity_cli.main([]) == 2


def test_unknown_command_names_valid_ones(capsys) -> None:
    assert verity_cli.main(["trian"]) == 2
    assert "Valid commands: data, train" in capsys.readouterr().err


@pytest.mark.torch  # the train, eval and export command modules load torch
def test_every_command_module_resolves() -> None:
    import importlib

    for module_name, function_name, _ in verity_cli.COMMANDS.values():
        assert callable(getattr(importlib.import_module(module_name), function_name))


def test_bad_image_path_gives_message_not_traceback(tmp_path) -> None:
    missing = tmp_path / "nope.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "verity", "predict", "--model", str(tmp_path), str(missing)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
