"""`verity promote` and `verity rollback`: which version a model's alias names, decided by a person and
recorded in the audit log (who, when, why, and the comparison behind it).

A modality's default follows the `production` alias of its models (api/registry.py): promoting a version
takes effect on every worker and box within a second or two (the change is counted in the shared audit
store, which each worker follows: api/shared_state.py). A new folder in the models directory never goes
live by itself once its model has a production alias.

    verity promote photo-default 1.1.0 --why "seizures of 2026-11" --comparison compare/compare.json
    verity rollback photo-default --why "false alarms at gate 3"
    verity promote --list
    verity drift report [--since 2026-12-01] [--json]
    verity shadow report [--since 2026-12-01] [--json]
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from verity.api.audit import AuditStore, ModelEvent, open_audit_store
from verity.api.audit_records import current_aliases
from verity.api.registry import PRODUCTION
from verity.api.settings import Settings, load_settings
from verity.api.shared_state import MODELS
from verity.inference.artifacts import COMPARISON_FILE
from verity.inference.drift import DRIFT_ALERT_PSI, WINDOW, drift_figures
from verity.inference.engine import read_metadata
from verity.inference.stamps import utc_now
from verity.inference.terminal import terminal_safe

log = logging.getLogger("verity.api.lifecycle")


class LifecycleError(ValueError):
    """A promotion or rollback that was refused, with the reason (the CLI prints it and exits 1)."""


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _current(store: AuditStore, name: str, alias: str) -> ModelEvent | None:
    return current_aliases(store.model_events(name)).get((name, alias))


def _check_comparison(path: Path, name: str, version: str, force: bool) -> str:
    """`verity compare`'s result for this challenger, as JSON text; a challenger worse beyond noise is
    refused unless forced."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        challenger, (low, high) = result["challenger"]["model"], result["roc_auc_difference_interval"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LifecycleError(f"--comparison {path}: not a `verity compare` result ({error}).") from error
    if challenger != f"{name}/{version}":
        raise LifecycleError(f"--comparison {path} compares {challenger}, not {name}/{version}.")
    if result.get("worse_beyond_noise") and not force:
        raise LifecycleError(
            f"{name}/{version} is worse than the champion beyond noise: ROC AUC difference "
            f"{result['roc_auc_difference']:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]. "
            "Give --force (with --why) to promote it anyway."
        )
    return json.dumps(result, sort_keys=True)


def promote(
    settings: Settings, store: AuditStore, name: str, version: str, why: str, *,
    alias: str = PRODUCTION, comparison: Path | None = None, force: bool = False,
) -> ModelEvent:  # fmt: skip
    """Points `alias` of `name` at `version` and records it; the version must be in the models folder,
    and a model marked weak or worse beyond noise is refused unless forced."""
    model = settings.models_dir / name / version / "model.onnx"
    if not model.is_file():
        raise LifecycleError(f"No model {name}/{version} in {settings.models_dir} (expected {model}).")
    _, card = read_metadata(model)
    if card.weak and not force:
        raise LifecycleError(f"{name}/{version} is marked weak in its card; give --force (with --why).")
    # Without --comparison, the one `verity retrain` left beside the version judges it.
    beside = model.parent / COMPARISON_FILE
    comparison = comparison or (beside if beside.is_file() else None)
    compared = _check_comparison(comparison, name, version, force) if comparison else None
    follow_references(settings, name, model)
    current = _current(store, name, alias)
    event = ModelEvent(utc_now(), "promote", name, alias, version, current.version if current else None,
                       _actor(), why, compared)  # fmt: skip
    store.record_model_event(event)
    store.bump_generation(MODELS)  # every worker reloads and follows the alias
    return event


def adopt(store: AuditStore, keys: list[tuple[str, str]]) -> list[ModelEvent]:
    """At a first start with aliases (or when a modality first gets a model), the model each modality
    serves (the newest) becomes its production alias, recorded once (`AuditStore.adopt_alias`): a name
    that has an alias by now (a worker beside this one adopted it first) is left as it is. Returns every
    model event after."""
    for name, version in keys:
        why = ("adopted at start: the model this modality served (its newest version) became its "
               "production alias; from now on a new version goes live only by `verity promote`")
        event = ModelEvent(utc_now(), "adopt", name, PRODUCTION, version, None, "verity serve", why)
        if store.adopt_alias(event):  # atomic: of workers starting at once, one records it
            log.warning("production alias adopted", extra={"model": f"{name}/{version}"})
    return store.model_events()


