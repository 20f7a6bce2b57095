"""The upstream LeaderWorkerSet controller (lws-manager, built by scripts/cluster.sh) beside the test
control plane: its CRD, and its webhooks served on loopback with a certificate of our own (the
webhooks label each group's Pods and give them LWS_LEADER_ADDRESS; without them no group forms)."""

from __future__ import annotations

import base64
import socket
import subprocess
import tempfile
from pathlib import Path

import yaml

from tests.kube.controlplane import ROOT, TOOLS_BIN, ControlPlane, wait_for

SERVING_CRDS = ROOT / ".tools" / "crds" / "serving"
WEBHOOKS = ROOT / ".tools" / "lws" / "webhooks.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _certificate(directory: Path) -> bytes:
    """A CA and a serving certificate for 127.0.0.1 (tls.crt, tls.key in `directory`); returns the CA."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=lws-test-ca",
            "-keyout", str(ca_key), "-out", str(ca_crt))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(directory / "tls.key"),
            "-out", str(directory / "tls.csr"))
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", str(directory / "tls.csr"), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-extfile", str(directory / "ext"), "-out", str(directory / "tls.crt"))
    return ca_crt.read_bytes()


def install_serving_crds(cluster: ControlPlane) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(SERVING_CRDS))
    cluster.wait_established("leaderworkersets.leaderworkerset.x-k8s.io",
                             "disaggregatedsets.disaggregatedset.x-k8s.io",
                             "inferencepools.inference.networking.k8s.io")


class LeaderWorkerSetController:
    """lws-manager against `cluster`, its webhooks registered with the apiserver at a loopback URL."""

    def __init__(self, cluster: ControlPlane, log: Path):
        self.cluster, self.log = cluster, log
        self.directory = Path(tempfile.mkdtemp(prefix="lws-"))
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LeaderWorkerSetController:
        install_serving_crds(self.cluster)
        ca = _certificate(self.directory)
        port, health = _free_port(), _free_port()
        config = self.directory / "config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.lws.x-k8s.io/v1alpha1", "kind": "Configuration",
            "leaderElection": {"leaderElect": False}, "internalCertManagement": {"enable": False},
            "webhook": {"port": port, "host": "127.0.0.1", "certDir": str(self.directory)},
            "metrics": {"bindAddress": "0"}, "health": {"healthProbeBindAddress": f"127.0.0.1:{health}"},
        }))
        self.process = subprocess.Popen([str(TOOLS_BIN / "lws-manager"), f"--config={config}"],
                                        env=self.cluster.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        configurations = [doc for doc in yaml.safe_load_all(WEBHOOKS.read_text()) if doc]
        for doc in configurations:
            for webhook in doc["webhooks"]:
                service = webhook["clientConfig"].pop("service")
                webhook["clientConfig"] = {"url": f"https://127.0.0.1:{port}{service['path']}",
                                           "caBundle": base64.b64encode(ca).decode()}
                if webhook["rules"][0]["resources"] == ["pods"]:
                    # Upstream's kustomize patch: only the Pods of a LeaderWorkerSet go through them.
                    webhook["objectSelector"] = {"matchExpressions": [
                        {"key": "leaderworkerset.sigs.k8s.io/name", "operator": "Exists"}]}
        self.cluster.apply(*configurations)

        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"lws-manager exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for("lws-manager's webhooks to listen", healthy, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        alive = self.process is not None and self.process.poll() is None
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            name = "mutating-webhook-configuration" if kind.startswith("mutating") else "validating-webhook-configuration"
            self.cluster.kubectl("delete", kind, name, "--ignore-not-found", check=False)
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if exc[0] is None:
            assert alive, f"lws-manager exited during the test:\n{self.log.read_text()[-3000:]}"
