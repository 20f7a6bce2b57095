"""Whole-model GPTQ on a synthetic model with real LLM shapes: wall time, time per stage, peak memory.

    python bench/quantize_model_bench.py --shape llama3-8b --samples 128 --seq-len 2048 --json out.json
    python bench/quantize_model_bench.py --shape llama3-8b --solvers triton,torch   # both, same model
    python bench/quantize_model_bench.py --shape tiny --samples 8 --seq-len 128          # CPU smoke run
    python bench/quantize_model_bench.py --shape small --recipes plain,no-source-targets,default   # their cost

The model is random (std 0.02 weights, unit norms) and written to --workdir as sharded safetensors
first, so the pipeline streams it from disk layer by layer exactly as it would a real model. Random
token ids serve as calibration: the shapes, not the text, set the cost. The sink packs every layer
into vLLM's tensors (so packing is timed) but keeps nothing, so the disk write of the result is not
part of the figure. Stages: forward (layer passes, Hessian accumulation included), solve (GPTQ),
pack_write (packing), evaluate (unused here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantizer.gptq import QuantRecipe
from quantizer.packing import gptq_tensors
from quantizer.pipeline import SourceModel, quantize_model

# 4-bit g128, static act-order, each: plain GPTQ (min-max scales, targets from its own inputs), the
# default without targets from the unquantized model, and the default.
RECIPES = {
    "plain": QuantRecipe(scale_search="minmax", full_range=False, source_targets=0.0),
    "no-source-targets": QuantRecipe(source_targets=0.0),
    "default": QuantRecipe(),
}
SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-70b-2layers": (8192, 28672, 2, 64, 8, 128256),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256),
    "small": (1024, 2816, 4, 16, 4, 32000),
    "tiny": (256, 768, 2, 4, 2, 1024),
}
# Mixtures of experts (Qwen3-MoE's layout): hidden, each expert's intermediate size, layers, heads, kv
# heads, head dim, vocab, experts, experts per token.
MOE_SHAPES = {
    "qwen3-30b-a3b": (2048, 768, 48, 32, 4, 128, 151936, 128, 8),
    "qwen3-235b-a22b": (4096, 1536, 94, 64, 4, 128, 151936, 128, 8),
    "tiny-moe": (256, 128, 2, 4, 2, 64, 1024, 8, 2),
}


def vocab_size(shape: str) -> int:
    return MOE_SHAPES[shape][6] if shape in MOE_SHAPES else SHAPES[shape][5]


class _Shards:
    """A synthetic model's folder: its config, random weights (std 0.02) shard by shard, the index
    Transformers (and so the peers) look for in a sharded checkpoint, and a placeholder tokenizer."""

    def __init__(self, path: Path, config, dtype: torch.dtype, device: torch.device):
        self.path, self.dtype, self.device = path, dtype, device
        self.weight_map: dict[str, str] = {}
        path.mkdir(parents=True)
        config.save_pretrained(path)

    def rand(self, *shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=self.device, dtype=torch.float32) * 0.02).to(self.dtype).cpu()

    def save(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, self.path / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, name))

    def finish(self) -> None:
        index = {"metadata": {}, "weight_map": self.weight_map}
        (self.path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        write_placeholder_tokenizer(self.path)


def write_synthetic_model(path: Path, shape: str, dtype: torch.dtype, device: torch.device,
                          layers: int | None = None) -> None:
    """The model of `shape`, with `layers` decoder layers instead of the shape's own depth if given."""
    from transformers import LlamaConfig

    if shape in MOE_SHAPES:
        write_synthetic_moe(path, shape, dtype, device, layers)
        return
    hidden, inter, depth, heads, kv_heads, vocab = SHAPES[shape]
    layers = layers or depth
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    head_dim = hidden // heads
    shards = _Shards(path, config, dtype, device)
    rand, save_shard = shards.rand, shards.save

    save_shard({"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                "model.norm.weight": torch.ones(hidden, dtype=dtype)}, "model-outer.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        save_shard({
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
        }, f"model-layer{i:03d}.safetensors")
    shards.finish()


def write_synthetic_moe(path: Path, shape: str, dtype: torch.dtype, device: torch.device, layers: int | None) -> None:
    """A Qwen3-MoE of `shape`: each layer's experts one Linear each, as the hub's checkpoints hold them."""
    from transformers import Qwen3MoeConfig

    hidden, inter, depth, heads, kv_heads, head_dim, vocab, experts, per_token = MOE_SHAPES[shape]
    layers = layers or depth
    config = Qwen3MoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, intermediate_size=inter * per_token, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        num_experts=experts, num_experts_per_tok=per_token, max_position_embeddings=8192, tie_word_embeddings=False,
        architectures=["Qwen3MoeForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    shards = _Shards(path, config, dtype, device)
    rand, save_shard = shards.rand, shards.save
    ones = {n: torch.ones(n, dtype=dtype) for n in (hidden, head_dim)}
    save_shard({"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
                "model.norm.weight": ones[hidden]}, "model-outer.safetensors")
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": ones[head_dim].clone(),
            p + "self_attn.k_norm.weight": ones[head_dim].clone(),
            p + "mlp.gate.weight": rand(experts, hidden),
            p + "input_layernorm.weight": ones[hidden].clone(),
            p + "post_attention_layernorm.weight": ones[hidden].clone(),
        }
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            tensors |= {q + "gate_proj.weight": rand(inter, hidden), q + "up_proj.weight": rand(inter, hidden),
                        q + "down_proj.weight": rand(hidden, inter)}
        save_shard(tensors, f"model-layer{i:03d}.safetensors")
    shards.finish()


def write_placeholder_tokenizer(path: Path) -> None:
    """A three-token tokenizer: the benches hand every tool token ids, but the peers' loaders insist
    on a tokenizer being there."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    tokenizer.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES | MOE_SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's own depth)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", type=Path, help="where the synthetic model is written (default: a temp dir)")
    parser.add_argument("--write-only", action="store_true", help="only write the synthetic model")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a model already in --workdir, so the process's peak host memory is the pipeline's")
    parser.add_argument("--solvers", default="auto", help="comma-separated, run in order: auto, torch, triton")
    parser.add_argument("--recipes", default="default",
                        help=f"comma-separated, each run with every solver: {', '.join(RECIPES)}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    unknown = set(args.recipes.split(",")) - RECIPES.keys()
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(sorted(unknown))}; use {', '.join(RECIPES)}")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kq-bench-"))
    model_dir = workdir / f"synthetic-{args.shape}"
    write_seconds = None
    if not (args.reuse and model_dir.exists()):
        if model_dir.exists():
            shutil.rmtree(model_dir)
        start = time.perf_counter()
        write_synthetic_model(model_dir, args.shape, dtype, device, layers=args.layers)
        write_seconds = round(time.perf_counter() - start, 1)
    if args.write_only:
        print(f"wrote {model_dir} in {write_seconds} s")
        return

    vocab = vocab_size(args.shape)
    windows = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    def sink(prefix, quantized, others):
        for qw in quantized.values():
            gptq_tensors(qw, 4)

    runs = []
    for name, solver in ((name, solver) for name in args.recipes.split(",") for solver in args.solvers.split(",")):
        start = time.perf_counter()
        result = quantize_model(SourceModel.open(model_dir), RECIPES[name], windows, sink, device, solver=solver)
        wall = time.perf_counter() - start
        runs.append({
            "recipe": name,
            "solver": result.solver,
            "wall_seconds": round(wall, 1),
            "stage_seconds": {k: round(v, 1) for k, v in result.stage_seconds.items()},
            "mean_layer_seconds": round(sum(result.layer_seconds) / len(result.layer_seconds), 2),
            "peak_device_gib": round(result.peak_device_bytes / 2**30, 2),
            "peak_host_gib": round(result.peak_host_bytes / 2**30, 2),
            "mean_relative_error": sum(s.relative_error for s in result.linears) / len(result.linears),
        })
    report = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "model_write_seconds": write_seconds,
        "runs": runs,
    }
    if len(runs) > 1:
        report["speedup_of_first_over_others"] = [round(r["wall_seconds"] / runs[0]["wall_seconds"], 2) for r in runs[1:]]
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
