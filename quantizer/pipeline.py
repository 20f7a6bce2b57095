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

import copy
import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from quantizer.contract import DEFAULT_EXPERT_CALIBRATION, EXPERT_CALIBRATIONS
from quantizer.errors import InputError
from quantizer.experts import ExpertLinears, expert_modules, unfuse_experts
from quantizer.families import SUPPORTED_ARCHITECTURES, Family, family_of, matches
from quantizer.gptq import QuantizedWeight, QuantRecipe, default_block_solver, gptq_quantize, rtn_quantize
from quantizer.perplexity import Comparison, EvalWindows, initialize_buffers, window_comparison

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
    patterns = [family.checkpoint_name(linear) for linear in family.linears]
    for name in checkpoint.names():
        if not (name.endswith(".weight") and any(matches(name.removesuffix(".weight"), p) for p in patterns)):
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


def read_module_tensors(module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint,
                        checkpoint_name: Callable[[str], str] = str) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers from the checkpoint (each module path named as the checkpoint
    names it by `checkpoint_name`), in host memory and the source dtype, keyed by module path."""
    state = {}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        key = checkpoint_name(f"{prefix}{name}")
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

    def __init__(self, layers: nn.ModuleList, layers_name: str, checkpoint: SafetensorsCheckpoint,
                 checkpoint_name: Callable[[str], str] = str):
        self._layers, self._layers_name, self._checkpoint = layers, layers_name, checkpoint
        self._checkpoint_name = checkpoint_name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kq-prefetch")
        self._pending: dict[int, Future] = {}

    def _request(self, index: int) -> None:
        if index < len(self._layers) and index not in self._pending:
            prefix = f"{self._layers_name}.{index}."
            self._pending[index] = self._pool.submit(read_module_tensors, self._layers[index], prefix, self._checkpoint,
                                                     self._checkpoint_name)

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
    # The fake-quant model against the source on the evaluation windows (perplexity.Comparison).
    fakequant_kl: float | None = None
    fakequant_top1: float | None = None
    # After each quantized layer: the evaluation stream's relative distance to the source's (drift()).
    eval_drift: list[float] = field(default_factory=list)
    eval_tokens: int = 0
    eval_windows: int = 0
    solver: str = ""
    resumed_layers: int = 0
    # Mixture-of-experts blocks: {experts module (checkpoint name): calibration tokens the router sent
    # to each expert}, and how the experts' Hessians were taken (EXPERT_CALIBRATIONS).
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    expert_calibration: str = ""

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
RecipeFor = Callable[[str], QuantRecipe | None]  # a Linear's checkpoint name -> its recipe (None: unquantized)


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

    def drift(self) -> float:
        """||h_quantized - h_source||^2 / ||h_source||^2 of the hidden states after the layers so far:
        how the quantized model's error grows with depth."""
        difference = energy = 0.0
        for quantized, source in zip(self.fakequant, self.baseline, strict=True):  # a window at a time
            source = source.float()
            difference += float((quantized.float() - source).square().sum())
            energy += float(source.square().sum())
        return difference / max(energy, 1e-30)

    def compare(self, norm: nn.Module, lm_head: nn.Module) -> Comparison:
        """Perplexity of both streams, and how far the fake-quant model's next-token distributions are
        from the source's, over the windows' scored tokens (one batch of logits of each at a time)."""
        batches = []
        for start in range(0, len(self.windows), self.batch_size):
            logits = [lm_head(norm(stream[start : start + self.batch_size].to(self.device)))
                      for stream in (self.baseline, self.fakequant)]
            batches.append(window_comparison(*logits, self.windows.ids[start : start + self.batch_size].to(self.device),
                                             self.windows.score_from[start : start + self.batch_size]))
        return Comparison.of(batches, self.windows.tokens_scored)


@dataclass
class OpenModel:
    """The source model built on the meta device with everything outside its decoder layers loaded (the
    layers are materialized one at a time: LayerPrefetcher, materialized)."""

    model: nn.Module
    layers_name: str
    layers: nn.ModuleList
    base: nn.Module  # the decoder: embed_tokens, layers, norm
    lm_head: nn.Module
    experts: bool  # its fused experts were replaced by one Linear per expert


