"""What the apiserver checks against the QuantizedModel CRD's schema before a model exists, checked
the same way for a file that never goes through one (`kubequant run`, `kubequant render`).

The CRD (crds/quantizedmodels.kubequant.io.yaml) is the one source of truth: a field it does not
declare is an error (the apiserver refuses it under strict field validation, and prunes it
otherwise, so a typo such as `groupsize` would silently quantize at the default group), and so is
every value the schema's types, required fields, bounds, enums, lengths and patterns refuse. The
CRD's CEL rules are spec.py's checks (each rule has its twin there).
"""

from __future__ import annotations

import difflib
import re
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

CRD_FILE = "quantizedmodels.kubequant.io.yaml"
# What a custom resource holds at the top level besides its schema's properties.
OBJECT_FIELDS = ("apiVersion", "kind", "metadata")


@cache
def crd_schema() -> dict:
    """The CRD's openAPIV3Schema: packaged with kubequant (kubequant.crds), else the checkout's crds/."""
    try:
        text = resources.files("kubequant.crds").joinpath(CRD_FILE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        text = (Path(__file__).resolve().parents[2] / "crds" / CRD_FILE).read_text(encoding="utf-8")
    return yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema_problems(body: dict) -> list[str]:
    """Every field of `body` (a QuantizedModel) the CRD does not declare, and every value outside a
    declared bound, each naming the field and the fix."""
    problems: list[str] = []
    schema = crd_schema()
    for key in body:
        if key not in OBJECT_FIELDS and key not in schema["properties"]:
            problems.append(_unknown(key, key, [*OBJECT_FIELDS, *schema["properties"]]))
    if "spec" in body:
        _walk(body["spec"], schema["properties"]["spec"], "spec", problems)
    return problems


def _unknown(path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or \
        [k for k in known if k.lower() == key.lower()]
    fix = f"did you mean {close[0]}?" if close else f"the fields here are {', '.join(sorted(known))}"
    return f"{path}: unknown field ({fix})"


_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                      "boolean": (bool,), "object": (dict,), "array": (list,)}


def _type_problem(value: Any, node: dict, path: str) -> str | None:
    if node.get("x-kubernetes-int-or-string"):
        wanted, ok = "an integer or a string", isinstance(value, (int, str)) and not isinstance(value, bool)
    elif node.get("type") in _TYPES:
        wanted = f"of type {node['type']}"
        ok = isinstance(value, _TYPES[node["type"]]) and (node["type"] == "boolean" or not isinstance(value, bool))
    else:
        return None
    return None if ok else f"{path} must be {wanted}, not {value!r}"


def _walk(value: Any, node: dict, path: str, problems: list[str]) -> None:
    problem = _type_problem(value, node, path)
    if problem:
        problems.append(problem)
        return
    if isinstance(value, dict):
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        problems += [f"{path}.{key} is required" for key in node.get("required", []) if key not in value]
        for key, item in value.items():
            where = f"{path}.{key}"
            if properties is not None and key in properties:
                _walk(item, properties[key], where, problems)
            elif isinstance(extra, dict):
                _walk(item, extra, where, problems)
            elif properties is not None and not extra and not node.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(_unknown(where, key, list(properties)))
        return
    if isinstance(value, list):
        if "maxItems" in node and len(value) > node["maxItems"]:
            problems.append(f"{path} must have at most {node['maxItems']} items, not {len(value)}")
        if isinstance(node.get("items"), dict):
            for index, item in enumerate(value):
                _walk(item, node["items"], f"{path}[{index}]", problems)
        return
    if "enum" in node and value not in node["enum"]:
        problems.append(f"{path} must be one of {', '.join(map(str, node['enum']))}, not {value!r}")
    if isinstance(value, str):
        if len(value) < node.get("minLength", 0):
            problems.append(f"{path} must not be shorter than {node['minLength']} characters")
        if "maxLength" in node and len(value) > node["maxLength"]:
            problems.append(f"{path} must be at most {node['maxLength']} characters, not {len(value)}")
        if "pattern" in node and not re.search(node["pattern"], value):
            problems.append(f"{path} must match {node['pattern']}, not {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, exclusive_low = node.get("minimum"), bool(node.get("exclusiveMinimum"))
    high, exclusive_high = node.get("maximum"), bool(node.get("exclusiveMaximum"))
    if low is not None and (value < low or (exclusive_low and value == low)):
        problems.append(f"{path} must be {'above' if exclusive_low else 'at least'} {low}, not {value}")
    if high is not None and (value > high or (exclusive_high and value == high)):
        problems.append(f"{path} must be {'below' if exclusive_high else 'at most'} {high}, not {value}")
