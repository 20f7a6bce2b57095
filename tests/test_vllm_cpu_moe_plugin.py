"""The CPU plugin that lets vLLM serve W4A16 mixtures of experts on any CPU (quantizer/vllm_cpu_moe_plugin.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from quantizer.experts import ExpertLinears
from quantizer.families import QWEN3_MOE
from quantizer.vllm_cpu_moe_plugin import FORCE_ENV, emulated_experts


def test_the_emulated_experts_compute_the_routed_sum():
    """vLLM's layout (w13 [E, 2I, H] gate rows first, w2 [E, H, I]) through emulated_experts gives what
    the pipeline's per-expert Linears give; experts of another rank (expert_map -1) add nothing."""
    torch.manual_seed(0)
    experts, hidden, intermediate, tokens = 6, 32, 16, 20
    block = ExpertLinears(QWEN3_MOE.experts, experts, hidden, intermediate, torch.nn.SiLU())
    for expert in block:
        for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
            torch.nn.init.normal_(linear.weight, std=0.3)
    w13 = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in block]).detach()
    w2 = torch.stack([e.down_proj.weight for e in block]).detach()
    x = torch.randn(tokens, hidden)
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 2), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(emulated_experts(x, w13, w2, weights, ids), block(x, ids, weights))
        # This rank holds experts 0-2 (local 0-2); 3-5 are another's.
        local = torch.tensor([0, 1, 2, -1, -1, -1])
        mine = emulated_experts(x, w13[:3], w2[:3], weights, ids, expert_map=local)
        expected = block(x, ids.where(ids < 3, torch.full_like(ids, -1)), weights)
    torch.testing.assert_close(mine, expected)


@pytest.mark.vllm
@pytest.mark.parametrize("forced", [True, False])
def test_register_makes_the_emulation_backend_a_cpu_candidate(forced):
    """In a process of its own (it changes vLLM's classes): the EMULATION backend becomes the CPU's last
    candidate, after vLLM's own (which refuse some layers even on AMX hosts), or its only one when
    forced; its experts class runs on the CPU; registering twice changes nothing more."""
    script = """
import json
from quantizer.vllm_cpu_moe_plugin import register
from vllm.model_executor.layers.fused_moe.oracle import int_wna16
from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts
before = [b.value for b in int_wna16._get_priority_backends()]
register(); register()
print(json.dumps({"before": before, "after": [b.value for b in int_wna16._get_priority_backends()],
                  "runs_on_cpu": Int4EmulationTritonExperts._supports_current_device()}))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != FORCE_ENV}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, FORCE_ENV: "1"} if forced else env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "EMULATION" not in seen["before"]
    assert seen["after"] == (["EMULATION"] if forced else [*seen["before"], "EMULATION"])
    assert seen["runs_on_cpu"] is True
