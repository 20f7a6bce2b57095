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


def _fetch_dataset(mirror: hub.Mirror, files: list[str], output: Path) -> tuple[subprocess.CompletedProcess, dict]:
    result = output.parent / f"{output.name}.json"
    done = subprocess.run(
        [sys.executable, "-m", "quantizer", "fetch", "--repo-type", "dataset", "--repo", mirror.dataset,
         "--revision", mirror.dataset_revision, *[a for f in files for a in ("--file", f)], "--output", str(output),
         "--result-file", str(result)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(output.parent), "HF_ENDPOINT": mirror.endpoint,
             "HF_HUB_DISABLE_TELEMETRY": "1"})
    return done, json.loads(result.read_text())


def test_a_dataset_file_comes_from_the_mirror_and_reads_as_the_claim_text(mirror: hub.Mirror, tmp_path):
    from quantizer.textdata import read_texts

    done, result = _fetch_dataset(mirror, ["data/calibration.parquet"], tmp_path / "texts")
    assert done.returncode == 0, done.stderr[-2000:]
    assert result["status"] == contract.SUCCEEDED
    assert not (tmp_path / "texts" / "data" / "evaluation.parquet").exists()  # only the files named
    assert read_texts(tmp_path / "texts" / "data" / "calibration.parquet") == [
        (FIXTURES / "text" / "calibration.txt").read_text()]


def test_a_dataset_file_that_is_not_there_is_bad_input_naming_it(mirror: hub.Mirror, tmp_path):
    done, result = _fetch_dataset(mirror, ["data/missing.parquet"], tmp_path / "texts")
    assert done.returncode == contract.EXIT_BAD_INPUT, done.stderr[-2000:]
    assert result["reason"] == contract.INVALID_INPUT and "data/missing.parquet" in result["message"]
    assert mirror.dataset in result["message"]


def test_kubequant_run_takes_its_texts_from_a_hub_dataset(mirror: hub.Mirror, tmp_path, capsys):
    """The texts of the 8B example's kind (spec.*.text.huggingface): fetched before quantizing, and the
    same tokens as the claim's text files, so the same calibration digest and the same checkpoint."""
    doc = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    for where, name in (("quantization", "calibration"), ("evaluation", "evaluation")):
        text = {"huggingface": {"repo": mirror.dataset, "revision": mirror.dataset_revision,
                                "file": f"data/{name}.parquet", "endpoint": mirror.endpoint}}
        if where == "quantization":
            doc["spec"]["quantization"]["calibration"]["text"] = text
        else:
            doc["spec"]["evaluation"]["text"] = text
    manifests = {"hub": doc, "claim": yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())}
    checkpoints, outs = {}, {}
    for name, body in manifests.items():
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(body))
        code = kubequant_main(["run", "-f", str(manifest), "--claim", f"kubequant-data={FIXTURES}", "--workdir",
                               str(tmp_path / name), "--engine", "torch", "--no-serve"])
        outs[name] = capsys.readouterr().out
        assert code == 0, outs[name]
        (checkpoints[name],) = (tmp_path / name / "artifacts").glob("kubequant/*/*/kubequant.json")
    for file in ("data/calibration.parquet", "data/evaluation.parquet"):
        assert f"fetch {mirror.dataset}@{mirror.dataset_revision}: {file}" in outs["hub"]
    hub_manifest, claim_manifest = (json.loads(checkpoints[n].read_text()) for n in ("hub", "claim"))
    assert hub_manifest["calibration"]["digest"] == claim_manifest["calibration"]["digest"]
    for shard in sorted(checkpoints["claim"].parent.glob("*.safetensors")):
        assert (checkpoints["hub"].parent / shard.name).read_bytes() == shard.read_bytes(), shard.name
