"""Argo CD: the QuantizedModel health check run in real Lua 5.1 (lupa), the argocd-cm snippet, the Application.

The health check runs in an environment like Argo CD's default one (gopher-lua with the base and
table libraries only: no string, math, os or io, and no string methods), on example resources.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="lupa (a dev dependency) provides Lua 5.1")
from lupa import lua51  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGOCD = ROOT / "deploy" / "argocd"
LUA = ARGOCD / "health-quantizedmodel.lua"
LWS_LUA = ARGOCD / "health-leaderworkerset.lua"
POOL_LUA = ARGOCD / "health-inferencepool.lua"
SNIPPET = ARGOCD / "argocd-cm-snippet.yaml"
APPLICATION = ARGOCD / "application.yaml"
CRD = ROOT / "crds" / "quantizedmodels.kubequant.io.yaml"
CHART = ROOT / "charts" / "kubequant"

# The sandbox: the base library and `table`, as Argo CD opens them when useOpenLibs is off.
SANDBOX = """
local source, obj = ...
local env = {obj = obj, table = table, _VERSION = _VERSION}
for _, name in ipairs({"assert", "error", "ipairs", "next", "pairs", "pcall", "select", "tonumber",
                       "tostring", "type", "unpack", "xpcall", "rawequal", "rawget", "rawset",
                       "getmetatable", "setmetatable"}) do
  env[name] = _G[name]
