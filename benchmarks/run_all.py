"""`make bench`: engine, server, decoding and large-scan benchmarks; prints a table, writes JSON.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only engine,server,overhead,stages,open_set,...]

(a) engine images/s at batch 1, 8, 32 for PyTorch eager, ORT fp32 and ORT INT8, with the share of
    this CPU's peak FLOP/s; (b) server throughput and p50/p99 latency at concurrency 1, 8, 32 with
    batching on and off (real HTTP load against `verity serve` on 127.0.0.1, fp32 and INT8 models),
    and the server's own CPU cost per request with a trivial model; (c) decode + preprocess cost of
    a 1024x768 JPEG; (d) a 4000x1500 X-ray scan with tile heatmap;
    (e) on a machine with CUDA/TensorRT, GPU providers, fp16 and IO binding (skipped otherwise);
    (f) what the open-set checks (novelty gate at 10,000 references, a product's reference check) add to
    /v1/predict CPU time on the shipped photo model (benchmarks/open_set_cost.py); (g) confident verdicts on
    foreign images per group, for the shipped models and any the robustness suite trained
    (benchmarks/foreign_bench.py); (h) what one /v1/predict costs stage by stage, in process (multipart
    parse, hash, decode, model, open-set gate, answer JSON, audit write, image store;
    benchmarks/request_stages.py); (i) an Open Inference Protocol request of 8 images, base64 JSON and
    binary extension, against /v1/predict/batch with the same 8 (benchmarks/oip_batch.py).

Results go to benchmarks/results/bench-<UTC time>.json and benchmarks/results/latest.json. The
machine's load average is recorded with each part: figures taken while other work shares the cores
are lower than the hardware allows. Exit code 0 (targets are reported, not enforced).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import (  # noqa: E402
    decode_bench,
    engine_bench,
    foreign_bench,
    foreign_images,
    gpu_bench,
    oip_batch,
    open_set_cost,
    request_stages,
    scan_bench,
    server_bench,
    server_overhead,
)
from benchmarks.common import RESULTS, cpu_info, int8_gate, load_average  # noqa: E402

PARTS = ("decode", "engine", "server", "overhead", "stages", "oip", "open_set", "foreign", "scan", "gpu")


# Table columns: header -> the row's key, or a function of the row for a cell that is formatted.
ENGINE_COLUMNS: dict[str, str | Callable[[dict[str, Any]], Any]] = {
    "runtime": "runtime",
    "batch": "batch",
    "img/s": "images_per_s",
    "ms/batch": "ms_per_batch",
    "GFLOP/s": "gflops_per_s",
    "of peak": lambda r: f"{100 * r['share_of_peak']:.1f}%",
    "CPU ms/img 1 thr": "cpu_ms_per_image_1thread",
    "img/s unshared": "images_per_s_unshared_estimate",
}
SERVER_COLUMNS: dict[str, str | Callable[[dict[str, Any]], Any]] = {
    "batching": "batching", "conc.": "concurrency", "req/s": "rps", "p50 ms": "p50_ms", "p99 ms": "p99_ms",
    "errors": "errors",
}  # fmt: skip
SCAN_COLUMNS: dict[str, str | Callable[[dict[str, Any]], Any]] = {
    "precision": "precision",
    "seconds": "seconds",
    "CPU s (all threads)": "cpu_seconds",
    "tiles": "tiles",
    "grid": lambda r: "x".join(map(str, r["grid"])),
    "verdict": "verdict",
}


def _table(
    title: str, columns: dict[str, str | Callable[[dict[str, Any]], Any]], records: list[dict[str, Any]]
) -> str:
    """The records as an aligned text table under `title`, after a blank line."""
    values = [[column(r) if callable(column) else r[column] for column in columns.values()] for r in records]
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in values]
    header = list(columns)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["\n" + title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cpu_lines(cpu: dict[str, Any]) -> list[str]:
    return [
        f"CPU: {cpu['model']} | {cpu['cores']} cores @ {cpu['ghz']} GHz, {cpu['simd']}, VNNI {cpu['vnni']} | "
        f"peak fp32 {cpu['peak_fp32_gflops']:.0f} GFLOP/s, int8 {cpu['peak_int8_gops']:.0f} GOP/s "
        f"(assumes {cpu['fma_units_assumed']} FMA units/core)"
    ]


def _decode_lines(d: dict[str, Any]) -> list[str]:
    out = [
        f"\n(c) decode+preprocess {d['image']}: {d['load_for_model_cpu_ms']:.2f} ms CPU/image "
        f"(wall {d['load_for_model_wall_ms']:.2f}; "
        f"naive full decode {d['naive_full_decode_cpu_ms']:.2f}; best of 5 repeats "
        f"{d['load_for_model_cpu_best_of_5_ms']:.2f}); "
        f"target <= {d['target_ms']} ms: {'met' if d['meets_target'] else 'NOT met'} "
        f"(load average {d['load_average']:.1f})"
    ]
    stages = d.get("stages_cpu_median_ms")
    if stages:
        parts = ", ".join(f"{name} {ms:.2f} ms" for name, ms in stages.items())
        out.append(f"    stages, timed in turns: {parts}")
    return out


def _engine_lines(e: dict[str, Any]) -> list[str]:
    title = f"(a) engine, {e['model']} ({e['gflops_per_image']:.2f} GFLOP/image, {e['threads']} threads)"
    gain = e["batch8_gain_cpu_time"]
    out = [
        _table(title, ENGINE_COLUMNS, e["rows"]),
        f"INT8 / fp32 at batch 8: {e['int8_speedup_batch8']:.2f}x (target >= 2x); "
        f"ORT fp32 / torch eager: {e['ort_vs_torch_batch8']:.1f}x (load average {e['load_average']:.1f})",
        f"In CPU time (1 thread, robust to shared cores): INT8 / fp32 at batch 8 "
        f"{e['int8_speedup_batch8_cpu_time']:.2f}x; per-image cost batch 1 / batch 8: fp32 "
        f"{gain['ort_fp32']:.2f}x, INT8 {gain['ort_int8']:.2f}x (the most batching can gain in compute). "
        "'img/s unshared' = cores / CPU time per image.",
    ]
    shipped = e.get("shipped_default")
    if shipped:
        rate = shipped["images_per_s"]
        out.append(
            f"Shipped default model {shipped['model']} ({shipped['input_shape'][-1]} px), batch "
            f"{shipped['batch']}, timed in turns: INT8 / fp32 {shipped['int8_speedup_wall']:.2f}x "
            f"({rate['int8']:.0f} vs {rate['fp32']:.0f} img/s), in CPU time "
            f"{shipped['int8_speedup_cpu_time']:.2f}x (target >= 2x)"
        )
    return out


def _server_lines(server: dict[str, Any], engine: dict[str, Any]) -> list[str]:
    title = (
        f"(b) server, {server['model']} model, {server['image']}, "
        f"load by {server['rows'][0]['load_generator']}"
    )
    out = [
        _table(title, SERVER_COLUMNS, server["rows"]),
        f"batching on/off at c=32: {server['batching_gain_c32']:.2f}x (target >= 2x); p99 at c=32 "
        f"{server['p99_ms_c32_batching_on']:.0f} ms (target <= 100 ms) "
        f"(load average {server['load_average']:.1f})",
    ]
    engine_rows = {(r["runtime"], r["batch"]): r for r in engine.get("rows", [])}
    peak = engine_rows.get((f"ort_{server['model']}", 8))
    if peak:
        # Closed loop: latency = concurrency / throughput, so the engine alone bounds the server.
        out.append(
            f"Ceiling from (a): the engine alone computes {peak['images_per_s']:.0f} img/s at batch 8 on "
            f"all cores, so 32 concurrent clients wait at least {32000 / peak['images_per_s']:.0f} ms "
            f"each on average, and a p99 <= 100 ms at c=32 needs >= 320 img/s"
        )
    return out


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    return [
        f"\nServer cost besides the model ({overhead['model']}, {overhead['image']}, c="
        f"{overhead['concurrency']}): {overhead['rps']:.0f} req/s, {overhead['cpu_ms_per_request']:.1f} "
        f"CPU ms per request, {overhead['event_loop_cpu_ms_per_request']:.1f} of them on the event loop "
        f"(GIL held), {overhead['cores_used']:.2f} cores used "
        f"(load average {overhead['load_average']:.1f})"
    ]


def _scan_lines(s: dict[str, Any]) -> list[str]:
    title = f"(d) {s['scan']} scan: decode, tiles, verdict, heatmap PNG ({s['threads']} threads)"
    return [
        _table(title, SCAN_COLUMNS, s["rows"]),
        f"target <= {s['target_s']} s (load average {s['load_average']:.1f})",
    ]


def _gpu_lines(g: dict[str, Any]) -> list[str]:
    if "skipped" in g:
        return [f"\n(e) GPU: skipped, {g['skipped']}"]
    return [_table(f"(e) GPU, {g['model']}", {key: key for key in g["rows"][0]}, g["rows"])]


def shipped_int8() -> list[dict[str, Any]]:
    """Each shipped model's INT8 gate as its card records it: whether model.int8.onnx serves, and why not."""
    cards = sorted((Path(__file__).resolve().parents[1] / "checkpoints").glob("*/*/card.json"))
    return [int8_gate(card_path) for card_path in cards]


