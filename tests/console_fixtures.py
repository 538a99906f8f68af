"""Helpers shared by the console's browser tests (tests/test_console*.py) and `make screenshots`
(docs/screenshots.py): the Chromium launch, a server as `make serve` starts it, and synthetic images.

Debian's Chromium (/usr/bin/chromium) driven by Playwright for Python, which never downloads a browser
of its own here. A missing Chromium (`require_chromium`) fails the browser tests in CI (`.ci/run` sets
VERITY_CI and installs it) and skips them elsewhere, saying so in pytest's summary with the command
that installs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from api_fixtures import REPO, LiveServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


MISSING = f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)"


def require_chromium() -> None:
    """Fails in CI, skips with the reason elsewhere, when Debian's Chromium is not installed."""
    import pytest

    if CHROMIUM.is_file():
        return
    if os.environ.get("VERITY_CI"):
        pytest.fail(MISSING)
    pytest.skip(f"browser tests skipped: {MISSING}")


def launch(playwright: Playwright, extra_args: list[str] | None = None) -> Browser:
    assert CHROMIUM.is_file(), MISSING
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + (extra_args or []))


def shipped_server(root: Path, **env: str) -> LiveServer:
    """`verity serve --host 127.0.0.1 --port P` from the checkout, as `make serve` runs it: the shipped
    models found by the default rule (./checkpoints), only the audit log, keys and images under root."""
    live = LiveServer(
        {
            "VERITY_AUDIT_DB": str(root / "audit.sqlite"),
            "VERITY_KEYS_FILE": str(root / "keys.json"),
            "VERITY_IMAGE_STORE_DIR": str(root / "images"),
            **env,
        },
        cwd=REPO,
    )
    live.env.pop("VERITY_MODELS_DIR", None)  # the default rule, not an inherited override
    return live.start(timeout=120)


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    mime: str
    modality: str
    product: str | None = None  # the synthetic product it shows, where known


def synthetic_samples(root: Path) -> dict[str, Sample]:
    """A genuine and a counterfeit label photo and a counterfeit 16-bit X-ray PNG from the repository's
    generators (seed 7, easy: the shipped models' own recipe; images 0, 5 and 6 of their plan), written
    under root so a browser can be given them as files."""
    from verity.datasets.synth import DIFFICULTIES, ImageJob, cue_policy, generator_for, plan_cases

    chosen = {"genuine-photo": ("photo", 0), "counterfeit-photo": ("photo", 5), "xray-16bit": ("xray", 6)}
    samples = {}
    for name, (modality, index) in chosen.items():
        generator = generator_for(modality)
        cases = plan_cases(7, index + 1, cue_policy(generator))
        job = ImageJob(index, 7, cases[index], DIFFICULTIES["easy"], 256)
        data, suffix, _ = generator.render(job)
        path = root / f"{name}{suffix}"
        path.write_bytes(data)
        mime = "image/png" if suffix == ".png" else "image/jpeg"
        samples[name] = Sample(path.name, data, mime, modality, cases[index].product)
    os.sync()
    return samples


def enrol_genuine_photos(server: LiveServer, keys_file: Path, product: str, count: int) -> None:
    """Enrols `count` genuine photos of a synthetic product (the generators' recipe, seed 7, cases of
    their own) as its references with the photo model, by an admin key added to the server's keys."""
    import httpx

    from verity.api.auth import KeyStore
    from verity.datasets.synth import DIFFICULTIES, CaseInfo, ImageJob, generator_for

    _, admin = KeyStore(keys_file).add("screenshots", role="admin")
    generator = generator_for("photo")
    files = []
    for index in range(count):
        job = ImageJob(1000 + index, 7, CaseInfo(1000 + index, "genuine", product), DIFFICULTIES["easy"], 256)
        data, suffix, _ = generator.render(job)
        mime = "image/png" if suffix == ".png" else "image/jpeg"
        files.append(("files", (f"{product}-{index}{suffix}", data, mime)))
    form = {"product": product, "modality": "photo"}
    answer = httpx.post(f"{server.url}/v1/references", files=files, data=form, headers={"X-API-Key": admin},
                        timeout=300)  # fmt: skip
    assert answer.status_code == 200, answer.text
