"""The whole model's fidelity on text it never saw, for every quantizer path, over calibration seeds.

    PYTHONPATH=<llm-compressor deps> python bench/model_quality_bench.py                 # the two fixtures
    python bench/model_quality_bench.py --models tiny-llama,/path/to/model --seeds 0,1,2 --json out.json

Users feel the model's outputs, not a layer's error. For each model, setting (BITS:GROUP), path and
calibration seed, the model is quantized by the layer pipeline (quantizer.pipeline.quantize_model, the
same calibration windows and the pipeline's own Hessians for every path: only the quantizer of each
Linear changes) and compared with the unquantized model on held-out text, token by token:
  kl     mean KL(source || quantized) per scored token over the whole vocabulary, nats
  top1   share of tokens whose most likely next token is the same in both models
  dppl   perplexity increase
and, in the JSON, the hidden states' relative distance to the source's after each layer (drift).
The seed draws the calibration windows from the calibration text (quantizer.calibration; RTN reads
none and runs once). Per model,
setting and path the table gives the mean over seeds and the spread (max - min); against the best
peer path (the lowest mean KL of llm-compressor's and GPTQModel's paths below) a path is a "lead" when its worst
seed's KL is below that path's best seed's, "behind" in the opposite case, and a "tie" when the seeds'
ranges overlap: a difference the calibration's own noise can make is not a difference.

Paths are bench/layer_quality_bench.py's (rtn, llm-compressor's GPTQ with its default and imatrix_mse
observers, our variants) and candidates measured here before any reaches the product:
  ours             the default recipe (QuantRecipe())
  ours+shrinkA     the Hessian shrunk toward its diagonal, (1 - A) H + A diag(H), for the whole solve
  ours+dampD       dampening D instead of 0.01
  ours+normP       the scale search's error norm p (sum of importance x |error|^p; the default's is
                   quantizer.gptq.SEARCH_ERROR_NORM)
  ours+refineN     N sweeps of coordinate descent over the codes and a re-fit of the scales after the pass
  ours+gptaqA      targets from the unquantized model's inputs with strength A (source_targets, GPTAQ's)
  ours+awqA        AWQ's activation-aware scaling with a fixed exponent A before our GPTQ (o_proj
                   unscaled: its scale cannot fold under grouped-query attention)
End to end (llm-compressor's own pipeline, `oneshot` with its sequential pipeline on the same
calibration windows; its checkpoint written, read back by quantizer.perplexity.load_dequantized_model
and scored on the same held-out windows against the same source logits):
  lc-e2e           GPTQModifier, min-max observer (its default)
  lc-e2e-imatrix   GPTQModifier with the imatrix_mse observer
  lc-e2e-awq       AWQModifier, then GPTQModifier (min-max): llm-compressor's AWQ-then-GPTQ recipe
These count as peer paths for the verdict. Dense models only (its MoE calibration is its own).
GPTQModel end to end (GPTQModel.load + quantize + save on the same calibration windows, in a process of
its own with GPTQModel's site first on PYTHONPATH: GPTQMODEL_SITE, from bench/peer_wheels.sh and
bench/install_peers.sh; its GPTQ-format checkpoint read back and scored as above):
  gptqmodel-e2e       static act-order (desc_act), min-max scales
  gptqmodel-e2e-best  its defaults at their best: group-aware act-order and its MSE grid search (mse=2.4)
These count as peer paths too (mixtures of experts included).
Any layer-pipeline path above may end in a rotation (bench/rotation.py), applied to the source before it
is quantized; the rotated model computes the source's function (its own KL to the source, stored in
float32, is below 1e-8), so the path is scored against the same source logits:
  PATH+hadamard     QuaRot/SpinQuant's R1 (residual stream) and R2 (each head's values), randomized
                    Hadamard matrices drawn by the calibration seed, merged into the weights
  PATH+hadamard-r1  R1 alone
Held-out text: a model's own evaluation text (tests/fixtures/text/evaluation.txt for the fixtures, or
--eval-text), never seen in its training nor in calibration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
import rotation  # noqa: E402
from layer_quality_bench import OURS, PEERS, PLAIN, quantizer_for  # noqa: E402

import quantizer.gptq as gptq_module  # noqa: E402
from quantizer.calibration import load_calibration  # noqa: E402
from quantizer.gptq import QuantizedWeight, QuantRecipe, gptq_quantize, output_energy, rtn_quantize  # noqa: E402
from quantizer.perplexity import load_evaluation_windows  # noqa: E402
from quantizer.pipeline import MatrixQuantizer, SourceModel, quantize_model  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
MODELS = {"tiny-llama": FIXTURES / "tiny-llama", "tiny-qwen3-moe": FIXTURES / "tiny-qwen3-moe"}
SETTINGS = ("4:128", "4:32", "3:128")
E2E_PATHS = ("lc-e2e", "lc-e2e-imatrix", "lc-e2e-awq")
LC_PATHS = (*PEERS, *E2E_PATHS)
GPTQMODEL_PATHS = ("gptqmodel-e2e", "gptqmodel-e2e-best")
PEER_PATHS = (*LC_PATHS, *GPTQMODEL_PATHS)
DEFAULT_PATHS = ("rtn", *PEERS, "gptq", "ours", "ours+shrink0.1", "ours+damp0.1")


def shrunk_toward_diagonal(hessian: torch.Tensor, amount: float) -> torch.Tensor:
    """(1 - amount) H + amount diag(H): the calibration's cross-correlations trusted less, its per-input
    energies kept (a Ledoit-Wolf-style shrinkage of the second-moment estimate)."""
    return (1 - amount) * hessian + amount * torch.diag_embed(torch.diagonal(hessian))


def activation_scale(hessian: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-input-channel scale s = rms(x)^alpha (normalized to a geometric mean of 1), from
    diag(H) = 2 mean(x^2). Quantizing W diag(s) and dividing the result by s is what a checkpoint with
    1/s folded into the preceding norm (q/k/v, gate/up: the same H, so the same s) or into up_proj's
    rows (down_proj) computes: a plain W4A16 model."""
    rms = torch.diagonal(hessian).clamp_min(1e-12).sqrt()
    scale = rms.pow(alpha)
    return scale / scale.log().mean().exp()


