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

from tests.conftest import TINY_MODEL


def phi3_from_tiny_llama(out: Path) -> Path:
    from transformers import Phi3Config

    llama = json.loads((TINY_MODEL / "config.json").read_text())
    config = Phi3Config(
        vocab_size=llama["vocab_size"], hidden_size=llama["hidden_size"], intermediate_size=llama["intermediate_size"],
        num_hidden_layers=llama["num_hidden_layers"], num_attention_heads=llama["num_attention_heads"],
        num_key_value_heads=llama["num_key_value_heads"], max_position_embeddings=llama["max_position_embeddings"],
        original_max_position_embeddings=llama["max_position_embeddings"], rms_norm_eps=llama["rms_norm_eps"],
        hidden_act=llama["hidden_act"], bos_token_id=llama["bos_token_id"], eos_token_id=llama["eos_token_id"],
        pad_token_id=llama["pad_token_id"], tie_word_embeddings=False,
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
    out.mkdir(parents=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in fused.items()}, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out


def gemma3_tiny(out: Path) -> Path:
    """A random tiny Gemma 3 (text) in bfloat16 (vLLM serves Gemma 3 in bfloat16 only), with sliding-window
    and full-attention layers alternating and a window (64) shorter than the evaluation windows (256), so
    that the two kinds of layer get different masks. Larger initial weights than Gemma's 0.02, so that
    the random model predicts something and quantization changes its perplexity measurably."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    llama = json.loads((TINY_MODEL / "config.json").read_text())
    config = Gemma3TextConfig(
        vocab_size=llama["vocab_size"], hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2, initializer_range=0.2,
        bos_token_id=llama["bos_token_id"], eos_token_id=llama["eos_token_id"], pad_token_id=llama["pad_token_id"],
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    model.config.architectures = ["Gemma3ForCausalLM"]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, out / name)
    return out
