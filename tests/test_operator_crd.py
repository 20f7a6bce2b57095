"""The QuantizedModel CRD: structure, the examples, and every CEL rule failing with its own message."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubequant.spec import SpecError, parse_model

from quantizer import contract
from tests.operator_support import crd

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _walk_fields(node: dict, path: str = ""):
    for key, sub in node.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from _walk_fields(sub, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk_fields(node["items"], f"{path}[]")


def _all_rules(node: dict) -> list[dict]:
    rules = list(node.get("x-kubernetes-validations", []))
    for _, sub in _walk_fields(node):
        rules += sub.get("x-kubernetes-validations", [])
        rules += (sub.get("items") or {}).get("x-kubernetes-validations", [])  # a list's rules on each item
    return rules


def test_crd_shape():
    spec = crd.crd()["spec"]
    assert spec["group"] == "kubequant.io" and spec["names"]["kind"] == "QuantizedModel"
    assert spec["names"]["shortNames"] == ["qm"] and spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Bits", "Group", "Baseline PPL", "Quantized PPL", "KL", "Top-1", "Task Drop", "Ready", "Candidate",
                       "Nodes", "Replicas",
                       "Age"]


def test_crd_is_a_valid_structural_crd():
    kubernetes_validate.validate(crd.crd(), "1.33.0", strict=True)
    for path, node in _walk_fields(crd.schema()):
        # Structural: every node has a type, except int-or-string ones (whose anyOf only lists types).
        if node.get("x-kubernetes-int-or-string"):
            assert all(set(branch) == {"type"} for branch in node["anyOf"]), path
        else:
            assert node.get("type"), f"{path} has no type"
        if node.get("type") == "object" and path != ".metadata":
            assert "properties" in node or "additionalProperties" in node, f"{path}: an object of what?"


def test_every_field_is_described_and_every_default_is_valid():
    for path, node in _walk_fields(crd.schema()):
        if path == ".metadata":
            continue  # the apiserver owns metadata's schema
        assert node.get("description"), f"{path} has no description"
        if "default" in node:
            jsonschema.Draft7Validator(node).validate(node["default"])


@pytest.mark.parametrize("name", ["tiny.yaml", "llama-3-8b-tp2.yaml"])
def test_examples_are_valid(name):
    obj = yaml.safe_load((EXAMPLES / name).read_text())
    assert crd.validate(obj) == []


def _base() -> dict:
    return yaml.safe_load((EXAMPLES / "llama-3-8b-tp2.yaml").read_text())


def _set(obj: dict, path: str, value) -> dict:
    obj = copy.deepcopy(obj)
    *parents, last = path.split(".")
    node = obj
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return obj


DELETE = object()
MIXED = {"finer": {"groupSize": 32}, "maxSizeIncreasePercent": 5}

# (what is wrong, [(path, value), ...], the message the apiserver must answer with)
INVALID = [
    ("two sources", [("spec.source.pvc", {"claimName": "models", "path": "llama"})],
     "source must set exactly one of huggingface or pvc"),
    ("no source", [("spec.source.huggingface", DELETE)],
     "source must set exactly one of huggingface or pvc"),
    ("absolute model path", [("spec.source", {"pvc": {"claimName": "models", "path": "/llama"}})],
     "source.pvc.path must be relative to the root of the claim and must not contain '..'"),
    ("8-bit served on the CPU", [("spec.quantization.bits", 8), ("spec.serving.device", "cpu"),
                                 ("spec.serving.tensorParallelSize", 1)],
     "serving.device cpu serves 4-bit only (vLLM's CPU kernel): set quantization.bits 4, or serving.device gpu"),
    ("CPU serving across GPUs", [("spec.serving.device", "cpu")],
     "serving.device cpu serves on one CPU Pod: set tensorParallelSize 1 and nodes 1, or device gpu"),
    ("3-bit served", [("spec.quantization.bits", 3)],
     "serving.enabled needs a recipe vLLM serves: quantization.bits 4 or 8, symmetric true and groupSize -1, 32, 64 or 128 (or set serving.enabled false to only quantize)"),
    ("asymmetric served", [("spec.quantization.symmetric", False)],
     "serving.enabled needs a recipe vLLM serves: quantization.bits 4 or 8, symmetric true and groupSize -1, 32, 64 or 128 (or set serving.enabled false to only quantize)"),
    ("group 256 served", [("spec.quantization.groupSize", 256)],
     "serving.enabled needs a recipe vLLM serves: quantization.bits 4 or 8, symmetric true and groupSize -1, 32, 64 or 128 (or set serving.enabled false to only quantize)"),
    ("group-aware order without act-order", [("spec.quantization.groupAwareOrder", True),
                                              ("spec.quantization.actOrder", False)],
     "quantization.groupAwareOrder is a kind of act-order: it needs actOrder true"),
    ("TP 3", [("spec.serving.tensorParallelSize", 3)],
     "serving.tensorParallelSize must be a power of two (1, 2, 4, 8, ...)"),
    ("negative increase", [("spec.evaluation.maxPerplexityIncrease", -0.5)],
     "evaluation.maxPerplexityIncrease must be positive"),
    ("zero KL", [("spec.evaluation.maxKLDivergence", 0)], "evaluation.maxKLDivergence must be positive"),
    ("agreement without the source", [("spec.evaluation.compareWithSource", False),
                                      ("spec.evaluation.minTopTokenAgreement", 0.9)],
     "evaluation.maxKLDivergence, minTopTokenAgreement, generation, tasks and throughput.minSpeedup compare with the source model: they need compareWithSource true"),
    ("zero speedup", [("spec.evaluation.throughput", {"minSpeedup": 0})], "evaluation.throughput.minSpeedup must be positive"),
    ("tasks from two places", [("spec.evaluation.tasks", {"path": "tasks", "configMap": {"name": "tasks"}})],
     "evaluation.tasks must set exactly one of path or configMap"),
    ("escaping tasks path", [("spec.evaluation.tasks", {"path": "../tasks"})],
     "a tasks path must be relative to the root of the storage PVC and must not contain '..'"),
    ("ratio below 1", [("spec.evaluation.maxPerplexityRatio", 0.9)],
     "evaluation.maxPerplexityRatio must be at least 1.0 (it divides the served perplexity by the baseline)"),
    ("stride above the window", [("spec.evaluation.stride", 4096)],
     "evaluation.stride must not exceed evaluation.seqLen (windows would skip tokens)"),
    ("zero engine tolerance", [("spec.evaluation.engineTolerance", 0)],
     "evaluation.engineTolerance must be positive"),
    # An integer under a fractional minimum passes the apiserver's schema check (it truncates the bound).
    ("zero dampening", [("spec.quantization.dampPercent", 0)],
     "quantization.dampPercent must be at least 0.001 (1.0 is the usual choice)"),
    ("a candidate that overrides nothing", [("spec.quantization.candidates", [{"name": "same"}])],
     "a quantization candidate must override at least one recipe field, such as groupSize"),
    ("zero dampening in a candidate", [("spec.quantization.candidates", [{"dampPercent": 0}])],
     "quantization.candidates[].dampPercent must be at least 0.001 (1.0 is the usual choice)"),
    ("group-aware candidate without act-order", [("spec.quantization.actOrder", False),
                                                 ("spec.quantization.candidates", [{"groupAwareOrder": True}])],
     "quantization.candidates[].groupAwareOrder is a kind of act-order: a candidate with groupAwareOrder needs "
     "actOrder true (its own or the recipe's)"),
    ("candidates without the gate", [("spec.serving.enabled", False),
                                     ("spec.quantization.candidates", [{"groupSize": 32}])],
     "quantization.candidates are tried until one passes the gate, which runs only when serving is enabled: "
     "set serving.enabled true, or drop the candidates"),
    ("3-bit candidate served", [("spec.quantization.candidates", [{"groupSize": 32}, {"bits": 3}])],
     "serving.enabled needs recipes vLLM serves: every quantization.candidates entry must make bits 4 or 8, "
     "symmetric true and groupSize -1, 32, 64 or 128 (or set serving.enabled false to only quantize)"),
    ("8-bit candidate served on the CPU", [("spec.serving.device", "cpu"), ("spec.serving.tensorParallelSize", 1),
                                           ("spec.quantization.candidates", [{"bits": 8}])],
     "serving.device cpu serves 4-bit only (vLLM's CPU kernel): no quantization.candidates entry may set bits "
     "other than 4"),
    ("mixed precision in the gptq layout", [("spec.quantization.format", "gptq"),
                                            ("spec.quantization.mixedPrecision", MIXED)],
     "quantization.mixedPrecision needs format compressed-tensors: the gptq layout holds one scheme for the whole "
     "checkpoint"),
    ("mixed precision no finer than the recipe", [("spec.quantization.mixedPrecision",
                                                   {**MIXED, "finer": {"groupSize": 128}})],
     "quantization.mixedPrecision.finer must be finer than the recipe: more bits, or the same bits and a smaller "
     "groupSize"),
    ("mixed precision unquantized and 8-bit", [("spec.quantization.mixedPrecision",
                                                {**MIXED, "finer": {"unquantized": True, "bits": 8}})],
     "mixedPrecision.finer sets bits or groupSize, or unquantized true alone"),
    ("mixed precision with no room", [("spec.quantization.mixedPrecision", {**MIXED, "maxSizeIncreasePercent": 0})],
     "mixedPrecision.maxSizeIncreasePercent must be above 0 (5 lets the checkpoint grow by 5%)"),
    ("a mixed candidate in the gptq layout", [("spec.quantization.candidates", [{"format": "gptq",
                                                                                "mixedPrecision": MIXED}])],
     "quantization.candidates[].mixedPrecision needs format compressed-tensors (the candidate's or the recipe's)"),
    ("8-bit finer units served on the CPU", [("spec.serving.device", "cpu"), ("spec.serving.tensorParallelSize", 1),
                                             ("spec.quantization.mixedPrecision", {**MIXED, "finer": {"bits": 8}})],
     "serving.device cpu serves 4-bit only (vLLM's CPU kernel): quantization.mixedPrecision.finer.bits must be 4 "
     "(or use a smaller groupSize, or unquantized)"),
    ("zero GPU memory", [("spec.serving.gpuMemoryUtilization", 0)],
     "serving.gpuMemoryUtilization must be at least 0.1 (0.9 is the default)"),
    ("text from two places", [("spec.evaluation.text.configMap", {"name": "texts", "key": "eval.txt"})],
     "a text source must set exactly one of path, configMap or huggingface"),
    ("calibration text from nowhere", [("spec.quantization.calibration.text", {})],
     "a text source must set exactly one of path, configMap or huggingface"),
    ("escaping text path", [("spec.quantization.calibration.text", {"path": "../secrets.txt"})],
     "a text path must be relative to the root of the storage PVC and must not contain '..'"),
    ("escaping dataset file", [("spec.quantization.calibration.text.huggingface.file", "../x.parquet")],
     "a dataset file must be relative to the root of the repository and must not contain '..'"),
    ("prompts from two places", [("spec.evaluation.generation", {"prompts": {
        "path": "prompts.txt", "configMap": {"name": "texts", "key": "prompts.txt"}}})],
     "a text source must set exactly one of path or configMap"),
    ("managed flag in extraArgs", [("spec.serving.extraArgs", ["--max-model-len=1024"])],
     "serving.extraArgs must not set --tensor-parallel-size, --pipeline-parallel-size, --distributed-executor-backend, --served-model-name, --max-model-len, --gpu-memory-utilization, --port, --quantization or --model: the spec sets them"),
    ("pipeline flag in extraArgs", [("spec.serving.extraArgs", ["--pipeline-parallel-size", "2"])],
     "serving.extraArgs must not set --tensor-parallel-size, --pipeline-parallel-size, --distributed-executor-backend, --served-model-name, --max-model-len, --gpu-memory-utilization, --port, --quantization or --model: the spec sets them"),
    ("autoscaling max below min", [("spec.serving.autoscaling", {"minReplicas": 3, "maxReplicas": 2})],
     "serving.autoscaling.maxReplicas must be at least minReplicas"),
    ("long name", [("metadata.name", "a" * 41)],
     "metadata.name must be at most 40 characters: it prefixes the names of the Jobs, Deployment and Service the operator creates"),
    ("name starting with a digit", [("metadata.name", "3b-model")],
     "metadata.name must start with a letter and hold only lowercase letters, digits and '-': it also names a Service"),
]

# (what changes, [(path, value), ...], message) on an update of the base object
IMMUTABLE = [
    ("claim", [("spec.storage.claimName", "other")], "storage.claimName is immutable: the artifacts live on that claim"),
    ("create", [("spec.storage.create", False)], "storage.create is immutable"),
    ("access mode", [("spec.storage.accessMode", "ReadWriteOnce")], "storage.accessMode is immutable"),
    ("storage class added", [("spec.storage.storageClassName", "fast")], "storage.storageClassName is immutable"),
]


@pytest.mark.parametrize(("what", "changes", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_resource_fails_with_its_message(what, changes, message):
    obj = _base()
    for path, value in changes:
        obj = _set(obj, path, value)
    assert crd.validate(obj) == [message]


@pytest.mark.parametrize(("what", "changes", "message"), IMMUTABLE, ids=[c[0] for c in IMMUTABLE])
def test_immutable_fields(what, changes, message):
    old = _base()
    new = old
    for path, value in changes:
        new = _set(new, path, value)
    assert crd.validate(new) == []  # fine to create
    assert crd.validate(new, old=old) == [message]  # not fine to change


def test_storage_class_cannot_be_removed_or_changed():
    old = _set(_base(), "spec.storage.storageClassName", "fast")
    for new in (_set(old, "spec.storage.storageClassName", DELETE), _set(old, "spec.storage.storageClassName", "slow")):
        assert crd.validate(new, old=old) == ["storage.storageClassName is immutable"]
    assert crd.validate(old, old=old) == []


def test_serving_disabled_allows_any_recipe():
    obj = _set(_set(_base(), "spec.quantization.bits", 3), "spec.serving.enabled", False)
    obj = _set(obj, "spec.quantization.symmetric", False)
    assert crd.validate(obj) == []


def test_schema_rejects_out_of_range_values():
    assert crd.validate(_set(_base(), "spec.quantization.bits", 5))  # enum
    assert crd.validate(_set(_base(), "spec.serving.gpuMemoryUtilization", 1.5))  # maximum
    assert crd.validate(_set(_base(), "spec.serving.replicas", -1))  # minimum
    assert crd.validate(_set(_base(), "spec.storage.retentionPolicy", "Keep"))  # enum


def test_every_rule_is_exercised():
    tested = {m for *_, m in INVALID} | {m for *_, m in IMMUTABLE}
    assert {r["message"] for r in _all_rules(crd.schema())} == tested


def test_recipe_choices_are_the_contracts():
    quantization = crd.schema()["properties"]["spec"]["properties"]["quantization"]["properties"]
    assert tuple(quantization["bits"]["enum"]) == contract.QUANTIZABLE_BITS
    assert tuple(quantization["groupSize"]["enum"]) == contract.GROUP_SIZES
    assert tuple(quantization["scaleSearch"]["enum"]) == contract.SCALE_SEARCHES
    assert quantization["refineSweeps"]["maximum"] == contract.MAX_REFINE_SWEEPS
    assert quantization["sourceTargets"]["default"] == contract.DEFAULT_SOURCE_TARGETS
    assert tuple(quantization["format"]["enum"]) == contract.CHECKPOINT_FORMATS
    serving = crd.schema()["properties"]["spec"]["properties"]["serving"]["properties"]
    assert tuple(quantization["device"]["enum"]) == tuple(serving["device"]["enum"]) == contract.DEVICES
    assert quantization["format"]["default"] == contract.DEFAULT_FORMAT
    mixed = quantization["mixedPrecision"]["properties"]
    assert tuple(mixed["sensitivity"]["enum"]) == contract.MIXED_SENSITIVITIES
    assert mixed["sensitivity"]["default"] == contract.DEFAULT_MIXED_SENSITIVITY
    assert tuple(mixed["finer"]["properties"]["bits"]["enum"]) == contract.SERVABLE_BITS
    assert tuple(mixed["finer"]["properties"]["groupSize"]["enum"]) == contract.SERVABLE_GROUP_SIZES


@pytest.mark.parametrize("device", contract.DEVICES)
@pytest.mark.parametrize("bits", contract.QUANTIZABLE_BITS)
def test_what_may_be_served_is_the_contracts(bits, device):
    """The CRD's rules, the operator's spec and the quantizer's contract agree on every recipe."""
    base = _set(_set(_base(), "spec.serving.device", device), "spec.serving.tensorParallelSize", 1)
    for group in contract.GROUP_SIZES:
        for symmetric in (True, False):
            obj = _set(_set(_set(base, "spec.quantization.bits", bits), "spec.quantization.groupSize", group),
                       "spec.quantization.symmetric", symmetric)
            servable = not contract.unservable_reasons(bits, group, symmetric, device)
            refused_by_crd = any("serving.enabled needs a recipe vLLM serves" in e or "serves 4-bit only" in e
                                 for e in crd.validate(obj))
            assert refused_by_crd is not servable, (bits, group, symmetric, device)
            obj["metadata"]["namespace"] = "ml"
            try:
                parse_model(obj)
                refused_by_spec = False
            except SpecError as exc:
                assert "serving.enabled needs a recipe vLLM serves" in str(exc)
                refused_by_spec = True
            assert refused_by_spec is not servable, (bits, group, symmetric)
