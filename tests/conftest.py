"""Shared fixtures: the committed tiny model, its texts, and checkpoints made once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantizer.cli import main as quantizer_main

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MODEL = FIXTURES / "tiny-llama"
CALIBRATION = FIXTURES / "text" / "calibration.txt"
EVALUATION = FIXTURES / "text" / "evaluation.txt"
# Small enough for CI on 2 cores, large enough to separate GPTQ from RTN.
CALIBRATION_ARGS = ["--samples", "32", "--seq-len", "256", "--eval-seq-len", "256", "--eval-max-windows", "24"]


def quantize(output: Path, *extra: str, model: Path = TINY_MODEL, calibration: Path = CALIBRATION) -> tuple[int, dict]:
    """Run `python -m quantizer quantize` in-process; return (exit code, JSON result)."""
    result_file = output.parent / f"{output.name}.result.json"
    code = quantizer_main(
        ["quantize", "--model", str(model), "--output", str(output), "--calibration", str(calibration),
         "--eval-text", str(EVALUATION), "--result-file", str(result_file), "--no-progress",
         *CALIBRATION_ARGS, *extra]
    )
    return code, json.loads(result_file.read_text())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """GPTQ and RTN checkpoints of the tiny model at groups 128 and 32, made once."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, args in {
        "gptq-g128": ["--group-size", "128"],
        "gptq-g32": ["--group-size", "32"],
        "rtn-g128": ["--group-size", "128", "--method", "rtn"],
        "rtn-g32": ["--group-size", "32", "--method", "rtn"],
    }.items():
        code, result = quantize(root / name, *args)
        assert code == 0, result
        made[name] = (root / name, result)
    return made
