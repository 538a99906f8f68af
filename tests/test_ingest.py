"""Ingestion: rejection report, dedupe, near-duplicates, grouped splits, append stability, stats, CLI."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from verity.datasets.cli import main as data_main
from verity.datasets.hashing import dhash, near_duplicate_pairs
from verity.datasets.ingest import IngestOptions, ingest
from verity.datasets.manifest import read_manifest
from verity.datasets.split import assign_groups, split_fractions

OPTIONS = IngestOptions(modality="photo", progress=False, workers=2)


def _image(seed: int, size: int = 32) -> Image.Image:
    """A small image unlike any other seed's: coarse random blocks scaled up (distinct dHash)."""
    blocks = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.BILINEAR)


def _write(path: Path, seed: int, fmt: str = "PNG", **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed).save(path, fmt, **options)
    return path


def _report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_ingest_reports_every_rejection_and_duplicate(tmp_path):
    src = tmp_path / "seizure"
    for i in range(4):
        _write(src / "genuine" / f"g{i}.png", i)
        _write(src / "Fake" / "box" / f"c{i}.png", 100 + i)  # label folder at any depth, any case
    _write(src / "real" / "r0.png", 50)  # real -> genuine
    (src / "genuine" / "copy_of_g0.png").write_bytes((src / "genuine" / "g0.png").read_bytes())
    _write(src / "counterfeit" / "g1_reencoded.jpg", 1, "JPEG", quality=95)  # near-dup of g1, other label
    (src / "counterfeit" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "genuine" / "notes.txt").write_text("seizure notes")
    _write(src / "unsorted" / "u.png", 60)
    _write(src / "genuine" / "fake" / "both.png", 61)
    out = tmp_path / "data" / "manifest.jsonl"

    result = ingest(src, out, OPTIONS)

    rows = list(read_manifest(out))
    assert result.seen == 15 and result.accepted == len(rows) == 10
    report = _report(result.report)
    rejected = {r["path"]: r for r in report if r["kind"] == "rejected"}
    assert set(rejected) == {
        "counterfeit/broken.jpg",
        "genuine/notes.txt",
        "unsorted/u.png",
        "genuine/fake/both.png",
    }
    assert rejected["counterfeit/broken.jpg"]["code"] == "undecodable_image"
    assert rejected["genuine/notes.txt"]["code"] == "unsupported_media_type"
    assert rejected["unsorted/u.png"]["code"] == "no_label"
    assert rejected["genuine/fake/both.png"]["code"] == "ambiguous_folder"
    duplicates = [r for r in report if r["kind"] == "duplicate"]
    # files are read in sorted order, so the copy (c < g) is the one kept
    assert len(duplicates) == 1 and not duplicates[0]["label_conflict"]
    assert duplicates[0]["path"] == "genuine/g0.png" and duplicates[0]["kept"].endswith(
        "genuine/copy_of_g0.png"
    )
    near = [r for r in report if r["kind"] == "near_duplicate"]
    assert len(near) == 1 and near[0]["cross_label"] and near[0]["severity"] == "warning"
    assert {m["path"].rsplit("/", 1)[-1] for m in near[0]["members"]} == {"g1.png", "g1_reencoded.jpg"}
    summary = report[-1]
    assert summary["kind"] == "summary" and sum(summary["rejected"].values()) == 4
    labels = Counter(row.label for row in rows)
    assert labels == {"genuine": 5, "counterfeit": 5}
    assert all(row.sha256 and row.split and row.meta and "dhash" in row.meta for row in rows)
    # images outside the manifest folder are stored with absolute paths
    assert all(Path(row.path).is_absolute() and Path(row.path).exists() for row in rows)


def _seizure_csv(folder: Path, cases: range, per_case: int = 3, seed_offset: int = 0) -> Path:
    rows = []
    for case in cases:
        label = "counterfeit" if case % 3 == 0 else "genuine"
        for k in range(per_case):
            image = _write(folder / "img" / f"case{case}_{k}.png", seed_offset + case * 10 + k)
            rows.append(
                {
                    "path": f"img/{image.name}",
                    "label": label,
                    "case_id": f"C{case}",
                    "product": f"P{case % 4}",
                    "station": "north",
                }
            )
    table = folder / "seizure.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def _case_splits(manifest: Path) -> dict[str, set[str]]:
    splits: dict[str, set[str]] = defaultdict(set)
    for row in read_manifest(manifest):
        splits[str(row.case_id)].add(str(row.split))
    return splits