def open_model(source: SourceModel, device: torch.device, compute_dtype: torch.dtype) -> OpenModel:
    from transformers import AutoModelForCausalLM

    config, checkpoint = source.config, source.weights
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    model.eval()
    layers_name, layers = find_decoder_layers(model, config.num_hidden_layers)
    experts = unfuse_experts(layers, source.family.experts)
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
    return OpenModel(model, layers_name, layers, base, lm_head, bool(experts))


def layer_linears(layer: nn.Module, family: Family) -> dict[str, nn.Linear]:
    """A decoder layer's Linears that the family quantizes (not its router), by module path in the layer."""
    return {name: module for name, module in layer.named_modules()
            if isinstance(module, nn.Linear) and any(matches(name, p) for p in family.linears)}


def linear_shapes(layers_name: str, layers: nn.ModuleList, family: Family) -> dict[str, tuple[int, int]]:
    """Every quantized Linear of the decoder layers (checkpoint names) and its [out, in] shape."""
    return {family.checkpoint_name(f"{layers_name}.{index}.{name}"): tuple(module.weight.shape)
            for index, layer in enumerate(layers) for name, module in layer_linears(layer, family).items()}


def decoder_linears(source: SourceModel) -> dict[str, tuple[int, int]]:
    """linear_shapes() of the model built on the meta device (nothing is read): what the layer pipeline
    will quantize."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config)
    layers_name, layers = find_decoder_layers(model, source.config.num_hidden_layers)
    unfuse_experts(layers, source.family.experts)
    return linear_shapes(layers_name, layers, source.family)


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
    expert_calibration: str = DEFAULT_EXPERT_CALIBRATION,
    recipe_for: RecipeFor | None = None,
    stage: str = "quantize",
) -> PipelineResult:
    """Quantize every decoder Linear of the source model; hand each finished layer to sink. With
    `resumed`, its layers are not quantized again: their stored weights replace the originals and the
    calibration and evaluation streams run through them (a forward pass only), so that the next layer
    sees the inputs an uninterrupted run would have given it. `expert_calibration` (mixture-of-experts
    models): "routed" takes each expert's Hessians from the tokens its router sends it (an expert that
    sees none is rounded to nearest), "all" from every calibration token, "auto" routed where enough
    tokens reached the expert (_expert_hessians, quantizer/experts.py). `recipe_for` gives a Linear (by its
    checkpoint name) its own recipe, None keeping it in the source dtype (mixed precision, quantizer/mixed.py);
    without it every Linear has `recipe`. `stage` names the pass in the progress bar."""

    if expert_calibration not in EXPERT_CALIBRATIONS:
        raise InputError(f"expert calibration {expert_calibration!r}: use one of {', '.join(EXPERT_CALIBRATIONS)}")

    config, checkpoint = source.config, source.weights
    dtype = source_dtype(config, checkpoint)
    # fp16/bf16 matmuls are slow and less exact on CPUs; GPUs run the source dtype.
    compute_dtype = dtype if device.type == "cuda" else torch.float32
    store_device = torch.device("cpu") if offload_activations else device
    result = PipelineResult()
    result.solver, block_solver = ("rtn", None) if method == "rtn" else default_block_solver(device, solver)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    opened = open_model(source, device, compute_dtype)
    model, layers_name, layers, base, lm_head = (opened.model, opened.layers_name, opened.layers, opened.base,
                                                 opened.lm_head)
    family = source.family
    if opened.experts:
        result.expert_calibration = expert_calibration

    evaluation: EvalStreams | None = None
    with torch.no_grad(), _timed(result, "forward", device):
        hidden, layer_kwargs = _capture_layer0_inputs(model, layers, calibration_windows, device, store_device)
        runner = _LayerRunner(layer_kwargs, batch_size)
        targets = SourceTargets(hidden.clone(), recipe.source_targets) \
            if method == "gptq" and recipe.source_targets else None
        if eval_windows is not None:
            evaluation = EvalStreams(model, layers, eval_windows, device, store_device, batch_size)

    bar = tqdm(range(len(layers)), desc=stage, unit="layer", disable=not progress)
    prefetcher = LayerPrefetcher(layers, layers_name, checkpoint, family.checkpoint_name)
    try:
        for index in bar:
            layer_start = time.perf_counter()
            prefix = f"{layers_name}.{index}."
            layer = layers[index]
            state = prefetcher.take(index)
            if resumed is not None and index < resumed.layers:
                with torch.no_grad(), materialized(layer, state, device, compute_dtype):
                    if targets is not None:
                        targets.hidden = runner.forward(layer, targets.hidden, device)
                    hidden = _replay_layer(layer, prefix, index, resumed, hidden, runner, evaluation, device, result,
                                           family)
                result.resumed_layers += 1
                result.layer_seconds.append(time.perf_counter() - layer_start)
                continue
            with torch.no_grad(), materialized(layer, state, device, compute_dtype):
                if evaluation is not None:
                    with _timed(result, "evaluate", device):
                        evaluation.through_original(layer)
                with targets.unquantized_copy(layer, runner) if targets is not None else nullcontext() as original:
                    quantized, outputs = _quantize_layer(
                        layer, prefix, family, recipe, method, block_solver, hidden, runner, device, result,
                        quantize_matrix, expert_calibration, targets, original, recipe_for,
                    )
                if outputs is None:
                    with _timed(result, "forward", device):
                        outputs = runner.forward(layer, hidden, device)
                hidden = outputs
                if evaluation is not None:
                    with _timed(result, "evaluate", device):
                        evaluation.through_quantized(layer)
                        result.eval_drift.append(evaluation.drift())
                written = {f"{name}.weight" for name in quantized}
                others = {
                    family.checkpoint_name(f"{prefix}{name}"): tensor
                    for name, tensor in state.items()
                    if family.checkpoint_name(name) not in written
                }
            with _timed(result, "pack_write", torch.device("cpu")):
                sink(prefix, quantized, others)
            seconds = time.perf_counter() - layer_start
            result.layer_seconds.append(seconds)
            if quantized:
                worst = max(s.relative_error for s in result.linears[-len(quantized) :])
                bar.set_postfix(seconds=f"{seconds:.1f}", worst_rel_err=f"{worst:.2e}")
            # Let this layer's results and source tensors go before the next layer's arrive: held until
            # the names are bound again, they would double the peak (a Qwen3-30B-A3B layer's codes and
            # dequantized weights alone are about 5 GB on the CPU).
            del quantized, others, state, outputs
    finally:
        prefetcher.close()

    if evaluation is not None:
        with torch.no_grad(), _timed(result, "evaluate", device):
            comparison = evaluation.compare(base.norm, lm_head)
        result.baseline_ppl, result.fakequant_ppl = comparison.baseline_ppl, comparison.quantized_ppl
        result.fakequant_kl, result.fakequant_top1 = comparison.kl, comparison.top1
        result.eval_tokens = evaluation.windows.tokens_scored
        result.eval_windows = len(evaluation.windows)

    result.peak_host_bytes = peak_host_bytes()
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _replay_layer(layer: nn.Module, prefix: str, index: int, resumed: Resumed, hidden: torch.Tensor,
                  runner: _LayerRunner, evaluation: EvalStreams | None, device, result: PipelineResult,
                  family: Family) -> torch.Tensor:
    """A finished layer of a previous run: its stored weights in place of the originals, the streams
    through it. Returns the next layer's calibration inputs."""
    with _timed(result, "resume", device):
        if evaluation is not None:
            evaluation.through_original(layer)
        stats = resumed.stats(index)
        for name, weight in resumed.weights(index).items():
            linear = layer.get_submodule(family.module_name(name))
            linear.weight.data = weight.to(device=linear.weight.device, dtype=linear.weight.dtype)
            result.linears.append(LinearStats(name=prefix + name, shape=tuple(linear.weight.shape),
                                              relative_error=stats[name]["relative_error"],
                                              damp=stats[name]["damp"], seconds=0.0))
        hidden = runner.forward(layer, hidden, device)
        if evaluation is not None:
            evaluation.through_quantized(layer)
            result.eval_drift.append(evaluation.drift())
    return hidden


