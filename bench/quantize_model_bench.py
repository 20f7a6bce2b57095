"""Whole-model GPTQ on a synthetic model with real LLM shapes: wall time, time per stage, peak memory.

    python bench/quantize_model_bench.py --shape llama3-8b --samples 128 --seq-len 2048 --json out.json
    python bench/quantize_model_bench.py --shape llama3-8b --solvers triton,torch   # both, same model
    python bench/quantize_model_bench.py --shape tiny --samples 8 --seq-len 128          # CPU smoke run

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

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-70b-2layers": (8192, 28672, 2, 64, 8, 128256),
    "llama3-70b": (8192, 28672, 80, 64, 8, 128256),
    "small": (1024, 2816, 4, 16, 4, 32000),
    "tiny": (256, 768, 2, 4, 2, 1024),
}


def write_synthetic_model(path: Path, shape: str, dtype: torch.dtype, device: torch.device,
                          layers: int | None = None) -> None:
    """The model of `shape`, with `layers` decoder layers instead of the shape's own depth if given."""
    from transformers import LlamaConfig

    hidden, inter, depth, heads, kv_heads, vocab = SHAPES[shape]
    layers = layers or depth
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype=str(dtype).removeprefix("torch."),
    )
    path.mkdir(parents=True)
    config.save_pretrained(path)
    head_dim = hidden // heads

    def rand(*s: int) -> torch.Tensor:
        return (torch.randn(*s, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()

    weight_map: dict[str, str] = {}

    def save_shard(tensors: dict[str, torch.Tensor], name: str) -> None:
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

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
    # The index Transformers (and so the peers) look for in a sharded checkpoint.
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    write_placeholder_tokenizer(path)


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", type=Path, help="where the synthetic model is written (default: a temp dir)")
    parser.add_argument("--write-only", action="store_true", help="only write the synthetic model")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse a model already in --workdir, so the process's peak host memory is the pipeline's")
    parser.add_argument("--solvers", default="auto", help="comma-separated, run in order: auto, torch, triton")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kq-bench-"))
    model_dir = workdir / f"synthetic-{args.shape}"
    write_seconds = None
    if not (args.reuse and model_dir.exists()):
        if model_dir.exists():
            shutil.rmtree(model_dir)
        start = time.perf_counter()
        write_synthetic_model(model_dir, args.shape, dtype, device)
        write_seconds = round(time.perf_counter() - start, 1)
    if args.write_only:
        print(f"wrote {model_dir} in {write_seconds} s")
        return

    recipe = QuantRecipe(bits=4, group_size=128, sym=True, act_order=True)
    vocab = SHAPES[args.shape][5]
    windows = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    def sink(prefix, quantized, others):
        for qw in quantized.values():
            gptq_tensors(qw, recipe.bits)

    runs = []
    for solver in args.solvers.split(","):
        start = time.perf_counter()
        result = quantize_model(SourceModel.open(model_dir), recipe, windows, sink, device, solver=solver)
        wall = time.perf_counter() - start
        runs.append({
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