def path_quantizer(path: str) -> tuple[MatrixQuantizer, dict[str, Any]]:
    """The matrix quantizer of a path and the recipe fields it sets beyond bits and group size."""
    defaults = QuantRecipe().to_dict()
    recipe_fields = {k: defaults[k] for k in PLAIN}  # the default recipe's choices of OURS' fields
    if path == "ours":
        return gptq_quantize, recipe_fields
    if path.startswith("ours+shrink"):
        amount = float(path.removeprefix("ours+shrink"))

        def shrunk(weight, hessian, recipe, name="", block_solver=None):
            return gptq_quantize(weight, shrunk_toward_diagonal(hessian, amount), recipe, name=name,
                                 block_solver=block_solver)
        return shrunk, recipe_fields
    if path.startswith("ours+awq"):
        alpha = float(path.removeprefix("ours+awq"))

        def activation_aware(weight, hessian, recipe, name="", block_solver=None):
            if name.endswith("o_proj"):  # its scale would fold into v_proj, shared across query heads (GQA)
                return gptq_quantize(weight, hessian, recipe, name=name, block_solver=block_solver)
            scale = activation_scale(hessian, alpha)
            q = gptq_quantize(weight * scale, hessian / scale / scale.unsqueeze(1), recipe, name=name,
                              block_solver=block_solver)
            q.dequantized = q.dequantized / scale
            return q
        return activation_aware, recipe_fields
    if path.startswith("ours+norm"):
        norm = float(path.removeprefix("ours+norm"))

        def with_norm(weight, hessian, recipe, name="", block_solver=None):
            kept, gptq_module.SEARCH_ERROR_NORM = gptq_module.SEARCH_ERROR_NORM, norm
            try:
                return gptq_quantize(weight, hessian, recipe, name=name, block_solver=block_solver)
            finally:
                gptq_module.SEARCH_ERROR_NORM = kept
        return with_norm, recipe_fields
    if path.startswith("ours+gptaq"):
        return gptq_quantize, recipe_fields | {"source_targets": float(path.removeprefix("ours+gptaq"))}
    if path.startswith("ours+refine"):
        return gptq_quantize, recipe_fields | {"refine_sweeps": int(path.removeprefix("ours+refine"))}
    if path.startswith("ours+damp"):
        return gptq_quantize, recipe_fields | {"damp": float(path.removeprefix("ours+damp"))}
    if path in E2E_PATHS or path in GPTQMODEL_PATHS:
        return gptq_quantize, {}  # not a matrix quantizer: run_end_to_end runs the peer itself
    if path == "rtn":
        return (lambda weight, hessian, recipe, name="", block_solver=None: rtn_quantize(weight, recipe, name)), PLAIN
    if path in OURS or path in PEERS:
        quantize, fields = quantizer_for(path)
        return quantize, PLAIN | fields
    raise SystemExit(f"unknown path {path!r}: one of rtn, {', '.join(PEERS)}, {', '.join(OURS)}, ours, "
                     "ours+shrinkA, ours+dampD, ours+normP, ours+refineN, ours+awqA, ours+gptaqA")