@dataclass
class SourceTargets:
    """Targets from the unquantized model (GPTAQ's asymmetric calibration). Plain GPTQ makes each
    Linear reproduce its own outputs on the inputs it gets through the layers already quantized, X:
    min ||X Q^T - X W^T||. Those inputs have drifted from the unquantized model's, X_s; what the next
    layers need is the unquantized model's outputs: min ||X Q^T - X_s W^T||. Its unconstrained
    solution is W* = W + W D H^-1, D = 2/n (X_s - X)^T X (the drift term), so GPTQ on the target
    W + strength * W D (H + damp)^-1 with the same H solves it; 0 is plain GPTQ, 1 the whole
    correction. `hidden` is the calibration windows' hidden states in the unquantized model."""

    hidden: torch.Tensor
    strength: float

    def target(self, weight: torch.Tensor, hessian: torch.Tensor, drift: torch.Tensor, damp: float) -> torch.Tensor:
        damped = hessian + damp * torch.diagonal(hessian).mean() * torch.eye(hessian.shape[0], device=hessian.device)
        w = weight.to(hessian.dtype)
        correction = torch.linalg.solve(damped, (w @ drift).t()).t()
        return (w + self.strength * correction).to(weight.dtype)

    @contextmanager
    def unquantized_copy(self, layer: nn.Module, runner: _LayerRunner) -> Iterator[nn.Module]:
        """The layer as it is before any of its groups is quantized, run with the layer's own kwargs."""
        original = copy.deepcopy(layer)
        runner.kwargs_by_layer[id(original)] = runner.kwargs_for(layer)
        try:
            yield original
        finally:
            del runner.kwargs_by_layer[id(original)]


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
    expert_calibration: str = DEFAULT_EXPERT_CALIBRATION,
    targets: SourceTargets | None = None,
    original: nn.Module | None = None,
    recipe_for: RecipeFor | None = None,
) -> tuple[dict[str, QuantizedWeight], torch.Tensor | None]:
    """The layer's Linears quantized group by group (true-sequential: each group's Hessian comes from
    inputs through the groups already quantized). Returns them (by checkpoint name) and, when the
    staged forward ran, the layer's outputs (the next layer's inputs); None means the caller runs the
    layer once more. With `targets` (and `original`, the layer before quantization), each group's
    target comes from the unquantized model's inputs (SourceTargets), and targets.hidden moves on
    through the unquantized layer."""
    modules = dict(layer.named_modules())
    groups = layer_groups(family, {name for name, m in modules.items() if isinstance(m, nn.Linear)}, prefix)
    quantized: dict[str, QuantizedWeight] = {}

    def quantize_group(group: tuple[str, ...], hessian: torch.Tensor | None, drift: torch.Tensor | None = None) -> None:
        for name in group:
            linear = modules[name]
            checkpoint_name = family.checkpoint_name(name)
            own = recipe if recipe_for is None else recipe_for(prefix + checkpoint_name)
            if own is None:  # kept in the source dtype: its weight goes to the sink with the layer's others
                continue
            start = time.perf_counter()
            with _timed(result, "solve", device):
                if method == "rtn" or hessian is None:
                    qw = rtn_quantize(linear.weight.data, own, name=prefix + checkpoint_name)
                else:
                    weight = linear.weight.data
                    if drift is not None:
                        weight = targets.target(weight, hessian, drift, own.damp)
                    qw = quantize_matrix(weight, hessian, own, name=prefix + checkpoint_name,
                                         block_solver=block_solver)
                linear.weight.data = qw.dequantized.to(linear.weight.dtype)
            quantized[checkpoint_name] = qw
            result.linears.append(LinearStats(name=prefix + checkpoint_name, shape=tuple(linear.weight.shape),
                                              relative_error=qw.relative_error, damp=qw.damp,
                                              seconds=time.perf_counter() - start))

    if method == "gptq" and family.staged and StagedDecoderLayer.fits(layer) and len(groups) == len(family.groups):
        staged = StagedDecoderLayer(layer, hidden, runner, device)
        if targets is not None:
            source = StagedDecoderLayer(original, targets.hidden, runner, device)
            for (group,), stage in zip(groups, staged.stages_against(source), strict=True):
                with _timed(result, "forward", device):
                    hessian, drift = stage()
                quantize_group(group, hessian, drift)
                del hessian, drift
            with _timed(result, "forward", device):
                targets.hidden = source.outputs()
                return quantized, staged.outputs()
        for (group,), hessian_of in zip(groups, staged.stages(), strict=True):
            with _timed(result, "forward", device):
                hessian = hessian_of()
            quantize_group(group, hessian)
            del hessian
        with _timed(result, "forward", device):
            return quantized, staged.outputs()
    experts = expert_modules(layer)
    counts: dict[int, torch.Tensor] | None = None
    for subgroups in groups:
        if method != "gptq":
            hessians: list[torch.Tensor | None] = [None] * len(subgroups)
        elif len(subgroups) == 1 and targets is not None:
            with _timed(result, "forward", device):
                hessian, drift = _group_hessian_against(subgroups[0][0], layer, original, hidden, targets.hidden,
                                                        runner, device)
            quantize_group(subgroups[0], hessian, drift)
            del hessian, drift
            continue
        elif len(subgroups) == 1:
            with _timed(result, "forward", device):
                hessians = [_group_hessian(modules[subgroups[0][0]], layer, hidden, runner, device)]
        else:
            with _timed(result, "forward", device):
                if counts is None:  # the router's choices, the same for every group of the layer
                    counts = route_counts(layer, experts, hidden, runner, device)
                    for block in experts:
                        path = next(n for n, m in modules.items() if m is block)
                        result.expert_tokens[prefix + family.checkpoint_name(path)] = counts[id(block)].tolist()
                if targets is None or expert_calibration == "routed":  # routed experts pair no tokens
                    hessians = _expert_hessians(layer, [modules[group[0]] for group in subgroups], experts, hidden,
                                                runner, device, expert_calibration, counts)
                else:
                    hessians, drifts = _expert_hessians_against(
                        layer, original, [group[0] for group in subgroups], hidden, targets.hidden, runner, device,
                        expert_calibration, counts)
                    for group, hessian, drift in zip(subgroups, hessians, drifts, strict=True):
                        quantize_group(group, hessian, drift)
                    del hessians, drifts
                    continue
        for group, hessian in zip(subgroups, hessians, strict=True):
            quantize_group(group, hessian)
        del hessians
    if targets is not None:
        with _timed(result, "forward", device):
            targets.hidden = runner.forward(original, targets.hidden, device)
    return quantized, None