def follow_references(settings: Settings, name: str, model: Path) -> list[str]:
    """Embeds every product's genuine references with the promoted version before it goes live (the
    store keeps embeddings per model file), so the first `product=` request after a promotion answers at
    once; refused, naming the products that would stop working, when that fails. Returns the products."""
    from verity.inference.engine import OnnxEngine
    from verity.inference.references.errors import ReferenceStoreError
    from verity.inference.references.store import ReferenceStore

    references = ReferenceStore(settings.references_dir)
    products = sorted(product for product, count in references.products(name).items() if count)
    if not products:
        return []
    engine = OnnxEngine(model, warmup=False)
    failed = []
    for product in products:
        try:
            references.calibration(engine, product)
        except (ReferenceStoreError, OSError, ValueError) as error:
            failed.append(f"{product} ({error})")
    if failed:
        raise LifecycleError(f"The references of {', '.join(failed)} could not be embedded with {model}: "
                             "product checks for them would stop working after the promotion.")  # fmt: skip
    return products


def rollback(store: AuditStore, name: str, why: str, alias: str = PRODUCTION) -> ModelEvent:
    """Points `alias` back at the version it named before its last change, and records it."""
    current = _current(store, name, alias)
    if current is None or current.previous_version is None:
        raise LifecycleError(f"{name} has no earlier {alias} version to roll back to.")
    event = ModelEvent(utc_now(), "rollback", name, alias, current.previous_version, current.version,
                       _actor(), why)  # fmt: skip
    store.record_model_event(event)
    store.bump_generation(MODELS)
    return event


def _describe(event: ModelEvent) -> str:
    before = f" (was {event.previous_version})" if event.previous_version else ""
    return (f"{event.created} {event.action} {event.model_name} {event.alias} -> {event.version}{before} "
            f"by {event.actor}: {event.why}")  # fmt: skip


def _with_store(run: Any) -> int:
    settings = load_settings()
    store = open_audit_store(settings)
    try:
        return int(run(settings, store))
    finally:
        store.close()


def promote_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="verity promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="the model's name (its folder in the models directory)")
    parser.add_argument("version", nargs="?", help="the version to promote")
    parser.add_argument("--why", help="why: recorded in the audit log with who and when (required)")
    parser.add_argument("--alias", default=PRODUCTION, help=f"the alias to point (default {PRODUCTION})")
    parser.add_argument("--comparison", type=Path, help="`verity compare --out` result (compare.json); "
                        "default: the compare.json in the version's folder, when there is one")
    parser.add_argument("--force", action="store_true", help="promote a weak or worse-beyond-noise model")
    parser.add_argument("--list", action="store_true", help="list every promotion and rollback")
    args = parser.parse_args(argv)

    def run(settings: Settings, store: AuditStore) -> int:
        if args.list:
            for event in store.model_events():
                print(terminal_safe(_describe(event)))
            return 0
        if not (args.name and args.version and args.why):
            parser.error("give NAME VERSION --why TEXT (or --list)")
        try:
            event = promote(settings, store, args.name, args.version, args.why, alias=args.alias,
                            comparison=args.comparison, force=args.force)  # fmt: skip
        except LifecycleError as error:
            print(terminal_safe(f"verity promote: refused: {error}"), file=sys.stderr)
            return 1
        print(terminal_safe(_describe(event)))
        return 0

    return _with_store(run)


def rollback_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="verity rollback", description="Point a model's alias back.")
    parser.add_argument("name", help="the model's name")
    parser.add_argument("--why", required=True, help="why: recorded in the audit log with who and when")
    parser.add_argument("--alias", default=PRODUCTION, help=f"the alias to point back (default {PRODUCTION})")
    args = parser.parse_args(argv)

    def run(settings: Settings, store: AuditStore) -> int:
        try:
            event = rollback(store, args.name, args.why, args.alias)
        except LifecycleError as error:
            print(terminal_safe(f"verity rollback: refused: {error}"), file=sys.stderr)
            return 1
        print(terminal_safe(_describe(event)))
        return 0

    return _with_store(run)


def drift_report(settings: Settings, store: AuditStore, since: str | None) -> list[dict[str, Any]]:
    """For each station, modality and model in the audit log since `since`: the scores' PSI against the
    model's validation distribution and the not-recognised rate (inference.drift; the brightness of the
    images is not in the log: /metrics has it live)."""
    groups: dict[tuple[str, str, str, str], list[Any]] = {}
    for record in store.since(since):
        key = (record.station_id or "-", record.modality, record.model_name, record.model_version)
        groups.setdefault(key, []).append(record)
    rows = []
    for (station, modality, name, version), records in sorted(groups.items()):
        model = settings.models_dir / name / version / "model.onnx"
        reference = (read_metadata(model)[1].novelty or {}).get("drift") if model.is_file() else None
        row: dict[str, Any] = {"station": station, "modality": modality, "model": f"{name}/{version}",
                               "answers": len(records)}  # fmt: skip
        if reference is None:
            row["note"] = "no validation distribution in the model's card (or the model is not here)"
        else:
            recent = records[-WINDOW:]
            scores = np.array([r.score for r in recent])
            flags = np.array([r.recognised is False for r in recent])
            no_brightness = np.full(len(scores), np.nan)
            row.update(drift_figures({**reference, "brightness": None}, scores, no_brightness, flags))
        rows.append(row)
    return rows


