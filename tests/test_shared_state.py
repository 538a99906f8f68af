"""State every worker shares: with `verity serve --workers 2`, a model reload, a key revocation and a
reference enrolment made through one worker (or the CLI) reach both within 2 s, and a key's rate holds
across them (the counters and buckets themselves are checked on both stores in test_audit_contract.py).

Each check opens 30 fresh connections, which the kernel spreads over the two workers: before the shared
reload counter, 21 of 30 such answers still named the old default 2 s after a reload.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from api_fixtures import LiveServer, image_bytes, server_env, write_model

from verity.api.auth import KeyStore

pytestmark = pytest.mark.slow
FOLLOW_S = 2.0
FRESH = 30


def both_ready(live: LiveServer, timeout: float = 60.0) -> LiveServer:
    """LiveServer.start sees one worker ready; wait until FRESH fresh connections all find readiness,
    so the other worker has loaded its models too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if {answer.status_code for answer in fresh_get(live.url + "/readyz", {})} == {200}:
            return live
        time.sleep(0.2)
    raise AssertionError("the second worker never became ready")


def fresh_get(url: str, headers: dict[str, str]) -> list[httpx.Response]:
    """FRESH requests, each on a new connection."""
    return [httpx.get(url, headers=headers, timeout=10) for _ in range(FRESH)]


@pytest.fixture()
def two_workers(tmp_path: Path):  # noqa: ANN201 - yields the server and an admin key
    env = server_env(tmp_path, VERITY_REQUIRE_API_KEYS="true", VERITY_WARMUP="false")
    keys = KeyStore(tmp_path / "keys.json")
    _, admin = keys.add("ops", role="admin")
    live = both_ready(LiveServer(env, ["--workers", "2"]).start(timeout=120))
    try:
        yield live, {"X-API-Key": admin}, keys, tmp_path
    finally:
        live.stop()


def test_a_reload_reaches_every_worker_within_2_s(two_workers) -> None:
    live, admin, _, root = two_workers
    before = fresh_get(live.url + "/v1/models", admin)
    assert {answer.json()["defaults"]["photo"] for answer in before} == {"photo-test/2"}
    write_model(root / "models", "photo-test", "3", "photo")
    reload = httpx.post(live.url + "/v1/models/reload", headers=admin, timeout=30)
    assert reload.status_code == 200, reload.text
    time.sleep(FOLLOW_S)
    after = fresh_get(live.url + "/v1/models", admin)
    loaded = [{f"{m['name']}/{m['version']}" for m in answer.json()["models"]} for answer in after]
    assert all("photo-test/3" in models for models in loaded)  # every worker loaded it
    # ... and none serves it: the first start made photo-test/2 the production alias (a promotion would).
    assert [answer.json()["defaults"]["photo"] for answer in after] == ["photo-test/2"] * FRESH


def test_a_revocation_reaches_every_worker_within_2_s(two_workers) -> None:
    live, admin, keys, _ = two_workers
    record, station = keys.add("gate-7", role="station")
    headers = {"X-API-Key": station}
    assert {answer.status_code for answer in fresh_get(live.url + "/v1/models", headers)} == {200}
    keys.revoke(record.key_id)  # as `verity keys revoke` does, beside the running server
    time.sleep(FOLLOW_S)
    assert [answer.status_code for answer in fresh_get(live.url + "/v1/models", headers)] == [401] * FRESH


