"""A control plane with a real node: scripts/cluster.sh with KUBEQUANT_NODE=1 (containerd, runc, the
kubelet, kube-proxy and the bridge CNI beside KWOK's GPU nodes), with the images scripts/images.sh
builds from the Dockerfile loaded into the node's containerd.

Nothing here stands in for a component: Pods run in our images, under a kubelet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.kube.controlplane import ROOT, ControlPlane

IMAGES_SH = ROOT / "scripts" / "images.sh"
NODE_NAME = "kubequant-node"
BRIDGE = "kq0"
TARGETS = ("operator", "quantizer-cpu", "evaluator-cpu")
# What the node needs on this machine, and the Debian packages that bring it.
NODE_TOOLS = {"buildah": "buildah", "podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap",
              "iptables": "iptables", "ip": "iproute2", "findmnt": "util-linux"}
CNI_PLUGINS = Path("/usr/lib/cni")


def missing_for_a_real_node() -> str | None:
    """Why a real node cannot run here (and what would fix it), or None."""
    if os.geteuid() != 0:
        return "a real node needs root (containerd, the kubelet, iptables, a bridge)"
    packages = sorted({package for tool, package in NODE_TOOLS.items() if shutil.which(tool) is None})
    if not (CNI_PLUGINS / "bridge").exists():
        packages.append("containernetworking-plugins")
    if packages:
        return f"a real node needs the Debian packages {' '.join(packages)} (apt-get install them)"
    return None


def image(target: str) -> str:
    return subprocess.run(["bash", str(IMAGES_SH), "name", target], capture_output=True, text=True,
                          check=True).stdout.strip()


def build_images(targets: tuple[str, ...] = TARGETS) -> None:
    """Build the images from this checkout (scripts/images.sh): minutes the first time; then buildah's
    layer cache rebuilds only what a change touched (our code: the wheel and the layers after it)."""
    subprocess.run(["bash", str(IMAGES_SH), "build", *targets], check=True, timeout=3600)


def start(directory: Path, targets: tuple[str, ...] = TARGETS) -> ControlPlane:
    """Images saved as OCI archives, then the cluster up with them in the node's containerd."""
    archives = directory / "images"
    subprocess.run(["bash", str(IMAGES_SH), "save", str(archives), *targets], check=True, timeout=1800)
    cluster = ControlPlane(directory / "cluster", settings={"KUBEQUANT_NODE": "1", "KUBEQUANT_NODE_IMAGES": str(archives)})
    try:
        cluster.up(timeout=1800)
    finally:
        shutil.rmtree(archives, ignore_errors=True)  # containerd holds its own copy
    return cluster


def machine_state() -> dict[str, object]:
    """What a real node adds to the machine, to compare before and after (`down` must undo it)."""
    def out(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""
    chains = sorted(line for cmd in ("iptables", "ip6tables") for table in ("filter", "nat", "mangle")
                    for line in (f"{cmd} {table} {rule.split()[1]}" for rule in out(cmd, "-t", table, "-S").splitlines()
                                 if rule.startswith("-N KUBE-")))
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")) + sorted(
        str(p) for p in Path("/sys/fs/cgroup").glob("*/k8s.io"))
    return {
        "bridge": BRIDGE in out("ip", "-o", "link", "show"),
        "iptables chains": chains,
        "cgroups": cgroups,
        **{path: Path(path).exists() for path in ("/var/lib/kubelet", "/run/containerd", "/var/lib/cni", "/run/netns",
                                                  "/run/nri", "/opt/containerd")},
        "shims": [line for line in out("ps", "-eo", "args").splitlines() if "containerd-shim-runc-v2" in line],
        "mounts": [line for line in out("findmnt", "-rn", "-o", "TARGET").splitlines() if "/node/kubelet/" in line],
    }
