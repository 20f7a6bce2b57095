"""Check custom resources against our CRD the way the apiserver would: defaults, schema, CEL rules.

jsonschema checks the OpenAPI schema (it ignores the x-kubernetes-* keywords); cel-python evaluates
every `x-kubernetes-validations` rule with values typed by the schema (a `number` field is a CEL
double even when written as 2), transition rules (oldSelf) only on updates, as Kubernetes does.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "quantizedmodels.kubequant.io.yaml"


@cache
def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(obj: Any, node: dict | None = None) -> Any:
    """Structural defaulting: a missing property with a default gets it, recursively, like the apiserver."""
    node = schema() if node is None else node
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        for key, sub in node.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(obj[key], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                obj[key] = apply_defaults(obj[key], extra)
    elif isinstance(obj, list) and "items" in node:
        obj = [apply_defaults(item, node["items"]) for item in obj]
    return obj


def _passes_on_the_apiserver(error: jsonschema.ValidationError) -> bool:
    """The apiserver compares an integer value with a fractional minimum or maximum converted to an
    integer: 0 passes `minimum: 0.001` there (found on the real apiserver; the CRD's CEL rules refuse
    it). jsonschema compares exactly; this says where the apiserver would not have refused."""
    value, bound = error.instance, error.validator_value
    if isinstance(value, bool) or not isinstance(value, int) or not isinstance(bound, float):
        return False
    return (error.validator == "minimum" and value >= int(bound)) or (error.validator == "maximum" and value <= int(bound))


def schema_errors(obj: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schema())
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
                  if not _passes_on_the_apiserver(e))


def _to_cel(value: Any, node: dict) -> Any:
    if isinstance(value, dict):
        props = node.get("properties", {})
        extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else {}
        return celtypes.MapType(
            {celtypes.StringType(k): _to_cel(v, props.get(k, extra)) for k, v in value.items()}
        )
    if isinstance(value, list):
        return celtypes.ListType([_to_cel(v, node.get("items", {})) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if node.get("type") == "number":
        return celtypes.DoubleType(float(value))
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    return celtypes.StringType(value)


_ENV = celpy.Environment()


@cache
def _program(rule: str):
    return _ENV.program(_ENV.compile(rule))


def cel_errors(obj: dict, old: dict | None = None) -> list[str]:
    """Messages of every failing rule; `old` makes it an update (transition rules run)."""
    errors: list[str] = []
    _walk(obj, old, schema(), errors)
    return errors


_MISSING = object()


def _walk(value: Any, old: Any, node: dict, errors: list[str]) -> None:
    for rule in node.get("x-kubernetes-validations", []):
        uses_old = "oldSelf" in rule["rule"]
        if uses_old and (old is _MISSING or old is None):
            continue
        activation = {"self": _to_cel(value, node)}
        if uses_old:
            activation["oldSelf"] = _to_cel(old, node)
        try:
            ok = _program(rule["rule"]).evaluate(activation)
        except celpy.CELEvalError as exc:  # a rule that cannot evaluate is a broken rule
            raise AssertionError(f"rule {rule['rule']!r} failed to evaluate: {exc}") from exc
        if isinstance(ok, celpy.CELEvalError):
            raise AssertionError(f"rule {rule['rule']!r} failed to evaluate: {ok}")
        if not ok:
            errors.append(rule["message"])
    if isinstance(value, dict):
        old_map = old if isinstance(old, dict) else {}
        for key, sub in node.get("properties", {}).items():
            if key in value and key != "metadata":
                _walk(value[key], old_map.get(key, _MISSING), sub, errors)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                _walk(item, old_map.get(key, _MISSING), extra, errors)
    elif isinstance(value, list) and "items" in node:
        # Kubernetes correlates list items for transition rules only in map lists; we never need it.
        for item in value:
            _walk(item, _MISSING, node["items"], errors)


def validate(obj: dict, old: dict | None = None) -> list[str]:
    """Everything the apiserver would say about creating (or updating from `old`) this object."""
    obj = apply_defaults(obj)
    errors = schema_errors(obj)
    if errors:
        return errors
    return cel_errors(obj, None if old is None else apply_defaults(old))
