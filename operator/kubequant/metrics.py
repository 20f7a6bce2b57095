"""Operator metrics on :8080/metrics (prometheus-client).

Fed from status transitions (a result recorded for the first time), not from every reconcile, so
that a resync tick or a restart never counts a quantization or a gate outcome twice.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from kubequant.reconcile import PHASES

RECONCILES = Counter("kubequant_reconciles", "Reconciles of QuantizedModels, by result.", ["result"])
MODELS = Gauge("kubequant_models", "QuantizedModels known to this operator, by phase.", ["phase"])
QUANTIZE_SECONDS = Histogram(
    "kubequant_quantization_duration_seconds", "Duration of successful quantizations.",
    buckets=(10, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600),
)
EVALUATE_SECONDS = Histogram(
    "kubequant_evaluation_duration_seconds", "Duration of evaluate Jobs that reached a verdict.",
    buckets=(10, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
BASELINE_PPL = Gauge("kubequant_baseline_perplexity", "Perplexity of the unquantized model.", ["namespace", "model"])
QUANTIZED_PPL = Gauge("kubequant_quantized_perplexity", "Perplexity of the quantized model (served by vLLM when "
                      "evaluated).", ["namespace", "model"])
KL_DIVERGENCE = Gauge("kubequant_kl_divergence", "Mean KL divergence of the served model's next-token "
                      "distributions from the source model's, nats per token.", ["namespace", "model"])
TOP_TOKEN_AGREEMENT = Gauge("kubequant_top_token_agreement", "Share of tokens whose most likely successor is the "
                            "source model's.", ["namespace", "model"])
TASK_SCORE = Gauge("kubequant_task_score", "Score of the served model on an lm-evaluation-harness task (its first "
                   "metric), and of the source model.", ["namespace", "model", "task", "metric", "of"])
# One series per recipe candidate (spec.quantization.candidates) that was quantized or evaluated.
CANDIDATE_LABELS = ("namespace", "model", "candidate")
CANDIDATE_SIZE = Gauge("kubequant_candidate_size_bytes", "Size on disk of a recipe candidate's artifact.",
                       CANDIDATE_LABELS)
CANDIDATE_KL = Gauge("kubequant_candidate_kl_divergence", "Mean KL divergence of a recipe candidate from the source "
                     "model, nats per token, as its gate measured it.", CANDIDATE_LABELS)
CANDIDATE_PASSED = Gauge("kubequant_candidate_passed", "1 when a recipe candidate passed the gate, 0 when it failed.",
                         CANDIDATE_LABELS)
CANDIDATE_GAUGES = tuple((gauge, CANDIDATE_LABELS) for gauge in (CANDIDATE_SIZE, CANDIDATE_KL, CANDIDATE_PASSED))
GATE_OUTCOMES = Counter("kubequant_gate_outcomes", "Quality gate verdicts.", ["namespace", "model", "outcome"])

_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
_server_started = False


def serve(port: int, address: str = "0.0.0.0") -> None:
    global _server_started
    with _lock:
        if not _server_started:
            start_http_server(port, addr=address)
            _server_started = True


def _set_phases() -> None:
    counts = dict.fromkeys(PHASES, 0)
    for phase in _phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        MODELS.labels(phase=phase).set(count)


def record(namespace: str, name: str, old: dict, new: dict) -> None:
    """Update the metrics from one status transition of one model."""
    with _lock:
        if new.get("phase"):
            _phases[(namespace, name)] = new["phase"]
            _set_phases()
    artifact, old_artifact = new.get("artifact") or {}, old.get("artifact") or {}
    if artifact.get("hash") and artifact.get("hash") != old_artifact.get("hash") and artifact.get("seconds") is not None:
        QUANTIZE_SECONDS.observe(float(artifact["seconds"]))
    evaluation, old_evaluation = new.get("evaluation") or {}, old.get("evaluation") or {}
    if evaluation.get("key") and evaluation.get("key") != old_evaluation.get("key"):
        GATE_OUTCOMES.labels(namespace=namespace, model=name, outcome=evaluation.get("reason", "Unknown")).inc()
        if evaluation.get("seconds") is not None:
            EVALUATE_SECONDS.observe(float(evaluation["seconds"]))
    if new.get("baselinePerplexity") is not None:
        BASELINE_PPL.labels(namespace=namespace, model=name).set(new["baselinePerplexity"])
    if new.get("quantizedPerplexity") is not None:
        QUANTIZED_PPL.labels(namespace=namespace, model=name).set(new["quantizedPerplexity"])
    if (evaluation.get("klDivergence") or {}).get("mean") is not None:
        KL_DIVERGENCE.labels(namespace=namespace, model=name).set(evaluation["klDivergence"]["mean"])
    if evaluation.get("topTokenAgreement") is not None:
        TOP_TOKEN_AGREEMENT.labels(namespace=namespace, model=name).set(evaluation["topTokenAgreement"])
    _record_candidates(namespace, name, new.get("candidates") or [])
    for task in evaluation.get("tasks") or []:
        for of in ("quantized", "source"):
            if task.get(of) is not None:
                TASK_SCORE.labels(namespace=namespace, model=name, task=task.get("task", ""),
                                  metric=task.get("metric", ""), of=of).set(task[of])


def _record_candidates(namespace: str, name: str, candidates: list[dict]) -> None:
    """The candidates' gauges: one series per candidate measured; none left for candidates gone from the spec."""
    names = {c.get("name") for c in candidates}
    _remove_series(CANDIDATE_GAUGES, namespace, name, keep=lambda labels: labels.get("candidate") in names)
    for c in candidates:
        labels = {"namespace": namespace, "model": name, "candidate": c.get("name", "")}
        artifact, evaluation = c.get("artifact") or {}, c.get("evaluation") or {}
        if artifact.get("sizeAfterBytes") is not None:
            CANDIDATE_SIZE.labels(**labels).set(artifact["sizeAfterBytes"])
        if (evaluation.get("klDivergence") or {}).get("mean") is not None:
            CANDIDATE_KL.labels(**labels).set(evaluation["klDivergence"]["mean"])
        if evaluation.get("passed") is not None:
            CANDIDATE_PASSED.labels(**labels).set(1 if evaluation["passed"] else 0)


def _remove_series(metrics: tuple, namespace: str, name: str, keep=lambda labels: False) -> None:
    """Remove the series of one model from (metric, its label names) pairs: all of them, or those `keep` refuses."""
    for metric, label_names in metrics:
        for labels in [s.labels for m in metric.collect() for s in m.samples]:
            if labels.get("namespace") == namespace and labels.get("model") == name and not keep(labels) \
                    and all(n in labels for n in label_names):
                with contextlib.suppress(KeyError):
                    metric.remove(*(labels[n] for n in label_names))


def forget(namespace: str, name: str) -> None:
    """A deleted model leaves no series behind."""
    with _lock:
        _phases.pop((namespace, name), None)
        _set_phases()
    for gauge in (BASELINE_PPL, QUANTIZED_PPL, KL_DIVERGENCE, TOP_TOKEN_AGREEMENT):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)
    _remove_series(((GATE_OUTCOMES, ("namespace", "model", "outcome")),
                    (TASK_SCORE, ("namespace", "model", "task", "metric", "of")), *CANDIDATE_GAUGES), namespace, name)
