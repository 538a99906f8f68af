"""What the open-set checks add to /v1/predict: the novelty gate against the largest bank a model keeps
(`bank.MAX_REFERENCES` references, with the input profiles of as many training images, when the model
has them) and a product's reference check (20 genuine references), measured side by side with the same
model without them, in one run.

Two parts:
- in process: the engine's predict for one photo, and the checks on its embedding (kNN novelty against
  the bank, the product's nearest-reference distance), median wall time on one thread;
- on the real service: two `verity serve` processes, the same ONNX weights, one with the gate and the
  product's references, one without; batches of sequential POST /v1/predict take turns between five
  kinds (each of two photos on the plain server and on the gated server without a product, what every
  request pays for the not-recognised gate, the 10% target; and the gated server with the product
  named, adding its reference check), and the server's CPU time (every thread's time on CPU, from
  /proc schedstat) is divided by its requests.

The two photos take the gate's two paths (`NoveltyGate.verdict_likeness`): a drawn scene the model does
not recognise (its novelty alone settles the verdict), and a synthetic photo of the kind the model was
trained on, which it recognises (its profile and joint distances are bounded, or measured in full).

The bank's rows are the model's own bank, padded with random unit vectors to that size (brute-force
search costs the same whatever the values); the references are 20 photos.

    .venv/bin/python benchmarks/open_set_cost.py [--model checkpoints/photo-default] [--rounds 4]
        [--bank-rows N]   # a bank of another size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as a server's one-thread sessions run it
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import photo_jpeg  # noqa: E402
from benchmarks.server_bench import Server  # noqa: E402
from benchmarks.server_overhead import thread_cpu_seconds  # noqa: E402
from verity.datasets.synth import generate  # noqa: E402
from verity.inference.artifacts import resolve_model  # noqa: E402
from verity.inference.bank import BANK_FILE, MAX_REFERENCES, build_bank, load_bank, save_bank  # noqa: E402
from verity.inference.engine import METADATA_CARD_KEY, OnnxEngine  # noqa: E402
from verity.inference.input_profile import (  # noqa: E402
    PROFILE_FILE,
    PROFILE_WIDTH,
    ProfileBank,
    input_profile,
    load_profiles,
    save_profiles,
)
from verity.inference.pipeline import score_bytes  # noqa: E402
from verity.inference.references.check import embed_image
from verity.inference.references.store import ReferenceStore  # noqa: E402
from verity.inference.tiling import TilingOptions, load_for_scoring  # noqa: E402

REFERENCES = 20
PRODUCT = "bench-product"


def padded_bank(model_dir: Path, rows: int) -> Any:
    """The model's bank padded with random unit rows to `rows` (the gate's threshold is unchanged)."""
    bank = load_bank(model_dir / BANK_FILE)
    shape = (max(0, rows - len(bank)), bank.dim)
    extra = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    embeddings = np.concatenate([bank.embeddings.astype(np.float32), extra])
    labels = np.concatenate([bank.labels, np.full(len(extra), "genuine")])
    return build_bank(embeddings, labels, None, {"benchmark": "padded"}, max_references=rows)


def padded_profiles(model_dir: Path, rows: int) -> ProfileBank:
    """The model's input profiles padded with random rows to `rows` (what a large set keeps)."""
    profiles = load_profiles(model_dir / PROFILE_FILE)
    generator = np.random.default_rng(1)
    extra = generator.standard_normal((max(0, rows - len(profiles.rows)), PROFILE_WIDTH))
    padded = replace(profiles, rows=np.concatenate([profiles.rows, extra.astype(np.float32)]))
    if profiles.bank_rows is None:
        return padded
    # The joint measure reads each profile's bank row: the padding's are the padded bank's last rows (so
    # a model whose every training image has a profile keeps its profiles in the bank's order).
    extra_rows = np.arange(rows - len(extra), rows)
    return replace(padded, bank_rows=np.concatenate([profiles.bank_rows, extra_rows]))


