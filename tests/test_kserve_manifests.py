"""The KServe manifests in deploy/kserve validate against the InferenceService schema that the `kserve`
package carries (its OpenAPI-generated models, and the Kubernetes client's for core types): every key
known at its place, every value of its type, and every required field and enumerated value checked by the
models' own validation. Beside that, what Verity needs of them: probes on /readyz and /healthz, the
audit database from a secret, resources sized, OIP v2 for the Triton runtime."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kserve.models as kserve_models
import kubernetes.client.models as core_models
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kserve"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


class SchemaError(ValueError):
    pass


def _model_class(name: str) -> Any:
    cls = getattr(kserve_models, name, None) or getattr(core_models, name, None)
    if cls is None:
        raise SchemaError(f"unknown schema type {name}")
    return cls


def build(value: Any, type_name: str, where: str) -> Any:
    """The value as the schema's type, or SchemaError naming where it does not fit."""
    # Both generators' notations: list[X] and dict(str, X) (kserve), List[X] and Dict[str, X] (kubernetes).
    if (inner := re.fullmatch(r"[lL]ist\[(.+)\]", type_name)) is not None:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list")
        return [build(item, inner.group(1), f"{where}[{i}]") for i, item in enumerate(value)]
    if (inner := re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", type_name)) is not None:
        item_type = inner.group(1) or inner.group(2)
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected a mapping")
        return {key: build(item, item_type, f"{where}.{key}") for key, item in value.items()}
    scalars = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,)}
    if type_name in scalars:
        if not isinstance(value, scalars[type_name]) or (type_name == "int" and isinstance(value, bool)):
            raise SchemaError(f"{where}: expected {type_name}, got {value!r}")
        return value
    cls = _model_class(type_name)
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected a {type_name} mapping")
    by_json_name = {json_name: attribute for attribute, json_name in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(by_json_name))
    if unknown:
        raise SchemaError(f"{where}: {', '.join(unknown)} not in {type_name}")
    arguments = {by_json_name[key]: build(item, cls.openapi_types[by_json_name[key]], f"{where}.{key}")
                 for key, item in value.items()}  # fmt: skip
    try:
        return cls(**arguments)  # the model's own checks: required fields, enumerated values
    except (ValueError, TypeError) as error:
        raise SchemaError(f"{where}: {error}") from error


def validate(manifest: dict[str, Any]) -> Any:
    kind = (manifest.get("apiVersion"), manifest.get("kind"))
    if kind != ("serving.kserve.io/v1beta1", "InferenceService"):
        raise SchemaError("not a serving.kserve.io/v1beta1 InferenceService")
    return build(manifest, "V1beta1InferenceService", manifest["metadata"]["name"])


def test_there_are_both_manifests() -> None:
    assert {path.name for path in MANIFESTS} == {"verity-server.yaml", "verity-triton.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_the_manifest_validates_against_the_kserve_schema(path: Path) -> None:
    service = validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert service.spec.predictor is not None


def test_the_validator_rejects_what_the_schema_does_not_allow() -> None:
    good = yaml.safe_load((DEPLOY / "verity-server.yaml").read_text(encoding="utf-8"))
    misspelt = yaml.safe_load(yaml.safe_dump(good))
    misspelt["spec"]["predictor"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(SchemaError, match="readynessProbe"):
        validate(misspelt)
    wrong_type = yaml.safe_load(yaml.safe_dump(good))
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(SchemaError, match="minReplicas"):
        validate(wrong_type)
    no_image_name = yaml.safe_load(yaml.safe_dump(good))
    del no_image_name["spec"]["predictor"]["containers"][0]["name"]  # a container must be named
    with pytest.raises(SchemaError, match="name"):
        validate(no_image_name)


def test_verity_server_keeps_its_guarantees_on_kserve() -> None:
    server = yaml.safe_load((DEPLOY / "verity-server.yaml").read_text(encoding="utf-8"))
    (container,) = server["spec"]["predictor"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {item["name"]: item for item in container["env"]}
    assert env["VERITY_AUDIT_DB"]["valueFrom"]["secretKeyRef"]  # one PostgreSQL audit log, from a secret
    assert env["VERITY_REQUIRE_API_KEYS"]["value"] == "true"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    triton = yaml.safe_load((DEPLOY / "verity-triton.yaml").read_text(encoding="utf-8"))
    model = triton["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert model["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
