"""Model families as data: for each decoder-layer layout the quantizer knows, its Linears in the order
the layer runs them, grouped by the input they read (one Hessian per group: true-sequential GPTQ
quantizes a group once every group before it is quantized), and the Linears vLLM splits along their
input under tensor parallelism (the operator's preflight checks them).

Adding a family vLLM serves with one of these layouts is one entry (or one architecture name in an
entry); the pipeline has no branch per family.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json's `architectures` this layout covers
    groups: tuple[tuple[str, ...], ...]  # Linears of a decoder layer reading one input, in execution order
    row_parallel: tuple[str, ...]  # split along their input dim by vLLM's tensor parallelism
    # Llama's pre-norm layer (input_layernorm, self_attn, post_attention_layernorm, gate/up/down with
    # act_fn): StagedDecoderLayer runs it stage by stage; every other layout runs whole up to each group.
    staged: bool = False

    @property
    def linears(self) -> frozenset[str]:
        return frozenset(name for group in self.groups for name in group)


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

FAMILIES = (LLAMA, PHI3, GEMMA3)
SUPPORTED_ARCHITECTURES = tuple(a for family in FAMILIES for a in family.architectures)
# Every family's row-parallel Linears, by name suffix (what the quantize result reports).
ROW_PARALLEL = tuple(dict.fromkeys(name for family in FAMILIES for name in family.row_parallel))


def family_of(architectures: list[str] | tuple[str, ...]) -> Family | None:
    """The family of a config's `architectures`, or None when no entry covers them."""
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures):
            return family
    return None
