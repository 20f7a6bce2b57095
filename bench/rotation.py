"""Hadamard rotations merged into a checkpoint's weights (QuaRot's and SpinQuant's R1 and R2 without
learning), for measuring whether a rotated model quantizes better: the rotated model computes the same
function, so it is quantized and compared with the source like any other.

R1 rotates the residual stream by an orthogonal Q (d x d): every RMSNorm's scale is first folded into
the Linears that read the norm's output (an RMSNorm of hQ is the RMSNorm of h, rotated, once its
elementwise scale is gone), then the embeddings become E Q, each reader W Q, each writer of the residual
Q^T W, and lm_head W diag(g_final) Q. R2 rotates each attention head's values by a head_dim x head_dim
orthogonal Hh: v_proj's rows of a key-value head become Hh^T W, o_proj's columns of each head W Hh
(attention mixes tokens, not a head's dimensions, so the two cancel; grouped-query heads share Hh).
Neither needs an operation at run time: the result is a plain checkpoint of the same architecture with
norm scales of one, which vLLM serves as it is.

Q and Hh are randomized Hadamard matrices, H diag(s) / sqrt(n) with random signs s, where n is a power
of two, otherwise random orthogonal matrices (the QR of a Gaussian matrix).

Llama's layout (and Qwen2/3, Mistral, Qwen3-MoE): the names below are the checkpoint's tensor names
inside a decoder layer, `*` one expert's index.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantizer.families import matches

# The Linears reading each norm's output (their input dim is the residual's), and those writing the
# residual stream (their output dim is).
READS_INPUT_NORM = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
READS_POST_ATTENTION_NORM = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate.weight",
                             "mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight")  # fmt: skip
WRITES_RESIDUAL = ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.experts.*.down_proj.weight")
ROTATABLE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n (a power of two), entries +-1."""
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < n:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A randomized Hadamard matrix when n is a power of two, else a Haar-random orthogonal matrix."""
    if n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
        return hadamard(n) * signs / n**0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _in_layer(name: str, patterns: tuple[str, ...]) -> bool:
    return any(matches(name, pattern) for pattern in patterns)


def rotate_weights(weights: dict[str, torch.Tensor], config: dict, seed: int, r1: bool = True,
                   r2: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """The rotated model's tensors (float64), from the source's; norms' scales become ones."""
    generator = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = random_orthogonal(hidden, generator) if r1 else torch.eye(hidden, dtype=torch.float64)
    hh = random_orthogonal(head_dim, generator)
    out = {name: tensor.to(torch.float64) for name, tensor in weights.items()}
    if "lm_head.weight" not in out:  # tied embeddings: lm_head gets its own (rotated, norm-folded) copy
        out["lm_head.weight"] = out["model.embed_tokens.weight"].clone()

    layer_norms = {}
    for name in list(out):
        match = re.fullmatch(r"(.*layers\.\d+\.)(input_layernorm|post_attention_layernorm)\.weight", name)
        if match:
            layer_norms[match.group(1), match.group(2)] = out[name].clone()
            out[name] = torch.ones_like(out[name])
    final_norm = out["model.norm.weight"].clone()
    out["model.norm.weight"] = torch.ones_like(final_norm)

    for name, tensor in out.items():
        layer = re.match(r".*layers\.\d+\.", name)
        if layer and _in_layer(name, READS_INPUT_NORM):
            out[name] = tensor * layer_norms[layer.group(0), "input_layernorm"] @ q
        elif layer and _in_layer(name, READS_POST_ATTENTION_NORM):
            out[name] = tensor * layer_norms[layer.group(0), "post_attention_layernorm"] @ q
        elif layer and _in_layer(name, WRITES_RESIDUAL):
            out[name] = q.T @ tensor
        elif name == "model.embed_tokens.weight":
            out[name] = tensor @ q
        elif name == "lm_head.weight":
            out[name] = tensor * final_norm @ q
    if r2:
        for name in list(out):
            if _in_layer(name, ("self_attn.v_proj.weight",)):
                rows = out[name].reshape(-1, head_dim, out[name].shape[-1])
                out[name] = (hh.T @ rows).reshape(out[name].shape)
            elif _in_layer(name, ("self_attn.o_proj.weight",)):
                columns = out[name].reshape(out[name].shape[0], -1, head_dim)
                out[name] = (columns @ hh).reshape(out[name].shape)
    return out


def write_rotated(source: Path, output: Path, seed: int, dtype: torch.dtype = torch.float32, r1: bool = True,
                  r2: bool = True) -> Path:  # fmt: skip
    """A rotated copy of a single-file safetensors model directory, stored in `dtype`."""
    config = json.loads((source / "config.json").read_text())
    if not set(config.get("architectures", ())) & set(ROTATABLE):
        raise ValueError(f"rotation knows {', '.join(ROTATABLE)}, not {config.get('architectures')}")
    if any(config.get(k) for k in ("attention_bias", "mlp_bias")):
        raise ValueError("biases are not rotated here")
    weights = load_file(source / "model.safetensors")
    rotated = rotate_weights(weights, config, seed, r1=r1, r2=r2)
    output.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name not in ("model.safetensors", "config.json", "README.md"):
            shutil.copy2(file, output / file.name)
    config["tie_word_embeddings"] = False
    config["dtype"] = str(dtype).removeprefix("torch.")
    (output / "config.json").write_text(json.dumps(config, indent=2))
    save_file({n: t.to(dtype).contiguous() for n, t in rotated.items()}, output / "model.safetensors")
    return output


def group_statistics(weights: dict[str, torch.Tensor], group: int = 128) -> tuple[float, float]:
    """Over the decoder's quantized Linears (their 128-wide groups along the input): the mean excess
    kurtosis of a group's weights, and the mean of its largest |weight| in standard deviations. A
    rotation pays by spreading outliers; Gaussian groups (0 and about 2.9) have none to spread."""
    kurtosis, peak = [], []
    for name, tensor in weights.items():
        if not _in_layer(name, READS_INPUT_NORM + READS_POST_ATTENTION_NORM + WRITES_RESIDUAL) or name.endswith("mlp.gate.weight"):
            continue
        t = tensor.double()
        groups = t.reshape(t.shape[0], -1, group) if t.shape[1] % group == 0 else t.unsqueeze(1)
        z = (groups - groups.mean(-1, keepdim=True)) / groups.std(-1, keepdim=True)
        kurtosis.append(float((z**4).mean()) - 3)
        peak.append(float(z.abs().amax(-1).mean()))
    return sum(kurtosis) / len(kurtosis), sum(peak) / len(peak)


if __name__ == "__main__":
    import sys

    for model in map(Path, sys.argv[1:]):  # python bench/rotation.py MODEL_DIR...
        source = load_file(model / "model.safetensors")
        rotated = rotate_weights(source, json.loads((model / "config.json").read_text()), seed=0)
        (k0, p0), (k1, p1) = group_statistics(source), group_statistics(rotated)
        print(f"{model.name}: excess kurtosis per group {k0:.2f} -> {k1:.2f} rotated; "
              f"largest |weight| {p0:.2f} -> {p1:.2f} standard deviations")
