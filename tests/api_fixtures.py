"""Helpers for the API tests: model folders of the tiny ONNX model, settings, images, requests, a live server.

The models are `benchmarks.models.tiny_onnx` (onnx.helper only, no torch, built in milliseconds): brighter
images score as more counterfeit (black about 0.2, white about 0.95), so tests can steer the verdict
against the thresholds written here (alarm 0.6, clear 0.4). The pytest fixtures built on these
(`models_dir`, `settings`, `client`) are in conftest.py.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec

if TYPE_CHECKING:
    import httpx
    from fastapi.testclient import TestClient

    from verity.api.settings import Settings

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32
# The loopback names (the default) plus the Host that Starlette's TestClient sends.
TEST_HOSTS = ["localhost", "127.0.0.1", "[::1]", "testserver"]


def write_model(
    models_dir: Path, name: str, version: str, modality: str = "photo", alarm: float = 0.6, clear: float = 0.4
) -> Path:
    """Writes the tiny model as <models_dir>/<name>/<version>/model.onnx and returns its path."""
    spec = tiny_spec(modality, IMAGE_SIZE)
    card = tiny_card(spec, name, version, alarm=alarm, clear=clear)
    return tiny_onnx(Path(models_dir) / name / version / "model.onnx", spec, card)


def make_models_dir(root: Path) -> Path:
    """photo-test 1 and 2 (2 is the default) and xray-test 1."""
    models = root / "models"
    write_model(models, "photo-test", "1", "photo")
    write_model(models, "photo-test", "2", "photo")
    write_model(models, "xray-test", "1", "xray")
    return models


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings with every file under `root` (models in root/models), loading at start, no warm-up, no
    heap freeze."""
    from verity.api.settings import Settings

    values: dict[str, Any] = dict(
        models_dir=root / "models",
        audit_db=root / "audit.sqlite",
        keys_file=root / "keys.json",
        alert_endpoints_file=root / "alert_endpoints.json",
        image_store_dir=root / "images",
        background_load=False,
        warmup=False,
        gc_freeze=False,  # each freeze collects the whole test process first (api/registry.freeze_long_lived)
        store_images=True,
        allowed_hosts=TEST_HOSTS,
    )
    values.update(overrides)
    return Settings(**values)


def image_bytes(
    value: int = 128, size: tuple[int, int] = (48, 40), fmt: str = "PNG", mode: str = "RGB"
) -> bytes:
    """A flat image of one intensity: 0 scores genuine, 255 counterfeit with the tiny models."""
    buffer = io.BytesIO()
    color = value if mode in ("L", "I;16") else (value,) * len(mode)
    Image.new(mode, size, color).save(buffer, format=fmt)
    return buffer.getvalue()


DARK, BRIGHT = image_bytes(0), image_bytes(255)


def predict(
    client: TestClient,
    data: bytes = DARK,
    modality: str = "photo",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> httpx.Response:
    """POST /v1/predict with one image and the form fields given."""
    form = {"modality": modality, **{k: str(v) for k, v in fields.items()}}
    return client.post(
        "/v1/predict", files={"file": ("item.png", data, "image/png")}, data=form, headers=headers
    )


def audit_rows(root: Path) -> dict[str, tuple]:
    """request_id -> (request_id, verdict, score, model_version) of root/audit.sqlite."""
    with sqlite3.connect(root / "audit.sqlite") as db:
        return {
            row[0]: row
            for row in db.execute("SELECT request_id, verdict, score, model_version FROM predictions")
        }


def admin_headers(settings: Settings) -> dict[str, str]:
    """A new admin key in the settings' key file, as headers: reloads need one on every server."""
    from verity.api.auth import KeyStore

    _, secret = KeyStore(settings.keys_file).add("ops", role="admin")
    return {"X-API-Key": secret}


# The optional numbers of an error detail, on the statuses they belong to (api/errors.py error_detail).
ERROR_NUMBERS = {413: {"limit_bytes"}, 429: {"retry_after_s"}, 503: {"retry_after_s"}}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is the API's error envelope with this status (and code), and no traceback; only a
    413 may carry limit_bytes, only a 429 or 503 retry_after_s (equal to Retry-After)."""
    assert response.status_code == status, response.text
    body = response.json()
    keys = {"code", "message", "request_id"}
    allowed = keys | ERROR_NUMBERS.get(status, set())
    assert set(body) == {"error"} and keys <= set(body["error"]) <= allowed, body
    if "retry_after_s" in body["error"]:
        assert str(body["error"]["retry_after_s"]) == response.headers["retry-after"]
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    if code:
        assert body["error"]["code"] == code
    return body


def server_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of a live server on the tiny models, with its audit log and keys under `root`."""
    return {
        "VERITY_MODELS_DIR": str(make_models_dir(root)),
        "VERITY_AUDIT_DB": str(root / "audit.sqlite"),
        "VERITY_KEYS_FILE": str(root / "keys.json"),
        "VERITY_ALERT_ENDPOINTS_FILE": str(root / "alert_endpoints.json"),
        **extra,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """`verity serve` in a subprocess on 127.0.0.1 and a free port, with the environment given."""

    def __init__(self, env: dict[str, str], args: list[str] | None = None, cwd: Path = REPO) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        self.args = args or []
        self.process: subprocess.Popen | None = None
        beside = env.get("VERITY_AUDIT_DB", "/tmp/verity")
        if "://" in beside:  # a database URL: the log goes beside the key file instead
            beside = env.get("VERITY_KEYS_FILE", "/tmp/verity")
        self.log_path = Path(beside).with_suffix(f".{self.port}.log")

    def start(self, timeout: float = 60.0) -> LiveServer:
        import httpx

        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "verity",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *self.args,
            ],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}: {self.log_path.read_text()[-3000:]}"
                )
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def build_wheel(tmp_path: Path) -> Path:
    """The wheel `pip install .` builds, from a copy of the checkout (a build leaves build/ behind)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("verity", "api", "inference", "datasets", "training"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    keep = shutil.ignore_patterns("__pycache__", "*.pt", "tensorboard", "data.jsonl", "report.html")
    shutil.copytree(REPO / "checkpoints", source / "checkpoints", ignore=keep)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("verity-*.whl")
    return wheel