def without_gate(source: Path, target: Path) -> None:
    """A copy of the ONNX file whose card has no novelty gate (and so no bank to load)."""
    import onnx

    from verity.inference.card import ModelCard

    proto = onnx.load(str(source))
    for entry in proto.metadata_props:
        if entry.key == METADATA_CARD_KEY:
            entry.value = replace(ModelCard.from_json(entry.value), novelty=None).to_json()
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target))


def prepare(model: Path, workdir: Path, bank_rows: int = MAX_REFERENCES) -> dict[str, Path]:
    """models-gated (bank and profiles padded to `bank_rows`), models-plain (no gate) and a reference
    store with 20 references."""
    card = OnnxEngine(model, warmup=False).card
    if card.novelty is None:
        raise SystemExit(f"{model} has no novelty gate: export it with --bank-data first.")
    gated = workdir / "models-gated" / card.name / card.version
    gated.mkdir(parents=True)
    shutil.copy(model, gated / "model.onnx")
    save_bank(padded_bank(model.parent, bank_rows), gated / BANK_FILE)
    if (card.novelty or {}).get("profile"):
        save_profiles(padded_profiles(model.parent, bank_rows), gated / PROFILE_FILE)
    without_gate(model, workdir / "models-plain" / card.name / card.version / "model.onnx")
    store, engine = ReferenceStore(workdir / "references"), OnnxEngine(gated / "model.onnx", warmup=False)
    for seed in range(REFERENCES):
        store.add(
            card.name,
            PRODUCT,
            photo_jpeg(400, 300, seed=100 + seed),
            source=f"ref-{seed}.jpg",
            actor="benchmark",
            role="admin",
            embed=lambda data: embed_image(engine, data),
        )
    return {
        "gated": gated / "model.onnx",
        "plain": workdir / "models-plain",
        "references": workdir / "references",
    }


def recognised_image(model: Path, workdir: Path, candidates: int = 16) -> bytes:
    """A 640 px synthetic image of the model's modality that its gate recognises: the first of a seeded
    set (the shipped photo model trained on such photos at 256 px; at 640 it recognises about half)."""
    engine = OnnxEngine(model, warmup=False)
    folder = workdir / "recognised"
    rows = generate(engine.card.modality, candidates, folder, seed=101, difficulty="easy", size=640)
    for row in rows:
        data = (folder / row.path).read_bytes()
        if score_bytes(data, engine, with_cam=False).recognised:
            return data
    kind = engine.card.modality
    raise SystemExit(f"None of {candidates} synthetic {kind} images is recognised by {model}.")


