"""Quantize runs that die leave nothing behind: real signals on the CLI, leftovers of dead writers,
a volume too small, a disk that fills up while writing."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest

from quantizer import checkpoint, contract
from quantizer.checkpoint import PROGRESS_FILE, STALE_AFTER_SECONDS, WRITER_FILE, remove_stale_partials
from tests.conftest import CALIBRATION, CALIBRATION_ARGS, EVALUATION, TINY_MODEL, quantize
from tests.families import mixtral_from_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _start(output: Path, model: Path = TINY_MODEL, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "quantizer", "quantize", "--model", str(model), "--output", str(output),
         "--calibration", str(CALIBRATION), "--eval-text", str(EVALUATION), "--no-progress", *CALIBRATION_ARGS,
         "--result-file", str(output.parent / "result.json"), *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _partials(output: Path) -> list[Path]:
    return list(output.parent.glob(f".{output.name}.partial-*"))


def _wait_for_partial(process: subprocess.Popen, output: Path, layers: int = 0) -> Path:
    """The partial output once it holds a shard of `layers` or more decoder layers (0: once it exists)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        found = _partials(output)
        if found and (layers == 0 or any(found[0].glob("shard-*.safetensors"))):
            return found[0]
        time.sleep(0.05)
    raise AssertionError("no partial output appeared")


@pytest.mark.slow
def test_sigterm_stops_at_a_safe_point_removes_the_partial_and_says_so(tmp_path):
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    process = _start(output)
    _wait_for_partial(process, output)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == contract.EXIT_ERROR, stderr  # retryable: a preempted Job runs again
    result = json.loads((output.parent / "result.json").read_text())
    assert result["status"] == contract.FAILED and result["reason"] == contract.TERMINATED
    assert "terminated by SIGTERM" in result["message"] and "decoder layers" in result["message"]
    assert "partial output was removed" in result["message"]
    assert not output.exists() and _partials(output) == []


@pytest.mark.slow
def test_a_killed_writer_leaves_a_partial_that_the_next_run_removes(tmp_path):
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    process = _start(output)
    partial = _wait_for_partial(process, output)
    process.send_signal(signal.SIGKILL)  # what an OOM kill or a lost node does: no handler runs
    process.communicate(timeout=60)
    assert partial.is_dir() and not output.exists()
    code, result = quantize(output)
    assert code == 0, result
    assert output.is_dir() and _partials(output) == []  # the dead writer's leftover went
    assert WRITER_FILE not in {p.name for p in output.iterdir()}  # and the live one's lock with its commit


def _wait_for_layers(process: subprocess.Popen, output: Path, layers: int) -> Path:
    """The partial output once its progress record holds `layers` finished decoder layers."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be stopped"
        for partial in _partials(output):
            try:
                if len(json.loads((partial / PROGRESS_FILE).read_text())["layers"]) >= layers:
                    return partial
            except (OSError, ValueError):
                pass
        time.sleep(0.01)
    raise AssertionError(f"no partial output with {layers} finished layers appeared")


def _tensor_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    code, result = quantize(output)
    assert code == 0, result
    return output


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_run_resumes_from_its_last_finished_layer_bit_for_bit(tmp_path, uninterrupted, stop):
    """Preempted (SIGTERM) or killed (SIGKILL) after two of the four decoder layers, then run again:
    the retry quantizes only the last two, and the checkpoint equals an uninterrupted run's."""
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    process = _start(output)
    partial = _wait_for_layers(process, output, 2)
    process.send_signal(stop)
    process.communicate(timeout=300)
    assert not output.exists() and partial.is_dir()
    if stop == signal.SIGTERM:
        result = json.loads((output.parent / "result.json").read_text())
        assert process.returncode == contract.EXIT_ERROR and result["reason"] == contract.TERMINATED
        assert "kept for the retry to resume from" in result["message"]
        assert not (partial / WRITER_FILE).exists()  # released: the retry may take it at once
    code, result = quantize(output)
    assert code == 0, result
    manifest = json.loads((output / "kubequant.json").read_text())
    assert manifest["resumed_layers"] >= 2
    assert _tensor_files(output) == _tensor_files(uninterrupted)
    assert _partials(output) == []
    # The statistics of the resumed layers are the first run's.
    reference = json.loads((uninterrupted / "kubequant.json").read_text())
    assert [(x["name"], x["relative_error"]) for x in manifest["linears"]] == \
        [(x["name"], x["relative_error"]) for x in reference["linears"]]


