"""The benchmark machinery itself works: short runs of the decode and server-overhead parts, reported.

The figures are `make bench`'s job; here only that the parts run, measure something and print it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from benchmarks import decode_bench, run_all, server_overhead
from benchmarks.common import cpu_info

pytestmark = pytest.mark.slow


def test_decode_bench_reports_the_serving_path_and_its_stages() -> None:
    figures = decode_bench.run(seconds=0.2)
    assert figures["decoded_shape"] == [192, 256, 3]  # the 1024x768 JPEG decoded at 1/4 scale
    assert 0 < figures["load_for_model_cpu_best_of_5_ms"] <= figures["naive_full_decode_cpu_ms"] * 2
    stages = figures["stages_cpu_median_ms"]
    assert set(stages) == {"jpeg_draft_decode", "resize", "scale_to_chw"} and min(stages.values()) > 0
    text = run_all.report({"cpu": cpu_info(), "decode": figures})
    assert "(c) decode+preprocess" in text and "stages, timed in turns: jpeg_draft_decode" in text


def test_server_overhead_measures_a_real_server(tmp_path: Path) -> None:
    figures = server_overhead.run(tmp_path, seconds=2)
    if shutil.which("wrk") is None:
        assert figures is None  # nothing to drive the server with: the part says so and is left out
        return
    assert figures is not None and figures["errors"] == 0 and figures["rps"] > 0
    assert 0 < figures["event_loop_cpu_ms_per_request"] < figures["cpu_ms_per_request"]
    text = run_all.report({"cpu": cpu_info(), "overhead": figures})
    assert "Server cost besides the model" in text


def test_open_set_cost_measures_in_process_and_on_two_servers(tmp_path: Path) -> None:
    from benchmarks import open_set_cost

    figures = open_set_cost.run(tmp_path, rounds=2, batch=2)
    inside = figures["in_process"]
    assert figures["bank_rows"] == inside["bank_rows"] == 10_000 and figures["references"] == 20
    assert inside["predict_ms"] > 0 and inside["novelty_ms"] > 0 and inside["reference_check_ms"] > 0
    server = figures["server"]
    assert server["requests_each"] == 4 and server["cpu_ms_per_request_without"] > 0
    assert server["cpu_ms_per_request_with_checks"] > 0
    kinds = {"plain", "gate", "plain_recognised", "gate_recognised", "gate_and_product"}
    assert set(server["cpu_ms_per_request"]) == kinds
    assert set(server["added_share"]) == {"gate", "gate_recognised", "gate_and_product"}
    assert all(len(bounds) == 2 for bounds in server["added_share_range"].values())
    assert "not-recognised gate" in open_set_cost.summary(figures)
    assert "target <= 10%" in open_set_cost.summary(figures)
    assert "for one it recognises" in open_set_cost.summary(figures)


def test_the_non_product_images_keep_their_groups_and_probes_apart() -> None:
    import io

    from PIL import Image

    from benchmarks.ood_images import PROBE, ood_images

    images = ood_images(faces=3, probes=True)
    groups = {image.group for image in images}
    assert {"found: photographs", "found: faces", "drawn: flat", "drawn: noise", "drawn: gradient"} <= groups
    sizes = {}
    for image in images:
        with Image.open(io.BytesIO(image.data)) as opened:
            sizes.setdefault(image.group, set()).add(opened.size)
    assert sizes["found: faces"] == {(25, 25)}
    assert sizes[PROBE + "faces at 100 px"] == {(100, 100)}
    assert sizes[PROBE + "grey photos at 48 px"] == {(48, 48)}
    assert not any(image.group.startswith(PROBE) for image in ood_images(faces=3))


def test_foreign_images_are_scored_per_group_through_the_pipeline() -> None:
    """The foreign set's groups are there (generated, bundled, or read from installed packages), and a
    shipped model scores them: the counts add up and the table prints every group."""
    from benchmarks import foreign_bench, foreign_images
    from benchmarks.ood_images import OodImage

    images = foreign_images.foreign_images(probes=False)
    groups = {image.group for image in images}
    expected = {"library photos", "library photos in grey", "faces in grey at 128 px", "product photos",
                "pseudo-colour scans", "medical DICOM"}  # fmt: skip
    assert expected <= groups and len(images) >= 200
    few: list[OodImage] = [next(im for im in images if im.group == group) for group in sorted(groups)]
    root = Path(__file__).resolve().parents[1]
    result = foreign_bench.measure(root / "checkpoints" / "xray-default" / "1.1.0", few)
    assert result["total"] == dict.fromkeys(sorted(groups), 1) and result["modality"] == "xray"
    # As measured over the whole groups (README): no confident verdict on a photo or a medical scan.
    assert result["confident"].get("library photos", 0) == result["confident"].get("medical DICOM", 0) == 0
    table = foreign_bench.table([result])
    assert all(group in table for group in groups)


def test_foreign_bench_counts_own_test_images_flagged_in_every_file_form(tmp_path: Path) -> None:
    """`--forms`: each 8-bit grey test image of an X-ray run is written in every form a console writes
    and scored; a colour or a 16-bit test image is left out."""
    import shutil

    import numpy as np
    from PIL import Image

    from benchmarks import foreign_bench
    from benchmarks.real_encodings import FORMS
    from verity.datasets.manifest import ManifestRow, write_manifest
    from verity.inference.engine import OnnxEngine

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "xray-default" / "1.1.0"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.onnx", "card.json", "bank.npz", "profile.npz"):
        shutil.copy(shipped / name, run / name)
    rng, rows = np.random.default_rng(0), []
    for index in range(5):
        path = tmp_path / f"{index}.png"
        if index < 4:  # the fourth in colour: no grey form
            shape = (48, 64) if index < 3 else (48, 64, 3)
            Image.fromarray(rng.integers(40, 220, shape, dtype=np.uint8)).save(path)
        else:  # 16-bit: its forms are not written from it
            Image.fromarray(rng.integers(0, 65535, (48, 64), dtype=np.uint16)).save(path)
        rows.append(ManifestRow(str(path), "genuine", "xray", split="test"))
    rows.append(ManifestRow(str(tmp_path / "0.png"), "genuine", "xray", split="train"))  # not a test image
    write_manifest(run / "data.jsonl", rows)
    counts = foreign_bench.own_forms_flagged(OnnxEngine(run / "model.onnx", warmup=False), run)
    assert set(counts) == set(FORMS)
    assert all(scored == 3 and 0 <= flagged <= 3 for flagged, scored in counts.values()), counts
    table = foreign_bench.forms_table([{"model": "run", "own_test_flagged_by_form": counts}])
    assert all(name in table for name in FORMS) and "/3" in table


def test_the_request_stages_part_times_each_stage_and_prints_them() -> None:
    from benchmarks import request_stages

    figures = request_stages.measure(request_stages.ROOT / "checkpoints", rounds=3)
    medians = figures["median_ms"]
    assert {*request_stages.SERVER_STAGES, "model", "raw body", "image store"} <= set(medians)
    assert all(value >= 0 for value in medians.values()) and medians["model"] > 0
    own = sum(medians[stage] for stage in request_stages.SERVER_STAGES)
    assert figures["server_stages_ms"] == pytest.approx(own, abs=0.01)
    text = run_all.report({"cpu": cpu_info(), "stages": figures})
    assert "Per-request stages" in text and "multipart parse" in text


def test_make_bench_says_why_the_shipped_models_serve_fp32() -> None:
    rows = run_all.shipped_int8()
    assert {row["model"] for row in rows} >= {"photo-default/1.0.0", "xray-default/1.1.0"}
    text = run_all.report({"cpu": cpu_info(), "shipped_int8": rows})
    for row in rows:
        assert row["model"] in text
        if row["passed"] is False:  # the gate's own reasons, e.g. "verdict agreement 98.17% < 99%"
            assert all(reason in text for reason in row["reasons"]) and "fp32 serves" in text


def test_the_shadow_cost_line_measures_both_servers(tmp_path: Path) -> None:
    from benchmarks import shadow_cost

    figures = shadow_cost.run(tmp_path, rounds=2, batch=2)
    assert figures["requests_each"] == 4
    assert figures["plain"]["p50_ms"] > 0 and figures["shadow"]["p50_ms"] > 0
    assert any('outcome="scored"' in line for line in figures["shadow_outcomes"])
    assert "target <= +10%" in shadow_cost.summary(figures)


def test_the_oip_batch_line_times_both_routes(tmp_path: Path) -> None:
    from benchmarks import oip_batch

    figures = oip_batch.run(tmp_path, rounds=2)
    assert figures["items"] == 8 and figures["ratio"] > 0
    assert "target <= 1.3x" in oip_batch.summary(figures)


def test_the_throughput_line_prints_the_int8_limit_and_why_fp32_serves(tmp_path: Path) -> None:
    from benchmarks import throughput_limit
    from benchmarks.common import photo_jpeg

    model = next((Path(__file__).resolve().parents[1] / "checkpoints" / "photo-default").glob("*/model.onnx"))
    int8 = throughput_limit.int8_limit(model, photo_jpeg(640, 480, seed=3), 0.3, 1, tmp_path)
    assert int8["limit_images_per_s"] > 0 and (tmp_path / "int8" / "model.int8.onnx").is_file()
    row = {"concurrency": 32, "rps": 100.0, "p99_ms": 400.0}
    figures = {"cores": 2, "limit_images_per_s": 200.0, "int8": int8, "verity": {32: row, 4: row},
               "naive": {32: row}, "share_of_limit_c32": 0.5, "verity_over_naive_c32": 1.0,
               "little_mean_ms_c32": 320.0, "p99_over_little_c32": 1.25, "p99_ms_c4": 40.0,
               "load_average": 1.0}
    text = throughput_limit.summary(figures)
    assert "fp32 200.0 img/s, INT8" in text
    if int8["passed"] is False:  # the shipped card's own reasons, e.g. "verdict agreement 98.17% < 99%"
        assert "fp32 serves" in text and all(reason in text for reason in int8["reasons"])


def test_the_suite_table_stars_a_test_rate_outside_what_validation_predicted() -> None:
    from benchmarks import real_data

    counts = {"val_false_alarms": 1, "n_val_genuine": 157, "val_misses": 3, "n_val_counterfeit": 66,
              "test_genuine": 157, "test_counterfeit": 64}  # fmt: skip
    run = {"test_false_alarm_rate": 0.0, "target_false_alarm_rate": 0.01, "rate_counts": counts,
           "card_false_alarm_rate_ci": [0.0002, 0.035]}  # fmt: skip
    assert real_data.predicted_interval(run, "test_false_alarm_rate") == pytest.approx([0.0, 7 / 157])
    shifted = {**run, "test_false_alarm_rate": 12 / 157}
    old = {key: value for key, value in run.items() if key != "rate_counts"}  # recorded before the counts
    cell = real_data._rate_cell([run, shifted, old], "test_false_alarm_rate", "card_false_alarm_rate_ci")
    assert cell == "0.000 / 0.076* / 0.000*v (target 0.01)"


def test_a_candidate_recipe_is_compared_with_the_kept_baselines(tmp_path: Path, monkeypatch) -> None:
    from benchmarks import real_data

    def record(row: str, method: str, seed: int, auc: float) -> str:
        return json.dumps({"set": row, "method": method, "seed": seed, "test_roc_auc": auc})

    kept, candidate = tmp_path / "kept.jsonl", tmp_path / "candidate.jsonl"
    kept.write_text("\n".join([record("a", "baseline", 0, 0.8), record("a", "verity", 0, 0.9),
                               record("b", "baseline", 0, 0.7), record("c", "baseline", 0, 0.6)]) + "\n")
    candidate.write_text("\n".join([record("a", "verity", 0, 0.95), record("b", "verity", 0, 0.75),
                                    record("b", "baseline", 0, 0.72)]) + "\n")  # fmt: skip
    monkeypatch.setattr(real_data, "RESULTS", kept)
    runs = real_data.with_kept_baselines(candidate)
    # Its own Verity runs, the kept baseline of a row it ran none for, its own baseline where it ran one,
    # and nothing of a row it did not run.
    assert {key: run["test_roc_auc"] for key, run in runs.items()} == {
        ("a", "verity", 0): 0.95, ("a", "baseline", 0): 0.8, ("b", "verity", 0): 0.75,
        ("b", "baseline", 0): 0.72}  # fmt: skip
    assert real_data.with_kept_baselines(kept) == real_data.done(kept)


def test_a_candidates_options_reach_every_verity_run(tmp_path: Path, monkeypatch) -> None:
    """`real_data.py --train-args` gives each Verity run the candidate's options after the defaults'
    data, seed and destination; the record still comes from the card the run writes."""
    import subprocess

    from benchmarks import real_data

    commands = []
    card = {"metrics": {"test": {"roc_auc": 0.9, "false_alarm_rate": 0.0, "miss_rate": 0.1, "n_genuine": 5,
                                 "n_counterfeit": 5}, "val": {"roc_auc": 0.95}},
            "thresholds": {"val_false_alarm_rate_ci": [0, 0.1], "val_miss_rate_ci": [0, 0.2],
                           "target_false_alarm_rate": 0.01, "target_miss_rate": 0.05, "val_false_alarms": 0,
                           "n_val_genuine": 30, "val_misses": 1, "n_val_counterfeit": 30}}  # fmt: skip

    def fake_run(command: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        (tmp_path / "row" / "seed1").mkdir(parents=True)
        (tmp_path / "row" / "seed1" / "card.json").write_text(json.dumps(card))
        return subprocess.CompletedProcess(command, 0, "epoch 1: ...\n", "")

    monkeypatch.setattr(real_data.subprocess, "run", fake_run)
    record = real_data.run_verity("row", tmp_path / "m.jsonl", "photo", 1, tmp_path,
                                  train_args=("--augment-preset", "patch"))  # fmt: skip
    (command,) = commands
    assert command[-2:] == ["--augment-preset", "patch"] and command[command.index("--seed") + 1] == "1"
    assert record["test_roc_auc"] == 0.9 and record["epochs_run"] == 1 and not record["export_error"]


def test_the_server_tail_part_measures_the_heap_and_the_dependency_solving() -> None:
    from benchmarks import server_tail

    inside = server_tail.in_process(requests=30)
    assert inside["heap_objects"] > 10_000 and inside["full_collect_ms"] > inside["full_collect_frozen_ms"]
    raw, form = (inside["dependency_ms_per_request"][name] for name in ("raw body", "multipart form"))
    assert raw["form fields"] == 0.0 < form["form fields"]  # a raw body has a route of its own
    assert "full collection" in server_tail.summary({"in_process": inside, "workers": 2})
    assert server_tail.connections_by_worker(os.getpid(), 1) == []  # no children holding that port


def test_the_soak_reads_the_servers_own_latencies_from_its_access_log(tmp_path: Path) -> None:
    from benchmarks.pg_soak import server_latencies_ms

    log = tmp_path / "server.log"
    access = '{{"logger": "verity.api.access", "message": "request", "path": "{}", "latency_ms": {}}}'
    log.write_text("\n".join([
        access.format("/v1/predict", 12.5),
        access.format("/readyz", 1.0),  # not an answer to score
        '{"logger": "uvicorn.error", "message": "Started server process [1]"}',
        access.format("/v1/predict", 3.0),
    ]) + "\n")  # fmt: skip
    assert server_latencies_ms(log) == [3.0, 12.5]
