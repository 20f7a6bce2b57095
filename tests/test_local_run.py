"""`kubequant run`: the operator's pipeline on this machine, from the same YAML."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubequant.cli import main as kubequant_main
from kubequant.local import load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny.yaml"
FIXTURES = ROOT / "tests" / "fixtures"
CLAIM = f"kubequant-data={FIXTURES}"


def _variant(tmp_path: Path, **evaluation) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["evaluation"].update(evaluation)
    path = tmp_path / "qm.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_quantize_and_gate_with_the_torch_engine(tmp_path, capsys):
    workdir = tmp_path / "work"
    code = kubequant_main(["run", "-f", str(EXAMPLE), "--claim", CLAIM, "--workdir", str(workdir),
                           "--engine", "torch", "--no-serve"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Passed" in out and "served perplexity" in out
    assert "KL divergence (nats/token)" in out and "top-1 agreement" in out and "generations matching" in out
    assert "task python_identifier (acc)" in out and "100 documents" in out
    manifests = list(workdir.glob("artifacts/**/kubequant.json"))
    assert len(manifests) == 1
    recipe = json.loads(manifests[0].read_text())["recipe"]
    spec = load_model(EXAMPLE).spec.quantization
    assert (recipe["bits"], recipe["group_size"], recipe["act_order"]) == (spec.bits, spec.group_size, spec.act_order)
    assert (recipe["scale_search"], recipe["full_range"], recipe["refine_sweeps"], recipe["group_aware_order"],
            recipe["source_targets"]) == \
        (spec.scale_search, spec.full_range, spec.refine_sweeps, spec.group_aware_order, spec.source_targets)
    assert "scales cost, full-range" in out  # the summary names the recipe
    assert "compressed-tensors" in out  # and the checkpoint's format

    # Same source and recipe: the artifact is reused, not quantized again.
    code = kubequant_main(["run", "-f", str(EXAMPLE), "--claim", CLAIM, "--workdir", str(workdir),
                           "--engine", "torch", "--no-serve"])
    assert code == 0
    assert "reusing" in capsys.readouterr().out


def test_a_failed_gate_stops_before_serving(tmp_path, capsys):
    strict = _variant(tmp_path, maxPerplexityRatio=1.0, maxPerplexityIncrease=0.0001)
    code = kubequant_main(["run", "-f", str(strict), "--claim", CLAIM, "--workdir", str(tmp_path / "w"),
                           "--engine", "torch"])
    out = capsys.readouterr().out
    assert code == 3
    assert "PerplexityRegression" in out and "not serving" in out


def test_the_first_candidate_that_passes_the_gate_is_chosen(tmp_path, capsys):
    """A gate between the tiny model's 4-bit g128 and g32 (KL 0.0097 and 0.0071 with the torch engine,
    on every machine measured): g128 fails, g32 passes; a second run measures nothing again."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["quantization"].update(groupSize=128, candidates=[{"groupSize": 32, "name": "finer"}, {"groupSize": 64}])
    doc["spec"]["evaluation"]["maxKLDivergence"] = 0.0084
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    args = ["run", "-f", str(manifest), "--claim", CLAIM, "--workdir", str(tmp_path / "w"), "--engine", "torch",
            "--no-serve"]
    assert kubequant_main(args) == 0
    out = capsys.readouterr().out
    assert "candidate w4-g128 failed the gate (KLDivergence): trying finer next" in out
    table = out[out.index("  candidate  recipe"):]
    assert re.search(r"w4-g128 +the spec's +1\.\d+ MiB +0\.0\d+ +\d+\.\d+% +\d+\.\d+ +KLDivergence", table)
    assert re.search(r"finer +groupSize 32 +1\.\d+ MiB +0\.00\d+ .* Passed", table)
    assert re.search(r"w4-g64 +groupSize 64 +not tried", table)
    assert re.search(r"candidate +finer", out) and "group 32" in out  # the summary is the chosen one's
    rows = json.loads(next((tmp_path / "w").glob("verdicts/**/candidates.json")).read_text())
    assert [(r["name"], r["state"]) for r in rows] == [("w4-g128", "GateFailed"), ("finer", "Passed"),
                                                       ("w4-g64", "Untried")]
    assert rows[0]["klDivergence"] > 0.0084 >= rows[1]["klDivergence"]
    assert kubequant_main(args) == 0
    again = capsys.readouterr().out
    assert again.count("reusing the verdict") == 2 and again.count("reusing /") == 2