def layer_groups(family: Family, linears: set[str], prefix: str = "") -> list[list[tuple[str, ...]]]:
    """The family's groups as this layer has them, in execution order: each a list of Linear groups
    that read one input (one per expert for a `*` group, one otherwise). Every Linear of the layer
    must be in exactly one group."""
    resolved: list[list[tuple[str, ...]]] = []
    for patterns in family.groups:
        if "*" not in "".join(patterns):
            present = [name in linears for name in patterns]
            if all(present):
                resolved.append([patterns])
            elif any(present):
                raise InputError(f"{prefix}: has {[n for n in patterns if n in linears]} but not "
                                 f"{[n for n in patterns if n not in linears]} of the {family.name} layout")
            continue
        head, _, tail = patterns[0].partition("*")
        indices = sorted({int(name[len(head):-len(tail)]) for name in linears
                          if name.startswith(head) and name.endswith(tail) and name[len(head):-len(tail)].isdigit()})
        if indices:
            resolved.append([tuple(p.replace("*", str(i)) for p in patterns) for i in indices])
    covered = {name for subgroups in resolved for group in subgroups for name in group}
    if covered != linears:
        raise InputError(
            f"{prefix}: Linear layers {sorted(linears - covered) or sorted(covered - linears)} do not fit the "
            f"{family.name} layout {sorted(family.linears)}"
        )
    return resolved