ROTATIONS = {"+hadamard": {"r1": True, "r2": True}, "+hadamard-r1": {"r1": True, "r2": False}}


def rotation_of(path: str) -> tuple[str, dict[str, bool] | None]:
    """A path's base path and its rotation's settings (None: not rotated)."""
    for suffix, settings in ROTATIONS.items():
        if path.endswith(suffix):
            return path.removesuffix(suffix), settings
    return path, None


def run_rotated(model: Path, setting: str, path: str, seed: int, args, windows, tokenizer) -> dict[str, Any]:
    """The base path run on a rotated copy of the model (float32, so that the rotation itself costs
    nothing measurable), reported under the model's name and the whole path."""
    base, settings = rotation_of(path)
    with tempfile.TemporaryDirectory() as tmp:
        rotated = rotation.write_rotated(model, Path(tmp) / model.name, seed=seed, **settings)
        run = run_once(rotated, setting, base, seed, args, windows, tokenizer)
    return run | {"path": path}


def run_once(model: Path, setting: str, path: str, seed: int, args, windows, tokenizer) -> dict[str, Any]:
    bits, group = (int(x) for x in setting.split(":"))
    quantize, fields = path_quantizer(path)
    recipe = QuantRecipe(bits=bits, group_size=group, **fields)
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len, seed=seed)
    start = time.perf_counter()
    result = quantize_model(SourceModel.open(model), recipe, calibration.windows, lambda *a: None, args.device,
                            eval_windows=windows, method="rtn" if path == "rtn" else "gptq", progress=False,
                            quantize_matrix=quantize)  # fmt: skip
    return {"model": model.name, "setting": setting, "path": path, "seed": seed,
            "baseline_ppl": result.baseline_ppl, "quantized_ppl": result.fakequant_ppl,
            "dppl": result.fakequant_ppl - result.baseline_ppl, "kl": result.fakequant_kl,
            "top1": result.fakequant_top1, "seconds": round(time.perf_counter() - start, 2),
            "drift_by_layer": result.eval_drift}  # fmt: skip


def generalization(model: Path, setting: str, path: str, seed: int, args, tokenizer) -> dict[str, Any]:
    """Each Linear's output error on the calibration activations it was solved on, and on held-out
    activations of the same quantized model: the pipeline runs twice, first quantizing on the
    calibration windows, then on held-out windows with every Linear given the first run's weights
    (so both runs' later layers see the same quantized model's inputs; only the text differs)."""
    bits, group = (int(x) for x in setting.split(":"))
    quantize, fields = path_quantizer(path)
    recipe = QuantRecipe(bits=bits, group_size=group, **fields)
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len, seed=seed)
    held_out = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len, args.samples).ids
    solved: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]] = {}

    def solve(weight, hessian, recipe, name="", block_solver=None):
        q = quantize(weight, hessian, recipe, name=name, block_solver=block_solver)
        w = weight.float()
        solved[name] = (w, q.dequantized, output_energy(w - q.dequantized, hessian), output_energy(w, hessian))
        return q

    held: dict[str, tuple[float, float]] = {}

    def replay(weight, hessian, recipe, name="", block_solver=None):
        w, dequantized, _, _ = solved[name]
        held[name] = (output_energy(w - dequantized, hessian), output_energy(w, hessian))
        rows, cols = w.shape
        return QuantizedWeight(codes=torch.zeros(rows, cols, dtype=torch.int32), scales=torch.ones(rows, 1),
                               zeros=torch.zeros(rows, 1), dequantized=dequantized, group_size=cols, damp=0.0,
                               relative_error=0.0)

    for windows, matrix_quantizer in ((calibration.windows, solve), (held_out, replay)):
        quantize_model(SourceModel.open(model), recipe, windows, lambda *a: None, args.device, progress=False,
                       quantize_matrix=matrix_quantizer)  # fmt: skip
    per_linear = {name: {"calibration": solved[name][2] / solved[name][3], "held_out": held[name][0] / held[name][1]}
                  for name in solved}  # fmt: skip
    calibration_error = sum(v[2] for v in solved.values()) / sum(v[3] for v in solved.values())
    held_out_error = sum(v[0] for v in held.values()) / sum(v[1] for v in held.values())
    return {"model": model.name, "setting": setting, "path": path, "seed": seed,
            "calibration_error": calibration_error, "held_out_error": held_out_error,
            "held_out_vs_calibration": held_out_error / calibration_error, "per_linear": per_linear}  # fmt: skip


