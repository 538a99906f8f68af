"""`verity refs`: enrol, list and remove genuine reference images per product, from the command line.

    verity refs add --model M --product P DIR_OR_FILES... [--who NAME] [--references-dir D] [--config F]
    verity refs list --model M [--product P] [--json]
    verity refs remove --model M ID

`--model` is a model file or folder (as for `verity predict`) or a model name in the settings' models
folder. Enrolment embeds each image with that model exactly as the server scores it, and every change
is written to the settings' audit log (actor `cli:<login name>`, role admin) before it takes effect, as
`POST /v1/references` does. A running server sees the change on its next check, without a restart.
Exit codes: 0 all added or duplicate, 1 any file refused (or a failed operation), 2 usage errors.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from verity.api.audit import AuditError, AuditStore, open_audit_store
from verity.api.reference_admin import audit_writer, calibration_or_none
from verity.api.settings import Settings, load_settings
from verity.inference.artifacts import ONNX_FILES, resolve_model
from verity.inference.decode import IMAGE_SUFFIXES, image_files_under, read_image_bytes
from verity.inference.decode_limits import DecodeError
from verity.inference.engine import ModelLoadError, OnnxEngine
from verity.inference.references.check import MIN_REFERENCES
from verity.inference.references.errors import (
    InvalidName,
    ReferenceStoreError,
)
from verity.inference.references.names import validate_product
from verity.inference.references.store import ReferenceStore
from verity.inference.terminal import terminal_json, terminal_safe
from verity.inference.tiling import TooManyTiles

WHO_MAX = 100


class UsageError(ValueError):
    """A bad argument: exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verity refs", description="Genuine reference images per product.")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", required=True, help="model.onnx, its folder, or a name in the models dir")
        sub.add_argument("--references-dir", help="reference store (default: settings references_dir)")
        sub.add_argument("--config", help="settings file (KEY=VALUE lines, VERITY_ prefix)")

    add = commands.add_parser("add", help="enrol genuine reference images of a product")
    common(add)
    add.add_argument("--product", required=True, help="product name, e.g. acme-watch-x2")
    add.add_argument("paths", nargs="+", metavar="DIR_OR_FILE", help="image files, or folders (recursive)")
    add.add_argument("--who", help="who enrols (default: your login name); recorded as cli:<who>")
    listing = commands.add_parser("list", help="products and their references")
    common(listing)
    listing.add_argument("--product", help="list this product's references with provenance")
    listing.add_argument("--json", action="store_true", help="print JSON")
    remove = commands.add_parser("remove", help="remove a reference (an audited event; the image stays)")
    common(remove)
    remove.add_argument("reference_id", metavar="ID")
    remove.add_argument("--who", help="who removes (default: your login name)")
    return parser


def resolve_model_arg(model: str, settings: Settings) -> Path:
    """A model file or folder, else a model name in the settings' models folder."""
    path = Path(model)
    if path.exists():
        return resolve_model(path, ONNX_FILES)
    named = settings.models_dir / model
    if "/" not in model and named.exists():
        return resolve_model(named, ONNX_FILES)
    raise UsageError(f"No model {model!r}: not a path, nor a model name in {settings.models_dir.absolute()}.")


def image_files(paths: list[str]) -> list[Path]:
    """Each named file, and every image file (by suffix) under each named folder, sorted."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = image_files_under(path)
            if not found:
                raise UsageError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"No file or folder {path}.")
    return files


def actor_name(who: str | None) -> str:
    """cli:<who>, or cli:<login name> of whoever runs the command."""
    if who is not None and not 0 < len(who) <= WHO_MAX:
        raise UsageError(f"--who takes 1-{WHO_MAX} characters.")
    if who is None:
        try:
            who = getpass.getuser()
        except (KeyError, OSError):
            who = "unknown"
    return f"cli:{who}"


def calibration_line(store: ReferenceStore, engine: OnnxEngine, product: str) -> str:
    """One line on a product's calibration, or how many references it still lacks."""
    calibration = calibration_or_none(store, engine, product)
    if calibration is None:
        count = store.products(engine.name).get(product, 0)
        if not count:
            return f"{product}: no references yet; the check abstains: 0 of {MIN_REFERENCES} references."
        return f"{product}: {count} references; not calibrated (no usable reference, or no embedding output)."
    count = calibration["references"]
    if calibration["threshold"] is None:
        return f"{product}: {count} references; the check abstains: {count} of {MIN_REFERENCES} references."
    patch = calibration.get("check") == "patch signature"
    loo = calibration["loo_scores"] if patch else calibration["loo_distances"]
    what = f"patch signature score ({calibration['signature_patches']} patches)" if patch else "distance"
    return (
        f"{product}: {count} references; mismatch beyond {what} {calibration['threshold']:.4f} "
        f"(leave-one-out mean {loo['mean']:.4f}, spread {calibration['spread']:.4f}, "
        f"false alarm rate {calibration['false_alarm_rate']:g})."
    )


