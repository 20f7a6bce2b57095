"""kubequant in real containers on a real node: the images built from the Dockerfile (scripts/images.sh),
run by a kubelet through containerd and runc (scripts/cluster.sh with KUBEQUANT_NODE=1).

The operator Pod starts from its image under the chart's securityContext and RBAC and talks to the
apiserver with in-cluster credentials through the `kubernetes` Service (kube-proxy); its metrics are read
through `kubectl port-forward`. The last test takes the node down and checks that the machine is left as
it was found.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.kube import hub, node
from tests.kube.controlplane import (
    ROOT,
    TOOLS_BIN,
    CommandError,
    ControlPlane,
    Unavailable,
    ensure_binaries,
    wait_for,
)
from tests.kube.docs import INSTALL, blocks
from tests.kube.models import data_volume, example
from tests.kube.operator_process import free_port

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]
OPERATOR_NAMESPACE = "kubequant-system"
MODELS_NAMESPACE = "demo"  # docs/install.md's
HUB_TOKEN = "hf_kubequant_test_token_never_shown"


@pytest.fixture(scope="module")
def machine_before() -> dict:
    return node.machine_state()


def _skip_without_a_real_node() -> None:
    reason = node.missing_for_a_real_node()
    if reason:
        pytest.skip(reason)
    try:
        ensure_binaries()
    except Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, machine_before) -> ControlPlane:
    _skip_without_a_real_node()
    node.build_images()
    started = node.start(tmp_path_factory.mktemp("real-node"))
    try:
        started.apply_crds()
        yield started
    finally:
        started.down()


def test_a_failed_up_stops_what_it_started(tmp_path, machine_before):
    """Before the module's node: an `up` that fails halfway (here an image archive containerd cannot
    read, once etcd, the control plane, the bridge and containerd run) stops all of it and leaves the
    machine as it was, keeping its logs."""
    _skip_without_a_real_node()
    images = tmp_path / "images"
    images.mkdir()
    (images / "images.tar").write_bytes(b"not an image archive")
    failing = ControlPlane(tmp_path / "cluster", settings={"KUBEQUANT_NODE": "1", "KUBEQUANT_NODE_IMAGES": str(images)})
    with pytest.raises(CommandError) as failed:
        failing.up(timeout=900)
    assert "up failed" in failed.value.stderr and "stopping what it started" in failed.value.stderr
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "cluster")], capture_output=True, text=True).stdout.split()
    assert left == [], subprocess.run(["ps", "-o", "pid,args", "-p", ",".join(left)], capture_output=True, text=True).stdout
    assert node.machine_state() == machine_before
    assert (tmp_path / "cluster" / "logs" / "containerd.log").exists()


def _operator_pod(cluster: ControlPlane) -> dict:
    pods = cluster.list("pods", OPERATOR_NAMESPACE, "app.kubernetes.io/component=operator")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def test_the_node_is_real(cluster: ControlPlane):
    got = cluster.get("node", node.NODE_NAME)
    info = got["status"]["nodeInfo"]
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert info["kubeletVersion"] == "v1.37.2"
    addresses = {a["type"]: a["address"] for a in got["status"]["addresses"]}
    assert addresses["InternalIP"] == "10.244.77.1"
    # The images were loaded into the node's containerd: the kubelet reports them.
    images = {name for i in got["status"].get("images") or [] for name in i["names"]}
    for target in node.TARGETS:
        assert any(name.endswith(node.image(target).split("/", 1)[1]) for name in images), (target, images)


def test_the_operator_runs_from_its_image_with_in_cluster_credentials(cluster: ControlPlane):
    # docs/install.md, "A cluster on one Linux machine": its commands once the cluster is up, as written
    # (the fixture built the images and started this cluster as the lines before them do).
    [commands] = blocks(INSTALL, "## A cluster on one Linux machine")
    after_up = commands[next(i for i, line in enumerate(commands) if line.startswith("export KUBECONFIG=")) + 1:]
    assert [line.split()[:2] for line in after_up] == [["kubectl", "apply"], ["kubectl", "create"], ["helm", "install"]]
    for line in after_up:
        done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=cluster.env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{line}:\n{done.stdout}\n{done.stderr}"
    assert f"--set 'operator.watchNamespaces={{{MODELS_NAMESPACE}}}'" in after_up[-1]
    wait_for("the operator Deployment to be available", lambda: (d := cluster.get(
        "deployment", "kubequant", OPERATOR_NAMESPACE)) and (d.get("status") or {}).get("availableReplicas"),
        timeout=300, interval=1)
    pod = _operator_pod(cluster)
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and "running" in status["state"], status
    assert status["image"].endswith(node.image("operator").split("/", 1)[1])
    # The chart's securityContext, as the kubelet enforced it: the process runs as 65532, and the root
    # filesystem refuses writes.
    exec_ = ["exec", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"], "--"]
    assert cluster.kubectl(*exec_, "python", "-c", "import os; print(os.getuid(), os.getgid())").stdout.split() == [
        "65532", "65532"]
    refused = cluster.kubectl(*exec_, "python", "-c", "open('/opt/kubequant/x', 'w')", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # A model with a bad spec: the operator, in its Pod, reads it through the `kubernetes` Service with
    # its ServiceAccount token and writes the failure into status.
    cluster.apply({
        "apiVersion": "kubequant.io/v1alpha1", "kind": "QuantizedModel",
        "metadata": {"name": "no-such-claim", "namespace": MODELS_NAMESPACE},
        "spec": {"source": {"pvc": {"claimName": "absent", "path": "model"}},
                 "quantization": {"calibration": {"text": {"path": "cal.txt"}}},
                 "evaluation": {"text": {"path": "eval.txt"}},
                 "storage": {"claimName": "absent"}},
    })
    status = wait_for("the operator to write the model's status", lambda: (
        got := cluster.get("qm", "no-such-claim", MODELS_NAMESPACE)) and got.get("status", {}).get("phase") and got["status"],
        timeout=120, describe=lambda: cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"],
                                                      check=False).stdout[-3000:])
    assert status["phase"], status
    logs = cluster.kubectl("logs", "-n", OPERATOR_NAMESPACE, pod["metadata"]["name"]).stdout
    assert "no-such-claim" in logs
    cluster.kubectl("delete", "qm", "no-such-claim", "-n", MODELS_NAMESPACE, "--wait=true", "--timeout=120s")


def test_the_operator_metrics_through_port_forward(cluster: ControlPlane):
    pod = _operator_pod(cluster)["metadata"]["name"]
    port = free_port()
    forward = subprocess.Popen([str(TOOLS_BIN / "kubectl"), "port-forward", "-n", OPERATOR_NAMESPACE, f"pod/{pod}",
                                f"{port}:metrics"], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert "Forwarding from" in forward.stdout.readline()

        def scrape() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    return response.read().decode()
            except OSError:
                return None
        text = wait_for("the operator's /metrics", scrape, timeout=60, interval=1)
    finally:
        forward.terminate()
        forward.wait(timeout=30)
    assert re.search(r"^kubequant_\w+", text, flags=re.M), text[:2000]


def _completion(url: str) -> dict:
    request = urllib.request.Request(
        f"{url}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "tiny-llama", "prompt": "def main(", "max_tokens": 8}).encode())
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _describe(cluster: ControlPlane) -> str:
    pods = cluster.kubectl("get", "pods", "-n", MODELS_NAMESPACE, "-o", "wide", check=False).stdout
    model = cluster.get("qm", "tiny-llama", MODELS_NAMESPACE) or {}
    return f"{pods}\n{json.dumps(model.get('status'), indent=1)[-3000:]}"


def test_the_tiny_model_quantized_gated_and_served_in_real_containers(cluster: ControlPlane, tmp_path_factory):
    """examples/tiny.yaml as a user applies it: the quantize Job in the CPU quantizer image writing to the
    claim as user 65532, the evaluate Job with vLLM on the CPU in the evaluator image, the Deployment's
    vLLM Ready through its own probes, a completion through the Service, vLLM's /metrics from the Pod."""
    data_volume(cluster, MODELS_NAMESPACE, "kubequant-data", tmp_path_factory.mktemp("claim"), with_fixtures=True,
                local_node=node.NODE_NAME)
    cluster.apply(example("tiny.yaml"), namespace=MODELS_NAMESPACE)
    # The operator's Pod deleted while the gate runs: the Deployment starts another, which picks the
    # model up where it was, creating no second Job.
    wait_for("the evaluate Job", lambda: cluster.list("jobs", MODELS_NAMESPACE,
                                                      "kubequant.io/model=tiny-llama,app.kubernetes.io/component=evaluate"),
             timeout=600, interval=1, describe=lambda: _describe(cluster))
    first_operator = _operator_pod(cluster)["metadata"]["name"]
    cluster.kubectl("delete", "pod", first_operator, "-n", OPERATOR_NAMESPACE, "--wait=true", "--timeout=120s")
    # Quantize (seconds), then the gate with two vLLM engines on two cores, then vLLM's start: minutes.
    done = cluster.kubectl("wait", "--for=condition=Ready", "qm/tiny-llama", "-n", MODELS_NAMESPACE,
                           "--timeout=1500s", check=False, timeout=1600)
    assert done.returncode == 0, _describe(cluster)
    status = cluster.get("qm", "tiny-llama", MODELS_NAMESPACE)["status"]
    assert status["phase"] == "Ready", status
    # The gate measured in vLLM on the CPU, against the source model served beside the artifact.
    evaluation = status["evaluation"]
    assert evaluation["passed"] and evaluation["reason"] == "Passed", evaluation
    assert evaluation["servedPerplexity"] > 0 and evaluation["klDivergence"]["mean"] >= 0, evaluation

    # Every Pod ran on the real node, from the CPU images, as user 65532.
    pods = cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model=tiny-llama")
    components = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in pods}
    assert {"quantize", "evaluate", "server"} <= set(components), sorted(components)
    for component, pod in components.items():
        assert pod["spec"]["nodeName"] == node.NODE_NAME, component
        image = pod["status"]["containerStatuses"][0]["image"]
        assert image.endswith(node.image("quantizer-cpu" if component == "quantize" else "evaluator-cpu").split("/", 1)[1])
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods) == [
        "evaluate", "quantize", "server"], "one Pod of each: no child was made twice"
    assert _operator_pod(cluster)["metadata"]["name"] != first_operator
    for component in ("quantize", "evaluate"):
        terminated = components[component]["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed", terminated
    artifact = Path(cluster.get("pv", f"{MODELS_NAMESPACE}-kubequant-data")["spec"]["local"]["path"]) / status[
        "serving"]["artifact"]["path"]
    assert (artifact / "kubequant.json").stat().st_uid == 65532
    # The evaluate Job kept the source model's scores in the model's folder, its one writable mount.
    [scores] = (artifact.parent / "source-scores").glob("*.safetensors")
    assert scores.stat().st_uid == 65532

    # The Deployment's vLLM answers through the Service's ClusterIP (kube-proxy), and its metrics from the Pod.
    service = cluster.get("service", "tiny-llama", MODELS_NAMESPACE)["spec"]
    completion = _completion(f"http://{service['clusterIP']}:{service['ports'][0]['port']}")
    assert completion["choices"][0]["text"], completion
    server_ip = components["server"]["status"]["podIP"]
    with urllib.request.urlopen(f"http://{server_ip}:8000/metrics", timeout=60) as response:
        metrics = response.read().decode()
    assert re.search(r'^vllm:generation_tokens_total\{.*model_name="tiny-llama".*\} [1-9]', metrics, flags=re.M), \
        metrics[:2000]


def test_a_deleted_serving_pod_is_replaced_and_serves_again(cluster: ControlPlane):
    (old,) = [p["metadata"]["name"] for p in cluster.list("pods", MODELS_NAMESPACE,
                                                         "kubequant.io/model=tiny-llama,app.kubernetes.io/component=server")]
    cluster.kubectl("delete", "pod", old, "-n", MODELS_NAMESPACE, "--wait=true", "--timeout=120s")
    done = cluster.kubectl("wait", "--for=condition=Available", "deployment/tiny-llama", "-n", MODELS_NAMESPACE,
                           "--timeout=600s", check=False, timeout=700)
    assert done.returncode == 0, _describe(cluster)
    new = wait_for("a new serving Pod, Ready", lambda: [
        p for p in cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model=tiny-llama,app.kubernetes.io/component=server")
        if p["metadata"]["name"] != old and any(c["type"] == "Ready" and c["status"] == "True"
                                                 for c in p["status"].get("conditions") or [])], timeout=600)
    assert len(new) == 1
    service = cluster.get("service", "tiny-llama", MODELS_NAMESPACE)["spec"]
    assert _completion(f"http://{service['clusterIP']}:{service['ports'][0]['port']}")["choices"][0]["text"]


def _quantize_only(name: str, **changes: object) -> dict:
    """examples/tiny.yaml renamed, quantize only, with dotted spec changes (quantization__bits=3). Its
    Job asks for a quarter of a core: the node has two, and the tiny example's server holds one."""
    quarter_core = {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    return example("tiny.yaml", name, **{"serving__enabled": False, "quantization__resources": quarter_core, **changes})


def _wait_phase(cluster: ControlPlane, name: str, phase: str, timeout: float) -> dict:
    """The model's status once it reaches `phase`."""
    return wait_for(f"{name} to be {phase}", lambda: (s := (cluster.get("qm", name, MODELS_NAMESPACE) or {}).get(
        "status") or {}).get("phase") == phase and s, timeout=timeout, interval=1, describe=lambda: _describe(cluster))


def test_a_quantize_pod_over_its_memory_limit_is_oomkilled_and_shown_as_such(cluster: ControlPlane):
    cluster.apply(_quantize_only("tiny-oom", quantization__resources={"limits": {"memory": "160Mi"}},
                                 quantization__backoffLimit=0), namespace=MODELS_NAMESPACE)
    status = _wait_phase(cluster, "tiny-oom", "Failed", timeout=300)
    failed = json.dumps(status)
    assert "OOMKilled" in failed and "raise its memory limit" in failed, failed
    (pod,) = cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model=tiny-oom")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "OOMKilled"


def test_a_quantize_pod_deleted_midway_resumes_to_the_same_checkpoint(cluster: ControlPlane):
    """The kubelet's SIGTERM (what a drain or a preemption sends) after a layer has finished: the Job's
    next Pod takes the finished layers over, and the checkpoint is the uninterrupted run's, byte for byte."""
    # More calibration than the example's, so that a layer takes long enough to stop the run midway.
    slower = {"quantization__calibration": {"text": {"path": "text/calibration.txt"}, "samples": 128, "seqLen": 512}}
    claim = Path(cluster.get("pv", f"{MODELS_NAMESPACE}-kubequant-data")["spec"]["local"]["path"])
    cluster.apply(_quantize_only("tiny-resumed", **slower), namespace=MODELS_NAMESPACE)

    def progress() -> list[Path]:
        return [p for p in claim.glob("kubequant/tiny-resumed/.*.partial-*/.progress.json")
                if len(json.loads(p.read_text() or "{}").get("layers") or []) >= 1]
    wait_for("a finished layer in the partial output", progress, timeout=600, interval=0.05,
             describe=lambda: _describe(cluster))
    (first,) = cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model=tiny-resumed")
    cluster.kubectl("delete", "pod", first["metadata"]["name"], "-n", MODELS_NAMESPACE, "--wait=false")
    resumed = _wait_phase(cluster, "tiny-resumed", "Ready", timeout=900)
    (second,) = cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model=tiny-resumed")
    assert second["metadata"]["name"] != first["metadata"]["name"]  # the Job made a new Pod
    manifest = json.loads((claim / resumed["artifact"]["path"] / "kubequant.json").read_text())
    assert manifest["resumed_layers"] > 0, manifest

    cluster.apply(_quantize_only("tiny-whole", **slower), namespace=MODELS_NAMESPACE)
    whole = _wait_phase(cluster, "tiny-whole", "Ready", timeout=900)

    def tensors(path: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}
    assert tensors(claim / resumed["artifact"]["path"]) == tensors(claim / whole["artifact"]["path"])


def test_a_model_from_a_hub_mirror_through_the_fetch_container(cluster: ControlPlane, tmp_path_factory):
    """spec.source.huggingface with an in-house mirror (olah, on the node's bridge so that Pods reach
    it) and a token Secret: the quantize Job's fetch container downloads the pinned commit; a wrong
    revision fails naming it; the token shows in no status, Event or log."""
    reason = hub.missing_olah()
    if reason:
        pytest.skip(reason)
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token", "namespace": MODELS_NAMESPACE},
                   "stringData": {"HF_TOKEN": HUB_TOKEN}})
    with hub.hub_mirror(tmp_path_factory.mktemp("hub"), host="10.244.77.1", port=18092) as mirror:
        def from_mirror(name: str, revision: str) -> dict:
            return _quantize_only(name, source={"huggingface": {
                "repo": mirror.repo, "revision": revision, "endpoint": mirror.endpoint,
                "tokenSecretRef": {"name": "hf-token"}}})
        cluster.apply(from_mirror("tiny-mirrored", mirror.revision), namespace=MODELS_NAMESPACE)
        cluster.apply(from_mirror("tiny-wrong-revision", "0" * 40), namespace=MODELS_NAMESPACE)
        fetched = _wait_phase(cluster, "tiny-mirrored", "Ready", timeout=900)
        wrong = _wait_phase(cluster, "tiny-wrong-revision", "Failed", timeout=600)
    assert fetched["artifact"]["path"]
    failure = json.dumps(wrong)
    assert "InvalidInput" in failure and "0" * 40 in failure and "pin an existing commit" in failure, failure
    seen = [json.dumps(fetched), failure,
            cluster.kubectl("get", "events", "-n", MODELS_NAMESPACE, "-o", "json").stdout]
    for pod in cluster.list("pods", MODELS_NAMESPACE, "kubequant.io/model in (tiny-mirrored,tiny-wrong-revision)"):
        seen.append(cluster.kubectl("logs", "-n", MODELS_NAMESPACE, pod["metadata"]["name"], "--all-containers",
                                    check=False).stdout)
        seen.append(json.dumps(pod["status"]))
    assert not [text for text in seen if HUB_TOKEN in text]


def test_down_leaves_the_machine_as_it_was(cluster: ControlPlane, machine_before: dict):
    during = node.machine_state()
    assert during["bridge"] and during["iptables chains"] and during["cgroups"], during
    cluster.down()
    # A shim exits a moment after its container is removed.
    for _ in range(50):
        if node.machine_state() == machine_before:
            break
        time.sleep(0.2)
    assert node.machine_state() == machine_before, json.dumps(
        {"before": machine_before, "after": node.machine_state()}, indent=1)
