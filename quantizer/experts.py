"""Mixture-of-experts blocks with one Linear per expert and projection, as checkpoints store them.

Transformers (5.x) fuses a block's experts into two 3D parameters ([E, 2I, H] gate_up and [E, H, I]
down) and converts the checkpoint's per-expert tensors when it loads them. GPTQ needs each expert's
projections as Linears of their own, with their own Hessians from the tokens that reach them, and the
checkpoint vLLM loads names each expert's tensors (`experts.<e>.gate_proj.weight_packed`, ...). So
the pipeline swaps each fused experts module of the model it builds for `ExpertLinears`: the same
routing arithmetic as Transformers' loop, over per-expert nn.Linear modules named as the checkpoint
names them (families.Experts).

Calibration coverage (`ExpertLinears.calibrate_all`): a router sends each token to its top-k experts
only, so with a few hundred calibration windows some experts see few tokens or none, and a Hessian
from few tokens is a poor estimate (from none, GPTQ has nothing to minimise). For the experts that
`calibrate_all` marks, the tokens the router did not send run through the expert too, in a call of
their own before the routed ones, while the block's output still combines only the experts the
router chose: the outputs, and so every later layer's inputs, are the same either way.
"""

from __future__ import annotations

import torch
from torch import nn

from quantizer.families import Experts


class _Expert(nn.Module):
    """One expert's three projections, registered under the names its checkpoint uses."""

    def __init__(self, names: Experts, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__()
        self.names = names
        self.add_module(names.gate, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(names.up, nn.Linear(hidden, intermediate, bias=False))
        self.add_module(names.down, nn.Linear(intermediate, hidden, bias=False))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in (self.names.gate, self.names.up, self.names.down))
        return down(self.act_fn(gate(x)) * up(x))


class ExpertLinears(nn.ModuleList):
    """Drop-in for a Transformers fused experts module: forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], the sum over each token's chosen experts of weight * expert(x)."""

    def __init__(self, names: Experts, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module):
        super().__init__(_Expert(names, hidden, intermediate, act_fn) for _ in range(num_experts))
        # Per expert: also run the tokens not routed to it (for the Hessians); None: no expert.
        self.calibrate_all: torch.Tensor | None = None
        # The tokens (rows of the block's input) of the expert call running now, for hooks that pair an
        # expert's inputs token by token across two passes (quantizer.pipeline.SourceTargets).
        self.running_tokens: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, slot = torch.where(top_k_index == index)
            if self.calibrate_all is not None and self.calibrate_all[index]:
                unrouted = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
                unrouted[token] = False
                self.running_tokens = torch.where(unrouted)[0]
                expert(hidden_states[unrouted])  # for the hooks only
            if not token.numel():
                continue
            self.running_tokens = token
            weighted = expert(hidden_states[token]) * top_k_weights[token, slot, None]
            output.index_add_(0, token, weighted.to(output.dtype))
        return output


def _fused_experts(layer: nn.Module, names: Experts) -> nn.Module | None:
    """The layer's fused experts module (at `names.module`, holding 3D gate_up and down), if it has one."""
    try:
        module = layer.get_submodule(names.module)
    except AttributeError:  # a dense layer
        return None
    has_fused = getattr(module, "gate_up_proj", None) is not None and getattr(module, "down_proj", None) is not None
    return module if has_fused and not isinstance(module, ExpertLinears) else None


def unfuse_experts(layers: nn.ModuleList, names: Experts | None) -> int:
    """Replace every fused experts module in `layers` by ExpertLinears (on the fused module's device,
    normally meta); returns how many were replaced. Layers without experts (dense ones) are left."""
    if names is None:
        return 0
    replaced = 0
    for layer in layers:
        fused = _fused_experts(layer, names)
        if fused is None:
            continue
        num_experts, double_intermediate, hidden = fused.gate_up_proj.shape
        with torch.device(fused.gate_up_proj.device):
            unfused = ExpertLinears(names, num_experts, hidden, double_intermediate // 2, fused.act_fn)
        unfused.to(fused.gate_up_proj.dtype)
        parent, _, child = names.module.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, unfused)
        replaced += 1
    return replaced


def expert_modules(layer: nn.Module) -> list[ExpertLinears]:
    return [m for m in layer.modules() if isinstance(m, ExpertLinears)]