def _add(args: argparse.Namespace, store: ReferenceStore, engine: OnnxEngine, audit: AuditStore) -> int:
    product = validate_product(args.product)
    actor = actor_name(args.who)
    files = image_files(args.paths)
    embed, on_event = store.embedder(engine), audit_writer(audit, engine.name)
    refused = 0
    for path in files:
        try:
            data = read_image_bytes(path, store.limits)
            done = store.add(
                engine.name,
                product,
                data,
                source=str(path),
                actor=actor,
                role="admin",
                embed=embed,
                on_event=on_event,
            )
        except (DecodeError, TooManyTiles, ReferenceStoreError, OSError) as error:
            refused += 1
            print(terminal_safe(f"{path}: refused: {error}"))
            continue
        print(terminal_safe(f"{path}: {done.status} {done.reference_id} (sha256 {done.sha256[:12]})"))
    print(f"{len(files) - refused} of {len(files)} files enrolled or already enrolled.")
    print(terminal_safe(calibration_line(store, engine, product)))
    return 1 if refused else 0


def _list(args: argparse.Namespace, store: ReferenceStore, engine: OnnxEngine) -> int:
    model = {"name": engine.name, "version": engine.version, "precision": engine.precision}
    if args.product is not None:
        references = [r.to_dict() for r in store.references(engine.name, validate_product(args.product))]
        calibration = calibration_or_none(store, engine, args.product)
        if args.json:
            print(terminal_json({"model": model, "calibration": calibration, "references": references}))
            return 0
        print(terminal_safe(calibration_line(store, engine, args.product)))
        for ref in references:
            fields = (ref["reference_id"], ref["sha256"][:12], ref["created"], ref["actor"], ref["source"])
            print("  " + "  ".join(terminal_safe(value) for value in fields))  # source: an uploaded name
        return 0
    products = store.products(engine.name)
    if args.json:
        listed = [
            {"product": name, "references": count, "calibration": calibration_or_none(store, engine, name)}
            for name, count in products.items()
        ]
        print(terminal_json({"model": model, "products": listed}))
        return 0
    if not products:
        print(terminal_safe(f"No genuine references for model {engine.name} in {store.root}."))
    for product in products:
        print(terminal_safe(calibration_line(store, engine, product)))
    return 0


def _remove(args: argparse.Namespace, store: ReferenceStore, engine: OnnxEngine, audit: AuditStore) -> int:
    reference = store.remove(
        engine.name,
        args.reference_id,
        actor=actor_name(args.who),
        role="admin",
        on_event=audit_writer(audit, engine.name),
    )
    sha256 = reference.sha256[:12]
    print(terminal_safe(f"removed {reference.reference_id} (product {reference.product}, sha256 {sha256})."))
    return 0


def _run(args: argparse.Namespace) -> int:
    overrides = {"references_dir": Path(args.references_dir)} if args.references_dir else {}
    settings = load_settings(args.config, **overrides)
    engine = OnnxEngine(resolve_model_arg(args.model, settings), provider="cpu", warmup=False)
    store = ReferenceStore(
        settings.references_dir,
        tiling=settings.tiling_options,
        limits=settings.decode_limits,
        false_alarm_rate=settings.reference_false_alarm_rate,
    )
    if args.command == "list":
        return _list(args, store, engine)
    audit = open_audit_store(settings)
    try:
        return (
            _add(args, store, engine, audit) if args.command == "add" else _remove(args, store, engine, audit)
        )
    finally:
        audit.close()


def refs_main(argv: list[str]) -> int:
    """Runs one `verity refs` command; returns 0, 1 (refused or failed) or 2 (usage)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, InvalidName, FileNotFoundError) as error:
        print(terminal_safe(f"verity refs: error: {error}"), file=sys.stderr)
        return 2
    except (ReferenceStoreError, ModelLoadError, AuditError, OSError, ValueError) as error:
        print(terminal_safe(f"verity refs: error: {error}"), file=sys.stderr)
        return 1
