"""The genuine reference store (inference/references/store.py): enrolment, replay, calibration and the check.

Most tests use `HandEngine`, an engine whose embedding of a flat grey image is a hand-made vector chosen
by its grey level, so distances and thresholds can be checked exactly while every image still goes
through the server's decode path (`embed_image`). The embedding path itself is checked on the tiny ONNX
model with an embedding output.
"""

from __future__ import annotations

import io
import json
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from api_fixtures import image_bytes
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.inference.decode_limits import DecodeError
from verity.inference.engine import OnnxEngine, Prediction, Thresholds
from verity.inference.references.check import MIN_REFERENCES, calibrate, embed_image
from verity.inference.references.errors import (
    InvalidName,
    NoEmbedding,
    ReferenceConflict,
    ReferenceStoreError,
    UnknownProduct,
    UnknownReference,
)
from verity.inference.references.events import EVENTS_FILE
from verity.inference.references.names import validate_product
from verity.inference.references.store import ReferenceStore
from verity.inference.tiling import TilingOptions, load_for_scoring, score_scan
from verity.inference.vocabulary import REFERENCE_STATUSES

MODEL = "hand"


def unit(vector: list[float]) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float32)
    return array / np.linalg.norm(array)


def angle_vector(degrees: float) -> np.ndarray:
    """A unit vector in the first two dimensions of 3, at this angle: cos distance is 1 - cos(delta)."""
    radians = np.deg2rad(degrees)
    return unit([float(np.cos(radians)), float(np.sin(radians)), 0.0])


class HandEngine:
    """An `Engine` that embeds a flat grey image as vectors[grey level]; counts the images it embedded."""

    thresholds = Thresholds(alarm=0.9, clear=0.1)
    novelty_gate = None

    def __init__(self, vectors: dict[int, np.ndarray], name: str = MODEL, embedding: bool = True) -> None:
        self.name, self.version, self.precision = name, "1", "fp32"
        self.path = Path("hand/model.onnx")
        self.feature_alignment = "corner"  # a convolutional net as Verity trains them
        self.spec = tiny_spec("photo", 32)
        self.card = SimpleNamespace(embedding_dim=3 if embedding else None)
        self.output_names = ["logits", "cam"] + (["embedding"] if embedding else [])
        self.vectors = vectors
        self.calls = 0

    def predict(self, inputs: list[np.ndarray] | np.ndarray, with_cam: bool = False) -> list[Prediction]:
        self.calls += len(inputs)
        return [
            Prediction(0.5, (0.0, 0.0), embedding=self.vectors[round(float(x.mean()) * 255)]) for x in inputs
        ]


# Grey levels 10, 20, ... 90 at angles 0, 10, 20, ... degrees; level 200 far off, 201 near level 10.
ANGLES = {10 * (i + 1): 10.0 * i for i in range(9)}
VECTORS = {level: angle_vector(angle) for level, angle in ANGLES.items()}
VECTORS[200] = unit([0.0, 0.0, 1.0])
VECTORS[201] = angle_vector(3.0)


def enrol(
    store: ReferenceStore, engine: HandEngine, product: str, levels: list[int], **extra: Any
) -> list[Any]:
    embed = store.embedder(engine)
    return [
        store.add(
            MODEL,
            product,
            image_bytes(level),
            source=f"{level}.png",
            actor="tester",
            role="admin",
            embed=embed,
            **extra,
        )
        for level in levels
    ]


