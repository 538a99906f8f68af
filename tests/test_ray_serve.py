"""Verity on Ray Serve (api/ray_serve.py): a local Ray on loopback, 2 replicas of the app against one
PostgreSQL audit log that a fixture starts, 200 requests through Serve's HTTP proxy. Every answer is in
the audit log exactly once, and equals /v1/predict's in process to 1e-4."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from api_fixtures import image_bytes, make_models_dir, make_settings
from fastapi.testclient import TestClient
from postgres_fixtures import PostgresServer, require_postgres, start_postgres
from ray_fixtures import local_ray_serve

from verity.api.app import create_app
from verity.api.ray_serve import app_builder, replica_options
from verity.api.settings import Settings

pytestmark = pytest.mark.slow
REQUESTS, CLIENTS = 200, 8


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres(require_postgres())
    yield server
    server.stop()


def test_options_leave_room_for_batches_and_autoscale() -> None:
    fixed = replica_options(2, None, None, {"VERITY_BATCH_MAX_SIZE": "12"})
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] >= 24
    scaled = replica_options(None, 1, 4, {})
    one_batch = Settings.model_fields["batch_max_size"].default  # a replica is busy with one batch
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": one_batch}
    assert scaled["autoscaling_config"] == autoscaling
    assert scaled["max_ongoing_requests"] >= scaled["autoscaling_config"]["target_ongoing_requests"]
    with pytest.raises(ValueError, match="replica"):
        app_builder({"replicaz": "2"})


def test_two_replicas_answer_as_v1_predict_and_audit_each_answer_once(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    import psycopg
    from ray import serve

    url = postgres.create_database("ray")
    models = make_models_dir(tmp_path)
    env = {"VERITY_MODELS_DIR": str(models), "VERITY_AUDIT_DB": url, "VERITY_RATE_LIMIT_PER_S": "0",
           "VERITY_KEYS_FILE": str(tmp_path / "keys.json"), "VERITY_LOG_JSON": "false"}  # fmt: skip
    images = [image_bytes(int(level)) for level in range(0, 256, 32)]
    with local_ray_serve(env, replicas=2) as base:
        status = serve.status().applications["verity"].deployments["verity"]
        assert status.replica_states.get("RUNNING") == 2

        def send(index: int) -> dict:
            image = images[index % len(images)]
            for _ in range(20):  # a 503 (busy) says to try again later; anything else is an answer
                answer = httpx.post(f"{base}/v1/predict", files={"file": ("a.png", image)},
                                    data={"modality": "photo"}, timeout=60)  # fmt: skip
                if answer.status_code != 503:
                    break
                time.sleep(0.2)
            assert answer.status_code == 200, answer.text
            return {"index": index % len(images), **answer.json()}

        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(send, range(REQUESTS)))
    # Every answer audited exactly once, in the one PostgreSQL log both replicas write.
    with psycopg.connect(url) as connection:
        rows = connection.execute("SELECT request_id, score FROM predictions").fetchall()
    audited = {request_id: score for request_id, score in rows}
    assert len(rows) == len(audited) == REQUESTS
    assert {answer["request_id"] for answer in answers} == set(audited)
    # The same images in process: the same answers.
    settings = make_settings(tmp_path / "local", models_dir=models, rate_limit_per_s=0)
    with TestClient(create_app(settings)) as client:
        form = {"modality": "photo"}
        local = [client.post("/v1/predict", files={"file": ("a.png", image)}, data=form).json()
                 for image in images]  # fmt: skip
    for answer in answers:
        expected = local[answer["index"]]
        assert abs(answer["score"] - expected["score"]) <= 1e-4 and answer["verdict"] == expected["verdict"]
        assert abs(audited[answer["request_id"]] - answer["score"]) <= 1e-9
