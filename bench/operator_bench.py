"""Operator scale on the real control plane: from N QuantizedModels created to their N quantize Jobs.

    python bench/operator_bench.py                              # N = 1, 100, 1000
    python bench/operator_bench.py --sizes 1,100 --repeat 3 --json out.json

For each N and each repeat, a fresh run on a fresh cluster (scripts/cluster.sh up in a temporary
folder; etcd, kube-apiserver, kube-controller-manager, kube-scheduler, KWOK's three nodes):

1. The CRDs and the chart (its ServiceAccount and namespaced RBAC for `bench`, no operator Pod) are
   installed; kube-apiserver writes an audit log of the operator's requests only (one audit policy
   rule for its ServiceAccount, level Metadata), which counts them by verb and resource.
2. The real operator runs in a separate process: this script with --operator-child, which calls
   `kubequant operator -n bench --metrics-port 0 --health-port 0` (the production entry point, INFO
   logging to a file), authenticated with a token of the chart's ServiceAccount, resync timer at
   the production default of 60 s.
3. Once the operator watches QuantizedModels, Jobs and Deployments (seen in the audit log), N copies
   of examples/tiny.yaml (tiny-llama-00000, ...) are created by a pool of 8 client threads. The
   clock starts at the first create.
4. "s to all Jobs": until the N-th quantize Job exists (polled every 0.2 s; its creationTimestamp
   has only 1 s resolution). The Job controller then creates their Pods, the scheduler binds what
   fits on the nodes and KWOK starts them: the operator sees the Jobs start, as on a cluster. Then
   the operator runs until it has sent no request for --quiet seconds, and is stopped with SIGINT.
5. Peak RSS: VmHWM of the operator's process (the kernel's high-water mark of its resident memory),
   read by the child itself as kopf returns. Operator CPU: user+sys of the burst and the shutdown
   (the child's total from os.wait4, less what it had used once idle). Control-plane CPU: the
   apiserver's, etcd's, the controller manager's and the scheduler's over the burst.

The control plane shares the 2 cores with the operator: the figures are the operator's cost on this
machine, not a production cluster's throughput.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAMESPACE = "bench"
EXAMPLE = ROOT / "examples" / "tiny.yaml"
WATCHED = {"quantizedmodels", "jobs", "deployments"}
USER = "system:serviceaccount:kubequant-system:kubequant"
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


def operator_child(namespace: str, resync_seconds: str, peak_file: str) -> int:
    """`kubequant operator` as deployed; writes its own peak RSS (VmHWM, KiB) once it has stopped."""
    from kubequant import cli

    try:
        return cli.main(["operator", "-n", namespace, "--metrics-port", "0", "--health-port", "0",
                         "--resync-seconds", resync_seconds])
    finally:
        Path(peak_file).write_text(str(_proc_kib("self", "VmHWM")))


def _proc_kib(pid: int | str, field: str = "VmRSS") -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _control_plane_cpu(directory: Path) -> float:
    """user+sys of the control plane's processes (each pid file holds the process's bash parent,
    which execs the binary, so it is the binary)."""
    return sum(_cpu_s(int((directory / "pids" / c).read_text())) for c in CONTROL_PLANE
               if (directory / "pids" / c).exists())


class AuditLog:
    """The operator's requests, from kube-apiserver's audit log (one JSON event per line)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.requests: collections.Counter[str] = collections.Counter()
        self.last = 0.0

    def read(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break  # being written: read again next time
                self.offset += len(line)
                if not line.strip():
                    continue
                event = json.loads(line)
                # A watch is long-running: it is logged when its response starts (and again when it ends).
                wanted = "ResponseStarted" if event["verb"] == "watch" else "ResponseComplete"
                if event.get("stage") != wanted:
                    continue
                ref = event.get("objectRef") or {}
                resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                self.requests[f"{event['verb']} {resource}"] += 1
                self.last = time.time()

    def reset(self) -> None:
        self.read()
        self.requests.clear()


def _alive(proc: subprocess.Popen, check):
    """`check`, for wait_for, failing at once when the operator has exited."""
    def checked():
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({proc.returncode})")
        return check()
    return checked


def _stop(proc: subprocess.Popen) -> Any:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        time.sleep(0.1)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    return usage


def model_bodies(n: int) -> list[dict]:
    import yaml

    base = yaml.safe_load(EXAMPLE.read_text())
    bodies = []
    for i in range(n):
        body = copy.deepcopy(base)
        body["metadata"].update(name=f"tiny-llama-{i:05d}", namespace=NAMESPACE)
        bodies.append(body)
    return bodies


def run_once(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    import kubernetes

    from tests.kube.controlplane import ControlPlane, ensure_binaries, wait_for
    from tests.kube.models import OPERATOR_NAMESPACE, SERVICE_ACCOUNT, install_operator_rbac

    ensure_binaries()
    policy = workdir / "audit-policy.yaml"
    policy.write_text(json.dumps({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                                  "rules": [{"level": "Metadata", "users": [USER]}, {"level": "None"}]}))
    cluster = ControlPlane(Path(tempfile.mkdtemp(prefix="cluster-", dir=workdir)))
    os.environ["KUBEQUANT_AUDIT_POLICY"] = str(policy)
    cluster.up()
    result: dict[str, Any] = {"n": n}
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/quantizedmodels.kubequant.io", "--timeout=60s")
        install_operator_rbac(cluster, [NAMESPACE])
        kubeconfig = cluster.token_kubeconfig(SERVICE_ACCOUNT, OPERATOR_NAMESPACE, workdir / f"operator-{n}.kubeconfig")
        audit = AuditLog(cluster.directory / "logs" / "audit.log")
        peak_file = workdir / f"operator-{n}.peak"
        with (workdir / f"operator-{n}.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--operator-child", NAMESPACE, "--resync-seconds",
                                     str(args.resync_seconds), "--peak-file", str(peak_file)],
                                    env={**os.environ, "KUBECONFIG": str(kubeconfig)}, stdout=log,
                                    stderr=subprocess.STDOUT)

        def watching() -> bool:
            audit.read()
            return {key.split()[1] for key in audit.requests if key.startswith("watch ")} >= WATCHED

        wait_for("the operator to watch", _alive(proc, watching), 120)
        time.sleep(1.0)
        result["idle_rss_mib"] = _mib(_proc_kib(proc.pid))
        idle_cpu = _cpu_s(proc.pid)
        audit.reset()
        kubernetes.config.load_kube_config(config_file=str(cluster.kubeconfig))
        api = kubernetes.client.CustomObjectsApi()
        batch = kubernetes.client.BatchV1Api()
        plane0 = _control_plane_cpu(cluster.directory)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda body: api.create_namespaced_custom_object(
                "kubequant.io", "v1alpha1", NAMESPACE, "quantizedmodels", body), model_bodies(n)))
        created = time.perf_counter()
        seen: dict[str, float] = {}

        def all_jobs() -> bool:
            for job in batch.list_namespaced_job(NAMESPACE, label_selector="app.kubernetes.io/component=quantize").items:
                seen.setdefault(job.metadata.name, time.perf_counter())
            return len(seen) >= n

        wait_for(f"{n} quantize Jobs", _alive(proc, all_jobs), args.timeout)
        done = time.perf_counter()
        give_up = done + args.settle_timeout
        while time.perf_counter() < give_up:
            audit.read()
            if time.time() - audit.last >= args.quiet:
                break
            time.sleep(0.2)
        plane1 = _control_plane_cpu(cluster.directory)
        result["settled_rss_mib"] = _mib(_proc_kib(proc.pid))
        peak_before_stop = _proc_kib(proc.pid, "VmHWM")
        phases = collections.Counter(
            (m.get("status") or {}).get("phase", "-") for m in
            api.list_namespaced_custom_object("kubequant.io", "v1alpha1", NAMESPACE, "quantizedmodels")["items"])
        usage = _stop(proc)
    finally:
        os.environ.pop("KUBEQUANT_AUDIT_POLICY", None)
        cluster.down()

    times = sorted(t - start for t in seen.values())
    total = sum(audit.requests.values())
    result.update(
        create_s=created - start, first_job_s=times[0], median_job_s=times[len(times) // 2], all_jobs_s=done - start,
        jobs_per_s=n / (done - start), phases=dict(phases),
        peak_rss_mib=_mib(int(peak_file.read_text()) if peak_file.exists() else peak_before_stop),
        operator_cpu_s=usage.ru_utime + usage.ru_stime - idle_cpu, control_plane_cpu_s=plane1 - plane0,
        requests=total, requests_per_model=total / n, request_mix=dict(audit.requests.most_common()),
    )
    return result


COLUMNS = [
    ("N", "n", "{}"),
    ("s to all Jobs", "all_jobs_s", "{:.2f}"),
    ("Jobs/s", "jobs_per_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("idle RSS MiB", "idle_rss_mib", "{:.1f}"),
    ("first Job s", "first_job_s", "{:.2f}"),
    ("median Job s", "median_job_s", "{:.2f}"),
    ("requests/model", "requests_per_model", "{:.1f}"),
    ("operator CPU s", "operator_cpu_s", "{:.1f}"),
    ("control plane CPU s", "control_plane_cpu_s", "{:.1f}"),
]


def print_table(rows: list[dict]) -> None:
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] +
             [f"{row['range_s'][0]:.2f}-{row['range_s'][1]:.2f} ({row['runs']})"] for row in rows]
    header = [h for h, _, _ in COLUMNS] + ["all-Jobs range s (runs)"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for c in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,100,1000", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="numbers of QuantizedModels, comma-separated (default 1,100,1000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the table shows the median one")
    parser.add_argument("--timeout", type=float, default=900, help="give up on a run after this many seconds")
    parser.add_argument("--resync-seconds", type=float, default=60, help="the operator's periodic re-check")
    parser.add_argument("--quiet", type=float, default=3.0,
                        help="after all Jobs, stop the operator once it sent no request for this long")
    parser.add_argument("--settle-timeout", type=float, default=60.0, help="... or after this long at most")
    parser.add_argument("--log-dir", help="where the logs go (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--operator-child", metavar="NAMESPACE", help=argparse.SUPPRESS)
    parser.add_argument("--peak-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.operator_child:
        sys.exit(operator_child(args.operator_child, str(args.resync_seconds), args.peak_file))

    workdir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="kubequant-opbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []
    for n in args.sizes:
        mine = []
        for i in range(args.repeat):
            result = run_once(n, args, workdir)
            print(f"N={n} run {i + 1}: {result['all_jobs_s']:.2f} s to all Jobs, peak RSS {result['peak_rss_mib']:.1f} "
                  f"MiB, {result['requests_per_model']:.1f} requests/model {result['request_mix']}",
                  file=sys.stderr, flush=True)
            mine.append(result)
        times = [r["all_jobs_s"] for r in mine]
        median = min(mine, key=lambda r: abs(r["all_jobs_s"] - statistics.median(times)))
        rows.append({**median, "runs": len(mine), "range_s": (min(times), max(times))})
        runs += mine
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "operator_child", "peak_file")},
            "runs": runs,
        }, indent=1, default=str))


if __name__ == "__main__":
    main()