def in_process(paths: dict[str, Path], image: bytes, repeats: int = 200) -> dict[str, Any]:
    """Median ms of one predict and of the two checks on its embedding, on one thread."""
    engine = OnnxEngine(paths["gated"], warmup=True)
    store = ReferenceStore(paths["references"])
    model_input = load_for_scoring(image, engine.spec, TilingOptions()).model_input
    prediction = engine.predict([model_input])[0]
    embedding, patches = prediction.embedding, prediction.patches
    store.check(engine, PRODUCT, embedding, patches)  # builds the product's index, as a first request does
    gate = engine.novelty_gate
    assert gate is not None and embedding is not None

    def median_ms(function: Any) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    def after_a_request_ms(function: Any) -> float:
        """Median ms of `function` right after a decode and a predict, as a server runs it: the bank
        and the signature are no longer in the caches."""
        times = []
        for _ in range(repeats):
            engine.predict([load_for_scoring(image, engine.spec, TilingOptions()).model_input])
            started = time.perf_counter()
            function()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    predict = median_ms(lambda: engine.predict([model_input], with_cam=True))
    novelty = median_ms(lambda: gate.novelty(embedding[None]))
    # Every measure the gate has, the input profile of the model input included (as `judge` runs it).
    likeness = median_ms(lambda: gate.likeness(embedding, input_profile(model_input)[None]))
    reference = median_ms(lambda: store.check(engine, PRODUCT, embedding, patches))
    return {
        "predict_ms": predict,
        "novelty_ms": novelty,
        "likeness_ms": likeness,
        "reference_check_ms": reference,
        "checks_share_of_predict": (likeness + reference) / predict,
        "novelty_after_a_request_ms": after_a_request_ms(lambda: gate.novelty(embedding[None])),
        "reference_check_after_a_request_ms": after_a_request_ms(
            lambda: store.check(engine, PRODUCT, embedding, patches)
        ),
        "bank_rows": len(gate.bank),
        "profile_rows": len(gate.profiles.rows) if gate.profiles else 0,
    }


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`: from schedstat's nanoseconds on CPU where the kernel has it
    (the 10 ms ticks of /proc/<pid>/stat put +-7% of noise on a 10-request batch)."""
    used = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            used[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile, or no schedstat
    return used or {str(tid): seconds for tid, seconds in thread_cpu_seconds(pid).items()}


def cpu_between(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU seconds spent between two `thread_cpu` readings, thread by thread: a worker thread that ended
    meanwhile (an idle pool thread retiring) drops out of both, instead of taking its whole past with it,
    which once made a round's plain server seem to use no CPU at all."""
    return sum(seconds - before.get(tid, 0.0) for tid, seconds in after.items())


# What each request kind sends (which photo, which fields) and the server that answers it: the gate alone
# is what every /v1/predict pays; the product's reference check is added only to requests that name a
# product. Each gated kind is compared with the plain server's requests of the same photo.
KINDS = {"plain": ("plain", "foreign", {}), "gate": ("gated", "foreign", {}),
         "plain_recognised": ("plain", "recognised", {}), "gate_recognised": ("gated", "recognised", {}),
         "gate_and_product": ("gated", "foreign", {"product": PRODUCT})}  # fmt: skip
BASELINE = {"gate": "plain", "gate_recognised": "plain_recognised", "gate_and_product": "plain"}


def server_cpu(
    paths: dict[str, Path], workdir: Path, images: dict[str, bytes], modality: str, rounds: int, batch: int
) -> dict[str, Any]:
    """CPU ms per /v1/predict of each request kind (KINDS), batches of each kind in turn with the order
    rotating every round, so a drift in the machine's speed falls on all; each added share is the median
    of the rounds' ratios against the plain server's batch of the same photo (BASELINE), with their
    range, since these shared cores are noisy."""
    import httpx

    env = {"VERITY_REFERENCES_DIR": str(paths["references"]), "VERITY_BATCH_MAX_DELAY_MS": "0"}
    used = dict.fromkeys(KINDS, 0.0)
    ratios: dict[str, list[float]] = {kind: [] for kind in BASELINE}
    gated_models = paths["gated"].parents[2]
    with Server(gated_models, workdir, env) as gated, Server(paths["plain"], workdir, env) as plain:
        servers = {"gated": gated, "plain": plain}
        with httpx.Client(timeout=30) as client:

            def send(kind: str, count: int) -> float:
                """CPU seconds the kind's server spent on `count` requests of that kind."""
                server, image, fields = KINDS[kind]
                process = servers[server].process
                assert process is not None
                before = thread_cpu(process.pid)
                for _ in range(count):
                    url = servers[server].url + "/v1/predict"
                    data = {"modality": modality, **fields}
                    client.post(url, data=data, files={"file": images[image]}).raise_for_status()
                return cpu_between(before, thread_cpu(process.pid))

            for kind in KINDS:  # warm-up, not counted
                send(kind, 10)
            order = list(KINDS)
            for number in range(rounds):
                turn = order[number % len(order) :] + order[: number % len(order)]
                this_round = {kind: send(kind, batch) for kind in turn}
                for kind in KINDS:
                    used[kind] += this_round[kind]
                for kind, baseline in BASELINE.items():
                    ratios[kind].append(this_round[kind] / max(this_round[baseline], 1e-9) - 1.0)
    requests = rounds * batch
    ms = {kind: used[kind] / requests * 1000 for kind in KINDS}
    return {
        "requests_each": requests,
        "cpu_ms_per_request": ms,
        "cpu_ms_per_request_without": ms["plain"],
        "cpu_ms_per_request_with_checks": ms["gate_and_product"],
        "added_share": {kind: statistics.median(values) for kind, values in ratios.items()},
        "added_share_of_totals": {kind: ms[kind] / max(ms[BASELINE[kind]], 1e-9) - 1.0 for kind in ratios},
        "added_share_range": {kind: [min(values), max(values)] for kind, values in ratios.items()},
        "rounds": rounds,
    }


def run(
    workdir: Path,
    model: str = "checkpoints/photo-default",
    rounds: int = 60,
    batch: int = 10,
    bank_rows: int = MAX_REFERENCES,
) -> dict[str, Any]:
    """Both parts on `model` (a shipped model with its novelty gate), files under `workdir`."""
    image = photo_jpeg(640, 480, seed=3)
    workdir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(model)
    paths = prepare(model_path, workdir, bank_rows)
    images = {"foreign": image, "recognised": recognised_image(model_path, workdir)}
    modality = OnnxEngine(model_path, warmup=False).card.modality
    result: dict[str, Any] = {
        "bank_rows": bank_rows,
        "references": REFERENCES,
        "in_process": in_process(paths, image),
    }
    if Path("/proc/self/task").is_dir():
        result["server"] = server_cpu(paths, workdir, images, modality, rounds, batch)
    return result


def summary(result: dict[str, Any]) -> str:
    """The `make bench` line."""
    inside = result["in_process"]
    line = (
        f"open-set checks at {result['bank_rows']:,} references + {result['references']} product references: "
        f"in process {inside['likeness_ms'] + inside['reference_check_ms']:.2f} ms per image beside "
        f"{inside['predict_ms']:.2f} ms predict ({inside['checks_share_of_predict']:.1%}); after a request "
        f"(cold caches) novelty {inside['novelty_after_a_request_ms']:.2f} ms, reference check "
        f"{inside['reference_check_after_a_request_ms']:.2f} ms"
    )
    server = result.get("server")
    if server:
        ms, share, spread = server["cpu_ms_per_request"], server["added_share"], server["added_share_range"]
        line += (
            f"; /v1/predict CPU {ms['plain']:.1f} ms without the checks, {ms['gate']:.1f} ms with the "
            f"not-recognised gate (+{share['gate']:.1%}, range {spread['gate'][0]:+.1%} to "
            f"{spread['gate'][1]:+.1%}; target <= 10%) for a photo it does not recognise; "
            f"{ms['plain_recognised']:.1f} and {ms['gate_recognised']:.1f} ms "
            f"(+{share['gate_recognised']:.1%}, range {spread['gate_recognised'][0]:+.1%} to "
            f"{spread['gate_recognised'][1]:+.1%}) for one it recognises; {ms['gate_and_product']:.1f} ms "
            f"with the gate and a named product's reference check "
            f"(+{share['gate_and_product']:.1%}, range {spread['gate_and_product'][0]:+.1%} to "
            f"{spread['gate_and_product'][1]:+.1%}); medians of {server['rounds']} rounds"
        )
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/photo-default")
    # Short batches, many rounds: the two servers' requests interleave finely, so a burst of load from
    # elsewhere on these shared cores falls on both (40-request batches gave ranges of -3% to +26%).
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--bank-rows", type=int, default=MAX_REFERENCES,
                        help="references the bank and profiles are padded to (default: the most a bank "
                        "keeps, %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="verity-open-set-cost-") as folder:
        result = run(Path(folder), args.model, args.rounds, args.batch, args.bank_rows)
    print(json.dumps(result, indent=2))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
