"""Checkpoints with several compressed-tensors config groups (mixed precision): each Linear read by its own
scheme, as vLLM reads it.

The mixed checkpoint here is put together by hand from two whole checkpoints of the tiny model (4:128,
and some units' tensors from 4:32 with a config group naming them), independently of the quantizer's
writer (tests/test_mixed_precision.py tests what the quantizer writes, and vLLM serving it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantizer.checkpoint import verify_checkpoint
from quantizer.errors import InputError
from quantizer.formats import FORMATS
from quantizer.perplexity import load_dequantized_model

# Units vLLM gives one scheme: q/k/v of a layer (fused into qkv_proj), and a down projection.
FINE_UNITS = ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj",
              "model.layers.0.mlp.down_proj")
CT = FORMATS["compressed-tensors"]


def mixed_checkpoint(coarse: Path, fine: Path, units: tuple[str, ...], out: Path) -> Path:
    """`coarse` with the tensors of `units` taken from `fine`, and a second config group naming them."""
    shutil.copytree(coarse, out)
    fine_map = json.loads((fine / "model.safetensors.index.json").read_text())["weight_map"]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(weight_map.values())):
        tensors = load_file(out / file)
        names = [n for n in tensors if any(n.startswith(unit + ".") for unit in units)]
        for name in names:
            tensors[name] = load_file(fine / fine_map[name])[name]
        if names:
            save_file(tensors, out / file, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    qconfig = config["quantization_config"]
    finer = json.loads(json.dumps(qconfig["config_groups"]["group_0"]))
    finer["weights"]["group_size"] = json.loads((fine / "config.json").read_text())[
        "quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"]
    finer["targets"] = [f"re:^{re.escape(unit)}$" for unit in units]
    qconfig["config_groups"]["group_1"] = finer
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def test_a_named_target_wins_over_every_linear_as_in_vllm():
    def group(size: int, targets: list[str]) -> dict:
        return {"targets": targets, "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                "strategy": "group", "group_size": size}}

    qconfig = {"format": "pack-quantized", "config_groups": {
        "group_0": group(128, ["Linear"]), "group_1": group(32, [r"re:^model\.layers\.3\.self_attn\.[qkv]_proj$"]),
        "group_2": group(64, ["model.layers.0.mlp.down_proj"])}}
    assert CT.scheme(qconfig).group_size == 128
    assert [s.group_size for s in CT.schemes(qconfig)] == [128, 32, 64]
    assert CT.scheme_for(qconfig, "model.layers.3.self_attn.k_proj").group_size == 32
    assert CT.scheme_for(qconfig, "model.layers.3.self_attn.o_proj").group_size == 128
    assert CT.scheme_for(qconfig, "model.layers.0.mlp.down_proj").group_size == 64
    assert CT.scheme_for(qconfig, "model.layers.0.mlp.down_proj_x").group_size == 128  # a name, not a prefix
    qconfig["config_groups"]["group_2"]["targets"] = ["Linear"]
    with pytest.raises(InputError, match="2 of them target every Linear"):
        CT.scheme(qconfig)


@pytest.fixture(scope="module")
def mixed(checkpoints, tmp_path_factory) -> Path:
    return mixed_checkpoint(checkpoints["gptq-g128"][0], checkpoints["gptq-g32"][0], FINE_UNITS,
                            tmp_path_factory.mktemp("mixed") / "ckpt")


def test_each_linear_is_read_by_its_own_scheme(checkpoints, mixed):
    summary = verify_checkpoint(mixed)
    assert summary["quantized_linears"] == 28
    model = load_dequantized_model(mixed)
    coarse, fine = (load_dequantized_model(checkpoints[n][0]) for n in ("gptq-g128", "gptq-g32"))
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    from_fine = {n: m.weight for n, m in fine.named_modules() if n in FINE_UNITS}
    from_coarse = {n: m.weight for n, m in coarse.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, weight in weights.items():
        expected = from_fine[name] if name in FINE_UNITS else from_coarse[name]
        assert torch.equal(weight, expected), name
    # Read by the coarse scheme, a fine unit's scales would not fit its shape: verify says so.
    config = json.loads((mixed / "config.json").read_text())
    broken = mixed.parent / "no-group"
    shutil.copytree(mixed, broken)
    del config["quantization_config"]["config_groups"]["group_1"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"model.layers.0.mlp.down_proj: weight_scale shape"):
        verify_checkpoint(broken)
