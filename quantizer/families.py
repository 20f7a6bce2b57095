"""Model families as data: for each decoder-layer layout the quantizer knows, its Linears in the order
the layer runs them, grouped by the input they read (one Hessian per group: true-sequential GPTQ
quantizes a group once every group before it is quantized), and the Linears vLLM splits along their
input under tensor parallelism (the operator's preflight checks them).

Adding a family vLLM serves with one of these layouts is one entry (or one architecture name in an
entry); the pipeline has no branch per family.

Names are module paths inside a decoder layer of the model the pipeline builds (Transformers' model,
its fused experts replaced by one Linear per expert: quantizer/experts.py). `*` stands for an expert's
index: a group `mlp.experts.*.gate_proj, mlp.experts.*.up_proj` is one group per expert, each with
the Hessian of the tokens that reach that expert. A group none of whose Linears a layer has (the
experts in a dense layer of a mostly-MoE model) is skipped for that layer. `renames` maps the module
paths to the checkpoint's names where Transformers renames them on loading (Mixtral's
`block_sparse_moe`), so the written checkpoint keeps the names vLLM loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block: where Transformers keeps its fused experts, and each expert's
    projections as checkpoints (and vLLM) name them."""

    module: str  # the fused experts module in a decoder layer, e.g. "mlp.experts"
    gate: str  # per expert: the gate, up and down projections' names, e.g. "gate_proj" or Mixtral's "w1"
    up: str
    down: str
    router: str  # the router's Linear (kept unquantized: vLLM reads it unquantized), e.g. "mlp.gate"


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json's `architectures` this layout covers
    groups: tuple[tuple[str, ...], ...]  # Linears of a decoder layer reading one input, in execution order
    row_parallel: tuple[str, ...]  # split along their input dim by vLLM's tensor parallelism
    # Llama's pre-norm layer (input_layernorm, self_attn, post_attention_layernorm, gate/up/down with
    # act_fn): StagedDecoderLayer runs it stage by stage; every other layout runs whole up to each group.
    staged: bool = False
    experts: Experts | None = None
    renames: tuple[tuple[str, str], ...] = ()  # (module path part, checkpoint name part)

    @property
    def linears(self) -> frozenset[str]:
        """The Linear name patterns of a decoder layer (`*`: any expert)."""
        return frozenset(name for group in self.groups for name in group)

    def checkpoint_name(self, name: str) -> str:
        """A module path (whole or inside a layer) as the checkpoint names it."""
        named = f".{name}"
        for module_part, checkpoint_part in self.renames:
            named = named.replace(f".{module_part}.", f".{checkpoint_part}.")
        return named[1:]

    def module_name(self, name: str) -> str:
        """The inverse of checkpoint_name."""
        named = f".{name}"
        for module_part, checkpoint_part in self.renames:
            named = named.replace(f".{checkpoint_part}.", f".{module_part}.")
        return named[1:]

    def unquantized(self) -> list[str]:
        """Linears the checkpoint keeps unquantized besides lm_head, as compressed-tensors `ignore`
        entries: the routers (vLLM builds them as Linears that would otherwise expect packed weights)."""
        if self.experts is None:
            return []
        return [f"re:.*{re.escape(self.checkpoint_name(self.experts.router))}$"]


def matches(name: str, pattern: str) -> bool:
    """Whether a Linear's full name (`model.layers.3.mlp.experts.7.down_proj`) ends with a pattern of
    the table (`mlp.experts.*.down_proj`), `*` standing for one index."""
    regex = r"(^|.*\.)" + r"\d+".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.fullmatch(regex, name) is not None


LLAMA = Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    row_parallel=("self_attn.o_proj", "mlp.down_proj"),
    staged=True,
)

# Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layer with q/k/v fused into one Linear and gate/up into
# another, checkpoints store them fused and vLLM loads them fused.
PHI3 = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    groups=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    row_parallel=("self_attn.o_proj", "mlp.down_proj"),
)

# Gemma 3 (text; Gemma3ForCausalLM): Llama's Linears, with norms around both blocks (pre- and
# post-attention, pre- and post-feed-forward), GELU, q/k norms and sliding-window layers beside
# full-attention ones: the generic path, each layer with its kind's mask and rotary embeddings.
GEMMA3 = Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    groups=LLAMA.groups,
    row_parallel=LLAMA.row_parallel,
)

# Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): Qwen3's attention; the MLP of most layers a block of routed
# experts (`mlp.experts.<e>.gate_proj/up_proj/down_proj`, router `mlp.gate`), of some (config
# `mlp_only_layers`, `decoder_sparse_step`) Llama's dense MLP. Under tensor parallelism vLLM splits
# each expert's intermediate size like a dense MLP's, so the experts' down projections are row-parallel.
QWEN3_MOE = Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    groups=(
        *LLAMA.groups,
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
        ("mlp.experts.*.down_proj",),
    ),
    row_parallel=(*LLAMA.row_parallel, "mlp.experts.*.down_proj"),
    experts=Experts(module="mlp.experts", gate="gate_proj", up="up_proj", down="down_proj", router="mlp.gate"),
)

# Mixtral: Mistral's attention, every layer a block of routed experts, which checkpoints name
# `block_sparse_moe.experts.<e>.w1` (gate), `w3` (up) and `w2` (down), router `block_sparse_moe.gate`;
# Transformers calls the block `mlp`.
MIXTRAL = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    groups=(*LLAMA.groups[:2], ("mlp.experts.*.w1", "mlp.experts.*.w3"), ("mlp.experts.*.w2",)),
    row_parallel=("self_attn.o_proj", "mlp.experts.*.w2"),
    experts=Experts(module="mlp.experts", gate="w1", up="w3", down="w2", router="mlp.gate"),
    renames=(("mlp", "block_sparse_moe"),),
)

FAMILIES = (LLAMA, PHI3, GEMMA3, QWEN3_MOE, MIXTRAL)
SUPPORTED_ARCHITECTURES = tuple(a for family in FAMILIES for a in family.architectures)


def linear_kind(name: str) -> str:
    """A Linear's name inside its decoder layer, any expert index as `*`:
    `model.layers.3.mlp.experts.7.down_proj` -> `mlp.experts.*.down_proj`."""
    inside = re.sub(r"^(.*\.)?layers\.\d+\.", "", name)
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", inside)


def is_row_parallel(name: str) -> bool:
    """Whether a quantized Linear (its checkpoint name) is split along its input by vLLM's tensor
    parallelism, in any family's layout."""
    return any(matches(name, family.checkpoint_name(pattern)) for family in FAMILIES for pattern in family.row_parallel)


def family_of(architectures: list[str] | tuple[str, ...]) -> Family | None:
    """The family of a config's `architectures`, or None when no entry covers them."""
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures):
            return family
    return None
