"""Operator scale on the kmock emulator: from N QuantizedModels created to their N quantize Jobs.

    python bench/operator_bench.py                              # N = 1, 100, 1000
    python bench/operator_bench.py --sizes 1,100 --repeat 3 --json out.json

For each N and each repeat, a fresh run:

1. The API emulator of the end-to-end tests (tests/operator_support/emulator.py: kmock 0.8 with
   resourceVersions, watches, the status subresource) serves HTTP in this process, subclassed
   here (BenchEmulator) to timestamp what the operator creates and to take kmock's linear scans
   out of its cost per request (--plain-emulator keeps those scans).
2. The real operator runs in a separate process: this script with --operator-child, which calls
   `kubequant operator -n bench --metrics-port 0 --health-port 0` (kubequant.cli, the production
   entry point, INFO logging to a file) with $KUBECONFIG pointing at the emulator. One addition:
   a startup handler turns kopf's namespace/CRD scanning off, as the e2e tests do, because kmock
   0.8 cannot serve the cluster-scoped lists that scanning makes. The resync timer is on, at the
   production default of 60 s (--resync-seconds); 1,000 models on 2 cores are done before it
   first fires.
3. Once the operator watches QuantizedModels, Jobs and Deployments, N copies of examples/tiny.yaml
   (named tiny-llama-00000, ...) go into the emulator's store in one burst, as `kubectl apply` of
   N objects would leave them. The clock starts at the first create.
4. "s to all Jobs": until the emulator stores the N-th quantize Job (timestamped inside the
   emulator's create: no polling). "s to all statuses": until every model has a status.phase.
   Then the operator runs until it has sent no request for --quiet seconds (at most
   --settle-timeout), and is stopped with SIGINT.
5. Peak RSS: VmHWM of the operator's process (the kernel's high-water mark of its resident
   memory), which the child reads from /proc/self/status as kopf returns, after its shutdown, and
   writes to a file. Not ru_maxrss (getrusage or os.wait4): Linux carries the high-water mark of
   the spawning process's memory (fork or vfork, then exec) into the child's ru_maxrss, which then
   reads this process's RSS (the emulator's) whenever that is the larger; it is kept in the JSON
   as `wait4_maxrss_mib` to show the effect. Idle RSS: VmRSS from /proc once the operator watches,
   before any model; settled RSS: the same after the burst. Operator CPU: user+sys of the burst
   and the shutdown (the child's total from os.wait4, less what it had used once idle). Emulator
   CPU: this process's, over the burst.

No controllers run: nothing starts the Jobs, so each model stops at Pending. The emulator is
Python and shares the CPU with the operator: the figures are the operator's cost on this machine
against a slow API server, not a real cluster's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import os
import resource
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
WATCHED = {"quantizedmodels", "jobs", "deployments"}  # what the operator watches once it is up


# ---- the operator, in the child process ---------------------------------------------------------

def operator_child(namespace: str, resync_seconds: str, peak_file: str) -> int:
    """`kubequant operator` as deployed, minus kopf's cluster scanning (which kmock cannot serve).

    Writes its own peak RSS (VmHWM, KiB) to `peak_file` once the operator has stopped.
    """
    import kopf
    from kubequant import cli

    @kopf.on.startup()
    def _no_scanning(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.scanning.disabled = True

    try:
        return cli.main(["operator", "-n", namespace, "--metrics-port", "0", "--health-port", "0",
                         "--resync-seconds", resync_seconds])
    finally:
        Path(peak_file).write_text(str(_proc_kib("self", "VmHWM")))


# ---- the emulator, in this process --------------------------------------------------------------

def make_emulator_class(indexed: bool):
    import attrs
    import kmock

    from tests.operator_support.emulator import Emulator, _selected

    @attrs.define(kw_only=True)
    class BenchEmulator(Emulator):
        """The e2e emulator, plus: when each quantize Job was stored, each model's phase, a request tally.

        And two changes to kmock 0.8's cost per request, so that the run measures the operator
        rather than the emulator (neither changes what is answered):
        - kmock matches each request against every request it has ever received (`request in
          reaction` walks its whole log): quadratic, 66 ms a request after 1,500 of them. Served
          requests are dropped from the log here; only those in flight stay.
        - with `indexed`, GETs, PATCH answers and namespaced lists look objects up by key (kmock
          scans every stored object for each), and a 404 carries no formatted traceback.
        """

        job_times: list[float] = attrs.field(factory=list, init=False)
        phases: dict[str, str] = attrs.field(factory=dict, init=False)
        requests: collections.Counter = attrs.field(factory=collections.Counter, init=False)
        last_request: float = attrs.field(default=0.0, init=False)
        keys: dict = attrs.field(factory=lambda: collections.defaultdict(list), init=False)  # (res, ns) -> keys
        declared: set | None = attrs.field(default=None, init=False)

        async def _store_create(self, resource: Any, namespace: str | None, obj: dict) -> dict:
            known = len(self._objects)
            created = await super()._store_create(resource, namespace, obj)
            meta = created["metadata"]
            if len(self._objects) > known:  # a new key (objects are only ever soft-deleted)
                self.keys[(resource, meta.get("namespace"))].append((resource, meta.get("namespace"), meta["name"]))
            if resource.plural == "jobs" and (meta.get("labels") or {}).get("app.kubernetes.io/component") == "quantize":
                self.job_times.append(time.perf_counter())
            return created

        async def _store_patch(self, resource: Any, namespace: str | None, name: str, patch: Any,
                               subresource: str | None = None) -> dict:
            after = await super()._store_patch(resource, namespace, name, patch, subresource)
            phase = (after.get("status") or {}).get("phase")
            if resource.plural == "quantizedmodels" and phase:
                self.phases[name] = phase
            return after

        async def _handle(self, request):
            self.last_request = time.perf_counter()
            what = request.resource.plural if request.resource is not None else request.url.path
            if request.subresource:
                what += "/" + request.subresource
            action = request.action.name.lower() if request.action is not None else str(request.method)
            self.requests[f"{action} {what}"] += 1
            try:
                return await super()._handle(request)
            finally:
                self._requests[:] = [r for r in self._requests if r is not request]

        def _lookup(self, request) -> Any:
            key = (request.resource, request.namespace, request.name)
            if key not in self._objects or self._objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError(details={"name": request.name})
            return self._objects[key]

        async def _serve_fetch(self, request):
            if not indexed or request.namespace is None or request.name is None:
                return await super()._serve_fetch(request)
            return self._lookup(request).raw

        async def _serve_update(self, request):
            if not indexed or request.namespace is None or request.name is None:
                return await super()._serve_update(request)
            return self._lookup(request).last.raw

        async def _serve_list(self, request):
            if not indexed or request.namespace is None:
                return await super()._serve_list(request)
            if self.declared is None:  # the resources served, without kmock's scan of every object
                self.declared = set(kmock.KubernetesScaffold._get_resources(self))
            if request.resource not in self.declared:
                raise kmock.KubernetesResourceNotFoundError()
            selector = request.params.get("labelSelector")
            async with self._lock:
                objs = (self._objects[key] for key in self.keys.get((request.resource, request.namespace), ()))
                items = [copy.deepcopy(obj.raw) for obj in objs if not obj.deleted and _selected(obj.raw, selector)]
                revision = str(self._revision)
            return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": revision}, "items": items}

    return BenchEmulator


# ---- one run ------------------------------------------------------------------------------------

def model_bodies(n: int) -> list[dict]:
    import yaml

    base = yaml.safe_load(EXAMPLE.read_text())
    bodies = []
    for i in range(n):
        body = copy.deepcopy(base)
        body["metadata"].update(name=f"tiny-llama-{i:05d}", namespace=NAMESPACE)
        bodies.append(body)
    return bodies


def _proc_kib(pid: int | str, field: str = "VmRSS") -> int | None:
    """From /proc/PID/status: VmRSS, resident now; VmHWM, the most resident so far (KiB)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def _cpu_s(pid: int) -> float | None:
    """user+sys seconds a running process has used so far."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


async def _until(what: str, check, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.01)


async def _stop(proc: subprocess.Popen) -> resource.struct_rusage:
    """SIGINT (kopf stops gracefully), then reap the child ourselves: os.wait4 gives its own rusage."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    # In a thread: the emulator keeps serving while kopf stops.
    waited = asyncio.ensure_future(asyncio.to_thread(os.wait4, proc.pid, 0))
    try:
        _, status, usage = await asyncio.wait_for(asyncio.shield(waited), 60)
    except asyncio.TimeoutError:
        proc.kill()
        _, status, usage = await waited
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