def llmcompressor_checkpoint(model: Path, bits: int, group: int, path: str, windows: torch.Tensor, output: Path) -> None:
    """llm-compressor's oneshot on the source model (float32, as our CPU pipeline computes), its
    compressed checkpoint written to output."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        # llm-compressor 0.14's AWQ pins its cached activations for copies to a GPU, which fails where
        # torch has no CUDA driver: on a CPU there is nothing to copy to.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group,
                               actorder="static", observer="imatrix_mse" if path == "lc-e2e-imatrix" else "minmax")
    gptq = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                        ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    recipe = [AWQModifier(), gptq] if path == "lc-e2e-awq" else [gptq]
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    oneshot(model=source, dataset=dataset, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    source.save_pretrained(output, save_compressed=True)


@torch.no_grad()
def score_checkpoint(model: Path, checkpoint: Path, windows) -> dict[str, float]:
    """Perplexities, KL and top-1 agreement of a written checkpoint against the source, window batch
    by window batch (both in float32)."""
    from transformers import AutoModelForCausalLM

    from quantizer.perplexity import Comparison, load_dequantized_model, window_comparison

    source = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    quantized = load_dequantized_model(checkpoint).eval()
    batches = []
    for start in range(0, len(windows), 8):
        ids, score_from = windows.ids[start : start + 8], windows.score_from[start : start + 8]
        batches.append(window_comparison(*(m(ids, use_cache=False).logits for m in (source, quantized)), ids, score_from))
    c = Comparison.of(batches, windows.tokens_scored)
    return {"baseline_ppl": c.baseline_ppl, "quantized_ppl": c.quantized_ppl, "dppl": c.quantized_ppl - c.baseline_ppl,
            "kl": c.kl, "top1": c.top1}


def run_end_to_end(model: Path, setting: str, path: str, seed: int, args, windows, tokenizer) -> dict[str, Any]:
    bits, group = (int(x) for x in setting.split(":"))
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len, seed=seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kq-lc-") as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        llmcompressor_checkpoint(model, bits, group, path, calibration.windows, checkpoint)
        seconds = time.perf_counter() - start
        scores = score_checkpoint(model, checkpoint, windows)
    return {"model": model.name, "setting": setting, "path": path, "seed": seed, **scores,
            "seconds": round(seconds, 2)}


def gptqmodel_checkpoint(model: Path, bits: int, group: int, best: bool, windows: Path, output: Path) -> None:
    """GPTQModel's quantize and save of the source model on the calibration windows (run in a process
    whose PYTHONPATH starts with GPTQModel's site)."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file

    options = {"act_group_aware": True, "mse": 2.4} if best else {"desc_act": True, "act_group_aware": False}
    config = QuantizeConfig(bits=bits, group_size=group, sym=True, damp_percent=0.01, **options)
    quantized = GPTQModel.load(str(model), config)
    rows = load_file(windows)["input_ids"]
    quantized.quantize([{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)}
                        for row in rows], batch_size=1)
    quantized.save(str(output))


