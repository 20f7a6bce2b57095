"""The first hour on a cluster, as the README and docs/install.md tell it: their command blocks, read from
the documents and run line by line exactly as written (kubectl, helm, from a checkout), on a control
plane of their own, in the order a user meets them. The operator runs as the chart's ServiceAccount
(KWOK's nodes run no containers; tests/test_real_node.py runs it from its image under a kubelet).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.kube.controlplane import ROOT, ControlPlane, wait_for
from tests.kube.docs import INSTALL, README, blocks
from tests.kube.operator_process import OperatorProcess

pytestmark = pytest.mark.controlplane
NAMESPACE, MODEL = "kubequant", "llama-3-8b"  # what the documents name


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, control_plane: ControlPlane) -> Iterator[ControlPlane]:
    """A control plane of its own (the documents install into `kubequant` and delete the CRD); the
    session's control_plane fixture has checked that the binaries are there."""
    own = ControlPlane(tmp_path_factory.mktemp("docs-cluster"))
    own.up()
    try:
        yield own
    finally:
        own.down()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A folder that looks like a checkout (the paths the commands name), so that files the commands
    write (kubequant.yaml) land there and not in the repository."""
    folder = tmp_path_factory.mktemp("checkout")
    for name in ("crds", "charts", "examples", "scripts", "deploy"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def run(cluster: ControlPlane, checkout: Path, line: str, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-c", line], cwd=checkout, env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{line!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def operator(cluster: ControlPlane, tmp_path: Path) -> OperatorProcess:
    """The chart's operator: its ServiceAccount in the release namespace, watching that namespace."""
    kubeconfig = cluster.token_kubeconfig("kubequant", NAMESPACE, tmp_path / "operator.kubeconfig")
    return OperatorProcess(kubeconfig, [NAMESPACE], tmp_path / "operator.log")


def condition(cluster: ControlPlane, kind: str) -> dict:
    status = (cluster.get("qm", MODEL, NAMESPACE) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def test_install_with_kubectl_then_helm_then_uninstall_as_written(cluster: ControlPlane, checkout: Path, tmp_path: Path):
    # docs/install.md, "With kubectl": the chart rendered once into plain manifests.
    [with_kubectl] = blocks(INSTALL, "## With kubectl")
    for line in with_kubectl:
        run(cluster, checkout, line)
    assert cluster.get("deployment", "kubequant", NAMESPACE) is not None
    run(cluster, checkout, "kubectl delete -n kubequant -f kubequant.yaml --wait")  # the next way installs it anew

    # README, "Install on a cluster": helm, the token Secret, the 8B example, and watching it.
    [readme] = blocks(README, "## Install on a cluster")
    crds, helm_install_readme, *model, watch = readme
    assert helm_install_readme.startswith("helm install ")
    for line in (crds, helm_install_readme):
        run(cluster, checkout, line)
    with operator(cluster, tmp_path):  # the ServiceAccount the chart just made
        for line in model:
            done = run(cluster, checkout, line)
            assert "no kubequant operator watches" not in done.stderr, (line, done.stderr)
        # The example's claim waits for a StorageClass this cluster does not have: the model says so.
        waiting = wait_for("the scheduler's reason on the 8B model", lambda: (c := condition(cluster, "Quantized")).get(
            "reason") == "Unschedulable" and c, timeout=90, describe=lambda: str(cluster.get("qm", MODEL, NAMESPACE)))
        assert "PersistentVolumeClaim" in waiting["message"] or "persistentvolumeclaim" in waiting["message"], waiting
        seen = subprocess.run(["bash", "-c", f"timeout 10 {watch}"], cwd=checkout, env=cluster.env, capture_output=True,
                              text=True)
        assert seen.returncode == 124, seen.stderr  # -w watches until stopped
        header, row = seen.stdout.splitlines()[:2]
        assert header.split()[:2] == ["NAME", "PHASE"] and row.split()[:2] == [MODEL, "Pending"], seen.stdout
        # Its texts come from the Hub with the model: the quantize Job fetches them onto the new claim.
        [job] = cluster.list("jobs", NAMESPACE, f"kubequant.io/model={MODEL}")
        assert [c["name"] for c in job["spec"]["template"]["spec"]["initContainers"]] == ["fetch", "fetch-texts"]

        # docs/install.md, "With Helm": the upgrade, CRDs first.
        _install, upgrade = blocks(INSTALL, "## With Helm")
        for line in upgrade:
            run(cluster, checkout, line)

        # docs/install.md, "Uninstalling": the model first, while the operator runs.
        uninstalling, release_by_hand = blocks(INSTALL, "## Uninstalling")
        listing, delete_model, helm_uninstall, delete_crd = uninstalling
        assert MODEL in run(cluster, checkout, listing).stdout
        run(cluster, checkout, delete_model)
    run(cluster, checkout, helm_uninstall)
    run(cluster, checkout, delete_crd)
    assert cluster.get("crd", "quantizedmodels.kubequant.io") is None

    # A model that removes its artifacts, left behind by an operator that is gone: released by hand.
    [helm_install, *_] = _install
    run(cluster, checkout, "kubectl apply --server-side -f crds/")
    run(cluster, checkout, helm_install)
    example = yaml.safe_load((ROOT / "examples" / "llama-3-8b-tp2.yaml").read_text())
    example["spec"]["storage"]["retentionPolicy"] = "Delete"
    with operator(cluster, tmp_path):
        cluster.apply(example, namespace=NAMESPACE)
        wait_for("the operator's finalizer", lambda: (cluster.get("qm", MODEL, NAMESPACE) or {}).get(
            "metadata", {}).get("finalizers"))
    run(cluster, checkout, helm_uninstall)
    [patch] = release_by_hand
    run(cluster, checkout, patch)
    run(cluster, checkout, delete_model)
    run(cluster, checkout, delete_crd)
