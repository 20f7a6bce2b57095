"""Task accuracy in the gate (quantizer/tasks.py): lm-evaluation-harness tasks from local files.

The loader's checks, the comparison and the gate's verdict on numbers, then the evaluator on the tiny
model with the shipped task (tests/fixtures/tasks, written by scripts/make_tiny_task.py): the sane
checkpoint keeps its score; a damaged one loses it, and the gate says by how much.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantizer import contract
from quantizer.cli import main as quantizer_main
from quantizer.errors import InputError
from quantizer.gate import GateThresholds, decide
from quantizer.tasks import TaskScore, compare_tasks, load_tasks, task_files
from tests.conftest import EVALUATION, FIXTURES, TINY_MODEL, damaged_copy

pytest.importorskip("lm_eval", reason="the `tasks` extra (lm-evaluation-harness) is not installed")

TASKS = FIXTURES / "tasks"
WINDOWS = ["--eval-text", str(EVALUATION), "--seq-len", "256", "--max-windows", "24"]


def test_a_task_directory_loads_with_its_data_next_to_it(tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(TASKS, moved)
    (config,) = load_tasks([moved])
    assert config["task"] == "python_identifier"
    # Relative to the YAML, wherever the directory is (a claim, a ConfigMap mount, a checkout).
    assert config["dataset_kwargs"]["data_files"] == {"test": str(moved / "python_identifier.jsonl")}
    assert task_files([moved / "python_identifier.yaml"]) == [moved / "python_identifier.yaml"]


@pytest.mark.parametrize(("arrange", "message"), [
    (lambda d: (d / "python_identifier.jsonl").unlink(), "data file python_identifier.jsonl not found next to the task"),
    (lambda d: [p.unlink() for p in d.glob("*.yaml")], "no task YAML"),
    (lambda d: shutil.copy(d / "python_identifier.yaml", d / "again.yaml"), "task names must be unique"),
    (lambda d: (d / "python_identifier.yaml").write_text("dataset_path: json\n"), "needs a `task:` name"),
])
def test_bad_task_files_are_bad_input_naming_the_file(tmp_path, arrange, message):
    tasks = tmp_path / "tasks"
    shutil.copytree(TASKS, tasks)
    arrange(tasks)
    with pytest.raises(InputError, match=message):
        load_tasks([tasks])
    with pytest.raises(InputError, match="no such file or directory"):
        load_tasks([tmp_path / "missing"])


def test_the_drop_follows_the_metric_direction():
    source = [TaskScore("a", "acc", 0.60, 0.03, 100), TaskScore("b", "perplexity", 10.0, None, 100, False)]
    quantized = [TaskScore("a", "acc", 0.55, 0.03, 100), TaskScore("b", "perplexity", 10.5, None, 100, False)]
    a, b = compare_tasks(source, quantized)
    assert a.drop == pytest.approx(0.05) and b.drop == pytest.approx(0.5)  # both worse: both positive


def test_the_gate_fails_a_task_that_dropped_too_far_and_names_it():
    tasks = compare_tasks([TaskScore("arc", "acc", 0.60, 0.02, 500), TaskScore("piqa", "acc", 0.70, 0.02, 500)],
                          [TaskScore("arc", "acc", 0.52, 0.02, 500), TaskScore("piqa", "acc", 0.69, 0.02, 500)])
    decision = decide(10.0, 10.2, 10.2, GateThresholds(max_accuracy_drop=0.02), tasks=tasks)
    assert not decision.passed and decision.reason == contract.TASK_ACCURACY_DROP
    assert "arc acc 0.6000 -> 0.5200 (stderr 0.0200): drop 0.0800 > 0.0200" in decision.message
    assert "piqa" not in decision.message  # within the threshold
    # A drop exactly at the limit passes; reported without a threshold, it never fails.
    at_limit = compare_tasks([TaskScore("arc", "acc", 0.5, None, 8)], [TaskScore("arc", "acc", 0.25, None, 8)])
    assert decide(10.0, 10.0, 10.0, GateThresholds(max_accuracy_drop=0.25), tasks=at_limit).passed
    assert decide(10.0, 10.0, 10.0, GateThresholds(), tasks=tasks).passed
    with pytest.raises(InputError, match="--max-accuracy-drop needs task scores"):
        decide(10.0, 10.0, 10.0, GateThresholds(max_accuracy_drop=0.02))
    with pytest.raises(InputError, match="--max-accuracy-drop must be 0 or more"):
        GateThresholds(max_accuracy_drop=-0.1)


def _evaluate(model: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    result_file = tmp_path / f"{model.name}.json"
    code = quantizer_main(["evaluate", "--model", str(model), *WINDOWS, "--engine", "torch",
                           "--baseline-model", str(TINY_MODEL), "--tasks", str(TASKS),
                           "--result-file", str(result_file), *extra])
    return code, json.loads(result_file.read_text())


@pytest.mark.slow
def test_the_sane_checkpoint_keeps_its_task_score_and_a_damaged_one_fails(checkpoints, tmp_path):
    path, _ = checkpoints["gptq-g128"]
    code, result = _evaluate(path, tmp_path, "--max-accuracy-drop", "0.05")
    assert code == 0, result["message"]
    (task,) = result["tasks"]
    assert task["task"] == "python_identifier" and task["metric"] == "acc" and task["samples"] == 200
    assert task["source"] > 0.1  # well above what guessing an identifier gives
    assert abs(task["drop"]) <= 0.05 and 0 < task["stderr"] < 0.05
    assert "python_identifier acc" in result["message"]

    # Perplexity would fail it first; loosened, the task is the check that fails, with its numbers.
    bad = damaged_copy(path, tmp_path / "bad", step=8)
    code, result = _evaluate(bad, tmp_path, "--max-accuracy-drop", "0.05", "--max-ppl-ratio", "50")
    assert code == contract.EXIT_GATE_FAILED
    assert result["reason"] == contract.TASK_ACCURACY_DROP
    (task,) = result["tasks"]
    assert task["drop"] > 0.1
    assert f"drop {task['drop']:.4f} > 0.0500" in result["message"]
    assert abs(result["engine_deviation"]) < 0.01  # served as written: the damage is the model's


def test_tasks_without_the_unquantized_model_are_bad_input(checkpoints, tmp_path):
    path, quantized = checkpoints["gptq-g128"]
    result_file = tmp_path / "r.json"
    code = quantizer_main(["evaluate", "--model", str(path), *WINDOWS, "--engine", "torch", "--baseline-ppl",
                           repr(quantized["baseline_ppl"]), "--tasks", str(TASKS), "--result-file", str(result_file)])
    assert code == contract.EXIT_BAD_INPUT and "--baseline-model" in json.loads(result_file.read_text())["message"]
    code = quantizer_main(["evaluate", "--model", str(path), *WINDOWS, "--engine", "torch", "--baseline-model",
                           str(TINY_MODEL), "--max-accuracy-drop", "0.02", "--result-file", str(result_file)])
    assert code == contract.EXIT_BAD_INPUT and "--tasks" in json.loads(result_file.read_text())["message"]
