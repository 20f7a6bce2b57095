"""Admission by the real apiserver: every CEL rule and every schema constraint of the CRD refuses a
QuantizedModel that breaks it, with a message naming the field; immutable fields refuse changes;
unknown fields are refused under strict field validation; every example is accepted."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import yaml

from tests.kube.controlplane import ROOT, CommandError, ControlPlane
from tests.test_operator_crd import DELETE, IMMUTABLE, INVALID, _base, _set

pytestmark = pytest.mark.controlplane
CRD = yaml.safe_load((ROOT / "crds" / "quantizedmodels.kubequant.io.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
TOO_MANY = object()


def _set_path(obj: dict, path: list[str], value) -> dict:
    """Set a value at a schema path: '[]' is the first item of a list, '{}' a key of a map."""
    obj = copy.deepcopy(obj)
    node = obj
    for i, key in enumerate(path[:-1]):
        following = path[i + 1]
        empty: object = [{}] if following == "[]" else {}
        if key == "[]":
            node = node[0]
            continue
        if key == "{}":
            key = "x"
        existing = node.get(key)
        if following == "[]":
            node[key] = [copy.deepcopy(existing[0]) if existing else {}]
        elif not isinstance(existing, dict):
            node[key] = empty
        node = node[key]
    node["x" if path[-1] == "{}" else path[-1]] = value
    return obj


def _base_for(path: list[str]) -> dict:
    """The example, with the alternative branch that `path` lies under chosen (and otherwise valid)."""
    body = _base()
    joined = ".".join(path)
    if joined.startswith("spec.source.pvc"):
        body["spec"]["source"] = {"pvc": {"claimName": "models", "path": "llama"}}
    for text in ("spec.quantization.calibration.text", "spec.evaluation.text"):
        if joined.startswith(f"{text}.configMap"):
            body = _set(body, text, {"configMap": {"name": "texts", "key": "t.txt"}})
    return body


def schema_cases(node: dict = SPEC_SCHEMA, path: list[str] | None = None) -> Iterator[tuple[str, list[str], object]]:
    """(constraint, path, bad value or DELETE) for every constraint of the spec's schema."""
    path = path or ["spec"]
    for field in node.get("required", []):
        yield "required", [*path, field], DELETE
    if "enum" in node:
        bad = max(node["enum"]) + 1 if node.get("type") == "integer" else "NotAnOption"
        yield "enum", path, bad
    if "minimum" in node:
        yield "minimum", path, node["minimum"] - 1
        if not float(node["minimum"]).is_integer():  # an integer just under it: the apiserver truncates the bound
            yield "fractional minimum", path, math.floor(node["minimum"])
    if "maximum" in node:
        yield "maximum", path, node["maximum"] + 1
    if "pattern" in node:
        yield "pattern", path, "!not valid!"
    if "minLength" in node:
        yield "minLength", path, ""
    if "maxLength" in node:
        yield "maxLength", path, "a" * (node["maxLength"] + 1)
    if "maxItems" in node:
        yield "maxItems", path, TOO_MANY
    if node.get("x-kubernetes-int-or-string"):
        yield "int-or-string", path, ["a", "list"]
    elif node.get("type") == "integer":
        yield "type", path, "eight"
    for key, sub in (node.get("properties") or {}).items():
        yield from schema_cases(sub, [*path, key])
    if isinstance(node.get("items"), dict):
        yield from schema_cases(node["items"], [*path, "[]"])
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_cases(node["additionalProperties"], [*path, "{}"])


def _schema_body(constraint: str, path: list[str], value) -> dict:
    body = _base_for(path)
    if value is DELETE:
        parent = body
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        parent.pop(path[-1], None)
        return body
    if value is TOO_MANY:
        node = SPEC_SCHEMA
        for key in path[1:]:
            node = node["properties"][key]
        item = {"key": "k", "operator": "Exists"} if node["items"].get("type") == "object" else "--flag"
        value = [item] * (node["maxItems"] + 1)
    if path[-1] == "[]":  # a list item itself
        return _set_path(body, path[:-1], [value])
    return _set_path(body, path, value)