@pytest.mark.slow
def test_a_killed_mixture_of_experts_run_resumes_bit_for_bit(tmp_path):
    """Mixtral's experts are named in the checkpoint as Transformers does not name them
    (block_sparse_moe.experts.<e>.w1): a resumed run puts the stored experts back in the right Linears."""
    model = mixtral_from_tiny_llama(tmp_path / "mixtral")
    reference = tmp_path / "reference" / "ckpt"
    code, result = quantize(reference, model=model)
    assert code == 0, result
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    process = _start(output, model)
    _wait_for_layers(process, output, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=300)
    code, result = quantize(output, model=model)
    assert code == 0, result
    assert json.loads((output / "kubequant.json").read_text())["resumed_layers"] >= 2
    assert _tensor_files(output) == _tensor_files(reference)


@pytest.mark.slow
def test_a_killed_mixed_precision_run_resumes_with_its_plan_bit_for_bit(tmp_path):
    """The retry measures the sensitivity again, finds the same plan (it is part of the resume key: a
    plan that differed would start afresh) and reads each stored Linear back by its own scheme."""
    mixed = ("--mixed-finer", "4:32", "--mixed-budget", "1")
    reference = tmp_path / "reference" / "ckpt"
    code, result = quantize(reference, *mixed)
    assert code == 0 and result["mixed_precision"]["finer_units"] > 0, result
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    process = _start(output, extra=mixed)
    _wait_for_layers(process, output, 2)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=300)
    code, result = quantize(output, *mixed)
    assert code == 0, result
    assert json.loads((output / "kubequant.json").read_text())["resumed_layers"] >= 2
    assert _tensor_files(output) == _tensor_files(reference)
    assert (output / "config.json").read_text() == (reference / "config.json").read_text()


def _fake_partial(output: Path, name: str, writer: dict | None, age: float = 0.0) -> Path:
    partial = output.parent / f".{output.name}.partial-{name}"
    partial.mkdir(parents=True)
    (partial / "shard-00001.safetensors").write_bytes(b"x" * 10)
    if writer is not None:
        (partial / WRITER_FILE).write_text(json.dumps(writer))
    stamp = time.time() - age
    for path in (partial / WRITER_FILE, partial):
        if path.exists():
            os.utime(path, (stamp, stamp))
    return partial


def test_only_the_partials_of_writers_that_are_gone_are_removed(tmp_path):
    output = tmp_path / "ckpt"
    here = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    live_here = _fake_partial(output, "live", {"host": here, "pid": os.getpid()})
    dead_here = _fake_partial(output, "dead", {"host": here, "pid": dead_pid})
    elsewhere_beating = _fake_partial(output, "beating", {"host": "other-node", "pid": 1}, age=60)
    elsewhere_silent = _fake_partial(output, "silent", {"host": "other-node", "pid": 1}, age=STALE_AFTER_SECONDS + 60)
    no_lock_old = _fake_partial(output, "old", None, age=STALE_AFTER_SECONDS + 60)
    other_target = _fake_partial(tmp_path / "other", "dead", {"host": here, "pid": dead_pid})
    removed = remove_stale_partials(output)
    assert sorted(removed) == sorted([dead_here, elsewhere_silent, no_lock_old])
    assert live_here.is_dir() and elsewhere_beating.is_dir() and other_target.is_dir()


def test_a_volume_too_small_is_refused_before_any_work(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("quantizer.quantize.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 10**5, 10**5))
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    code, result = quantize(output)
    assert code == contract.EXIT_BAD_INPUT
    assert "97.7 KiB free" in result["message"] and "needs about 1.4 MiB" in result["message"]
    assert not output.exists() and _partials(output) == []


def test_a_disk_that_fills_up_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    output = tmp_path / "out" / "ckpt"
    output.parent.mkdir()
    code, result = quantize(output)
    assert code == contract.EXIT_ERROR
    assert result["reason"] == contract.DISK_FULL and "the partial output was removed" in result["message"]
    assert not output.exists() and _partials(output) == []
