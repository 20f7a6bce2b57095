"""The source model's side of the gate, measured once: kept in a folder, keyed by everything it depends on.

The evaluator serves the unquantized model beside each quantized one (perplexity, top-k log-probabilities,
greedy completions, throughput, task scores). Those numbers depend on the source model, the engine and
its settings, the evaluation windows and what is asked, never on the quantized checkpoint: every recipe
candidate of a QuantizedModel would measure them again. `--source-scores DIR` keeps them in DIR, one
file per key (`<key>.safetensors`: the log-probabilities as tensors, the rest as JSON in its header), so
each later evaluation serves only the quantized model.

The key hashes the source model's files (names, sizes and modification times: a model copied over
the same path is measured again), the engine (its version, the device, the settings and the VLLM_
environment that choose its kernels), the windows' token ids and the request. A file is written
whole (a temporary name, then a rename) or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from quantizer.files import written_whole
from quantizer.perplexity import EngineScores, EvalWindows, Perplexity
from quantizer.tasks import TaskScore

log = logging.getLogger(__name__)

FORMAT = "kubequant-source-scores/1"


def files_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """(name, size, modification time) of a file, or of every file under a folder."""
    out = []
    for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if path.is_file():
            st = path.stat()
            out.append((str(path.relative_to(root)) if path != root else path.name, st.st_size, st.st_mtime_ns))
    return out


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu {platform.machine()} {platform.processor()}".strip()


def _engine_version(engine: str) -> str:
    if engine != "vllm":
        return f"torch {torch.__version__}"
    import vllm

    return f"vllm {vllm.__version__}"


def source_key(model_dir: Path, windows: EvalWindows, engine: str, settings: dict[str, Any], request: dict[str, Any]) -> str:
    """The digest of everything the source model's scores depend on."""
    ids = windows.ids.to(torch.int64).contiguous()
    identity = {
        "format": FORMAT,
        "model": files_fingerprint(model_dir),
        "engine": _engine_version(engine),
        "device": _device(),
        "settings": settings,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")},
        "windows": {"ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "shape": list(ids.shape),
                    "score_from": windows.score_from},
        "request": request,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _to_tensors(top: list[list[tuple[int, float]]]) -> dict[str, torch.Tensor]:
    k = max((len(t) for t in top), default=0)
    ids = torch.full((len(top), k), -1, dtype=torch.int64)
    logprobs = torch.zeros((len(top), k), dtype=torch.float64)  # float64: the KL is the same, read back or not
    lengths = torch.tensor([len(t) for t in top], dtype=torch.int64)
    for i, token in enumerate(top):
        if token:
            ids[i, : len(token)] = torch.tensor([t for t, _ in token], dtype=torch.int64)
            logprobs[i, : len(token)] = torch.tensor([p for _, p in token], dtype=torch.float64)
    return {"top_ids": ids, "top_logprobs": logprobs, "top_lengths": lengths}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> list[list[tuple[int, float]]]:
    ids, logprobs, lengths = tensors["top_ids"].tolist(), tensors["top_logprobs"].tolist(), tensors["top_lengths"].tolist()
    return [list(zip(ids[i][:n], logprobs[i][:n], strict=True)) for i, n in enumerate(lengths)]


def save(path: Path, scores: EngineScores) -> None:
    """Write `scores` to `path` whole or not at all."""
    rest = {"perplexity": scores.perplexity.to_dict(), "generations": scores.generations,
            "throughput": scores.throughput, "tasks": [asdict(t) for t in scores.tasks]}
    with written_whole(path) as tmp:
        save_file(_to_tensors(scores.top), str(tmp), metadata={"format": FORMAT, "scores": json.dumps(rest)})


def load(path: Path) -> EngineScores | None:
    """The scores kept at `path`, or None when there are none (or they are not ours, or damaged)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            return None
        rest = json.loads(metadata["scores"])
        return EngineScores(Perplexity(**rest["perplexity"]), _from_tensors(load_file(str(path))), rest["generations"],
                            rest["throughput"], [TaskScore(**t) for t in rest["tasks"]])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        log.warning("source scores at %s cannot be read (%s): measuring the source model again", path, exc)
        return None
