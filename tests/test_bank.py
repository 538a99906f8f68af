"""The training bank (inference/bank.py): fp16 file round trip, deterministic subsampling, kNN novelty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from verity.inference.bank import (
    BankError,
    BruteForceSearch,
    build_bank,
    load_bank,
    novelty,
    save_bank,
    subsample_indices,
    unit_rows,
)


def random_rows(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def test_bank_round_trip_keeps_fp16_rows_labels_products_and_provenance(tmp_path: Path) -> None:
    embeddings = random_rows(50)
    labels = ["genuine", "counterfeit"] * 25
    products = [f"watch-{i % 3}" for i in range(50)]
    bank = build_bank(embeddings, labels, products, {"model": "tiny-photo", "split": "train"})
    assert bank.embeddings.dtype == np.float16 and bank.embeddings.shape == (50, 16) and bank.dim == 16
    np.testing.assert_allclose(np.linalg.norm(bank.embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    path = save_bank(bank, tmp_path / "models" / "bank.npz")
    assert path == tmp_path / "models" / "bank.npz" and path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["bank.npz"]  # no temporary left behind
    loaded = load_bank(path)
    assert loaded.embeddings.dtype == np.float16
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    assert loaded.labels.tolist() == labels and loaded.products.tolist() == products
    assert loaded.provenance == bank.provenance
    assert loaded.provenance["model"] == "tiny-photo" and loaded.provenance["total"] == 50
    # At an embedding width of 1280 (efficientnet_lite0), fp16 makes the file about half of float32.
    wide = save_bank(build_bank(random_rows(200, dim=1280), labels * 4, products * 4), tmp_path / "wide.npz")
    assert wide.stat().st_size < 0.55 * 200 * 1280 * 4


def test_bank_without_products_stores_empty_names(tmp_path: Path) -> None:
    loaded = load_bank(save_bank(build_bank(random_rows(4), ["genuine"] * 4), tmp_path / "bank.npz"))
    assert loaded.products.tolist() == [""] * 4


def test_subsampling_is_deterministic_and_bounded() -> None:
    embeddings = random_rows(100)
    labels = [str(i) for i in range(100)]
    first = build_bank(embeddings, labels, max_references=30, seed=1)
    again = build_bank(embeddings, labels, max_references=30, seed=1)
    other = build_bank(embeddings, labels, max_references=30, seed=2)
    keep = subsample_indices(100, 30, 1)
    assert len(first) == 30 and np.all(np.diff(keep) > 0)  # distinct rows, in their original order
    assert first.labels.tolist() == again.labels.tolist() == [str(i) for i in keep]
    assert other.labels.tolist() != first.labels.tolist()
    np.testing.assert_array_equal(first.embeddings, unit_rows(embeddings[keep]).astype(np.float16))
    assert first.provenance["total"] == 100 and first.provenance["max_references"] == 30
    assert first.provenance["seed"] == 1
    assert len(build_bank(embeddings, labels, max_references=100)) == 100  # at the limit: all rows


def direct_novelty(queries: np.ndarray, references: np.ndarray, k: int) -> np.ndarray:
    """1 - the mean of the k largest cosine similarities, by a full sort in float64."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    r = references.astype(np.float64)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    similarity = np.sort(q @ r.T, axis=1)[:, ::-1]
    return 1.0 - similarity[:, :k].mean(axis=1)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_novelty_matches_a_direct_computation(k: int) -> None:
    bank = build_bank(random_rows(40), ["genuine"] * 40)
    queries = random_rows(7, seed=3).astype(np.float64) * 3.0  # unnormalised on purpose
    expected = direct_novelty(queries, bank.embeddings, k)
    np.testing.assert_allclose(novelty(queries, bank, k), expected, atol=1e-5)
    single = novelty(queries[0], bank, k)  # one embedding alone is a batch of one
    np.testing.assert_allclose(single, expected[:1], atol=1e-5)


def test_search_returns_the_nearest_references_first() -> None:
    references = random_rows(30)
    queries = unit_rows(random_rows(4, seed=5))
    similarities, indices = BruteForceSearch(references).search(queries, 3)
    full = queries.astype(np.float64) @ unit_rows(references).T.astype(np.float64)
    assert indices.tolist() == np.argsort(-full, axis=1)[:, :3].tolist()
    np.testing.assert_allclose(similarities, np.take_along_axis(full, indices, axis=1), atol=1e-6)


def test_an_image_in_the_bank_has_no_novelty_and_a_far_one_has_much() -> None:
    embeddings = random_rows(20)
    bank = build_bank(embeddings, ["genuine"] * 20)
    assert novelty(embeddings[4], bank, k=1)[0] == pytest.approx(0.0, abs=1e-3)
    opposite = -bank.embeddings.astype(np.float32).sum(axis=0)  # far from every reference at once
    assert novelty(opposite, bank, k=1)[0] > novelty(embeddings[4], bank, k=1)[0] + 0.5


def test_bank_errors_are_explicit(tmp_path: Path) -> None:
    bank = build_bank(random_rows(5), ["genuine"] * 5)
    with pytest.raises(BankError, match="k must be between 1"):
        novelty(random_rows(1), bank, k=6)
    with pytest.raises(BankError, match="dimension 8"):
        novelty(random_rows(1, dim=8), bank)
    with pytest.raises(BankError, match="as many labels"):
        build_bank(random_rows(5), ["genuine"] * 4)
    with pytest.raises(BankError, match="No reference bank"):
        load_bank(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BankError, match="not a readable"):
        load_bank(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", embeddings=np.zeros((2, 2), np.float16))
    with pytest.raises(BankError, match="lacks labels"):
        load_bank(tmp_path / "other.npz")
    np.savez(tmp_path / "pickled.npz", embeddings=np.zeros((2, 2), np.float16), labels=np.array([{}, {}]),
             products=np.array(["", ""]), provenance=np.array("{}"), format=np.array(1))
    with pytest.raises(BankError, match="not a readable"):  # object arrays would need pickle
        load_bank(tmp_path / "pickled.npz")


def test_a_bank_rows_left_out_novelty_leaves_its_whole_case_out() -> None:
    """Each training image's novelty against the bank without its case (identical case-mates would
    otherwise make it 0), as `novelty` gives it against a bank of the other cases; infinite where fewer
    than k rows lie outside its case."""
    from verity.inference.bank import left_out_novelty

    rng = np.random.default_rng(4)
    embeddings = np.repeat(rng.normal(size=(15, 8)), 2, axis=0)
    groups = np.repeat(np.arange(15), 2)
    bank = build_bank(embeddings, ["genuine"] * 30)
    left_out = left_out_novelty(bank, groups, k=3, chunk=7)
    for i in (0, 13, 29):
        others = build_bank(embeddings[groups != groups[i]], ["genuine"] * 28)
        assert left_out[i] == pytest.approx(novelty(embeddings[i][None], others, 3)[0], abs=1e-4)
    assert left_out.min() > 0.05
    assert left_out_novelty(bank, np.arange(30), k=1).max() == pytest.approx(0.0, abs=1e-3)  # its twin
    one_case = np.where(np.arange(30) < 28, 0, 1)
    assert np.isinf(left_out_novelty(bank, one_case, k=3)[:28]).all()
    with pytest.raises(BankError, match="group codes"):
        left_out_novelty(bank, groups[:5], k=3)
