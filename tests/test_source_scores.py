"""The source model measured once (quantizer/source_scores.py): the second evaluation of another
checkpoint reads the source model's scores back and reaches the numbers it would have measured."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from quantizer import source_scores
from quantizer.perplexity import EngineScores, Perplexity
from quantizer.tasks import TaskScore
from tests.conftest import FIXTURES, TINY_MODEL
from tests.test_evaluate import _gate_args, evaluate_in_process

PROMPTS = FIXTURES / "text" / "prompts.txt"
TASKS = FIXTURES / "tasks"
AGAINST_SOURCE = ["--engine", "torch", "--generation-prompts", str(PROMPTS), "--max-new-tokens", "8",
                  "--tasks", str(TASKS), "--task-limit", "20"]


def test_scores_are_written_whole_and_read_back_as_they_were(tmp_path):
    scores = EngineScores(Perplexity(27.7, 123.4, 100, 2, "torch 2.13"), [[(5, -0.1), (7, -2.5)], [], [(1, -0.01)]],
                          [[1, 2, 3]], [{"batch_size": 1, "output_tokens_per_second": 9.5}],
                          [TaskScore("t", "acc", 0.5, 0.05, 20)])
    path = tmp_path / "scores" / "k.safetensors"
    source_scores.save(path, scores)
    assert source_scores.load(path) == scores
    assert [p.name for p in path.parent.iterdir()] == ["k.safetensors"]  # no temporary file left
    path.write_bytes(path.read_bytes()[:40])  # damaged: measured again, not trusted
    assert source_scores.load(path) is None


@pytest.mark.slow
def test_a_second_checkpoint_reads_the_source_scores_back_with_the_same_numbers(checkpoints, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(TINY_MODEL, source)
    kept = tmp_path / "kept"
    (g128, q128), (g32, q32) = checkpoints["gptq-g128"], checkpoints["gptq-g32"]
    base = ["--baseline-model", str(source), *AGAINST_SOURCE]

    def evaluate(path, quantized, name: str, *extra: str) -> dict:
        folder = tmp_path / name
        folder.mkdir()
        code, result = evaluate_in_process(path, folder, *base, *_gate_args(quantized), *extra)
        assert code in (0, 3), result
        return result

    first = evaluate(g128, q128, "first", "--source-scores", str(kept))
    assert first["source"]["scores"] == "measured" and len(list(kept.iterdir())) == 1
    second = evaluate(g32, q32, "second", "--source-scores", str(kept))
    assert second["source"]["scores"] == "reused"
    fresh = evaluate(g32, q32, "fresh")  # the same evaluation, serving the source model again
    assert "source" in fresh and fresh["source"]["scores"] == "measured"
    for field in ("baseline_ppl", "kl_divergence", "top_token_agreement", "generation_match", "tasks", "passed"):
        assert second[field] == fresh[field], field
    assert second["source"]["seconds"] < fresh["source"]["seconds"]

    # Anything the source's numbers depend on makes a new key: another request, the model's files.
    third = evaluate(g32, q32, "third", "--source-scores", str(kept), "--top-logprobs", "10")
    assert third["source"]["scores"] == "measured" and len(list(kept.iterdir())) == 2
    config = source / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    fourth = evaluate(g32, q32, "fourth", "--source-scores", str(kept))
    assert fourth["source"]["scores"] == "measured"
    assert len(json.dumps(fourth)) < 4096  # still fits the Pod's termination message


def test_source_scores_need_the_source_model(checkpoints, tmp_path):
    path, quantized = checkpoints["gptq-g128"]
    code, result = evaluate_in_process(path, tmp_path, "--engine", "torch", *_gate_args(quantized),
                                       "--source-scores", str(tmp_path / "kept"))
    assert code == 2 and "--source-scores keeps the source model's scores: it needs --baseline-model" in result["message"]