def route_counts(layer: nn.Module, experts: list[ExpertLinears], hidden: torch.Tensor, runner: _LayerRunner,
                 device) -> dict[int, torch.Tensor]:
    """{id(block): calibration tokens its router sends each expert}, from a pass of the layer that
    stops where the experts would start (they are called with the router's top-k choices)."""
    counts = {id(block): torch.zeros(len(block), dtype=torch.int64) for block in experts}

    def count(block, args):
        counts[id(block)] += torch.bincount(args[1].flatten().cpu(), minlength=len(block))[: len(block)]
        raise _StopForward

    handles = [block.register_forward_pre_hook(count) for block in experts]
    try:
        runner.forward(layer, hidden, device, stop_early=True)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _expert_hessians(layer: nn.Module, firsts: list[nn.Linear], experts: list[ExpertLinears], hidden: torch.Tensor,
                     runner: _LayerRunner, device, expert_calibration: str,
                     counts: dict[int, torch.Tensor]) -> list[torch.Tensor | None]:
    """One Hessian per expert (the inputs of its Linear in `firsts`, one per expert in block order)
    from one pass of the layer, which stops once the experts have run (EXPERT_CALIBRATIONS): "routed",
    from the tokens the router sends the expert (None for an expert that saw none); "all", from every
    token; "auto", routed where the expert saw at least as many tokens as the Linear has inputs (a
    Hessian of full rank is possible), all where it saw fewer. The block's output follows the router
    in every mode."""
    totals = [_HessianSum(linear.in_features, device) for linear in firsts]
    handles = [linear.register_forward_pre_hook(lambda _m, args, total=total: total.add(args[0]))
               for linear, total in zip(firsts, totals, strict=True)]

    def stop(_module, _args, _output):
        raise _StopForward

    handles += [block.register_forward_hook(stop) for block in experts]
    for block in experts:
        block.calibrate_all = _calibrate_all(expert_calibration, counts[id(block)], firsts[0].in_features)
    try:
        with _exact_tf32(hidden.dtype):
            runner.forward(layer, hidden, device, stop_early=True)
    finally:
        for handle in handles:
            handle.remove()
        for block in experts:
            block.calibrate_all = None
    return [total.result() if total.count else None for total in totals]


