"""Tiny models of other decoder families, made here from transformers' config classes (no hub).

Phi-3 is Llama's layer with q/k/v and gate/up fused: the trained tiny Llama's weights, fused, make a
Phi-3 that computes the same function, so it has a trained model's perplexity rather than a random
one's (the same quality evidence as the tiny Llama, in the other layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.conftest import FIXTURES, TINY_MODEL

# Trained by scripts/train_tiny_model.py --architecture qwen3_moe (its README says how).
TINY_QWEN3_MOE = FIXTURES / "tiny-qwen3-moe"


def _tiny_llama_config() -> dict:
    return json.loads((TINY_MODEL / "config.json").read_text())


def _llama_sizes(llama: dict) -> dict:
    """The tiny Llama's sizes and token ids, as a config class of another family takes them."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps")
    return {**{key: llama[key] for key in keys}, **_token_ids(), "tie_word_embeddings": False}


def _save_from_tiny_llama(out: Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    """A model made from the tiny Llama's tensors: its config, weights, and the tiny Llama's tokenizer."""
    out.mkdir(parents=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out


def phi3_from_tiny_llama(out: Path) -> Path:
    from transformers import Phi3Config

    llama = _tiny_llama_config()
    config = Phi3Config(
        **_llama_sizes(llama), original_max_position_embeddings=llama["max_position_embeddings"],
        hidden_act=llama["hidden_act"],
        rope_parameters={"rope_theta": llama["rope_parameters"]["rope_theta"], "rope_type": "default",
                         "partial_rotary_factor": 1.0},
    )
    assert config.hidden_size // config.num_attention_heads == llama["head_dim"]
    config.architectures = ["Phi3ForCausalLM"]
    config.dtype = llama["dtype"]
    weights = load_file(TINY_MODEL / "model.safetensors")
    fused = {}
    for name, tensor in weights.items():
        if ".self_attn.q_proj." in name:
            prefix = name.split("q_proj.")[0]
            fused[f"{prefix}qkv_proj.weight"] = torch.cat(
                [weights[f"{prefix}{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
        elif ".mlp.gate_proj." in name:
            prefix = name.split("gate_proj.")[0]
            fused[f"{prefix}gate_up_proj.weight"] = torch.cat(
                [weights[f"{prefix}{p}_proj.weight"] for p in ("gate", "up")], dim=0)
        elif not any(f".{p}_proj." in name for p in ("k", "v", "up")):
            fused[name] = tensor
    return _save_from_tiny_llama(out, config, fused)


def gemma3_tiny(out: Path) -> Path:
    """A random tiny Gemma 3 (text) in bfloat16 (vLLM serves Gemma 3 in bfloat16 only), with sliding-window
    and full-attention layers alternating and a window (64) shorter than the evaluation windows (256), so
    that the two kinds of layer get different masks. Larger initial weights than Gemma's 0.02, so that
    the random model predicts something and quantization changes its perplexity measurably."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=1024, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.2, **_token_ids(),
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out


def _random_tiny(model_class, config, architecture: str, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    torch.manual_seed(0)
    model = model_class(config).to(dtype)
    model.config.architectures = [architecture]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out


def _token_ids() -> dict:
    """The tiny Llama's vocabulary and special tokens: models made here use its tokenizer."""
    llama = _tiny_llama_config()
    return {key: llama[key] for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}


def qwen3_moe_tiny(out: Path, experts: int = 8) -> Path:
    """A random tiny Qwen3-MoE in bfloat16: 8 experts (by default), 2 per token, layer 1 a dense MLP (`mlp_only_layers`),
    so that both kinds of layer are quantized. Transformers saves the experts one Linear each, as the
    hub's Qwen3-MoE checkpoints hold them."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        num_experts=experts, num_experts_per_tok=2, mlp_only_layers=[1], initializer_range=0.2, **_token_ids(),
    )
    return _random_tiny(Qwen3MoeForCausalLM, config, "Qwen3MoeForCausalLM", out)


def mixtral_from_tiny_llama(out: Path, experts: int = 4, spread: float = 0.05) -> Path:
    """A Mixtral made from the trained tiny Llama ("upcycled"): its attention as it is (Mixtral's is
    Mistral's, which is Llama's), each of `experts` experts the Llama's MLP with every weight scaled by
    1 + `spread` * N(0, 1), and a random router choosing 2 per token. With the router's weights renormalised
    over the chosen two, it computes nearly the Llama's function: a trained model's perplexity in the
    mixture-of-experts layout, with experts that differ (checkpoint names `block_sparse_moe.experts.<e>.w1`...)."""
    from transformers import MixtralConfig

    llama = _tiny_llama_config()
    config = MixtralConfig(
        **_llama_sizes(llama), head_dim=llama["head_dim"], rope_parameters=llama["rope_parameters"],
        num_local_experts=experts, num_experts_per_tok=2, sliding_window=None,
    )
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = llama["dtype"]
    generator = torch.Generator().manual_seed(0)
    weights = load_file(TINY_MODEL / "model.safetensors")
    upcycled = {}
    for name, tensor in weights.items():
        if ".mlp." not in name:
            upcycled[name] = tensor
            continue
        prefix, projection = name.split(".mlp.")
        if projection.startswith("gate_proj"):
            router = torch.randn(experts, config.hidden_size, generator=generator) * 0.1
            upcycled[f"{prefix}.block_sparse_moe.gate.weight"] = router.to(tensor.dtype)
        mixtral_name = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[projection.split(".")[0]]
        for expert in range(experts):
            noise = 1 + spread * torch.randn(tensor.shape, generator=generator)
            upcycled[f"{prefix}.block_sparse_moe.experts.{expert}.{mixtral_name}.weight"] = (tensor.float() * noise).to(tensor.dtype)
    return _save_from_tiny_llama(out, config, upcycled)


def trained_qwen3_moe(out: Path) -> Path:
    """The trained tiny Qwen3-MoE fixture (8 experts, 2 per token, float16), copied."""
    return Path(shutil.copytree(TINY_QWEN3_MOE, out))