def test_an_unmapped_claim_is_a_clear_error(tmp_path, capsys):
    code = kubequant_main(["run", "-f", str(EXAMPLE), "--workdir", str(tmp_path), "--no-serve"])
    assert code == 2
    assert "--claim kubequant-data=DIR" in capsys.readouterr().err


def test_serving_across_nodes_is_refused_before_any_work(tmp_path, capsys):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["serving"].update(nodes=2, device="gpu")  # serving across nodes is for GPUs
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    code = kubequant_main(["run", "-f", str(manifest), "--workdir", str(tmp_path / "work"), "--claim", CLAIM])
    assert code == 2
    err = capsys.readouterr().err
    assert "spec.serving.nodes is 2" in err and "--no-serve" in err
    assert not (tmp_path / "work").exists(), "nothing is started or written"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


@pytest.mark.vllm
@pytest.mark.slow
def _vllm_servers(port: int) -> list[int]:
    """The pids of vLLM API servers started on `port`, found by their command lines."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "vllm.entrypoints.openai.api_server" in text and f"--port {port} " in f"{text} ":
                found.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            continue
    return found


@pytest.fixture(scope="module")
def serve_workdir(tmp_path_factory) -> Path:
    """One workdir for the serving tests: the second run reuses the first one's artifact."""
    return tmp_path_factory.mktemp("serve")


# Ctrl-C signals the terminal's foreground group; a process manager or `timeout` sends SIGTERM to the
# command alone, and a closed terminal SIGHUP: each must stop the vLLM server the run started.
@pytest.mark.parametrize(("stop", "to_group", "exit_code"), [
    (signal.SIGINT, True, 0),
    (signal.SIGTERM, False, 128 + signal.SIGTERM),
], ids=["ctrl-c", "sigterm"])
def test_serves_with_vllm_and_whatever_stops_the_run_stops_vllm(serve_workdir, stop, to_group, exit_code):
    port = 18123
    process = subprocess.Popen(
        [sys.executable, "-m", "kubequant.cli", "run", "-f", str(EXAMPLE), "--claim", CLAIM,
         "--workdir", str(serve_workdir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=serve_workdir,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        output = []
        for line in process.stdout:
            output.append(line)
            if "serving; Ctrl-C stops it" in line:
                break
        # Keep reading: vLLM logs to the same pipe every few seconds, and a full pipe would block
        # both it and `kubequant run` (which prints as it stops) on their next write.
        threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
        assert process.poll() is None, "".join(output[-40:])
        text = "".join(output)
        assert re.search(rf"^  endpoint +{re.escape(base)}$", text, flags=re.M) and f"{base}/metrics" in text
        request = urllib.request.Request(
            f"{base}/v1/completions",
            data=json.dumps({"model": "tiny-llama", "prompt": "def main(", "max_tokens": 8}).encode(),
            headers={"Content-Type": "application/json"},
        )
        # No short limits: a loaded machine serves slowly, and the test is about what it serves.
        with urllib.request.urlopen(request, timeout=600) as response:
            completion = json.loads(response.read())
        assert completion["choices"][0]["text"]
        assert b"vllm:num_requests_running" in _get(f"{base}/metrics")
        assert _vllm_servers(port), "the vLLM server is not found by its command line"
    finally:
        if to_group:
            os.killpg(process.pid, stop)
        else:
            process.send_signal(stop)
        returncode = process.wait(timeout=300)
    assert returncode == exit_code, "".join(output[-20:])
    # Nothing the run started is left: no process serving on the port, no answer there.
    for _ in range(50):
        if not _vllm_servers(port):
            break
        time.sleep(0.2)
    assert not _vllm_servers(port), "vLLM outlived the run"
    with pytest.raises(OSError):
        _get(f"{base}/health")


def test_readme_example_is_the_example_file():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    example = yaml.safe_load((ROOT / "examples" / "llama-3-8b-tp2.yaml").read_text())
    assert yaml.safe_load(block) == example