def drift_main(argv: list[str]) -> int:
    args = _report_command("verity drift", "Drift of answers from validation.",
                           "per station, modality and model, over the audit log",
                           "print JSON lines instead of a table").parse_args(argv)  # fmt: skip

    def run(settings: Settings, store: AuditStore) -> int:
        for row in drift_report(settings, store, args.since):
            if args.json:
                print(json.dumps(row))
                continue
            figures = row.get("note") or (
                f"score PSI {_figure(row['score_psi'])} (alert above {DRIFT_ALERT_PSI}), not recognised "
                f"{_figure(row['not_recognised_rate'], '.1%')} "
                f"(validation {_figure(row['val_not_recognised_rate'], '.1%')})"
            ) + ("  ALERT" if row.get("alert") else "")
            print(terminal_safe(f"{row['station']:<16} {row['modality']:<6} {row['model']:<28} "
                                f"{row['answers']:>6} answers  {figures}"))  # fmt: skip
        return 0

    return _with_store(run)


def _report_command(prog: str, description: str, report_help: str, json_help: str) -> argparse.ArgumentParser:
    """A command whose one action is `report` over the audit log, from a time on, as text or JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    report = parser.add_subparsers(dest="action", required=True).add_parser("report", help=report_help)
    report.add_argument("--since", help="only answers from this ISO 8601 time on")
    report.add_argument("--json", action="store_true", help=json_help)
    return parser


def _figure(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def shadow_report(store: AuditStore, since: str | None, examples: int = 20) -> dict[str, Any]:
    """The shadow model's answers (VERITY_SHADOW) beside the answers given: how often the verdicts agree,
    how far the scores are apart, and the cases where the verdicts differ (with their stored images)."""
    pairs = [(store.get(shadow.request_id), shadow) for shadow in store.shadow_records(since)]
    pairs = [(given, shadow) for given, shadow in pairs if given is not None]
    differ = [(given, shadow) for given, shadow in pairs if given.verdict != shadow.verdict]
    models = sorted({f"{shadow.model_name}/{shadow.model_version}" for _, shadow in pairs})
    gaps = [abs(shadow.score - given.score) for given, shadow in pairs]
    return {
        "answers": len(pairs),
        "shadow_models": models,
        "agreement": 1 - len(differ) / len(pairs) if pairs else None,
        "mean_score_difference": float(np.mean(gaps)) if gaps else None,
        "disagreements": [
            {"request_id": given.request_id, "created": given.created, "station_id": given.station_id,
             "served": f"{given.model_name}/{given.model_version}", "verdict": given.verdict,
             "score": given.score, "shadow_verdict": shadow.verdict, "shadow_score": shadow.score,
             "image_path": given.image_path}  # fmt: skip
            for given, shadow in differ[:examples]
        ],
        "disagreement_count": len(differ),
    }


def shadow_main(argv: list[str]) -> int:
    args = _report_command("verity shadow", "The shadow model beside production.",
                           "agreement and disagreements, from the audit log",
                           "print the report as JSON").parse_args(argv)  # fmt: skip

    def run(settings: Settings, store: AuditStore) -> int:
        result = shadow_report(store, args.since)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        if not result["answers"]:
            print("no shadow answers (is VERITY_SHADOW set on the server?)")
            return 0
        print(terminal_safe(
            f"{result['answers']} answers scored by {', '.join(result['shadow_models'])}: verdicts agree on "
            f"{result['agreement']:.1%}, mean score difference {result['mean_score_difference']:.4f}, "
            f"{result['disagreement_count']} disagree"
        ))  # fmt: skip
        for case in result["disagreements"]:
            print(terminal_safe(
                f"  {case['request_id']} {case['created']} station {case['station_id'] or '-'}: "
                f"{case['served']} said {case['verdict']} ({case['score']:.3f}), the shadow "
                f"{case['shadow_verdict']} ({case['shadow_score']:.3f})"
                + (f", image {case['image_path']}" if case["image_path"] else "")
            ))  # fmt: skip
        return 0

    return _with_store(run)