def test_grouped_split_is_stratified_and_reproducible(tmp_path):
    table = _seizure_csv(tmp_path / "s1", range(40))
    first = ingest(table, tmp_path / "a.jsonl", IngestOptions(modality="photo", seed=7, progress=False))
    assert first.accepted == 120
    case_splits = _case_splits(tmp_path / "a.jsonl")
    assert all(len(splits) == 1 for splits in case_splits.values())  # no case in two splits
    per_split = {split: Counter() for split in ("train", "val", "test")}
    for row in read_manifest(tmp_path / "a.jsonl"):
        per_split[str(row.split)][row.label] += 1
        assert row.meta == {"station": "north", "dhash": row.meta["dhash"]}  # extra columns kept in meta
    for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        for label, total in (("genuine", 78), ("counterfeit", 42)):
            assert abs(per_split[split][label] / total - share) < 0.1, (split, label, per_split)
    ingest(table, tmp_path / "b.jsonl", IngestOptions(modality="photo", seed=7, progress=False))
    assert _case_splits(tmp_path / "b.jsonl") == case_splits
    ingest(table, tmp_path / "c.jsonl", IngestOptions(modality="photo", seed=8, progress=False))
    assert _case_splits(tmp_path / "c.jsonl") != case_splits


def test_append_keeps_existing_rows_and_groups(tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    ingest(_seizure_csv(tmp_path / "s1", range(12)), manifest, OPTIONS)
    before = manifest.read_text().splitlines()
    before_cases = _case_splits(manifest)

    # a second seizure: more photos of known cases 0-5 plus new cases 20-29
    second = _seizure_csv(tmp_path / "s2", [*range(6), *range(20, 30)], per_case=2, seed_offset=5000)
    result = ingest(second, manifest, OPTIONS)
    after = manifest.read_text().splitlines()
    assert after[: len(before)] == before  # existing rows untouched, byte for byte
    assert result.existing == len(before) and result.accepted == 32 and len(after) == len(before) + 32
    after_cases = _case_splits(manifest)
    assert all(len(splits) == 1 for splits in after_cases.values())
    for case, splits in before_cases.items():
        assert after_cases[case] == splits  # new rows of a known case joined its split

    again = ingest(second, manifest, OPTIONS)  # the same seizure twice: all exact duplicates
    assert again.accepted == 0 and again.duplicates == 32
    assert manifest.read_text().splitlines() == after


def test_jsonl_source_with_bad_rows(tmp_path):
    _write(tmp_path / "scan.png", 1)
    deep = (np.arange(32 * 32).reshape(32, 32) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "scan16.png")
    lines = [
        {"path": "scan.png", "label": "authentic", "modality": "xray", "case_id": 7},
        {"path": "scan16.png", "label": "fake", "product": "charger", "meta": {"scanner": "S1"}},
        {"path": "missing.png", "label": "genuine"},
        {"path": "scan.png", "label": "maybe"},
        {"path": "scan.png", "label": "genuine", "modality": "ultrasound"},
    ]
    table = tmp_path / "rows.jsonl"
    table.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    result = ingest(table, tmp_path / "out" / "m.jsonl", IngestOptions(modality="xray", progress=False))
    rows = {row.path: row for row in read_manifest(tmp_path / "out" / "m.jsonl")}
    assert result.accepted == 2 and len(rows) == 2
    by_name = {Path(path).name: row for path, row in rows.items()}
    assert by_name["scan.png"].label == "genuine" and by_name["scan.png"].case_id == "7"
    assert by_name["scan16.png"].meta["scanner"] == "S1" and by_name["scan16.png"].modality == "xray"
    codes = Counter(r["code"] for r in _report(result.report) if r["kind"] == "rejected")
    assert codes == {"unreadable": 1, "bad_label": 1, "bad_modality": 1, "bad_row": 1}


def test_split_assignment_reaches_targets_and_bad_fractions_are_refused():
    groups = {
        f"case:{i}": Counter({"genuine": 1 + i % 5} if i % 2 else {"counterfeit": 1 + i % 3})
        for i in range(300)
    }
    placed = assign_groups(groups, split_fractions(0.2, 0.1), seed=1)
    totals = {split: Counter() for split in ("train", "val", "test")}
    for key, split in placed.items():
        totals[split].update(groups[key])
    for label in ("genuine", "counterfeit"):
        whole = sum(totals[s][label] for s in totals)
        assert (
            abs(totals["val"][label] / whole - 0.2) < 0.02 and abs(totals["test"][label] / whole - 0.1) < 0.02
        )
    with pytest.raises(ValueError, match="val \\+ test < 1"):
        split_fractions(0.6, 0.5)


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 700, dtype=np.uint64)
    hashes[10] = hashes[500] ^ np.uint64(0b101)  # distance 2
    found = {
        (int(i), int(j))
        for a, b, _ in near_duplicate_pairs(hashes, 3, chunk=64)
        for i, j in zip(a, b, strict=True)
    }
    expected = {
        (i, j)
        for i in range(700)
        for j in range(i + 1, 700)
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 3
    }
    assert (10, 500) in found and found == expected
    image = np.asarray(_image(1), dtype=np.float32).transpose(2, 0, 1) / 255
    assert dhash(image) == dhash(image * 0.9)  # brightness changes keep the hash
    # letterbox padding is trimmed before hashing: the same scan padded differently hashes alike
    padded = np.ones((3, 64, 64), np.float32)
    padded[:, 16:48, 16:48] = image
    assert dhash(padded, trim_value=1.0) == dhash(image, trim_value=1.0) != dhash(padded)