end
local chunk, err = loadstring(source, "=health-quantizedmodel.lua")
if chunk == nil then error(err) end
setfenv(chunk, env)
local hs = chunk()
return hs.status, hs.message
"""


@functools.cache
def _runtime():
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    assert lua.eval("_VERSION") == "Lua 5.1"
    lua.execute('getmetatable("").__index = nil')  # gopher-lua without the string library has no methods
    return lua, lua.compile(SANDBOX)


def health(resource: dict, script: Path = LUA) -> tuple[str, str | None]:
    lua, sandbox = _runtime()
    status, message = sandbox(script.read_text(), lua.table_from(resource, recursive=True))
    return status, message


def model(status: dict | None = None, generation: int | None = 1) -> dict:
    obj = {"apiVersion": "kubequant.io/v1alpha1", "kind": "QuantizedModel",
           "metadata": {"name": "llama-3-8b", "namespace": "llm"}, "spec": {"serving": {"replicas": 2}}}
    if generation is not None:
        obj["metadata"]["generation"] = generation
    if status is not None:
        obj["status"] = status
    return obj


def status(phase: str, message: str | None = None, observed: int | None = 1, **extra) -> dict:
    out = {"phase": phase, **extra}
    if message is not None:
        out["message"] = message
    if observed is not None:
        out["observedGeneration"] = observed
    return out


CONDITIONS = [
    {"type": "Quantized", "status": "True", "reason": "ArtifactReady", "message": "4.1 GB -> 5.7 GB"},
    {"type": "Ready", "status": "False", "reason": "GateFailed", "message": "the gate failed"},
]


@pytest.mark.parametrize(("resource", "expected_status", "expected_message"), [
    # No status yet: the operator has not seen the model.
    (model(), "Progressing", "Waiting for the kubequant operator"),
    (model({}), "Progressing", "Waiting for the kubequant operator"),
    (model({"phase": ""}), "Progressing", "Waiting for the kubequant operator"),
    (model({"conditions": CONDITIONS}), "Progressing", "Waiting for the kubequant operator"),
    # The status was computed for an older spec.
    (model(status("Ready", "serving", observed=1), generation=2), "Progressing",
     "has not yet reconciled generation 2 of the spec (last 1)"),
    (model(status("Ready", "serving", observed=None), generation=2), "Progressing", "(last none)"),
    (model(status("GateFailed", "ppl 9.1 > 8.4", observed=3), generation=4), "Progressing", "generation 4"),
    (model(status("Failed", "OOMKilled", observed=1), generation=2), "Progressing", "generation 2"),
    # On its way.
    (model(status("Pending", "waiting for the quantize Job to be scheduled")), "Progressing",
     "Pending: waiting for the quantize Job to be scheduled"),
    (model(status("Quantizing", "quantize Job llama-3-8b-quantize-0f3a running")), "Progressing",
     "Quantizing: quantize Job llama-3-8b-quantize-0f3a running"),
    (model(status("Evaluating", "measuring perplexity in vLLM")), "Progressing",
     "Evaluating: measuring perplexity in vLLM"),
    (model(status("Deploying", "1/2 replicas available")), "Progressing", "Deploying: 1/2 replicas available"),
    (model(status("Quantizing")), "Progressing", "Quantizing: in progress"),
    # Serving.
    (model(status("Ready", "serving artifact 0f3a (perplexity 8.21, baseline 8.02)", conditions=CONDITIONS,
                  baselinePerplexity=8.02, quantizedPerplexity=8.21)),
     "Healthy", "Ready: serving artifact 0f3a (perplexity 8.21, baseline 8.02)"),
    (model(status("Ready", "")), "Healthy", "Ready: serving the quantized model"),
    (model(status("Ready", "ok", observed=5), generation=5), "Healthy", "Ready: ok"),
    (model(status("Ready", "ok", observed=6), generation=5), "Healthy", "Ready: ok"),
    # A model without metadata.generation (not from an apiserver) is judged by its phase.
    (model(status("Ready", "ok", observed=None), generation=None), "Healthy", "Ready: ok"),
    # Failures, with the operator's message.
    (model(status("Failed", "OOMKilled: the quantize container ran out of memory (limit 64Gi)")), "Degraded",
     "Failed: OOMKilled: the quantize container ran out of memory (limit 64Gi)"),
    (model(status("Failed")), "Degraded", "Failed: the operator reported a failure"),
    (model(status("GateFailed", "PerplexityRegression: 9.10 > 8.02 * 1.05; still serving 7c1e")), "Degraded",
     "GateFailed: PerplexityRegression: 9.10 > 8.02 * 1.05; still serving 7c1e"),
    (model(status("GateFailed")), "Degraded", "the last model that passed keeps serving"),
    # A phase this check does not know (a newer operator): say so rather than guess.
    (model(status("Paused", "by the user")), "Unknown", "Unknown phase Paused"),
])
def test_health(resource, expected_status, expected_message):
    got_status, got_message = health(resource)
    assert got_status == expected_status
    assert expected_message in got_message


def test_health_covers_every_phase_of_the_crd():
    crd = yaml.safe_load(CRD.read_text())
    phases = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "phase"]["enum"]
    expected = {"Pending": "Progressing", "Quantizing": "Progressing", "Evaluating": "Progressing",
                "Deploying": "Progressing", "Ready": "Healthy", "Failed": "Degraded", "GateFailed": "Degraded"}
    assert sorted(phases) == sorted(expected), "a phase was added to the CRD: teach the health check"
    for phase in phases:
        assert health(model(status(phase, "m")))[0] == expected[phase], phase


def test_health_does_not_change_the_resource():
    resource = model(status("Ready", "ok"))
    before = copy.deepcopy(resource)
    health(resource)
    assert resource == before


def test_sandbox_is_as_strict_as_argo_cd():
    """The sandbox really lacks what Argo CD lacks, so a script that passes here runs there too."""
    lua, sandbox = _runtime()
    for script in ('return {status = string.upper("x")}', 'return {status = ("x"):upper()}',
                   'return {status = tostring(math.floor(1.5))}', 'return {status = os.getenv("HOME")}'):
        with pytest.raises(lua51.LuaError):
            sandbox(script, lua.table_from({}, recursive=True))


# ---- argocd-cm ----------------------------------------------------------------------------------

def test_snippet_embeds_the_same_lua():
    snippet = yaml.safe_load(SNIPPET.read_text())
    crd = yaml.safe_load(CRD.read_text())
    key = f"resource.customizations.health.{crd['spec']['group']}_{crd['spec']['names']['kind']}"
    scripts = {key: LUA, "resource.customizations.health.leaderworkerset.x-k8s.io_LeaderWorkerSet": LWS_LUA,
               "resource.customizations.health.inference.networking.k8s.io_InferencePool": POOL_LUA}
    assert list(snippet["data"]) == list(scripts)
    for name, script in scripts.items():
        assert snippet["data"][name] == script.read_text(), f"keep argocd-cm-snippet.yaml and {script.name} identical"
    assert snippet["metadata"]["name"] == "argocd-cm"


def test_snippet_is_a_valid_configmap():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(yaml.safe_load(SNIPPET.read_text()), "1.33.0", strict=True)


# ---- the Application and its sync waves ---------------------------------------------------------

APPLICATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "argoproj.io/v1alpha1"},
        "kind": {"const": "Application"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["project", "destination", "sources"],
            "properties": {
                "project": {"type": "string"},
                "destination": {"type": "object", "additionalProperties": False, "required": ["namespace"],
                                "properties": {"server": {"type": "string"}, "name": {"type": "string"},
                                               "namespace": {"type": "string"}}},
                "sources": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["repoURL", "targetRevision"],
                    "properties": {
                        "repoURL": {"type": "string", "pattern": "^https://"},
                        # Pinned: a release tag or a commit, never a moving branch.
                        "targetRevision": {"type": "string", "pattern": "^(v[0-9]+\\.[0-9]+\\.[0-9]+|[0-9a-f]{40})$"},
                        "path": {"type": "string"},
                        "chart": {"type": "string"},
                        "ref": {"type": "string"},
                        "helm": {"type": "object", "additionalProperties": False, "properties": {
                            "releaseName": {"type": "string"}, "valuesObject": {"type": "object"},
                            "valueFiles": {"type": "array"}, "skipCrds": {"type": "boolean"}}},
                        "directory": {"type": "object", "additionalProperties": False, "properties": {
                            "include": {"type": "string"}, "exclude": {"type": "string"},
                            "recurse": {"type": "boolean"}}},
                    }}},
                "syncPolicy": {"type": "object", "additionalProperties": False, "properties": {
                    "automated": {"type": "object", "additionalProperties": False, "properties": {
                        "prune": {"type": "boolean"}, "selfHeal": {"type": "boolean"}}},
                    "syncOptions": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z]+=[a-z]+$"}},
                    "retry": {"type": "object"}}},
            },
        },
    },
}


def _application() -> dict:
    return yaml.safe_load(APPLICATION.read_text())


def _wave(obj: dict) -> int:
    return int(((obj.get("metadata") or {}).get("annotations") or {}).get("argocd.argoproj.io/sync-wave", "0"))


def _source(path: str) -> dict:
    (source,) = [s for s in _application()["spec"]["sources"] if s.get("path") == path]
    return source


def test_application_shape():
    app = _application()
    jsonschema.validate(app, APPLICATION_SCHEMA)
    for source in app["spec"]["sources"]:
        assert (ROOT / source["path"]).is_dir(), source["path"]
    assert "finalizers" not in app["metadata"], "deleting the Application must not cascade to the CRD and the models"
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


def test_the_application_pins_a_commit_of_this_repository_with_this_chart():
    """Pinned to a commit that exists (no tag no one made), holding the chart and the models folder at
    the version this checkout documents."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)

    if git("rev-parse", "--is-shallow-repository").stdout.strip() != "false":
        pytest.skip("needs this repository's history (a full clone, not a shallow one or an export)")
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for source in _application()["spec"]["sources"]:
        revision = source["targetRevision"]
        assert git("merge-base", "--is-ancestor", revision, "HEAD").returncode == 0, f"{revision} is not in main's history"
        pinned = git("show", f"{revision}:charts/kubequant/Chart.yaml")
        assert pinned.returncode == 0 and yaml.safe_load(pinned.stdout)["version"] == chart["version"], revision
        assert git("cat-file", "-e", f"{revision}:{source['path']}").returncode == 0, (revision, source["path"])