async def run_once(n: int, args: argparse.Namespace, log_path: Path) -> dict:
    import kmock

    from tests.operator_support.cluster import QM, register_resources, write_kubeconfig

    bodies = model_bodies(n)
    async with make_emulator_class(not args.plain_emulator)() as emulator, kmock.Server(emulator) as server:
        register_resources(emulator)
        peak_file = log_path.with_suffix(".peak")
        kubeconfig = write_kubeconfig(log_path.with_suffix(".kubeconfig"), server, NAMESPACE)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONPATH": str(ROOT / "operator")}
        with log_path.open("w") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--operator-child", NAMESPACE,
                                     "--resync-seconds", str(args.resync_seconds), "--peak-file", str(peak_file)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        result: dict[str, Any] = {"n": n, "log": str(log_path)}
        try:
            def watching() -> bool:
                return WATCHED.issubset(key.split()[1] for key in emulator.requests if key.startswith("watch "))
            await _until("the operator to watch", watching, 60, proc)
            await asyncio.sleep(0.5)  # its initial (empty) listings are done
            result["idle_rss_mib"] = _mib(_proc_kib(proc.pid))
            idle_cpu = _cpu_s(proc.pid) or 0.0
            own0 = resource.getrusage(resource.RUSAGE_SELF)
            emulator.requests.clear()

            start = time.perf_counter()
            for body in bodies:
                await emulator.store_create(QM, body)
            created = time.perf_counter()
            await _until(f"{n} quantize Jobs", lambda: len(emulator.job_times) >= n, args.timeout, proc)
            await _until(f"{n} statuses", lambda: len(emulator.phases) >= n, args.timeout, proc)
            statuses = time.perf_counter()
            give_up = statuses + args.settle_timeout
            while time.perf_counter() - emulator.last_request < args.quiet and time.perf_counter() < give_up:
                await asyncio.sleep(0.05)
            own1 = resource.getrusage(resource.RUSAGE_SELF)
            result["settled_rss_mib"] = _mib(_proc_kib(proc.pid))
            peak_before_stop = _proc_kib(proc.pid, "VmHWM")
        finally:
            usage = await _stop(proc)

    jobs = sorted(emulator.job_times)
    total = sum(emulator.requests.values())
    result.update(
        create_s=created - start,
        first_job_s=jobs[0] - start,
        median_job_s=jobs[len(jobs) // 2] - start,
        all_jobs_s=jobs[-1] - start,
        jobs_per_s=n / (jobs[-1] - start),
        all_statuses_s=statuses - start,
        settled_s=emulator.last_request - start,
        phases=dict(collections.Counter(emulator.phases.values())),
        peak_rss_mib=_mib(int(peak_file.read_text()) if peak_file.exists() else peak_before_stop),
        peak_rss_before_stop_mib=_mib(peak_before_stop),
        wait4_maxrss_mib=usage.ru_maxrss / 1024,  # includes this process's RSS at the spawn: see above
        operator_cpu_s=usage.ru_utime + usage.ru_stime - idle_cpu,
        operator_startup_cpu_s=idle_cpu,
        emulator_cpu_s=(own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime),
        requests=total,
        requests_per_model=total / n,
        request_mix=dict(emulator.requests.most_common()),
    )
    return result


# ---- the table ----------------------------------------------------------------------------------

COLUMNS = [  # header, key, format
    ("N", "n", "{}"),
    ("s to all Jobs", "all_jobs_s", "{:.2f}"),
    ("Jobs/s", "jobs_per_s", "{:.1f}"),
    ("peak RSS MiB", "peak_rss_mib", "{:.1f}"),
    ("idle RSS MiB", "idle_rss_mib", "{:.1f}"),
    ("first Job s", "first_job_s", "{:.2f}"),
    ("median Job s", "median_job_s", "{:.2f}"),
    ("s to all statuses", "all_statuses_s", "{:.2f}"),
    ("requests/model", "requests_per_model", "{:.1f}"),
    ("operator CPU s", "operator_cpu_s", "{:.1f}"),
    ("emulator CPU s", "emulator_cpu_s", "{:.1f}"),
]


def print_table(rows: list[dict]) -> None:
    """One row per N: the run with the median time to all Jobs (every run is in the JSON)."""
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] +
             [f"{row['range_s'][0]:.2f}-{row['range_s'][1]:.2f} ({row['runs']})"] for row in rows]
    header = [h for h, _, _ in COLUMNS] + ["all-Jobs range s (runs)"]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for c in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)) + " |")


