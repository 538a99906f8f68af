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


def test_serve_runs_numpys_matrix_products_on_one_thread() -> None:
    """`verity serve` sets OPENBLAS_NUM_THREADS=1 before numpy loads (its gate's and reference check's
    small products otherwise spin a thread per core: 3x the CPU of a gated request), unless the operator
    chose a value."""
    import os
    import subprocess
    import sys

    probe = (
        "import ctypes, glob, os, sys\n"
        "from verity import cli\n"
        "assert 'numpy' not in sys.modules\n"
        "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "import numpy\n"
        "lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(numpy.__file__) + '.libs', "
        "'libscipy_openblas*'))[0])\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], lib.scipy_openblas_get_num_threads64_())\n"
    )
    unset = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    environment = {k: v for k, v in os.environ.items() if k not in unset}
    ran = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[-2:] == ["1", "1"]
    chosen = subprocess.run([sys.executable, "-c", probe], env={**environment, "OPENBLAS_NUM_THREADS": "2"},
                            capture_output=True, text=True)  # fmt: skip
    assert chosen.stdout.split()[-2:] == ["2", "2"], chosen.stderr


def test_serve_shares_the_cores_among_its_worker_processes(tmp_path, monkeypatch) -> None:
    """`verity serve --workers 2` tells each worker how many there are, so each runs its share of the
    cores' batches (api.registry), never two model runs per core."""
    import os

    import uvicorn

    from verity.api.cli import serve_main
    from verity.api.settings import Settings

    started: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.update(kwargs))
    monkeypatch.setattr("verity.api.logs.configure_logging", lambda *args, **kwargs: None)  # pytest's own
    for name in ("VERITY_WORKER_PROCESSES", "VERITY_SHARED_LIMITS", "VERITY_SERVE_PROCESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VERITY_KEYS_FILE", str(tmp_path / "keys.json"))
    monkeypatch.setenv("VERITY_AUDIT_DB", str(tmp_path / "audit.sqlite"))
    monkeypatch.setattr(os, "environ", os.environ.copy())  # what serve_main sets for its workers, undone
    assert serve_main(["--host", "127.0.0.1", "--port", "1", "--workers", "2"]) == 0
    assert started["workers"] == 2 and os.environ["VERITY_WORKER_PROCESSES"] == "2"
    assert Settings().worker_processes == 2
