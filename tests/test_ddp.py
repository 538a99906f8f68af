"""DistributedDataParallel on CPU: 2 processes under torchrun train a few steps and end with equal weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_trainer import make_folder

pytestmark = pytest.mark.torch

# Each rank trains through the same entry point as `verity train` and writes its final weight digest.
_RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from verity.training.trainer import train_from_options
    data, out = sys.argv[1], sys.argv[2]
    result = train_from_options(
        data=data, out=out, name="ddp", model="resnet18", pretrained=False, epochs=2, image_size=32,
        batch_size=4, workers=0, progress=False, export=False, report=False, lr=3e-3, allow_weak=True,
    )
    rank = int(os.environ["RANK"])
    Path = __import__("pathlib").Path
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": result["rank"], "digest": result["last_weights_digest"], "model_pt": result.get("model_pt"),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data", per_class=12, size=32)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(data), str(tmp_path / "out")]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["digest"] == ranks[1]["digest"], "DDP ranks ended with different weights"
    # Rank 0 alone writes the artifacts and reports them; rank 1 only reports its digest.
    assert ranks[0]["model_pt"] and Path(ranks[0]["model_pt"]).is_file() and ranks[1]["model_pt"] is None
    assert "epoch 2:" in finished.stdout and finished.stdout.count("epoch 1:") == 1