def events(root: Path) -> list[dict[str, Any]]:
    path = root / MODEL / EVENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_add_duplicate_conflict_remove_and_replay(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    (first,) = enrol(store, engine, "acme-watch", [10])
    assert first.status == "added" and len(first.sha256) == 64
    (again,) = enrol(store, engine, "acme-watch", [10])
    assert (again.status, again.reference_id) == ("duplicate", first.reference_id)
    assert len(events(tmp_path / "refs")) == 1  # a duplicate writes nothing
    with pytest.raises(ReferenceConflict, match="'acme-watch'") as conflict:
        enrol(store, engine, "other-product", [10])
    assert conflict.value.product == "acme-watch"
    image = tmp_path / "refs" / MODEL / "images" / first.sha256[:2] / f"{first.sha256}.png"
    assert image.read_bytes() == image_bytes(10)

    (reference,) = store.references(MODEL, "acme-watch")
    assert (reference.actor, reference.role, reference.source) == ("tester", "admin", "10.png")
    removed = store.remove(MODEL, first.reference_id, actor="tester-2", role="admin")
    assert removed.reference_id == first.reference_id
    assert store.products(MODEL) == {} and image.exists()  # the image stays for the audit trail
    with pytest.raises(UnknownReference, match="already removed"):
        store.remove(MODEL, first.reference_id, actor="tester", role="admin")
    with pytest.raises(UnknownReference, match="no reference"):
        store.remove(MODEL, "f" * 32, actor="tester", role="admin")
    assert [e["action"] for e in events(tmp_path / "refs")] == ["add", "remove"]
    assert events(tmp_path / "refs")[1]["actor"] == "tester-2"

    # Re-added after its removal: a new reference; a new store replays the same set.
    (back,) = enrol(store, engine, "other-product", [10, 20])[:1]
    reopened = ReferenceStore(tmp_path / "refs")
    assert reopened.products(MODEL) == {"other-product": 2}
    assert [r.reference_id for r in reopened.references(MODEL, "other-product")][0] == back.reference_id


@pytest.mark.parametrize("name", ["", "Acme", "-watch", "a" * 65, "a/b", "..", "a b", "acme\n"])
def test_bad_product_names_are_refused(tmp_path: Path, name: str) -> None:
    store = ReferenceStore(tmp_path / "refs")
    with pytest.raises(InvalidName, match="Invalid product name"):
        enrol(store, HandEngine(VECTORS), name, [10])
    assert not (tmp_path / "refs").exists()


@pytest.mark.parametrize("name", ["a", "acme-watch_x2.v1", "0" * 64])
def test_good_product_names(name: str) -> None:
    assert validate_product(name) == name


def test_a_bad_image_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = ReferenceStore(tmp_path / "refs")
    with pytest.raises(DecodeError):
        store.add(
            MODEL,
            "acme",
            b"not an image at all",
            source="x",
            actor=None,
            role=None,
            embed=store.embedder(HandEngine(VECTORS)),
        )
    assert not (tmp_path / "refs").exists()


def test_a_failed_audit_write_records_nothing(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)

    def failing(event: dict[str, Any]) -> None:
        raise RuntimeError("audit down")

    with pytest.raises(RuntimeError, match="audit down"):
        enrol(store, engine, "acme", [10], on_event=failing)
    assert events(tmp_path / "refs") == [] and store.products(MODEL) == {}
    assert not list((tmp_path / "refs" / MODEL).rglob("*.png"))
    seen: list[dict[str, Any]] = []
    (done,) = enrol(store, engine, "acme", [10], on_event=seen.append)
    assert seen == events(tmp_path / "refs")
    assert seen[0]["reference_id"] == done.reference_id and seen[0]["sha256"] == done.sha256

    with pytest.raises(RuntimeError, match="audit down"):
        store.remove(MODEL, done.reference_id, actor="x", role="admin", on_event=failing)
    assert store.products(MODEL) == {"acme": 1}


def test_loo_threshold_is_mean_plus_z_std_of_nearest_other_distances() -> None:
    angles = [0.0, 10.0, 25.0, 45.0, 50.0, 80.0]
    rows = np.stack([angle_vector(a) for a in angles])
    calibration = calibrate(rows, false_alarm_rate=0.05)
    # d_i by hand: the smallest angle to another reference, as a cosine distance.
    nearest = [min(abs(a - b) for b in angles if b != a) for a in angles]
    distances = [1.0 - np.cos(np.deg2rad(delta)) for delta in nearest]
    z = statistics.NormalDist().inv_cdf(0.95)
    expected = statistics.mean(distances) + z * statistics.stdev(distances)
    assert calibration.loo == pytest.approx(distances, abs=1e-6)
    assert calibration.threshold == pytest.approx(expected, abs=1e-6)
    assert calibration.spread == pytest.approx(statistics.stdev(distances), abs=1e-6)
    # Identical distances: no spread, which is floored so margins stay finite.
    square = np.stack([angle_vector(a) for a in (0.0, 90.0, 180.0, 270.0, 360.0 - 1e-9)])[:4]
    flat = calibrate(square, min_references=4)
    assert flat.threshold == pytest.approx(1.0) and flat.spread == 1e-6


def test_check_matches_near_and_flags_far_images(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs", false_alarm_rate=0.01), HandEngine(VECTORS)
    levels = [10, 20, 30, 40, 60, 90]  # angles 0, 10, 20, 30, 50, 80
    enrol(store, engine, "acme", levels)
    expected = calibrate(np.stack([VECTORS[level] for level in levels]), 0.01)
    near = store.check(engine, "acme", VECTORS[201])
    assert near.status == "match" and near.distance == pytest.approx(1 - np.cos(np.deg2rad(3.0)), abs=1e-6)
    assert near.threshold == pytest.approx(expected.threshold) and near.references == 6
    far = store.check(engine, "acme", VECTORS[200])
    assert far.status == "mismatch" and far.distance == pytest.approx(1.0, abs=1e-6)
    assert far.margin == pytest.approx((far.distance - expected.threshold) / expected.spread)
    assert {near.status, far.status} <= set(REFERENCE_STATUSES)
    summary = store.calibration(engine, "acme")
    assert summary["status"] == "calibrated" and summary["threshold"] == pytest.approx(expected.threshold)
    assert summary["loo_distances"]["mean"] == pytest.approx(statistics.mean(expected.loo))
    assert summary["false_alarm_rate"] == 0.01 and summary["min_references"] == MIN_REFERENCES


def test_fewer_than_the_minimum_abstains(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    enrol(store, engine, "acme", [10, 20, 30, 40])
    check = store.check(engine, "acme", VECTORS[200])
    assert (check.status, check.threshold, check.margin) == ("abstained", None, None)
    assert check.references == 4 and check.min_references == MIN_REFERENCES == 5
    assert check.distance == pytest.approx(1.0, abs=1e-6)
    assert store.calibration(engine, "acme")["status"] == "abstains"
    enrol(store, engine, "acme", [50])
    assert store.check(engine, "acme", VECTORS[200]).status == "mismatch"


def test_unknown_product_names_the_known_ones(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    with pytest.raises(UnknownProduct) as nothing:
        store.check(engine, "acme", VECTORS[10])
    assert nothing.value.known == [] and "No product has references yet" in str(nothing.value)
    enrol(store, engine, "zeta", [10])
    enrol(store, engine, "acme", [20])
    with pytest.raises(UnknownProduct) as unknown:
        store.check(engine, "nope", VECTORS[10])
    assert unknown.value.product == "nope" and unknown.value.known == ["acme", "zeta"]
    assert "Known products: acme, zeta." in str(unknown.value)
    with pytest.raises(UnknownProduct):
        store.references(MODEL, "nope")


def test_the_index_sees_another_instances_enrolments(tmp_path: Path) -> None:
    server, cli = ReferenceStore(tmp_path / "refs"), ReferenceStore(tmp_path / "refs")
    engine = HandEngine(VECTORS)
    enrol(server, engine, "acme", [10, 20, 30, 40])
    assert server.check(engine, "acme", VECTORS[200]).status == "abstained"
    (added,) = enrol(cli, HandEngine(VECTORS), "acme", [50])
    seen = server.check(engine, "acme", VECTORS[200])
    assert (seen.references, seen.status) == (5, "mismatch")
    cli.remove(MODEL, added.reference_id, actor="x", role="admin")
    assert server.check(engine, "acme", VECTORS[200]).references == 4


def test_check_if_ready_answers_only_from_a_current_index(tmp_path: Path) -> None:
    """The serving path's check: None until the index is built, then the same answer as `check`, and
    None again once another instance (the CLI) changed the product's references."""
    server, cli = ReferenceStore(tmp_path / "refs"), ReferenceStore(tmp_path / "refs")
    engine = HandEngine(VECTORS)
    enrol(server, engine, "acme", [10, 20, 30, 40, 60])
    assert server.check_if_ready(engine, "acme", VECTORS[200]) is None  # the index is not built yet
    built = server.check(engine, "acme", VECTORS[200])
    assert server.check_if_ready(engine, "acme", VECTORS[200]) == built and built.status == "mismatch"
    assert server.check_if_ready(engine, "zeta", VECTORS[200]) is None  # not a product of the index
    enrol(cli, HandEngine(VECTORS), "acme", [90])
    assert server.check_if_ready(engine, "acme", VECTORS[200]) is None and not server.ready(engine, "acme")
    assert server.check(engine, "acme", VECTORS[200]).references == 6
    assert server.check_if_ready(engine, "acme", VECTORS[200]).references == 6


def test_an_engines_key_is_worked_out_once(tmp_path: Path) -> None:
    """engine_key stats the model file once per engine object: a served model's key cannot change."""
    from verity.inference.references import check

    model = tmp_path / "model.onnx"
    model.write_bytes(b"weights")
    engine, other = HandEngine(VECTORS), HandEngine(VECTORS)
    engine.path = other.path = model
    first = check.engine_key(engine)
    model.write_bytes(b"re-exported weights")  # a new file: a new engine (a reload) gets a new key
    assert check.engine_key(engine) == first
    assert check.engine_key(other) != first


def test_stored_images_are_embedded_once_then_cached(tmp_path: Path) -> None:
    enrolling = HandEngine(VECTORS)
    enrol(ReferenceStore(tmp_path / "refs"), enrolling, "acme", [10, 20, 30, 40, 50])
    assert enrolling.calls == 5
    fresh = HandEngine(VECTORS)  # another process: nothing in memory, so the stored images are embedded
    assert ReferenceStore(tmp_path / "refs").check(fresh, "acme", VECTORS[10]).status == "match"
    assert fresh.calls == 5
    assert len(list((tmp_path / "refs" / MODEL / "embeddings").glob("*.npz"))) == 1
    cached = HandEngine(VECTORS)
    assert ReferenceStore(tmp_path / "refs").check(cached, "acme", VECTORS[10]).references == 5
    assert cached.calls == 0  # from the embeddings cache
    other = HandEngine({level: -vector for level, vector in VECTORS.items()})
    other.version = "2"  # another model file: its own embeddings, never the cached ones
    assert ReferenceStore(tmp_path / "refs").check(other, "acme", -VECTORS[10]).status == "match"
    assert other.calls == 5


def test_enrolment_embeddings_go_to_the_cache(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    enrol(store, engine, "acme", [10, 20, 30, 40, 50])
    assert store.check(engine, "acme", VECTORS[10]).status == "match"
    assert engine.calls == 5  # the enrolment's embeddings were used, not computed again
    restarted = HandEngine(VECTORS)
    assert ReferenceStore(tmp_path / "refs").check(restarted, "acme", VECTORS[10]).references == 5
    assert restarted.calls == 0


def test_files_are_private(tmp_path: Path) -> None:
    enrol(ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS), "acme", [10])
    model = tmp_path / "refs" / MODEL
    assert (model / EVENTS_FILE).stat().st_mode & 0o777 == 0o600
    (image,) = (model / "images").rglob("*.png")
    assert image.stat().st_mode & 0o777 == 0o600 and image.parent.stat().st_mode & 0o777 == 0o700
    assert model.stat().st_mode & 0o777 == 0o700


def test_a_model_without_embeddings_is_refused(tmp_path: Path) -> None:
    store = ReferenceStore(tmp_path / "refs")
    with pytest.raises(NoEmbedding, match="no embedding output"):
        store.embedder(HandEngine(VECTORS, embedding=False))
    enrol(store, HandEngine(VECTORS), "acme", [10])
    with pytest.raises(NoEmbedding):
        store.check(HandEngine(VECTORS, embedding=False), "acme", VECTORS[10])


def test_an_unfinished_last_event_line_is_ignored_then_cut(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    enrol(store, engine, "acme", [10])
    path = tmp_path / "refs" / MODEL / EVENTS_FILE
    with path.open("a") as out:
        out.write('{"action": "add", "reference_id": "half')  # a crash mid-append
    assert ReferenceStore(tmp_path / "refs").products(MODEL) == {"acme": 1}
    enrol(store, engine, "acme", [20])
    assert len(events(tmp_path / "refs")) == 2  # the half line was cut, the new one is whole
    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(ReferenceStoreError, match="line 3 is not a JSON event"):
        ReferenceStore(tmp_path / "refs").products(MODEL)


def test_concurrent_enrolments_are_all_recorded(tmp_path: Path) -> None:
    store, engine = ReferenceStore(tmp_path / "refs"), HandEngine(VECTORS)
    levels = list(ANGLES)
    threads = [threading.Thread(target=enrol, args=(store, engine, "acme", [level])) for level in levels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.products(MODEL) == {"acme": len(levels)}
    assert len({e["reference_id"] for e in events(tmp_path / "refs")}) == len(levels)


def test_embed_image_is_the_servers_embedding(tmp_path: Path) -> None:
    spec = tiny_spec("photo", 32)
    path = tiny_onnx(
        tmp_path / "m" / "model.onnx", spec, tiny_card(spec, "photo-ref"), features=8, embedding=True
    )
    engine = OnnxEngine(path, provider="cpu", warmup=False)
    data = image_bytes(180, size=(64, 48))
    options = TilingOptions()
    vector = embed_image(engine, data, options)
    served = engine.predict([load_for_scoring(data, engine.spec, options).model_input])[0].embedding
    assert vector.shape == (8,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, served, atol=1e-6)
    plain = tiny_onnx(tmp_path / "p" / "model.onnx", spec, tiny_card(spec, "plain"))
    with pytest.raises(NoEmbedding):
        embed_image(OnnxEngine(plain, provider="cpu", warmup=False), data, options)


def test_a_long_scan_is_embedded_as_the_server_scores_it_in_tiles(tmp_path: Path) -> None:
    spec = tiny_spec("xray", 32)
    path = tiny_onnx(
        tmp_path / "x" / "model.onnx", spec, tiny_card(spec, "xray-ref"), features=8, embedding=True
    )
    engine = OnnxEngine(path, provider="cpu", warmup=False)
    rng = np.random.default_rng(3)
    scan = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 600), dtype=np.uint8)).save(scan, format="PNG")
    options = TilingOptions()
    loaded = load_for_scoring(scan.getvalue(), engine.spec, options)
    assert loaded.pixels is not None  # longer than 8 model inputs: tiled by the one rule
    expected = score_scan(loaded.pixels, engine, options).output.embedding
    np.testing.assert_allclose(embed_image(engine, scan.getvalue(), options), expected, atol=1e-6)