def _chart_objects(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(copy.deepcopy(values))
        rendered = chart.render(values=copy.deepcopy(values), name="kubequant", namespace="kubequant",
                                is_install=True)
        crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    objects = [d for path, text in rendered.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    return crds + objects


def _models() -> list[dict]:
    source = _source("deploy/argocd/models")
    docs = []
    for path in sorted((ROOT / source["path"]).glob(source["directory"]["include"])):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_sync_waves_order_crds_then_operator_then_models():
    chart = _source("charts/kubequant")
    objects = _chart_objects(chart["helm"]["valuesObject"])
    crd_waves = {_wave(o) for o in objects if o["kind"] == "CustomResourceDefinition"}
    operator_waves = {_wave(o) for o in objects if o["kind"] != "CustomResourceDefinition"}
    models = _models()
    assert models and all(m["kind"] == "QuantizedModel" for m in models)
    model_waves = {_wave(m) for m in models}
    assert crd_waves == {0} and operator_waves == {1} and model_waves == {2}
    assert {o["kind"] for o in objects} >= {"CustomResourceDefinition", "Deployment", "Role", "ServiceAccount"}
    for m in models:
        # The CRD comes in the same sync: Argo CD must not dry-run the model before it exists.
        assert "SkipDryRunOnMissingResource=true" in m["metadata"]["annotations"]["argocd.argoproj.io/sync-options"]
        assert "namespace" not in m["metadata"], "models go to the Application's namespace, the one the operator watches"


def test_argocd_models_are_valid_and_match_the_examples():
    try:
        from tests.operator_support.crd import validate
    except ImportError:  # the operator's CRD helpers (CEL too) are not there: the OpenAPI schema alone
        schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

        def validate(obj):
            return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    example = yaml.safe_load((ROOT / "examples" / "llama-3-8b-tp2.yaml").read_text())
    (argocd_model,) = _models()
    assert validate(argocd_model) == []
    assert argocd_model["spec"] == example["spec"], "deploy/argocd/models/ drifted from examples/llama-3-8b-tp2.yaml"
    assert argocd_model["metadata"]["name"] == example["metadata"]["name"]


def _lws(status: dict | None, replicas: int = 2, generation: int = 1) -> dict:
    obj = {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
           "metadata": {"name": "m", "generation": generation}, "spec": {"replicas": replicas}}
    if status is not None:
        obj["status"] = status
    return obj


AVAILABLE = [{"type": "Available", "status": "True"}]


@pytest.mark.parametrize(("resource", "expected"), [
    (_lws(None), ("Progressing", "waiting for the LeaderWorkerSet controller")),
    (_lws({"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2, "conditions": AVAILABLE}),
     ("Healthy", "2/2 groups ready")),
    (_lws({"observedGeneration": 1, "readyReplicas": 1, "updatedReplicas": 2, "conditions": AVAILABLE}),
     ("Progressing", "2/2 groups updated, 1 ready")),
    (_lws({"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2, "conditions": AVAILABLE}, generation=2),
     ("Progressing", "the controller has not seen the latest spec yet")),
])
def test_leader_worker_set_health(resource, expected):
    assert health(resource, LWS_LUA) == expected


def _pool(*conditions: dict) -> dict:
    parents = [{"parentRef": {"name": "gw"}, "conditions": list(conditions)}] if conditions else []
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "status": {"parents": parents}}


@pytest.mark.parametrize(("resource", "expected"), [
    (_pool(), ("Progressing", "no gateway references the pool yet")),
    (_pool({"type": "Accepted", "status": "True"}, {"type": "ResolvedRefs", "status": "True"}),
     ("Healthy", "accepted by 1 gateway(s)")),
    (_pool({"type": "Accepted", "status": "True"}, {"type": "ResolvedRefs", "status": "False",
                                                     "reason": "InvalidExtensionRef", "message": "no Service llama-epp"}),
     ("Degraded", "InvalidExtensionRef: no Service llama-epp")),
    (_pool({"type": "Accepted", "status": "True"}), ("Progressing", "waiting for the gateway to accept the pool")),
])
def test_inference_pool_health(resource, expected):
    assert health(resource, POOL_LUA) == expected
