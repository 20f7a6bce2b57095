"""A model from a Hugging Face Hub mirror (spec.source.huggingface.endpoint): olah on loopback serving a
git repository of the tiny model, as a cluster behind a firewall reaches the Hub through an in-house
mirror. The download at a pinned commit, a wrong revision as bad input naming it, a token in no output,
and `kubequant run` from such a spec. (tests/test_real_node.py does the same through the quantize Job.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubequant.cli import main as kubequant_main

from quantizer import contract
from tests.kube import hub

pytestmark = pytest.mark.citools
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TOKEN = "hf_kubequant_test_token_never_printed"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    reason = hub.missing_olah()
    if reason:
        pytest.skip(reason)
    with hub.hub_mirror(tmp_path_factory.mktemp("hub"), port=18091) as served:
        yield served


def _fetch(mirror: hub.Mirror, revision: str, output: Path) -> tuple[subprocess.CompletedProcess, dict]:
    result = output.parent / f"{output.name}.json"
    done = subprocess.run(
        [sys.executable, "-m", "quantizer", "fetch", "--repo", mirror.repo, "--revision", revision,
         "--output", str(output), "--result-file", str(result)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(output.parent), "HF_ENDPOINT": mirror.endpoint, "HF_TOKEN": TOKEN,
             "HF_HUB_DISABLE_TELEMETRY": "1"})
    return done, json.loads(result.read_text())


def test_the_pinned_commit_comes_from_the_mirror_as_it_was_committed(mirror: hub.Mirror, tmp_path):
    done, result = _fetch(mirror, mirror.revision, tmp_path / "model")
    assert done.returncode == 0, done.stderr[-2000:]
    assert result["status"] == contract.SUCCEEDED and result["revision"] == mirror.revision
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "model" / name).read_bytes() == (hub.TINY_MODEL / name).read_bytes(), name
    assert TOKEN not in done.stdout + done.stderr + json.dumps(result)


def test_a_wrong_revision_is_bad_input_naming_it_and_the_mirror(mirror: hub.Mirror, tmp_path):
    wrong = "0" * 40
    done, result = _fetch(mirror, wrong, tmp_path / "model")
    assert done.returncode == contract.EXIT_BAD_INPUT, done.stderr[-2000:]
    assert result["reason"] == contract.INVALID_INPUT
    assert wrong in result["message"] and mirror.endpoint in result["message"] and "pin an existing commit" in result["message"]
    assert TOKEN not in done.stdout + done.stderr + json.dumps(result)
    assert not (tmp_path / "model").exists()


def test_kubequant_run_fetches_through_the_spec_endpoint(mirror: hub.Mirror, tmp_path, capsys):
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    doc["spec"]["source"] = {"huggingface": {"repo": mirror.repo, "revision": mirror.revision,
                                             "endpoint": mirror.endpoint}}
    manifest = tmp_path / "qm.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    code = kubequant_main(["run", "-f", str(manifest), "--claim", f"kubequant-data={FIXTURES}", "--workdir",
                           str(tmp_path / "work"), "--engine", "torch", "--no-serve"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"fetch {mirror.repo}@{mirror.revision}" in out and "Passed" in out
    (fetched,) = (tmp_path / "work" / "sources").iterdir()
    assert (fetched / "model.safetensors").read_bytes() == (hub.TINY_MODEL / "model.safetensors").read_bytes()