async def main_async(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    workdir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="kubequant-opbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runs, rows = [], []
    for n in args.sizes:
        if args.max_n and n > args.max_n:
            print(f"N={n}: skipped (over --max-n {args.max_n})", file=sys.stderr)
            continue
        mine = []
        for i in range(args.repeat):
            result = await run_once(n, args, workdir / f"operator-{n}-{i}.log")
            print(f"N={n} run {i + 1}: {result['all_jobs_s']:.2f} s to all Jobs, peak RSS "
                  f"{result['peak_rss_mib']:.1f} MiB, requests {result['request_mix']}", file=sys.stderr, flush=True)
            mine.append(result)
        times = [r["all_jobs_s"] for r in mine]
        median = min(mine, key=lambda r: abs(r["all_jobs_s"] - statistics.median(times)))
        rows.append({**median, "runs": len(mine), "range_s": (min(times), max(times))})
        runs += mine
    return runs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,100,1000", type=lambda s: [int(x) for x in s.split(",") if x],
                        help="numbers of QuantizedModels, comma-separated (default 1,100,1000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the table shows the median one")
    parser.add_argument("--max-n", type=int, help="skip sizes above this (a cap for slow machines)")
    parser.add_argument("--timeout", type=float, default=900, help="give up on a run after this many seconds")
    parser.add_argument("--resync-seconds", type=float, default=60,
                        help="the operator's periodic re-check (production default 60; 0 turns it off)")
    parser.add_argument("--quiet", type=float, default=2.0,
                        help="after all statuses, stop the operator once it sent no request for this long")
    parser.add_argument("--settle-timeout", type=float, default=30.0, help="... or after this long at most")
    parser.add_argument("--plain-emulator", action="store_true",
                        help="keep kmock's scans of every stored object per request (see BenchEmulator)")
    parser.add_argument("--log-dir", help="where the operator's logs go (default: a new temp dir)")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--operator-child", metavar="NAMESPACE", help=argparse.SUPPRESS)
    parser.add_argument("--peak-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.operator_child:
        sys.exit(operator_child(args.operator_child, str(args.resync_seconds), args.peak_file))

    runs, rows = asyncio.run(main_async(args))
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "args": {k: v for k, v in vars(args).items() if k not in ("json", "operator_child", "peak_file")},
            "runs": runs,
        }, indent=1, default=str))


if __name__ == "__main__":
    main()