def test_a_rate_limit_holds_across_workers(tmp_path: Path) -> None:
    """A burst of 5 refilled at 0.5 a second: in T seconds at most 5 + 0.5 T requests pass, whichever worker
    answers (a slow refill, so that a slow machine cannot blur the bound). Each worker keeping its own
    bucket let 18 of 40 through in a second at 5 a second."""
    env = server_env(tmp_path, VERITY_RATE_LIMIT_PER_S="0.5", VERITY_RATE_LIMIT_BURST="5")
    live = both_ready(LiveServer(env, ["--workers", "2"]).start(timeout=120))
    try:
        started = time.monotonic()
        statuses = [
            httpx.post(live.url + "/v1/predict", files={"file": ("a.png", image_bytes(128), "image/png")},
                       data={"modality": "photo"}, timeout=10).status_code
            for _ in range(40)
        ]  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        live.stop()
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) <= 5 + 0.5 * elapsed + 1, (statuses.count(200), elapsed)
    assert statuses.count(429) > 0


def test_an_enrolment_reaches_every_worker_within_2_s(tmp_path: Path) -> None:
    """Genuine references enrolled through one worker: every worker then checks the product (an unknown
    product is a 404 naming the enrolled ones)."""
    from test_references_api import MODEL, noise_png, write_models

    write_models(tmp_path)
    env = {
        "VERITY_MODELS_DIR": str(tmp_path / "models"), "VERITY_AUDIT_DB": str(tmp_path / "audit.sqlite"),
        "VERITY_KEYS_FILE": str(tmp_path / "keys.json"),
        "VERITY_REFERENCES_DIR": str(tmp_path / "references"),
    }  # fmt: skip
    _, admin = KeyStore(tmp_path / "keys.json").add("ops", role="admin")
    headers = {"X-API-Key": admin}
    live = both_ready(LiveServer(env, ["--workers", "2"]).start(timeout=120))
    try:

        def ask() -> list[int]:
            form = {"modality": "photo", "product": "acme"}
            return [
                httpx.post(live.url + "/v1/predict", data=form, headers=headers, timeout=10,
                           files={"file": ("s.png", noise_png(99), "image/png")}).status_code
                for _ in range(FRESH)
            ]  # fmt: skip

        assert set(ask()) == {404}  # no worker knows the product yet
        files = [("files", (f"ref-{seed}.png", noise_png(seed), "image/png")) for seed in range(1, 6)]
        enrolled = httpx.post(live.url + "/v1/references", files=files, headers=headers, timeout=60,
                              data={"product": "acme", "model": MODEL})  # fmt: skip
        assert enrolled.status_code == 200, enrolled.text
        time.sleep(FOLLOW_S)
        assert ask() == [200] * FRESH
    finally:
        live.stop()


def test_a_promotion_and_a_rollback_reach_every_worker_within_2_s(two_workers) -> None:
    """`verity promote` and `verity rollback` beside the running server: the audit store records each,
    and every worker serves the alias within 2 s."""
    import os
    import subprocess
    import sys

    live, admin, _, _ = two_workers
    shared = ("VERITY_MODELS_DIR", "VERITY_AUDIT_DB")
    env = {**os.environ, **{name: live.env[name] for name in shared}}

    def verity(*argv: str) -> str:
        command = [sys.executable, "-m", "verity", *argv]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def served() -> list[str]:
        return [answer.json()["defaults"]["photo"] for answer in fresh_get(live.url + "/v1/models", admin)]

    verity("promote", "photo-test", "1", "--why", "version 2 alarms on tea")
    time.sleep(FOLLOW_S)
    assert served() == ["photo-test/1"] * FRESH
    verity("promote", "photo-test", "2", "--why", "fixed")
    time.sleep(FOLLOW_S)
    assert served() == ["photo-test/2"] * FRESH
    verity("rollback", "photo-test", "--why", "false alarms at gate 3")
    time.sleep(FOLLOW_S)
    assert served() == ["photo-test/1"] * FRESH
    events = [line.split()[1:3] for line in verity("promote", "--list").splitlines()]
    # Two workers started, and each model was adopted once: photo-test and xray-test.
    assert sorted(events[:2]) == [["adopt", "photo-test"], ["adopt", "xray-test"]]
    assert events[2:] == [["promote", "photo-test"], ["promote", "photo-test"], ["rollback", "photo-test"]]