def _calibrate_all(expert_calibration: str, routed: torch.Tensor, inputs: int) -> torch.Tensor:
    """Which experts run every calibration token for the Hessians (EXPERT_CALIBRATIONS)."""
    return {"routed": torch.zeros_like(routed, dtype=torch.bool), "all": torch.ones_like(routed, dtype=torch.bool),
            "auto": routed < inputs}[expert_calibration]


def _expert_hessians_against(layer: nn.Module, original: nn.Module, names: list[str], hidden: torch.Tensor,
                             source_hidden: torch.Tensor, runner: _LayerRunner, device, expert_calibration: str,
                             counts: dict[int, torch.Tensor]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
    """_expert_hessians' Hessians for the Linears `names` (one per expert, in block order), and each
    expert's drift term (SourceTargets) where it runs every calibration token: there the quantized
    layer and `original` (on the unquantized model's hidden states) give it the same tokens, paired
    row by row once sorted by token. An expert that runs only its routed tokens gets None: the router
    chooses differently in the two passes."""
    experts, source_experts = expert_modules(layer), expert_modules(original)
    columns = layer.get_submodule(names[0]).in_features
    hessians = [_HessianSum(columns, device) for _ in names]
    drifts = [_HessianSum(columns, device) for _ in names]
    for block, source_block in zip(experts, source_experts, strict=True):
        block.calibrate_all = source_block.calibrate_all = _calibrate_all(expert_calibration, counts[id(block)], columns)
    owners = _expert_owners(experts)
    paired = [bool(block.calibrate_all[index]) for block, index in (owners[id(layer.get_submodule(n))] for n in names)]
    captured: list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = [{}, {}]

    def hooks(module: nn.Module, blocks: list[ExpertLinears], into: dict) -> list:
        def capture(position: int, block: ExpertLinears):
            def hook(_module, args):
                into.setdefault(position, []).append((block.running_tokens, args[0].reshape(-1, columns).float()))
            return hook

        def stop(_module, _args, _output):
            raise _StopForward

        owner = _expert_owners(blocks)
        handles = [module.get_submodule(name).register_forward_pre_hook(capture(position, owner[id(module.get_submodule(name))][0]))
                   for position, name in enumerate(names)]
        return handles + [block.register_forward_hook(stop) for block in blocks]

    handles = hooks(layer, experts, captured[0]) + hooks(original, source_experts, captured[1])
    try:
        for _ in _paired_batches(layer, original, hidden, source_hidden, runner, device):
            mine, theirs = captured
            for position in mine:
                tokens, x = (torch.cat(parts) for parts in zip(*mine[position], strict=True))
                if not paired[position]:
                    hessians[position].add(x)
                    continue
                x = x[tokens.argsort()]
                source_tokens, x_source = (torch.cat(parts) for parts in zip(*theirs[position], strict=True))
                x_source = x_source[source_tokens.argsort()]
                hessians[position].add(x)
                drifts[position].add(x_source - x, x)
            mine.clear()
            theirs.clear()
    finally:
        for handle in handles:
            handle.remove()
        for block in (*experts, *source_experts):
            block.calibrate_all = block.running_tokens = None
    return ([h.result() if h.count else None for h in hessians],
            [d.result() if paired[i] and d.count else None for i, d in enumerate(drifts)])


def _expert_owners(blocks: list[ExpertLinears]) -> dict[int, tuple[ExpertLinears, int]]:
    """{id(module): (its experts block, the expert's index)} for every module inside an expert."""
    return {id(m): (block, index) for block in blocks for index, expert in enumerate(block) for m in expert.modules()}


class _HessianSum:
    """H = 2/n * sum x x^T over the rows x of every batch added (float32)."""

    def __init__(self, columns: int, device):
        self.hessian = torch.zeros(columns, columns, device=device, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add x^T x, or x^T y (a cross term, y's rows the same tokens as x's)."""
        x = x.reshape(-1, self.hessian.shape[0]).float()
        y = x if y is None else y.reshape(-1, self.hessian.shape[1]).float()
        self.hessian.addmm_(x.t(), y)
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

    def _stage_inputs(self) -> list[tuple[int, Callable[[slice, torch.Tensor], torch.Tensor]]]:
        """Each group's input width and how a batch's inputs are computed, in Llama's order (families.LLAMA)."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        return [(attn.q_proj.in_features, self._qkv_inputs), (attn.o_proj.in_features, self._o_inputs),
                (mlp.gate_proj.in_features, self._gate_up_inputs), (mlp.down_proj.in_features, self._down_inputs)]

    def stages(self) -> list[Callable[[], torch.Tensor]]:
        """One Hessian per group of Llama's layout (families.LLAMA), each called once the groups before it are
        quantized (the layer's weights then hold their dequantized values)."""
        return [lambda columns=columns, inputs=inputs: self._hessian(columns, inputs)
                for columns, inputs in self._stage_inputs()]

    def stages_against(self, source: StagedDecoderLayer) -> list[Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
        """Per group, H = 2/n X^T X and the drift term 2/n (X_source - X)^T X: X are the group's inputs
        here (through the layers and groups already quantized), X_source the same Linear's inputs in
        `source`, the unquantized layer run on the unquantized model's hidden states (batch for batch
        the same tokens). Each call runs one stage of both layers."""

        def stage(columns: int, inputs, source_inputs) -> tuple[torch.Tensor, torch.Tensor]:
            hessian, drift = _HessianSum(columns, self.device), _HessianSum(columns, self.device)
            with _exact_tf32(self.hidden.dtype):
                for (rows, x), (_, x_source) in zip(self._batches(), source._batches(), strict=True):
                    mine = inputs(rows, x).reshape(-1, columns).float()
                    theirs = source_inputs(rows, x_source).reshape(-1, columns).float()
                    hessian.add(mine)
                    drift.add(theirs - mine, mine)
            return hessian.result(), drift.result()

        return [lambda c=c, i=i, si=si: stage(c, i, si)
                for (c, i), (_, si) in zip(self._stage_inputs(), source._stage_inputs(), strict=True)]

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


def _group_hessian_against(name: str, layer: nn.Module, original: nn.Module, hidden: torch.Tensor,
                           source_hidden: torch.Tensor, runner: _LayerRunner, device) -> tuple[torch.Tensor, torch.Tensor]:
    """_group_hessian's H for the Linear `name` of `layer`, and the drift term 2/n (X_source - X)^T X
    with X_source its inputs in `original` on the unquantized model's hidden states (SourceTargets)."""
    columns = layer.get_submodule(name).in_features
    hessian, drift = _HessianSum(columns, device), _HessianSum(columns, device)
    captured: list[torch.Tensor] = []

    def capture(_module, args):
        captured.append(args[0].reshape(-1, columns).float())
        raise _StopForward

    handles = [module.get_submodule(name).register_forward_pre_hook(capture) for module in (layer, original)]
    try:
        for _ in _paired_batches(layer, original, hidden, source_hidden, runner, device):
            mine, theirs = captured
            captured.clear()
            hessian.add(mine)
            drift.add(theirs - mine, mine)
    finally:
        for handle in handles:
            handle.remove()
    return hessian.result(), drift.result()


def _paired_batches(layer: nn.Module, original: nn.Module, hidden: torch.Tensor, source_hidden: torch.Tensor,
                    runner: _LayerRunner, device) -> Iterator[None]:
    """Batch for batch, `layer` on `hidden` and then `original` on the same rows of `source_hidden`, each
    until a hook stops it (_StopForward); yields once both have run, their hooks having captured the
    inputs of the two passes (SourceTargets)."""
    with _exact_tf32(hidden.dtype):
        for start in range(0, hidden.shape[0], runner.batch_size):
            rows = slice(start, start + runner.batch_size)
            for module, states in ((layer, hidden), (original, source_hidden)):
                with suppress(_StopForward):
                    module(states[rows].to(device), **runner.kwargs_for(layer))
            yield
