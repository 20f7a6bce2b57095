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
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.kube import node
from tests.kube.controlplane import ROOT, TOOLS_BIN, ControlPlane, Unavailable, ensure_binaries, wait_for

pytestmark = [pytest.mark.controlplane, pytest.mark.slow]
CHART = ROOT / "charts" / "kubequant"
OPERATOR_NAMESPACE = "kubequant-system"
MODELS_NAMESPACE = "kq-real"


@pytest.fixture(scope="module")
def machine_before() -> dict:
    return node.machine_state()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, machine_before) -> ControlPlane:
    reason = node.missing_for_a_real_node()
    if reason:
        pytest.skip(reason)
    try:
        ensure_binaries()
    except Unavailable as exc:
        pytest.skip(str(exc))
    node.ensure_images()
    started = node.start(tmp_path_factory.mktemp("real-node"))
    try:
        started.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        started.kubectl("wait", "--for=condition=Established", "crd/quantizedmodels.kubequant.io", "--timeout=60s")
        yield started
    finally:
        started.down()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    cluster.create_namespace(MODELS_NAMESPACE)
    cluster.helm("install", "kubequant", str(CHART), "-n", OPERATOR_NAMESPACE, "--create-namespace",
                 "--set", f"operator.watchNamespaces={{{MODELS_NAMESPACE}}}", *node.local_image_values(),
                 "--wait", "--timeout=5m")
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


def test_the_operator_metrics_through_port_forward(cluster: ControlPlane):
    pod = _operator_pod(cluster)["metadata"]["name"]
    port = _free_port()
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
