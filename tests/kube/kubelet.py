"""The test plays the kubelet for Job Pods: it runs a Pod's own container command on this machine
and writes the Pod's status as a kubelet does.

No kubelet can run here (no container runtime, no images). KWOK marks scheduled Pods Running; for a
Job Pod this module then runs the container's command (the real quantizer or evaluator CLI) with the
Pod's volumes mapped to local folders (a claim to its PersistentVolume's hostPath, an emptyDir to a
temporary folder, a ConfigMap to its keys written out), reads the termination message from the file
the kubelet would mount at terminationMessagePath, and writes `state.terminated` (exit code, reason,
message) and the Pod phase through the status subresource.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from tests.kube.controlplane import ControlPlane, wait_for

# The kubelet keeps at most this much of the termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    def __init__(self, cluster: ControlPlane, namespace: str, workdir: Path):
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir

    # ---- finding Pods ----

    def job_pods(self, job: str) -> list[dict]:
        return self.cluster.list("pods", self.namespace, f"batch.kubernetes.io/job-name={job}")

    def running_pod(self, job: str, timeout: float = 60) -> dict:
        """The Job's Pod once the scheduler has bound it and KWOK has started it."""
        def check() -> dict | None:
            for pod in self.job_pods(job):
                if pod["spec"].get("nodeName") and pod.get("status", {}).get("phase") == "Running":
                    return pod
            return None
        def describe() -> str:
            got = self.cluster.get("job", job, self.namespace)
            return json.dumps({"job": got and got.get("status"), "deleting": got and got["metadata"].get(
                "deletionTimestamp"), "pods": [p.get("status") for p in self.job_pods(job)]})[:3000]
        return wait_for(f"a running Pod of Job {job}", check, timeout, describe=describe)

    # ---- running a container ----

    def _volume_paths(self, pod: dict, scratch: Path) -> dict[str, Path]:
        """Pod volume name -> a folder on this machine."""
        out = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "persistentVolumeClaim" in volume:
                claim = self.cluster.get("pvc", volume["persistentVolumeClaim"]["claimName"], self.namespace)
                assert claim and claim["spec"].get("volumeName"), f"claim of volume {name} is not bound"
                pv = self.cluster.get("pv", claim["spec"]["volumeName"])
                out[name] = Path(pv["spec"]["hostPath"]["path"])
            elif "emptyDir" in volume:
                out[name] = scratch / "volumes" / name
                out[name].mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume:
                config_map = self.cluster.get("configmap", volume["configMap"]["name"], self.namespace)
                folder = scratch / "volumes" / name
                folder.mkdir(parents=True, exist_ok=True)
                items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in config_map["data"]]
                for item in items:
                    (folder / item["path"]).write_text(config_map["data"][item["key"]])
                out[name] = folder
            # projected (the ServiceAccount token) and others: not used by the commands run here.
        return out

    def _mounts(self, pod: dict, container: dict, scratch: Path) -> list[tuple[str, Path]]:
        volumes = self._volume_paths(pod, scratch)
        mounts = [(m["mountPath"], volumes[m["name"]] / m.get("subPath", ""))
                  for m in container.get("volumeMounts") or [] if m["name"] in volumes]
        return sorted(mounts, key=lambda m: -len(m[0]))  # the deepest mount wins

    @staticmethod
    def _map(value: str, mounts: list[tuple[str, Path]]) -> str:
        for mount_path, local in mounts:
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(local) + value[len(mount_path.rstrip("/")):]
        return value

    def run(self, pod: dict, *, container_name: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 900) -> dict:
        """Run the container's command as the kubelet would start it; write the terminated status.

        Returns the terminated state written."""
        container = next(c for c in pod["spec"]["containers"] if container_name in (None, c["name"]))
        scratch = Path(tempfile.mkdtemp(prefix=f"{pod['metadata']['name']}-", dir=self.workdir))
        mounts = self._mounts(pod, container, scratch)
        argv = [self._map(arg, mounts) for arg in [*container.get("command", []), *container.get("args", [])]]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        termination_log = scratch / "termination-log"
        termination_log.touch()
        if argv[1:3] == ["-m", "quantizer"]:
            # The kubelet mounts this file at terminationMessagePath (/dev/termination-log).
            argv += ["--result-file", str(termination_log)]
        container_env = {e["name"]: self._map(e.get("value", ""), mounts)
                         for e in container.get("env") or [] if "value" in e}
        started = _now()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=scratch,
                              env={**os.environ, **container_env, **(env or {})})
        (scratch / "log").write_text(done.stdout + done.stderr)
        message = termination_log.read_text()[:TERMINATION_MESSAGE_LIMIT]
        return self.terminate(pod, exit_code=done.returncode, message=message, started=started,
                              container_name=container["name"], log=scratch / "log")

    def terminate(self, pod: dict, *, exit_code: int, reason: str | None = None, message: str = "",
                  started: str | None = None, container_name: str | None = None, log: Path | None = None) -> dict:
        """Write the Pod's status as the kubelet does when its only container has exited."""
        container = next(c for c in pod["spec"]["containers"] if container_name in (None, c["name"]))
        terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                      "startedAt": started or _now(), "finishedAt": _now()}
        if message:
            terminated["message"] = message
        now = _now()
        status = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "conditions": [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now}
                           for t in ("Ready", "ContainersReady")],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": False, "started": False, "restartCount": 0,
                                   "state": {"terminated": terminated}}],
        }
        self.cluster.kubectl("patch", "pod", pod["metadata"]["name"], "-n", self.namespace, "--subresource=status",
                             "--type=merge", "-p", json.dumps({"status": status}))
        if log is not None:
            terminated["log"] = str(log)
        return terminated