def _int8_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = ["", "INT8 on the shipped models (VERITY_PRECISION=auto serves model.int8.onnx only if it passed):"]
    for row in rows:
        if row["passed"]:
            out.append(f"  {row['model']}: INT8 passed its gate and serves on CPU")
        elif row["passed"] is None:
            out.append(f"  {row['model']}: no INT8 gate run (fp32 serves)")
        else:
            out.append(f"  {row['model']}: fp32 serves; INT8 failed its gate: {'; '.join(row['reasons'])}")
    return out


def report(results: dict[str, Any]) -> str:
    """The printed summary of whatever parts ran."""
    out = _cpu_lines(results["cpu"])
    if results.get("shipped_int8"):
        out += _int8_lines(results["shipped_int8"])
    if "decode" in results:
        out += _decode_lines(results["decode"])
    if "engine" in results:
        out += _engine_lines(results["engine"])
    for server in results.get("server", []):
        out += _server_lines(server, results.get("engine", {}))
    if results.get("overhead"):
        out += _overhead_lines(results["overhead"])
    if results.get("stages"):
        out += ["", request_stages.summary(results["stages"])]
    if results.get("oip"):
        out += ["", oip_batch.summary(results["oip"])]
    if results.get("open_set"):
        out += ["", open_set_cost.summary(results["open_set"])]
    if results.get("foreign"):
        out += ["", "Foreign images: confident verdicts per group (goal 0), own test images flagged",
                foreign_bench.table(results["foreign"])]  # fmt: skip
    if "scan" in results:
        out += _scan_lines(results["scan"])
    if "gpu" in results:
        out += _gpu_lines(results["gpu"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the Verity benchmarks.")
    parser.add_argument("--quick", action="store_true", help="shorter measurements (about 3 minutes)")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    seconds = 1.0 if args.quick else 2.0
    started = time.perf_counter()
    results: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_info(),
        "load_average_start": load_average(),
        "shipped_int8": shipped_int8(),
    }
    with tempfile.TemporaryDirectory(prefix="verity-bench-") as work:
        workdir = Path(work)
        if "decode" in parts:
            print("decode ...", file=sys.stderr, flush=True)
            results["decode"] = decode_bench.run(seconds)
        if "engine" in parts or "server" in parts:
            print("engine (export, quantize, time) ...", file=sys.stderr, flush=True)
            results["engine"] = engine_bench.run(workdir / "engine", seconds)
        if "server" in parts:
            models = workdir / "engine" / "photo" / "0.0.0"
            results["server"] = []
            for label, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
                print(f"server ({label}) ...", file=sys.stderr, flush=True)
                results["server"].append(
                    server_bench.run(
                        models / name, workdir / f"server-{label}", 4.0 if args.quick else 8.0, label
                    )
                )
        if "overhead" in parts:
            print("server overhead ...", file=sys.stderr, flush=True)
            results["overhead"] = server_overhead.run(workdir / "overhead", 4.0 if args.quick else 6.0)
        if "stages" in parts:
            print("request stages ...", file=sys.stderr, flush=True)
            shipped = request_stages.ROOT / "checkpoints"
            results["stages"] = request_stages.measure(shipped, 50 if args.quick else 200)
        if "oip" in parts:
            print("OIP batch ...", file=sys.stderr, flush=True)
            results["oip"] = oip_batch.run(workdir / "oip", rounds=8 if args.quick else 20)
        if "open_set" in parts:
            print("open-set checks ...", file=sys.stderr, flush=True)
            results["open_set"] = open_set_cost.run(workdir / "open-set", rounds=20 if args.quick else 60)
        if "foreign" in parts:  # the shipped models, and those the robustness suite trained, if any
            print("foreign images ...", file=sys.stderr, flush=True)
            images = foreign_images.foreign_images()
            models = foreign_bench.model_dirs()
            results["foreign"] = [foreign_bench.measure(model.resolve(), images) for model in models]
        if "engine" not in parts:
            results.pop("engine", None)
        if "scan" in parts:
            print("scan ...", file=sys.stderr, flush=True)
            results["scan"] = scan_bench.run(workdir / "scan", seconds * 1.5)
        if "gpu" in parts:
            print("gpu ...", file=sys.stderr, flush=True)
            results["gpu"] = gpu_bench.run(workdir / "gpu", seconds)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(results, indent=2)
    (args.out / f"bench-{stamp}.json").write_text(text + "\n")
    (args.out / "latest.json").write_text(text + "\n")
    print(report(results))
    print(f"\nJSON: {args.out / f'bench-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