def run_gptqmodel_end_to_end(model: Path, setting: str, path: str, seed: int, args, windows, tokenizer) -> dict[str, Any]:
    from safetensors.torch import save_file

    bits, group = (int(x) for x in setting.split(":"))
    calibration = load_calibration(args.calibration, tokenizer, args.samples, args.seq_len, seed=seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["GPTQMODEL_SITE"], str(ROOT)]))
    if (os.cpu_count() or 1) < 4:  # its default CPU pool is half the cores, below what its loader asks for
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    with tempfile.TemporaryDirectory(prefix="kq-gptqmodel-") as scratch:
        save_file({"input_ids": calibration.windows.contiguous()}, f"{scratch}/windows.safetensors")
        checkpoint = Path(scratch) / "checkpoint"
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_gptqmodel", str(model), str(bits), str(group),
                        "best" if path.endswith("-best") else "plain", f"{scratch}/windows.safetensors", str(checkpoint)],
                       env=env, check=True)
        seconds = time.perf_counter() - start
        scores = score_checkpoint(model, checkpoint, windows)
    return {"model": model.name, "setting": setting, "path": path, "seed": seed, **scores,
            "seconds": round(seconds, 2)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per model, setting and path: means and spreads over seeds, and the verdict against the
    best peer path (llm-compressor's or GPTQModel's) of the same model and setting."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["setting"], run["path"]), []).append(run)

    def stats(key: str, rows: list[dict[str, Any]]) -> tuple[float, float, float]:
        values = [r[key] for r in rows]
        return statistics.fmean(values), min(values), max(values)

    rows = []
    for (model, setting, path), group in groups.items():
        peers_here = [(stats("kl", groups[(model, setting, p)]), p) for p in PEER_PATHS if (model, setting, p) in groups]
        best_peer = min(peers_here)[1] if peers_here else None
        row: dict[str, Any] = {"model": model, "setting": setting, "path": path, "seeds": len(group)}
        for key in ("kl", "top1", "dppl", "seconds"):
            mean, low, high = stats(key, group)
            row |= {key: mean, f"{key}_spread": high - low}
        if best_peer:
            peer_mean, peer_low, peer_high = stats("kl", groups[(model, setting, best_peer)])
            low, high = min(r["kl"] for r in group), max(r["kl"] for r in group)
            row |= {"best_peer": best_peer, "kl_vs_best_peer": row["kl"] / peer_mean,
                    "top1_vs_best_peer": row["top1"] - stats("top1", groups[(model, setting, best_peer)])[0],
                    "verdict": "lead" if high < peer_low else "behind" if low > peer_high else "tie"}  # fmt: skip
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], out: Callable[[str], None] = print) -> None:
    out(f"{'model':>15} {'setting':>7} {'path':>18} {'KL (nats)':>10} {'+-':>8} {'top-1':>7} {'+-':>6} "
        f"{'ppl +':>7} {'+-':>6} {'KL/peer':>7} {'verdict':>7} {'s':>6}")
    for r in rows:
        ratio = f"{r['kl_vs_best_peer']:7.3f}" if "kl_vs_best_peer" in r else f"{'-':>7}"
        out(f"{r['model']:>15} {r['setting']:>7} {r['path']:>18} {r['kl']:10.5f} {r['kl_spread']:8.5f} "
            f"{r['top1']:7.2%} {r['top1_spread']:6.2%} {r['dppl']:7.3f} {r['dppl_spread']:6.3f} {ratio} "
            f"{r.get('verdict', '-'):>7} {r['seconds']:6.1f}")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as docs/benchmarks.md shows it: mean and spread (+-) over the seeds."""
    lines = ["| model | setting | path | KL to the source (nats/token) | top-1 agreement | perplexity increase | "
             "KL vs best peer |", "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    def order(r: dict[str, Any]) -> tuple:
        rank = ["rtn", *LC_PATHS, *GPTQMODEL_PATHS, "ours"]
        return (r["model"], SETTINGS.index(r["setting"]) if r["setting"] in SETTINGS else 9,
                rank.index(r["path"]) if r["path"] in rank else len(rank), r["path"])

    for r in sorted(rows, key=order):
        versus = f"{r['kl_vs_best_peer']:.3f}x, {r['verdict']}" if "kl_vs_best_peer" in r else "-"
        lines.append(f"| {r['model']} | {r['setting']} | {r['path']} | {r['kl']:.4g} ± {r['kl_spread']:.2g} | "
                     f"{r['top1']:.2%} ± {r['top1_spread']:.2%} | {r['dppl']:+.3f} ± {r['dppl_spread']:.3f} | {versus} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated fixture names or model folders (default %(default)s)")
    parser.add_argument("--calibration", type=Path, default=FIXTURES / "text" / "calibration.txt")
    parser.add_argument("--eval-text", type=Path, default=FIXTURES / "text" / "evaluation.txt")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-windows", type=int, help="evaluation windows (default: the whole text)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated BITS:GROUP")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS), help="comma-separated (default %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--generalization", action="store_true",
                        help="instead: each path's layer error on its calibration and on held-out activations")
    parser.add_argument("--json", type=Path, help="every run and the summary, as JSON")
    parser.add_argument("--report", type=Path, nargs="+",
                        help="print the summary of --json files (their runs together) as a Markdown table, and stop")
    args = parser.parse_args(argv)
    if args.report:
        runs_by_key: dict[tuple, dict[str, Any]] = {}
        for report in args.report:
            for run in json.loads(report.read_text())["runs"]:
                runs_by_key.setdefault((run["model"], run["setting"], run["path"], run["seed"]), run)
        print(markdown_table(summarize(list(runs_by_key.values()))))
        return 0
    args.device = torch.device(args.device)

    from transformers import AutoTokenizer

    paths = [p for p in args.paths.split(",") if p]
    for path in paths:
        path_quantizer(rotation_of(path)[0])  # an unknown path fails before any work
    missing = peers.available()
    if missing:
        print(f"# {missing}: the lc-* paths are skipped")
        paths = [p for p in paths if p not in LC_PATHS]
    if "GPTQMODEL_SITE" not in os.environ and set(paths) & set(GPTQMODEL_PATHS):
        print("# GPTQMODEL_SITE is not set (bench/peer_wheels.sh, bench/install_peers.sh): the gptqmodel-* paths are skipped")
        paths = [p for p in paths if p not in GPTQMODEL_PATHS]
    seeds = [int(s) for s in args.seeds.split(",")]
    models = [MODELS.get(m, Path(m)) for m in args.models.split(",") if m]
    runs: list[dict[str, Any]] = []
    env = {"device": str(args.device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "peers": None if missing else peers.version()}  # fmt: skip
    print(f"# {env}")
    for model in models:
        tokenizer = AutoTokenizer.from_pretrained(model)
        windows = load_evaluation_windows(args.eval_text, tokenizer, args.seq_len, args.max_windows)
        print(f"# {model.name}: calibration {args.samples} x {args.seq_len} from {args.calibration.name}, seeds "
              f"{seeds}; held-out {windows.tokens_scored} tokens in {len(windows)} windows", flush=True)
        if args.generalization:
            for setting in args.settings.split(","):
                for path in paths:
                    for seed in seeds:
                        run = generalization(model, setting, path, seed, args, tokenizer)
                        runs.append(run)
                        print(f"  {model.name} {setting} {path:>18} seed {seed}: layer error on calibration "
                              f"{run['calibration_error']:.4e}, held out {run['held_out_error']:.4e} "
                              f"({run['held_out_vs_calibration']:.3f}x)", flush=True)
            continue
        for setting in args.settings.split(","):
            for path in paths:
                for seed in seeds[:1] if path == "rtn" else seeds:  # RTN reads no calibration
                    runner = run_end_to_end if path in E2E_PATHS else \
                        run_gptqmodel_end_to_end if path in GPTQMODEL_PATHS else \
                        run_rotated if rotation_of(path)[1] else run_once
                    run = runner(model, setting, path, seed, args, windows, tokenizer)
                    runs.append(run)
                    write_json(args.json, env, args, runs)  # a run stopped early keeps what it measured
                    print(f"  {model.name} {setting} {path} seed {seed}: KL {run['kl']:.5f} top-1 {run['top1']:.2%} "
                          f"ppl +{run['dppl']:.3f} ({run['seconds']:.0f} s)", flush=True)
    summary = [] if args.generalization else summarize(runs)
    if summary:
        print()
        print_table(summary)
    if args.json:
        write_json(args.json, env, args, runs, summary)
        print(f"# wrote {args.json}")
    return 0


def write_json(path: Path | None, env: dict, args, runs: list[dict], summary: list[dict] | None = None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                               "summary": summary, "runs": runs}, indent=2))  # fmt: skip
    tmp.replace(path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_gptqmodel"]:  # run_gptqmodel_end_to_end's child
        model_dir, bits, group, mode, windows_file, output = sys.argv[2:]
        gptqmodel_checkpoint(Path(model_dir), int(bits), int(group), mode == "best", Path(windows_file), Path(output))
        sys.exit(0)
    sys.exit(main())
