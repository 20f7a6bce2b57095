"""Shared fixtures: the committed tiny model, its texts, and checkpoints made once per session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

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
    """GPTQ and RTN checkpoints of the tiny model at groups 128 and 32, one with full-range (signed)
    scales, all in the default format (compressed-tensors), and GPTQ g128 in the GPTQ format, made once."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, args in {
        "gptq-g128": ["--group-size", "128"],
        "gptq-g32": ["--group-size", "32"],
        "rtn-g128": ["--group-size", "128", "--method", "rtn"],
        "rtn-g32": ["--group-size", "32", "--method", "rtn"],
        "full-range-g32": ["--group-size", "32", "--scale-search", "cost", "--full-range"],
        "gptq-g128-gptq-format": ["--group-size", "128", "--format", "gptq"],
    }.items():
        code, result = quantize(root / name, *args)
        assert code == 0, result
        made[name] = (root / name, result)
    return made


def damaged_copy(path: Path, out: Path, step: int, layers: str = "model.layers.") -> Path:
    """A copy of a 4-bit checkpoint (either format) whose Linears under `layers` have their codes moved
    to a grid `step` times coarser, written consistently: vLLM and our reference read the same damaged
    weights, so the engine check cannot see the damage; only the comparison with the source can."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from safetensors.torch import load_file, save_file

    from quantizer.packing import pack, unpack

    def coarser(signed):  # codes centred on 0, in [-8, 7]
        return (torch.round(signed / step) * step).clamp(-8, 7)

    shutil.copytree(path, out)
    for file in out.glob("model-*.safetensors"):
        tensors = load_file(file)
        for name in [n for n in tensors if n.startswith(layers)]:
            if name.endswith(".qweight"):  # GPTQ: unsigned codes, packed along the input
                codes = unpack(tensors[name], 4, tensors[name].shape[0] * 8)
                tensors[name] = pack((coarser(codes - 8) + 8).to(torch.int32), 4)
            elif name.endswith(".weight_packed"):  # compressed-tensors: signed codes, packed per row
                shape = torch.Size(tensors[name.replace("weight_packed", "weight_shape")].tolist())
                codes = unpack_from_int32(tensors[name], 4, shape)
                tensors[name] = pack_to_int32(coarser(codes.float()).to(torch.int8), 4)
        save_file(tensors, file, metadata={"format": "pt"})
    return out


# ---- the real control plane (scripts/cluster.sh) ----------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "controlplane: needs the real Kubernetes control plane (scripts/cluster.sh)")
    config.addinivalue_line("markers", "citools: needs a tool .ci/run installs outside the venv (olah)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With CI=true a test of what CI builds or installs (the control plane, the real node, olah) that
    skips fails the run."""
    outcome = yield
    report = outcome.get_result()
    needs_ci = item.get_closest_marker("controlplane") or item.get_closest_marker("citools")
    if report.skipped and os.environ.get("CI") == "true" and needs_ci:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test of what CI builds or installs may not skip ({reason})"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory):
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK's nodes, once per session,
    with the CRDs applied as a user applies them."""
    from tests.kube.controlplane import ControlPlane, Unavailable, ensure_binaries

    try:
        ensure_binaries()
    except Unavailable as exc:
        pytest.skip(str(exc))
    cluster = ControlPlane(tmp_path_factory.mktemp("cluster"))
    cluster.up()
    try:
        cluster.apply_crds()
        yield cluster
    finally:
        cluster.down()