def test_cli_ingest_stats_and_dispatch(tmp_path, capsys):
    _write(tmp_path / "src" / "genuine" / "a.png", 1)
    _write(tmp_path / "src" / "counterfeit" / "b.png", 2)
    manifest = tmp_path / "m.jsonl"
    assert (
        data_main(
            [
                "ingest",
                str(tmp_path / "src"),
                "--out",
                str(manifest),
                "--modality",
                "photo",
                "--report",
                str(tmp_path / "rejected.jsonl"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "accepted" in capsys.readouterr().out and (tmp_path / "rejected.jsonl").exists()
    assert data_main(["stats", str(manifest)]) == 0
    printed = capsys.readouterr().out
    assert "2 images, 1 genuine, 1 counterfeit" in printed and "photo" in printed and "no group" in printed
    assert data_main(["bogus"]) == 2
    assert "Valid subcommands: synth, ingest, stats." in capsys.readouterr().err
    # nothing accepted -> exit 1 with the reasons in the report
    (tmp_path / "junk" / "genuine").mkdir(parents=True)
    (tmp_path / "junk" / "genuine" / "x.jpg").write_bytes(b"nope")
    assert (
        data_main(
            [
                "ingest",
                str(tmp_path / "junk"),
                "--out",
                str(tmp_path / "j.jsonl"),
                "--modality",
                "photo",
                "--no-progress",
            ]
        )
        == 1
    )
    with pytest.raises(SystemExit):
        data_main(["ingest", str(tmp_path / "src"), "--out", str(manifest), "--val", "1.5"])
    with pytest.raises(ValueError, match="pass --modality"):
        data_main(["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "n.jsonl")])


def test_manifest_inside_the_image_tree_is_not_ingested(tmp_path):
    _write(tmp_path / "genuine" / "a.png", 1)
    _write(tmp_path / "counterfeit" / "b.png", 2)
    manifest = tmp_path / "manifest.jsonl"
    first = ingest(tmp_path, manifest, OPTIONS)
    assert first.accepted == 2 and not first.rejected
    rows = list(read_manifest(manifest))
    assert {row.path for row in rows} == {
        "genuine/a.png",
        "counterfeit/b.png",
    }  # relative: below the manifest
    again = ingest(tmp_path, manifest, OPTIONS)  # appends: manifest and report are not images to ingest
    assert again.accepted == 0 and again.duplicates == 2 and not again.rejected
