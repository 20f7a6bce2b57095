"""The records kept in status: the artifact and the evaluation, from the Jobs' results."""

from __future__ import annotations

from kubequant import builders
from kubequant.reconcile.jobs import redact
from kubequant.spec import Model
from quantizer.contract import EvaluateResult, QuantizeResult

# ---- records kept in status ---------------------------------------------------------------------

def status_records(status: dict, kind: str) -> list[dict]:
    """The records of `kind` ("artifact" or "evaluation") a status holds: the latest, what serves, and
    each recipe candidate's, so that nothing measured before is measured again."""
    serving = status.get("serving") or {}
    found = [status.get(kind), serving.get(kind), *(c.get(kind) for c in status.get("candidates") or [])]
    return [r for r in found if r]


def record_for(key_name: str, key: str, records: list[dict]) -> dict | None:
    """The first of `records` whose `key_name` is `key`."""
    return next((r for r in records if r.get(key_name) == key), None)


def artifact_record(model: Model, a_hash: str, result: QuantizeResult) -> dict:
    record = {
        "hash": a_hash,
        "path": builders.artifact_dir(model, a_hash),
        "baselinePerplexity": result.baseline_ppl,
        "fakequantPerplexity": result.fakequant_ppl,
        "sizeBeforeBytes": result.size_before_bytes,
        "sizeAfterBytes": result.size_after_bytes,
        "seconds": result.seconds,
        "groupSize": result.group_size,
        "groupSizes": result.group_sizes,
        "rowParallelInFeatures": result.row_parallel_in_features,
        "expertInFeatures": result.expert_in_features,
        "decoderLayers": result.decoder_layers,
        "fullRangeScales": result.recipe.get("full_range"),
    }
    return {k: v for k, v in record.items() if v is not None}


def evaluation_record(model: Model, e_key: str, a_hash: str, verdict: EvaluateResult, seconds: float | None) -> dict:
    record = {
        "key": e_key,
        "artifactHash": a_hash,
        "passed": verdict.passed,
        "reason": verdict.reason,
        "message": redact(verdict.message),
        "servedPerplexity": verdict.served_ppl,
        "klDivergence": verdict.kl_divergence and {k: verdict.kl_divergence.get(k) for k in ("mean", "p99", "max")},
        "topTokenAgreement": verdict.top_token_agreement,
        "generationMatch": verdict.generation_match,
        "throughput": verdict.throughput and [_throughput_row(row) for row in verdict.throughput],
        "tasks": verdict.tasks and [_task_row(row) for row in verdict.tasks],
        "tensorParallelSize": model.spec.serving.tensor_parallel_size,
        "seconds": seconds,
    }
    return {k: v for k, v in record.items() if v is not None}


_THROUGHPUT_FIELDS = {"batch_size": "batchSize", "output_tokens_per_second": "outputTokensPerSecond",
                      "time_to_first_token_seconds": "timeToFirstTokenSeconds",
                      "source_output_tokens_per_second": "sourceOutputTokensPerSecond", "speedup": "speedup"}


def _throughput_row(row: dict) -> dict:
    return {camel: row[name] for name, camel in _THROUGHPUT_FIELDS.items() if isinstance(row, dict) and name in row}


_TASK_FIELDS = ("task", "metric", "source", "quantized", "drop", "stderr", "samples")


def _task_row(row: dict) -> dict:
    return {name: row[name] for name in _TASK_FIELDS if isinstance(row, dict) and row.get(name) is not None}
