"""The real operator (`kubequant operator`) as a process of its own, as the chart's Deployment runs it,
authenticated with a token of the chart's ServiceAccount: what RBAC refuses it, it cannot do here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.kube.controlplane import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespaces: list[str], log: Path, resync_seconds: float = 0,
                 extra_args: tuple[str, ...] = ()):
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log = log
        self.resync_seconds = resync_seconds
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> OperatorProcess:
        argv = [sys.executable, "-m", "kubequant.cli", "operator", *[f"--namespace={n}" for n in self.namespaces],
                f"--metrics-port={self.metrics_port}", "--health-port=0", "--bind-address=127.0.0.1",
                f"--resync-seconds={self.resync_seconds}", "--verbose", *self.extra_args]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("a") as out:
            out.write(f"--- start: {' '.join(argv)}\n")
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        wait_for("the operator's metrics endpoint", self._serving, timeout=60, describe=self.tail)
        return self

    def _serving(self) -> bool:
        assert self.process is not None and self.process.poll() is None, f"the operator exited:\n{self.tail()}"
        try:
            self.metrics()
            return True
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def sample(self, name: str, labels: dict[str, str]) -> float | None:
        """One sample of the operator's /metrics, parsed by prometheus-client."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when its node dies or it is OOM-killed."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text().splitlines()[-lines:]) if self.log.exists() else ""

    def __enter__(self) -> OperatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
