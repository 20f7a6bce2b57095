"""The real control plane of scripts/cluster.sh, driven from tests: kubectl, helm, restarts.

One cluster per test session (started once, about 15 s); each test works in namespaces of its own.
Where the binaries are missing and Go is not installed (a laptop), the tests that need the cluster
skip and say why; with CI=true such a skip fails the run (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = ROOT / "scripts" / "cluster.sh"
TOOLS_BIN = Path(os.environ.get("KUBEQUANT_TOOLS_BIN", ROOT / ".tools" / "bin"))
MONITORING_CRDS = ROOT / ".tools" / "crds" / "monitoring.coreos.com"


class Unavailable(Exception):
    """The control plane cannot run on this machine; the message says why and what would fix it."""


def ensure_binaries() -> None:
    """Build the control plane (`scripts/cluster.sh build`) unless `scripts/cluster.sh check` finds it built."""
    checked = subprocess.run(["bash", str(CLUSTER_SH), "check"], capture_output=True, text=True)
    if checked.returncode == 0:
        return
    if shutil.which("go") is None:
        raise Unavailable(f"{checked.stderr.strip().removeprefix('cluster: ')}, and Go is not installed to build "
                          "them: install Go 1.26, then `scripts/cluster.sh build`")
    subprocess.run(["bash", str(CLUSTER_SH), "build"], check=True)


class CommandError(AssertionError):
    def __init__(self, argv: list[str], done: subprocess.CompletedProcess):
        super().__init__(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        self.returncode = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr


@dataclass
class ControlPlane:
    directory: Path
    # More of scripts/cluster.sh's settings (KUBEQUANT_NODE=1 adds a real node: tests/kube/node.py).
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "admin.kubeconfig"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.settings,
                "KUBEQUANT_CLUSTER_DIR": str(self.directory), "KUBECONFIG": str(self.kubeconfig),
                "PATH": f"{TOOLS_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                # helm keeps caches and its repository list here, not in the user's home.
                "HELM_CACHE_HOME": str(self.directory / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.directory / "helm" / "config"),
                "HELM_DATA_HOME": str(self.directory / "helm" / "data")}

    # ---- lifecycle ----

    def up(self, timeout: float = 300) -> None:
        self._script("up", timeout=timeout)

    def down(self) -> None:
        self._script("down")

    def apply_crds(self) -> None:
        """The CRDs as a user applies them (server-side), once established."""
        self.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        self.wait_established("quantizedmodels.kubequant.io")

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until each CRD is established. Not `kubectl wait`: it fails outright (".status.conditions
        accessor error") when it reads a CRD before the apiserver wrote any condition, which a loaded
        machine sees."""
        for crd in crds:
            wait_for(f"{crd} to be established", lambda name=crd: any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in ((self.get("crd", name) or {}).get("status") or {}).get("conditions") or []),
                timeout=timeout)

    def restart(self, component: str) -> None:
        self._script("restart", component)

    def _script(self, *args: str, timeout: float = 300) -> str:
        return self._run(["bash", str(CLUSTER_SH), *args], timeout=timeout).stdout

    # ---- commands ----

    def _run(self, argv: list[str], *, timeout: float = 120, stdin: str | None = None, check: bool = True,
             kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        env = self.env if kubeconfig is None else {**self.env, "KUBECONFIG": str(kubeconfig)}
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise CommandError(argv, done)
        return done

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120,
                kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
        return self._run([str(TOOLS_BIN / "kubectl"), *args], stdin=stdin, check=check, timeout=timeout,
                         kubeconfig=kubeconfig)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self._run([str(TOOLS_BIN / "helm"), *args], check=check, timeout=timeout)

    def apply(self, *docs: dict, namespace: str | None = None, server_side: bool = False) -> None:
        args = ["apply", "-f", "-"] + (["--server-side"] if server_side else [])
        if namespace:
            args += ["-n", namespace]
        self.kubectl(*args, stdin=yaml.safe_dump_all(docs))

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        args = ["get", kind, name, "-o", "json"] + (["-n", namespace] if namespace else [])
        done = self.kubectl(*args, check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr:
                return None
            raise CommandError(["kubectl", *args], done)
        return json.loads(done.stdout)

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-n", namespace, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args).stdout)["items"]

    def create_namespace(self, name: str) -> str:
        self.kubectl("create", "namespace", name)
        return name

    def token_kubeconfig(self, service_account: str, namespace: str, path: Path) -> Path:
        """A kubeconfig that authenticates as a ServiceAccount, with a token from the TokenRequest API."""
        token = self.kubectl("create", "token", service_account, "-n", namespace, "--duration=2h").stdout.strip()
        admin = yaml.safe_load(self.kubeconfig.read_text())
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": admin["clusters"],
            "users": [{"name": service_account, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": admin["clusters"][0]["name"],
                                                    "user": service_account, "namespace": namespace}}],
        }))
        path.chmod(0o600)
        return path


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2,
             describe: Callable[[], str] | None = None) -> Any:
    """Poll `check` until it returns something truthy; on time-out say what was awaited (and seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = f"; {describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")
        time.sleep(interval)
