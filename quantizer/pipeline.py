"""Sequential, layer-by-layer GPTQ of a Hugging Face decoder-only causal LM.

The model is built on the meta device; each decoder layer's tensors are read from the safetensors
files only when that layer is processed, and the layer goes back to meta afterwards, so host and
device memory hold one layer (plus activations and Hessians) whatever the model's depth.

Per layer, true-sequentially: q/k/v, then o, then gate/up, then down. For each group a forward pass
over the calibration windows accumulates the Hessian of the group's input (the pass stops as soon as
that input has been seen), then GPTQ solves each Linear and its weight is replaced by the dequantized
one, so later groups calibrate against the already-quantized part of the layer. A final pass gives
the next layer's inputs.

With evaluation windows, two more activation streams run through every layer (EvalStreams): the
original layer (baseline) and the quantized one (fake-quant), giving both perplexities at the end at
no extra device memory beyond the two streams.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from quantizer.errors import InputError
from quantizer.families import SUPPORTED_ARCHITECTURES, Family, family_of
from quantizer.gptq import QuantizedWeight, QuantRecipe, default_block_solver, gptq_quantize, rtn_quantize
from quantizer.perplexity import EvalWindows, initialize_buffers, window_nll

log = logging.getLogger(__name__)

# gptq_quantize's signature: (weight, hessian, recipe, name=, block_solver=) -> QuantizedWeight.
# The benchmarks put other GPTQ implementations in its place, on the same Hessians.
MatrixQuantizer = Callable[..., QuantizedWeight]


class _StopForward(Exception):
    """Raised by a hook once the input it needed has been seen: the rest of the layer is skipped."""


# ---------------------------------------------------------------------------------------------------
# Reading the source model lazily
# ---------------------------------------------------------------------------------------------------


class SafetensorsCheckpoint:
    """Name -> tensor access over a (possibly sharded) safetensors checkpoint, one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: model_dir / file for name, file in weight_map.items()}
            for file in sorted(set(self.file_of.values())):
                self._keys(file)
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise InputError(
                    f"--model {model_dir}: no *.safetensors weights found; convert the model to safetensors "
                    "(PyTorch .bin checkpoints are not read)"
                )
            self.file_of = {}
            for file in files:
                self.file_of.update(dict.fromkeys(self._keys(file), file))

    def _keys(self, file: Path) -> list[str]:
        """The tensor names of one file, whose header (and size) are checked: a truncated or missing
        shard is bad input, found before any work, not a crash halfway through."""
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except FileNotFoundError:
            raise InputError(f"--model {self.model_dir}: {file.name} is named in the index but missing; "
                             "download the model again") from None
        except Exception as exc:  # safetensors raises its own error type for a malformed file
            raise InputError(f"--model {self.model_dir}: {file.name} is not a complete safetensors file ({exc}); "
                             "it may be truncated: download the model again") from None

    def names(self) -> list[str]:
        return list(self.file_of)

    # Each read opens and closes its file: a handle kept open keeps its memory map, and every page
    # read through it stays in this process's resident set, which would then grow with the depth
    # of the model. Parsing a safetensors header again costs microseconds.
    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        with safe_open(self.file_of[name], framework="pt") as handle:
            return list(handle.get_slice(name).get_shape())

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.file_of.values()))


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not model_dir.is_dir():
        raise InputError(f"--model {model_dir}: not a directory; pass a Hugging Face model directory")
    if not (model_dir / "config.json").exists():
        raise InputError(f"--model {model_dir}: no config.json, so this is not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if family_of(architectures) is None:
        raise InputError(
            f"--model {model_dir}: architecture {architectures or 'unknown'} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(config, "quantization_config", None):
        raise InputError(f"--model {model_dir}: the model is already quantized; start from FP16/BF16 weights")
    return config


@dataclass(frozen=True)
class SourceModel:
    """A Hugging Face model directory, opened once: its config (checked) and its safetensors weights."""

    path: Path
    config: Any
    weights: SafetensorsCheckpoint

    @property
    def family(self) -> Family:
        return family_of(self.config.architectures)  # type: ignore[return-value]  # load_config checked it

    @classmethod
    def open(cls, path: Path) -> SourceModel:
        config = load_config(path)
        return cls(path, config, SafetensorsCheckpoint(path))

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def source_dtype(config, checkpoint: SafetensorsCheckpoint) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return checkpoint.get(next(n for n in checkpoint.names() if n.endswith("weight"))).dtype


def check_linear_shapes(config, checkpoint: SafetensorsCheckpoint, group_size: int) -> None:
    """Fail before any work when a quantized Linear's input size does not split into whole groups."""
    if group_size == -1:
        return
    family = family_of(config.architectures)
    for name in checkpoint.names():
        if not any(name.endswith(f"{linear}.weight") for linear in family.linears):
            continue
        in_features = checkpoint.shape(name)[-1]
        if in_features % group_size:
            raise InputError(
                f"{name}: in_features={in_features} is not divisible by group_size={group_size}; "
                f"choose a group size that divides {in_features} (or -1 for one group per row)"
            )


def find_decoder_layers(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the decoder layers, found by shape rather than by name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return name, module
    raise InputError(f"no list of {num_layers} decoder layers found in the model")


def read_module_tensors(module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers from the checkpoint, in host memory and the source dtype."""
    state = {}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        key = f"{prefix}{name}"
        if key not in checkpoint.file_of:
            raise InputError(f"tensor {key} missing from the checkpoint in {checkpoint.model_dir}")
        state[name] = checkpoint.get(key)
    return state


class LayerPrefetcher:
    """Reads the next decoder layer from disk on a background thread while the current one computes.

    The read is I/O and a copy out of the file's pages, both outside the GIL's hot path, so it
    overlaps the forward passes and the solve; it holds at most one layer beyond the current one in
    host memory, so the resident set stays flat in depth.
    """

    def __init__(self, layers: nn.ModuleList, layers_name: str, checkpoint: SafetensorsCheckpoint):
        self._layers, self._layers_name, self._checkpoint = layers, layers_name, checkpoint
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kq-prefetch")
        self._pending: dict[int, Future] = {}

    def _request(self, index: int) -> None:
        if index < len(self._layers) and index not in self._pending:
            prefix = f"{self._layers_name}.{index}."
            self._pending[index] = self._pool.submit(read_module_tensors, self._layers[index], prefix, self._checkpoint)

    def take(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors (waiting for its read if needed); the read of the next one starts."""
        self._request(index)
        state = self._pending.pop(index).result()
        self._request(index + 1)
        return state

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


@contextmanager
def materialized(module: nn.Module, state: dict[str, torch.Tensor], device, dtype):
    """The module with `state` (read_module_tensors) on the device in dtype; back to meta on exit."""
    module.to_empty(device=device)
    module.load_state_dict({name: t.to(device=device, dtype=dtype) for name, t in state.items()}, strict=True, assign=True)
    try:
        yield module
    finally:
        module.to("meta")


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class LinearStats:
    name: str
    shape: tuple[int, int]  # [out, in]
    relative_error: float
    damp: float
    seconds: float


@dataclass
class PipelineResult:
    linears: list[LinearStats] = field(default_factory=list)
    layer_seconds: list[float] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_host_bytes: int = 0
    peak_device_bytes: int = 0
    baseline_ppl: float | None = None
    fakequant_ppl: float | None = None
    eval_tokens: int = 0
    eval_windows: int = 0
    solver: str = ""
    resumed_layers: int = 0

    def add_time(self, stage: str, seconds: float) -> None:
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds


@contextmanager
def _timed(result: PipelineResult, stage: str, device: torch.device) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result.add_time(stage, time.perf_counter() - start)


def peak_host_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------

# Called with (layer prefix, {linear name: QuantizedWeight}, {other tensor name: tensor}) per layer.
LayerSink = Callable[[str, dict[str, QuantizedWeight], dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Resumed:
    """Layers a previous run finished: `weights(i)` gives layer i's Linears as quantized (dequantized,
    [out, in]), `stats(i)` their {name: {"relative_error", "damp"}} as that run measured them."""

    layers: int
    weights: Callable[[int], dict[str, torch.Tensor]]
    stats: Callable[[int], dict[str, dict]]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _LayerRunner:
    """Runs one decoder layer over stored activations with the kwargs the model gives that kind of layer
    (its attention type: sliding-window and full-attention layers get their own mask and, in Gemma 3,
    their own rotary embeddings)."""

    def __init__(self, kwargs_by_layer: dict[int, dict], batch_size: int):
        self.kwargs_by_layer = kwargs_by_layer  # by id() of the layer module; layers of one kind share one dict
        self.batch_size = batch_size

    def kwargs_for(self, layer: nn.Module) -> dict:
        return self.kwargs_by_layer[id(layer)]

    def forward(self, layer: nn.Module, inputs: torch.Tensor, device, stop_early: bool = False) -> torch.Tensor | None:
        outputs = None if stop_early else torch.empty_like(inputs)
        for start in range(0, inputs.shape[0], self.batch_size):
            batch = inputs[start : start + self.batch_size].to(device)
            try:
                out = _layer_output(layer(batch, **self.kwargs_for(layer)))
            except _StopForward:
                continue
            if outputs is not None:
                outputs[start : start + batch.shape[0]] = out.to(outputs.device)
        return outputs


def _layer_kinds(model, layers: list[nn.Module]) -> list[str | None]:
    """Each decoder layer's attention type: the config's `layer_types` (Gemma 3 picks masks and rotary
    embeddings by it), else the layer's own `attention_type` (Qwen2's sliding window)."""
    declared = getattr(model.config, "layer_types", None)
    if declared and len(declared) == len(layers):
        return list(declared)
    return [getattr(layer, "attention_type", None) for layer in layers]


def _capture_layer0_inputs(model, layers: nn.ModuleList, windows: torch.Tensor, device, store_device):
    """Run the model's embedding and mask preparation; catch what layer 0 receives, and the kwargs the
    model passes to the first layer of each attention type (a model of sliding-window and full-attention
    layers gives each kind its own mask, Gemma 3 its own rotary embeddings too), for every layer of that
    kind. The layers up to the last first-of-its-kind are stand-ins that pass the hidden states on; the
    model stops there."""
    captured: list[torch.Tensor] = []
    kwargs_by_kind: dict[str | None, dict] = {}
    originals = list(layers)
    kinds = _layer_kinds(model, originals)
    first_of_kind: dict[str | None, int] = {}
    for index, kind in enumerate(kinds):
        first_of_kind.setdefault(kind, index)
    last = max(first_of_kind.values())

    class Recorder(nn.Module):
        def __init__(self, index: int):
            super().__init__()
            self.index = index
            self.attention_type = kinds[index]  # models that pick the mask by the layer's attribute read it

        def forward(self, hidden_states, *args, **kwargs):
            if self.index == 0:
                captured.append(hidden_states.to(store_device))
            if first_of_kind[kinds[self.index]] == self.index:
                kwargs_by_kind[kinds[self.index]] = kwargs
            if self.index == last:
                raise _StopForward
            return hidden_states

    for index in range(last + 1):
        layers[index] = Recorder(index)
    try:
        for row in windows:
            with suppress(_StopForward):
                model(row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for index in range(last + 1):
            layers[index] = originals[index]
    for kwargs in kwargs_by_kind.values():
        kwargs.pop("past_key_values", None)
        kwargs["use_cache"] = False
    return torch.cat(captured), {id(layer): kwargs_by_kind[kind] for layer, kind in zip(originals, kinds, strict=True)}


def _nll_sum(norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, windows: EvalWindows, device, batch_size) -> float:
    total = 0.0
    for start in range(0, hidden.shape[0], batch_size):
        logits = lm_head(norm(hidden[start : start + batch_size].to(device)))
        ids = windows.ids[start : start + batch_size].to(device)
        total += window_nll(logits, ids, windows.score_from[start : start + batch_size])
    return total


class EvalStreams:
    """The evaluation windows through every layer twice: as it was (baseline), and as quantized
    (fake-quant, each layer after its Linears are replaced by their dequantized weights)."""

    def __init__(self, model, layers: nn.ModuleList, windows: EvalWindows, device, store_device, batch_size: int):
        self.windows = windows
        self.device = device
        self.batch_size = batch_size
        # Its own kwargs: the rotary embeddings and mask depend on the window length.
        self.baseline, kwargs = _capture_layer0_inputs(model, layers, windows.ids, device, store_device)
        self.runner = _LayerRunner(kwargs, batch_size)
        self.fakequant = self.baseline.clone()

    def through_original(self, layer: nn.Module) -> None:
        self.baseline = self.runner.forward(layer, self.baseline, self.device)

    def through_quantized(self, layer: nn.Module) -> None:
        self.fakequant = self.runner.forward(layer, self.fakequant, self.device)

    def perplexities(self, norm: nn.Module, lm_head: nn.Module) -> tuple[float, float]:
        """(baseline, fake-quant) perplexity over the windows' scored tokens."""
        tokens = self.windows.tokens_scored
        nll = [_nll_sum(norm, lm_head, stream, self.windows, self.device, self.batch_size)
               for stream in (self.baseline, self.fakequant)]
        return math.exp(nll[0] / tokens), math.exp(nll[1] / tokens)


def quantize_model(
    source: SourceModel,
    recipe: QuantRecipe,
    calibration_windows: torch.Tensor,
    sink: LayerSink,
    device: torch.device,
    eval_windows: EvalWindows | None = None,
    method: str = "gptq",
    batch_size: int = 1,
    offload_activations: bool = False,
    progress: bool = True,
    solver: str = "auto",
    quantize_matrix: MatrixQuantizer = gptq_quantize,
    resumed: Resumed | None = None,
) -> PipelineResult:
    """Quantize every decoder Linear of the source model; hand each finished layer to sink. With
    `resumed`, its layers are not quantized again: their stored weights replace the originals and the
    calibration and evaluation streams run through them (a forward pass only), so that the next layer
    sees the inputs an uninterrupted run would have given it."""
    from transformers import AutoModelForCausalLM

    config, checkpoint = source.config, source.weights
    dtype = source_dtype(config, checkpoint)
    # fp16/bf16 matmuls are slow and less exact on CPUs; GPUs run the source dtype.
    compute_dtype = dtype if device.type == "cuda" else torch.float32
    store_device = torch.device("cpu") if offload_activations else device
    result = PipelineResult()
    result.solver, block_solver = ("rtn", None) if method == "rtn" else default_block_solver(device, solver)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    model.eval()
    layers_name, layers = find_decoder_layers(model, config.num_hidden_layers)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    base_prefix = layers_name.rsplit(".", 1)[0] + "." if "." in layers_name else ""

    # Everything outside the decoder layers is small: load it once. Buffers the checkpoint does not hold
    # (rotary frequencies, Gemma's embedding scale) are set by the model's own initialisation, as
    # Transformers does for a model built on the meta device.
    for module_name in ("embed_tokens", "norm"):
        module = getattr(base, module_name)
        module.load_state_dict(
            {n: checkpoint.get(f"{base_prefix}{module_name}.{n}").to(device, compute_dtype) for n, _ in module.named_parameters()},
            assign=True,
        )
    for module_name in ("embed_tokens", "norm", "rotary_emb"):
        if hasattr(base, module_name):
            initialize_buffers(model, getattr(base, module_name), device)
    lm_head = model.get_output_embeddings()
    lm_head_key = "lm_head.weight" if "lm_head.weight" in checkpoint.file_of else f"{base_prefix}embed_tokens.weight"
    lm_head.to_empty(device=device)
    lm_head.load_state_dict({"weight": checkpoint.get(lm_head_key).to(device, compute_dtype)}, assign=True)

    evaluation: EvalStreams | None = None
    with torch.no_grad(), _timed(result, "forward", device):
        hidden, layer_kwargs = _capture_layer0_inputs(model, layers, calibration_windows, device, store_device)
        runner = _LayerRunner(layer_kwargs, batch_size)
        if eval_windows is not None:
            evaluation = EvalStreams(model, layers, eval_windows, device, store_device, batch_size)

    bar = tqdm(range(len(layers)), desc="quantize", unit="layer", disable=not progress)
    prefetcher = LayerPrefetcher(layers, layers_name, checkpoint)
    try:
        for index in bar:
            layer_start = time.perf_counter()
            prefix = f"{layers_name}.{index}."
            layer = layers[index]
            state = prefetcher.take(index)
            if resumed is not None and index < resumed.layers:
                with torch.no_grad(), materialized(layer, state, device, compute_dtype):
                    hidden = _replay_layer(layer, prefix, index, resumed, hidden, runner, evaluation, device, result)
                result.resumed_layers += 1
                result.layer_seconds.append(time.perf_counter() - layer_start)
                continue
            with torch.no_grad(), materialized(layer, state, device, compute_dtype):
                if evaluation is not None:
                    with _timed(result, "evaluate", device):
                        evaluation.through_original(layer)
                quantized, outputs = _quantize_layer(
                    layer, prefix, source.family, recipe, method, block_solver, hidden, runner, device, result,
                    quantize_matrix,
                )
                if outputs is None:
                    with _timed(result, "forward", device):
                        outputs = runner.forward(layer, hidden, device)
                hidden = outputs
                if evaluation is not None:
                    with _timed(result, "evaluate", device):
                        evaluation.through_quantized(layer)
                others = {
                    f"{prefix}{name}": tensor
                    for name, tensor in state.items()
                    if not any(name == f"{q}.weight" for q in quantized)
                }
            with _timed(result, "pack_write", torch.device("cpu")):
                sink(prefix, quantized, others)
            seconds = time.perf_counter() - layer_start
            result.layer_seconds.append(seconds)
            worst = max(s.relative_error for s in result.linears[-len(quantized) :])
            bar.set_postfix(seconds=f"{seconds:.1f}", worst_rel_err=f"{worst:.2e}")
    finally:
        prefetcher.close()

    if evaluation is not None:
        with torch.no_grad(), _timed(result, "evaluate", device):
            result.baseline_ppl, result.fakequant_ppl = evaluation.perplexities(base.norm, lm_head)
        result.eval_tokens = evaluation.windows.tokens_scored
        result.eval_windows = len(evaluation.windows)

    result.peak_host_bytes = peak_host_bytes()
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _replay_layer(layer: nn.Module, prefix: str, index: int, resumed: Resumed, hidden: torch.Tensor,
                  runner: _LayerRunner, evaluation: EvalStreams | None, device, result: PipelineResult) -> torch.Tensor:
    """A finished layer of a previous run: its stored weights in place of the originals, the streams
    through it. Returns the next layer's calibration inputs."""
    with _timed(result, "resume", device):
        if evaluation is not None:
            evaluation.through_original(layer)
        stats = resumed.stats(index)
        for name, weight in resumed.weights(index).items():
            linear = layer.get_submodule(name)
            linear.weight.data = weight.to(device=linear.weight.device, dtype=linear.weight.dtype)
            result.linears.append(LinearStats(name=prefix + name, shape=tuple(linear.weight.shape),
                                              relative_error=stats[name]["relative_error"],
                                              damp=stats[name]["damp"], seconds=0.0))
        hidden = runner.forward(layer, hidden, device)
        if evaluation is not None:
            evaluation.through_quantized(layer)
    return hidden


def _quantize_layer(
    layer: nn.Module,
    prefix: str,
    family: Family,
    recipe: QuantRecipe,
    method: str,
    block_solver,
    hidden: torch.Tensor,
    runner: _LayerRunner,
    device: torch.device,
    result: PipelineResult,
    quantize_matrix: MatrixQuantizer,
) -> tuple[dict[str, QuantizedWeight], torch.Tensor | None]:
    """The layer's Linears quantized group by group (true-sequential: each group's Hessian comes from
    inputs through the groups already quantized). Returns them and, when the staged forward ran, the
    layer's outputs (the next layer's inputs); None means the caller runs the layer once more."""
    modules = dict(layer.named_modules())
    linears = {name for name, m in modules.items() if isinstance(m, nn.Linear)}
    if linears != family.linears:
        raise InputError(
            f"{prefix}: Linear layers {sorted(linears)} differ from the {family.name} layout {sorted(family.linears)}"
        )
    quantized: dict[str, QuantizedWeight] = {}

    def quantize_group(group: tuple[str, ...], hessian: torch.Tensor | None) -> None:
        for name in group:
            linear = modules[name]
            start = time.perf_counter()
            with _timed(result, "solve", device):
                if method == "rtn":
                    qw = rtn_quantize(linear.weight.data, recipe, name=prefix + name)
                else:
                    qw = quantize_matrix(linear.weight.data, hessian, recipe, name=prefix + name, block_solver=block_solver)
                linear.weight.data = qw.dequantized.to(linear.weight.dtype)
            quantized[name] = qw
            result.linears.append(LinearStats(name=prefix + name, shape=tuple(linear.weight.shape),
                                              relative_error=qw.relative_error, damp=qw.damp,
                                              seconds=time.perf_counter() - start))

    if method == "gptq" and family.staged and StagedDecoderLayer.fits(layer):
        staged = StagedDecoderLayer(layer, hidden, runner, device)
        for group, hessian_of in zip(family.groups, staged.stages(), strict=True):
            with _timed(result, "forward", device):
                hessian = hessian_of()
            quantize_group(group, hessian)
            del hessian
        with _timed(result, "forward", device):
            return quantized, staged.outputs()
    for group in family.groups:
        hessian = None
        if method == "gptq":
            with _timed(result, "forward", device):
                hessian = _group_hessian(modules[group[0]], layer, hidden, runner, device)
        quantize_group(group, hessian)
        del hessian
    return quantized, None


class _HessianSum:
    """H = 2/n * sum x x^T over the rows x of every batch added (float32)."""

    def __init__(self, columns: int, device):
        self.hessian = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.hessian.shape[0]).float()
        self.hessian.addmm_(x.t(), x)
        self.count += x.shape[0]

    def result(self) -> torch.Tensor:
        return self.hessian.mul_(2.0 / max(self.count, 1))


@contextmanager
def _exact_tf32(dtype: torch.dtype) -> Iterator[None]:
    # 16-bit activations convert to TF32 without loss (fp16 has TF32's 10-bit mantissa, bf16 fewer),
    # and accumulation stays float32: TF32 tensor cores give the exact same H, several times faster.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype in (torch.float16, torch.bfloat16)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class StagedDecoderLayer:
    """A pre-norm decoder layer (h = x + attn(norm(x)), then h + mlp(norm(h)): Llama's) run stage by
    stage, so that true-sequential GPTQ computes each part of the layer as few times as it can.

    Run whole up to each group, as `_group_hessian` does, the layer computes the attention four times
    and the MLP's up projections twice. Here each stage starts from what the one before kept: the
    attention's output before o_proj and the residual h (each the size of the hidden states). The
    MLP's wide intermediate (about 3.5x the hidden states) is kept too when it takes at most a
    quarter of the memory free where the activations are stored; otherwise gate and up run twice.
    The same operations in the same order as the layer's own forward: outputs and Hessians are bit
    for bit those of the generic path.
    """

    def __init__(self, layer: nn.Module, hidden: torch.Tensor, runner: _LayerRunner, device):
        self.layer, self.hidden, self.runner, self.device = layer, hidden, runner, device
        self.attention = torch.empty_like(hidden)  # o_proj's inputs
        self.residual = torch.empty_like(hidden)  # h = x + attention block; then the outputs, in place
        wide = (*hidden.shape[:-1], layer.mlp.down_proj.in_features)
        needed = math.prod(wide) * hidden.element_size()
        self.intermediate = torch.empty(wide, dtype=hidden.dtype, device=hidden.device) \
            if needed <= free_memory_bytes(hidden.device) // 4 else None

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        mlp = getattr(layer, "mlp", None)
        return (all(hasattr(layer, name) for name in ("input_layernorm", "self_attn", "post_attention_layernorm"))
                and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
                and hasattr(layer.self_attn, "o_proj"))

    def _batches(self) -> Iterator[tuple[slice, torch.Tensor]]:
        size = self.runner.batch_size
        for start in range(0, self.hidden.shape[0], size):
            rows = slice(start, start + size)
            yield rows, self.hidden[rows].to(self.device)

    def _hessian(self, columns: int, inputs: Callable[[slice, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        total = _HessianSum(columns, self.device)
        with _exact_tf32(self.hidden.dtype):
            for rows, x in self._batches():
                total.add(inputs(rows, x))
        return total.result()

    def _qkv_inputs(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        return self.layer.input_layernorm(x)

    def _o_inputs(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        captured = []

        def capture(_module, args):
            captured.append(args[0])
            raise _StopForward

        handle = self.layer.self_attn.o_proj.register_forward_pre_hook(capture)
        try:
            with suppress(_StopForward):
                self.layer.self_attn(hidden_states=self.layer.input_layernorm(x), **self.runner.kwargs_for(self.layer))
        finally:
            handle.remove()
        self.attention[rows] = captured[0].to(self.attention.device)
        return captured[0]

    def _gate_up_inputs(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        h = x + self.layer.self_attn.o_proj(self.attention[rows].to(self.device))
        self.residual[rows] = h.to(self.residual.device)
        return self.layer.post_attention_layernorm(h)

    def _intermediate(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.layer.mlp
        h = self.residual[rows].to(self.device)
        n = self.layer.post_attention_layernorm(h)
        return h, mlp.act_fn(mlp.gate_proj(n)) * mlp.up_proj(n)

    def _down_inputs(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        intermediate = self._intermediate(rows)[1]
        if self.intermediate is not None:
            self.intermediate[rows] = intermediate.to(self.intermediate.device)
        return intermediate

    def stages(self) -> list[Callable[[], torch.Tensor]]:
        """One Hessian per group of Llama's layout (families.LLAMA), each called once the groups before it are
        quantized (the layer's weights then hold their dequantized values)."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        return [
            lambda: self._hessian(attn.q_proj.in_features, self._qkv_inputs),
            lambda: self._hessian(attn.o_proj.in_features, self._o_inputs),
            lambda: self._hessian(mlp.gate_proj.in_features, self._gate_up_inputs),
            lambda: self._hessian(mlp.down_proj.in_features, self._down_inputs),
        ]

    def outputs(self) -> torch.Tensor:
        """The layer's outputs with every group quantized: h + down(act(gate(n)) * up(n))."""
        del self.attention
        for rows, _ in self._batches():
            if self.intermediate is None:
                h, intermediate = self._intermediate(rows)
            else:
                h, intermediate = self.residual[rows].to(self.device), self.intermediate[rows].to(self.device)
            self.residual[rows] = (h + self.layer.mlp.down_proj(intermediate)).to(self.residual.device)
        self.intermediate = None
        return self.residual


def free_memory_bytes(device: torch.device) -> int:
    """What can still be allocated on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with suppress(OSError, ValueError, StopIteration):
        line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return 0


def _group_hessian(linear: nn.Linear, layer: nn.Module, hidden: torch.Tensor, runner: _LayerRunner, device) -> torch.Tensor:
    """H = 2/n * sum x x^T over every input token of `linear` (float32), the layer run until it."""
    total = _HessianSum(linear.in_features, device)

    def accumulate(_module, args):
        total.add(args[0])
        raise _StopForward

    handle = linear.register_forward_pre_hook(accumulate)
    try:
        with _exact_tf32(hidden.dtype):
            runner.forward(layer, hidden, device, stop_early=True)
    finally:
        handle.remove()
    return total.result()