def _field(path: list[str]) -> str:
    """The part of the field's name the apiserver's message holds for sure: up to the first list
    item or map key (written [0] or .x, depending on the check)."""
    named = []
    for key in path:
        if key in ("[]", "{}"):
            break
        named.append(key)
    return ".".join(named)


def _create(cluster: ControlPlane, namespace: str, body: dict, name: str) -> CommandError | None:
    body = copy.deepcopy(body)
    body["metadata"]["name"] = body["metadata"].get("name") if name == "" else name
    try:
        cluster.kubectl("create", "--validate=strict", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))
    except CommandError as exc:
        return exc
    return None


def test_the_apiserver_refuses_every_invalid_model(control_plane: ControlPlane, capsys: pytest.CaptureFixture):
    ns = control_plane.create_namespace("kq-admission")
    tried, refused, problems = 0, 0, []

    def expect_refused(what: str, error: CommandError | None, *needles: str) -> None:
        nonlocal tried, refused
        tried += 1
        if error is None:
            problems.append(f"{what}: accepted")
            return
        refused += 1
        missing = [n for n in needles if n not in error.stderr]
        if missing:
            problems.append(f"{what}: refused, but the message lacks {missing}: {error.stderr.strip()}")

    # Every CEL rule, with its own message.
    for i, (what, changes, message) in enumerate(INVALID):
        body = _base()
        for path, value in changes:
            body = _set(body, path, value)
        keeps_name = any(path == "metadata.name" for path, _ in changes)
        expect_refused(f"CEL: {what}", _create(control_plane, ns, body, "" if keeps_name else f"cel-{i}"), message)

    # Every schema constraint, with the field named.
    cases = list(schema_cases())
    for i, (constraint, path, value) in enumerate(cases):
        body = _schema_body(constraint, path, value)
        expect_refused(f"schema: {constraint} of {'.'.join(path)}", _create(control_plane, ns, body, f"schema-{i}"),
                       _field(path))

    # Unknown fields, under strict field validation (kubectl's --validate=strict).
    for i, path in enumerate(["spec.quantization.bitz", "spec.serving.replica", "spec.unknown"]):
        body = _set(_base(), path, 4)
        expect_refused(f"unknown field {path}", _create(control_plane, ns, body, f"unknown-{i}"),
                       f'unknown field "{path}"')

    # Immutable fields, changed on update (server-side apply, as a GitOps tool sends it).
    for i, (what, changes, message) in enumerate(IMMUTABLE):
        old = copy.deepcopy(_base())
        old["metadata"]["name"] = f"immutable-{i}"
        control_plane.apply(old, namespace=ns, server_side=True)
        new = old
        for path, value in changes:
            new = _set(new, path, value)
        try:
            control_plane.apply(new, namespace=ns, server_side=True)
            error = None
        except CommandError as exc:
            error = exc
        expect_refused(f"immutable: {what}", error, message)

    with capsys.disabled():  # shown in the run's output, not only on failure
        print(f"\nadmission corpus: {tried} invalid QuantizedModels tried, {refused} refused by the apiserver "
              f"({len(INVALID)} CEL rules, {len(cases)} schema constraints, 3 unknown fields, "
              f"{len(IMMUTABLE)} immutable fields)")
    assert not problems, "\n".join(problems)
    assert tried >= 25 and refused == tried
    created = control_plane.kubectl("get", "qm", "-n", ns, "-o", "name").stdout.split()
    assert sorted(created) == sorted(f"quantizedmodel.kubequant.io/immutable-{i}" for i in range(len(IMMUTABLE)))


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_is_accepted(control_plane: ControlPlane, example: str):
    ns = f"kq-example-{example.removesuffix('.yaml').replace('.', '-')}"
    if control_plane.get("namespace", ns) is None:
        control_plane.create_namespace(ns)
    control_plane.kubectl("create", "--validate=strict", "-n", ns, "-f", str(ROOT / "examples" / example))
    body = yaml.safe_load((ROOT / "examples" / example).read_text())
    stored = control_plane.get("qm", body["metadata"]["name"], ns)
    # Defaults from the schema are filled in by the apiserver.
    assert stored["spec"]["quantization"]["bits"] == body["spec"]["quantization"].get("bits", 4)
    assert "retentionPolicy" in stored["spec"]["storage"]
