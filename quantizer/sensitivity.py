"""How much each unit gains from the finer setting: what mixed precision's plan is chosen by (quantizer/mixed.py).

Two measures, each by unit (the Linears vLLM gives one scheme):

- `solo` (the default): the unit's own effect on the model's output. The source model with only this unit
  quantized, by GPTQ against the Hessians of the source's own activations, at the base setting and at the
  finer one; the gain is KL(source || base) - KL(source || finer) over the whole vocabulary on scored
  windows (the quantize Job holds an eighth of its calibration windows out of the Hessians for them;
  never the evaluation text, on which the gate measures). Measured in one streamed pass: the source's
  calibration and scored streams go through the layers one at a time, as in the quantize pass; at each
  layer every unit is quantized both ways and a copy of the scored stream goes on from there with that
  unit changed, through every later layer (each layer is read once; the copies live on the activations' device, `offload_activations`
  puts them in host memory; at most SOLO_WINDOWS windows, fewer when the copies would pass
  SOLO_STREAM_BYTES). On the bundled tiny Llama it ranks the units about as well as the truth
  allows (bench/sensitivity_bench.py, docs/benchmarks.md) and its plans beat uniform settings of the
  same size.
- `error`: the relative output error the finer setting removes, summed over the unit's Linears, from a
  quantize pass at the base setting that solves each Linear both ways on the same inputs. Cheaper (no
  extra forward passes), but it ranks by the layer's error rather than the model's, and its plans were
  worse than uniform on the dense tiny model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantizer.gptq import QuantRecipe, default_block_solver, gptq_quantize, rtn_quantize
from quantizer.mixed import Unit
from quantizer.perplexity import Comparison, EvalWindows, window_comparison
from quantizer.pipeline import (
    LayerPrefetcher,
    SourceModel,
    _capture_layer0_inputs,
    _HessianSum,
    _LayerRunner,
    layer_linears,
    linear_shapes,
    materialized,
    open_model,
    quantize_model,
    source_dtype,
)

# At most this many evaluation windows measure the solo gains, and fewer when every unit's copies of their
# hidden states (one per setting, all alive until the last layer) would pass SOLO_STREAM_BYTES: an 8B
# model's 128 units at 2048 tokens per window hold 4 GiB per window in bfloat16.
SOLO_WINDOWS = 16
SOLO_STREAM_BYTES = 8 << 30


def error_gains(source: SourceModel, base: QuantRecipe, finer: QuantRecipe | None, units: Callable[[list[str]], list[Unit]],
                calibration_windows: torch.Tensor, device: torch.device, **pipeline_options) -> dict[str, float]:
    """The `error` measure: gain by unit name."""
    gains: dict[str, float] = {}

    def both(weight, hessian, recipe, name, **kwargs):
        quantized = gptq_quantize(weight, hessian, recipe, name=name, **kwargs)
        fine = 0.0 if finer is None else gptq_quantize(weight, hessian, finer, name=name, **kwargs).relative_error
        gains[name] = quantized.relative_error - fine
        return quantized

    result = quantize_model(source, base, calibration_windows, lambda *_: None, device, quantize_matrix=both,
                            stage="sensitivity", **pipeline_options)
    return {u.name: sum(gains.get(n, 0.0) for n in u.linears) for u in units([s.name for s in result.linears])}


@torch.no_grad()
def solo_gains(source: SourceModel, base: QuantRecipe, finer: QuantRecipe | None, units: Callable[[list[str]], list[Unit]],
               calibration_windows: torch.Tensor, scored_windows: EvalWindows, device: torch.device,
               batch_size: int = 1, offload_activations: bool = False, progress: bool = True,
               solver: str = "auto") -> dict[str, float]:
    """The `solo` measure: gain by unit name (see the module's docstring), its Hessians from
    `calibration_windows`, its KL over (at most SOLO_WINDOWS of) `scored_windows`."""
    compute_dtype = source_dtype_on(source, device)
    store = torch.device("cpu") if offload_activations else device
    opened = open_model(source, device, compute_dtype)
    layers, family = opened.layers, source.family
    _, block_solver = default_block_solver(device, solver)
    settings = {"base": base} | ({"finer": finer} if finer is not None else {})
    streams = len(units(list(linear_shapes(opened.layers_name, layers, family)))) * len(settings)
    per_window = scored_windows.ids.shape[1] * source.config.hidden_size * torch.tensor([], dtype=compute_dtype).element_size()
    count = max(1, min(SOLO_WINDOWS, SOLO_STREAM_BYTES // max(streams * per_window, 1)))
    windows = scored_windows[:count]
    calibration, kwargs = _capture_layer0_inputs(opened.model, layers, calibration_windows, device, store)
    runner = _LayerRunner(kwargs, batch_size)
    evaluation, eval_kwargs = _capture_layer0_inputs(opened.model, layers, windows.ids, device, store)
    eval_runner = _LayerRunner(eval_kwargs, batch_size)
    changed: dict[tuple[str, str], torch.Tensor] = {}  # (unit, setting): the evaluation stream with it changed
    prefetcher = LayerPrefetcher(layers, opened.layers_name, source.weights, family.checkpoint_name)
    try:
        for index in tqdm(range(len(layers)), desc="sensitivity", unit="layer", disable=not progress):
            prefix = f"{opened.layers_name}.{index}."
            layer = layers[index]
            with materialized(layer, prefetcher.take(index), device, compute_dtype):
                linears = {family.checkpoint_name(prefix + name): module
                           for name, module in layer_linears(layer, family).items()}
                hessians, calibration_out = _hessians(layer, linears, calibration, runner, device)
                for unit in units(sorted(linears)):
                    for setting, recipe in settings.items():
                        with _quantized(unit, recipe, linears, hessians, block_solver):
                            changed[(unit.name, setting)] = eval_runner.forward(layer, evaluation, device)
                for key, stream in changed.items():
                    if not key[0].startswith(prefix):  # changed before this layer: on through it
                        changed[key] = eval_runner.forward(layer, stream, device)
                calibration = calibration_out
                evaluation = eval_runner.forward(layer, evaluation, device)
                del hessians, calibration_out
    finally:
        prefetcher.close()

    def kl(stream: torch.Tensor) -> float:
        batches = []
        for start in range(0, len(windows), batch_size):
            rows = slice(start, start + batch_size)
            logits = [opened.lm_head(opened.base.norm(s[rows].to(device))) for s in (evaluation, stream)]
            batches.append(window_comparison(*logits, windows.ids[rows].to(device), windows.score_from[rows]))
        return Comparison.of(batches, windows.tokens_scored).kl

    names = {unit for unit, _ in changed}
    return {u: kl(changed[(u, "base")]) - (kl(changed[(u, "finer")]) if finer is not None else 0.0) for u in names}


def source_dtype_on(source: SourceModel, device: torch.device) -> torch.dtype:
    """The dtype the pipeline computes in: the source's on a GPU, float32 on a CPU."""
    return source_dtype(source.config, source.weights) if device.type == "cuda" else torch.float32


def _hessians(layer: nn.Module, linears: dict[str, nn.Linear], calibration: torch.Tensor, runner: _LayerRunner,
              device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each Linear's Hessian from the inputs it sees when the source's calibration stream runs the layer
    (an expert's: the tokens its router sends it; none, when it sees none), and the layer's outputs."""
    sums = {name: _HessianSum(linear.in_features, device) for name, linear in linears.items()}
    hooks = [linear.register_forward_pre_hook(lambda _m, args, s=sums[name]: s.add(args[0]))
             for name, linear in linears.items()]
    try:
        outputs = runner.forward(layer, calibration, device)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: s.result() for name, s in sums.items() if s.count}, outputs


class _quantized:
    """The unit's Linears quantized at `recipe` inside the block, their source weights back after it."""

    def __init__(self, unit: Unit, recipe: QuantRecipe, linears: dict[str, nn.Linear],
                 hessians: dict[str, torch.Tensor], block_solver):
        self.unit, self.recipe, self.linears, self.hessians, self.block_solver = (
            unit, recipe, linears, hessians, block_solver)
        self.kept: dict[str, torch.Tensor] = {}

    def __enter__(self) -> None:
        for name in self.unit.linears:
            linear = self.linears[name]
            self.kept[name] = linear.weight.data
            hessian = self.hessians.get(name)
            qw = (gptq_quantize(linear.weight.data, hessian, self.recipe, name=name, block_solver=self.block_solver)
                  if hessian is not None else rtn_quantize(linear.weight.data, self.recipe, name=name))
            linear.weight.data = qw.dequantized.to(linear.weight.dtype)

    def __exit__(self, *_exc) -> None:
        for name, weight in self.kept.items():
            self.linears[name].weight.data = weight
