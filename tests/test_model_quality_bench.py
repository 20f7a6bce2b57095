"""bench/model_quality_bench.py's verdicts: a difference inside the seeds' spread is a tie."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import model_quality_bench as bench


def _runs(path: str, kls: list[float]) -> list[dict]:
    return [{"model": "m", "setting": "4:128", "path": path, "seed": seed, "kl": kl, "top1": 0.9, "dppl": 0.1,
             "seconds": 1.0} for seed, kl in enumerate(kls)]


@pytest.mark.parametrize("ours,verdict", [([0.5, 0.6, 0.7], "lead"), ([0.8, 1.2, 1.0], "tie"), ([1.5, 1.6, 1.7], "behind")])
def test_verdict_against_the_best_peer_path(ours, verdict):
    runs = _runs("lc-minmax", [2.0, 2.1, 2.2]) + _runs("gptqmodel-e2e-best", [1.2, 1.3, 1.4]) + \
        _runs("lc-imatrix", [0.9, 1.0, 1.1]) + _runs("ours", ours)
    rows = {row["path"]: row for row in bench.summarize(runs)}
    assert rows["ours"]["best_peer"] == "lc-imatrix"
    assert rows["lc-imatrix"]["best_peer"] == "lc-imatrix"  # GPTQModel's paths count as peers too
    best_gptqmodel = bench.summarize([r | {"kl": r["kl"] / 2} for r in runs if r["path"].startswith("gptqmodel")] +
                                     [r for r in runs if not r["path"].startswith("gptqmodel")])
    assert {row["path"]: row for row in best_gptqmodel}["ours"]["best_peer"] == "gptqmodel-e2e-best"
    assert rows["ours"]["verdict"] == verdict
    assert rows["ours"]["kl_vs_best_peer"] == pytest.approx(sum(ours) / 3 / 1.0)
    assert rows["ours"]["kl_spread"] == pytest.approx(max(ours) - min(ours))


def test_shrinking_toward_the_diagonal_keeps_the_diagonal():
    x = torch.randn(64, 8)
    hessian = x.T @ x
    shrunk = bench.shrunk_toward_diagonal(hessian, 0.25)
    assert torch.allclose(torch.diagonal(shrunk), torch.diagonal(hessian))
    off = ~torch.eye(8, dtype=torch.bool)
    assert torch.allclose(shrunk[off], 0.75 * hessian[off])


def test_an_unknown_path_is_refused_before_any_work():
    with pytest.raises(SystemExit, match=re.escape("unknown path 'gptq+magic'")):
        bench.path_quantizer("gptq+magic")


def test_gptqmodel_paths_are_skipped_without_its_site(monkeypatch, capsys):
    """GPTQModel runs from a site of its own (bench/peer_wheels.sh, install_peers.sh): without it its
    paths are named as skipped, and nothing runs."""
    monkeypatch.delenv("GPTQMODEL_SITE", raising=False)
    assert bench.path_quantizer("gptqmodel-e2e-best")[1] == {}
    assert bench.main(["--models", "tiny-llama", "--paths", "gptqmodel-e2e,gptqmodel-e2e-best", "--seeds", "0",
                       "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "GPTQMODEL_SITE is not set" in out and "KL" not in out


@pytest.mark.parametrize("fixture", ["tiny-llama", "tiny-qwen3-moe"])
def test_a_rotated_model_computes_the_source_function(tmp_path, fixture):
    """bench/rotation.py's R1 and R2 merged into the weights: the same logits (float32), norms' scales of
    one, and every quantized Linear's weights changed (else a rotation path would measure the source)."""
    import rotation
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    source = bench.MODELS[fixture]
    rotated = rotation.write_rotated(source, tmp_path / fixture, seed=1)
    ids = torch.randint(4, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).eval()(ids).logits for m in (source, rotated)]
    assert torch.allclose(*logits, atol=1e-3), (logits[0] - logits[1]).abs().max()
    before, after = load_file(source / "model.safetensors"), load_file(rotated / "model.safetensors")
    assert all(torch.equal(t, torch.ones_like(t)) for n, t in after.items() if n.endswith("norm.weight")
               and "q_norm" not in n and "k_norm" not in n)
    linears = [n for n in before if re.search(r"(_proj|experts\.\d+\.\w+)\.weight$", n)]
    assert linears and not any(torch.allclose(before[n].float(), after[n]) for n in linears)


def test_a_rotation_path_names_its_base_path():
    assert bench.rotation_of("ours+hadamard") == ("ours", {"r1": True, "r2": True})
    assert bench.rotation_of("lc-imatrix+hadamard-r1") == ("lc-imatrix", {"r1": True, "r2": False})
    assert bench.rotation_of("ours+gptaq0.5") == ("ours+gptaq0.5", None)


def test_group_statistics_tell_outliers_from_gaussian_weights():
    """bench/rotation.py's measure of what a rotation could spread: Gaussian groups score near the
    sample's own values, a group with one large weight far above them."""
    import rotation

    gaussian = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    outliers = gaussian.clone()
    outliers[:, ::128] *= 20
    kurtosis, peak = rotation.group_statistics({"model.layers.0.self_attn.q_proj.weight": gaussian})
    assert abs(kurtosis) < 0.2 and 2.5 < peak < 3.2
    kurtosis, peak = rotation.group_statistics({"model.layers.0.self_attn.q_proj.weight": outliers})
    assert kurtosis > 20 and peak > 6  # a single outlier in 128 reaches at most 127 / sqrt(128) = 11.2
