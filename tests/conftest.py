"""Shared fixtures: the committed tiny model, its texts, and checkpoints made once per session."""

from __future__ import annotations

import json
import os
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
    """GPTQ and RTN checkpoints of the tiny model at groups 128 and 32, and one with full-range
    (signed) scales, made once."""
    root = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for name, args in {
        "gptq-g128": ["--group-size", "128"],
        "gptq-g32": ["--group-size", "32"],
        "rtn-g128": ["--group-size", "128", "--method", "rtn"],
        "rtn-g32": ["--group-size", "32", "--method", "rtn"],
        "full-range-g32": ["--group-size", "32", "--scale-search", "cost", "--full-range"],
    }.items():
        code, result = quantize(root / name, *args)
        assert code == 0, result
        made[name] = (root / name, result)
    return made


# ---- the real control plane (scripts/cluster.sh) ----------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "controlplane: needs the real Kubernetes control plane (scripts/cluster.sh)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With CI=true a control-plane test that skips fails the run: CI builds the control plane."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.get_closest_marker("controlplane"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a control-plane test may not skip ({reason})"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory):
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK's nodes, once per session,
    with the CRDs applied as a user applies them."""
    from tests.kube.controlplane import ROOT, ControlPlane, Unavailable, ensure_binaries

    try:
        ensure_binaries()
    except Unavailable as exc:
        pytest.skip(str(exc))
    cluster = ControlPlane(tmp_path_factory.mktemp("cluster"))
    cluster.up()
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/quantizedmodels.kubequant.io", "--timeout=60s")
        yield cluster
    finally:
        cluster.down()
