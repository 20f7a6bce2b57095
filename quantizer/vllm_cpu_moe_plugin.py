"""W4A16 mixture-of-experts layers for vLLM CPU builds that cannot run them (a vLLM general plugin).

vLLM 0.32 picks a W4A16 MoE backend per layer (fused_moe/oracle/int_wna16.py). On CPUs its only
candidates are ZEN_CPU (AMD's zentorch) and CPU (`CPUExpertsInt4`, which needs AMX tiles and
quantizes the activations to int8 on the fly, so it computes W4A8, not the W4A16 the checkpoint
describes and GPUs serve through Marlin). On any other host, and to compute exactly W4A16 on AMX ones,
a quantized MoE model fails to build: "No WNA16 MoE backend supports the deployment configuration".

`register()` adds one more candidate on CPUs, last, vLLM's own EMULATION backend: vLLM parses the config,
creates and loads the expert weights, and dequantizes them with its own routine
(`_process_weights_emulation_gptq`, as on GPUs without Marlin), so what it serves is what the
checkpoint holds as vLLM reads it. Only the experts' forward pass, Triton's on GPUs, is replaced by
PyTorch here (`emulated_experts`), in float32. It is test infrastructure, like vllm_cpu_plugin: slow,
inert on GPUs, and used on CPUs where no backend of vLLM's own takes the layer (every host without AMX
or zentorch; on AMX hosts, every layer CPUExpertsInt4 refuses, such as the tiny MoE's at group 32,
found by the operator's MoE test on an AMX machine), or everywhere with KUBEQUANT_CPU_MOE_EMULATION=1
(the tests of the engine set it, so that every host serves W4A16).
"""

from __future__ import annotations

import logging
import os

import torch

LOGGER_NAME = "vllm.plugins.kubequant_cpu_moe"
FORCE_ENV = "KUBEQUANT_CPU_MOE_EMULATION"

_registered = False


def emulated_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """sum over each token's chosen experts e of weight * w2[e] (silu(gate) * up), with [gate; up] =
    w13[e] x (vLLM's w13 layout: [E, 2I, H], gate rows first; w2: [E, H, I]), in float32."""
    x = hidden_states.float()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        local = expert if expert_map is None else int(expert_map[expert])
        if local < 0:  # another rank's expert
            continue
        token, slot = torch.where(topk_ids == expert)
        gate, up = (x[token] @ w13[local].float().t()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[local].float().t()
        out.index_add_(0, token, y * topk_weights[token, slot, None].float())
    return out


def _emulated_apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                    expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                    apply_router_weight_on_input) -> None:
    """Int4EmulationTritonExperts.apply on CPUs: w1, w2 are the weights vLLM dequantized at load time."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    if activation != MoEActivation.SILU or apply_router_weight_on_input:
        raise NotImplementedError("kubequant's CPU MoE emulation runs SiLU experts with router weights on the output")
    output.copy_(emulated_experts(hidden_states, w1, w2, topk_weights, topk_ids, expert_map))


def register() -> None:
    """vLLM general plugin: on CPUs, make vLLM's EMULATION backend the last W4A16 MoE candidate (the
    only one with FORCE_ENV=1), its experts run by `emulated_experts`. Idempotent."""
    global _registered
    from vllm.platforms import current_platform

    if _registered or not current_platform.is_cpu():
        return
    forced = os.environ.get(FORCE_ENV) == "1"
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    backend = int_wna16.WNA16MoEBackend.EMULATION
    priority = int_wna16._get_priority_backends

    def priority_with_emulation() -> list:
        return [backend] if forced else [*priority(), backend]

    # vLLM accepts only its own experts classes (make_wna16_moe_kernel asserts it), so the emulation
    # class itself is taught to run on the CPU; in a CPU process nothing else uses it.
    int_wna16._get_priority_backends = priority_with_emulation
    Int4EmulationTritonExperts._supports_current_device = staticmethod(current_platform.is_cpu)
    Int4EmulationTritonExperts.apply = _emulated_apply
    _registered = True
    logging.getLogger(LOGGER_NAME).info(
        "kubequant: W4A16 MoE layers run on vLLM's EMULATION backend in PyTorch (%s)",
        "forced" if forced else "where none of vLLM's own CPU backends takes a layer")
