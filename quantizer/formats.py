"""The two checkpoint formats vLLM serves for weight-only GPTQ: the same codes and scales, two layouts.

- `gptq`: AutoGPTQ's layout (qweight packed along the input, scales, qzeros in the v1 convention,
  g_idx), `quant_method: gptq` in config.json (quantizer/packing.py, docs/development.md).
- `compressed-tensors`: llm-compressor's W4A16 "pack-quantized" layout (weight_packed packed along the
  input of each output row, weight_scale, weight_shape; weight_zero_point only for asymmetric grids),
  `quant_method: compressed-tensors` with its config groups and ignore list. The compressed-tensors
  library writes both the tensors (its PackedQuantizationCompressor, from our dequantized weight and
  our scales, so that it chooses the codes by its own rounding) and the config (its ModelCompressor);
  `layer_tensors` then reads the codes back and refuses a checkpoint whose codes are not ours.

vLLM routes both to the same mixed-precision kernels (Marlin, Machete, CPUWNA16), so they serve at the
same perplexity; what differs is who else reads them (Transformers' compressed-tensors integration,
GPTQModel, AutoGPTQ's successors).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import safe_open

from quantizer.contract import COMPRESSED_TENSORS_FORMAT, GPTQ_FORMAT
from quantizer.errors import InputError, require
from quantizer.families import family_of
from quantizer.gptq import QuantizedWeight, QuantRecipe
from quantizer.packing import dequantize_gptq, gptq_tensors

if TYPE_CHECKING:
    from quantizer.mixed import Plan

MIXED_NEEDS_COMPRESSED_TENSORS = (
    "mixed precision needs --format compressed-tensors: the GPTQ layout holds one scheme for the whole "
    "checkpoint (quantize_config.json), compressed-tensors one per config group")


@dataclass(frozen=True)
class Scheme:
    """What a checkpoint's config says about its quantized Linears, whatever the format."""

    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    desc_act: bool = False  # dynamic act-order (a permuted g_idx): what vLLM 0.32 refuses with groups


@dataclass(frozen=True)
class Header:
    """One tensor as its file's header describes it; `read` loads it."""

    file: Path
    name: str
    shape: list[int]
    dtype: str  # safetensors' names: I32, F16, BF16, ...

    def read(self) -> torch.Tensor:
        # Opened for this tensor alone: a handle kept open keeps every page read through it resident.
        with safe_open(self.file, framework="pt") as handle:
            return handle.get_tensor(self.name)


class CheckpointFormat:
    """One layout of the quantized Linears' tensors and its config.json entry."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]  # the tensors of one quantized Linear, by name suffix
    required: ClassVar[tuple[str, ...]]

    def write_config(self, directory: Path, config: dict, recipe: QuantRecipe, version: str,
                     plan: Plan | None = None) -> dict:
        """Write config.json (the source model's `config` with its `quantization_config`) and whatever
        else the format's loaders read; return the `quantization_config` written. `plan`: mixed
        precision (quantizer/mixed.py), the units it keeps finer or unquantized."""
        raise NotImplementedError

    def layer_tensors(self, qw: QuantizedWeight, recipe: QuantRecipe) -> dict[str, torch.Tensor]:
        """The tensors of one quantized Linear, by suffix, on the CPU."""
        raise NotImplementedError

    def scheme(self, qconfig: dict) -> Scheme:
        """The scheme every quantized Linear has unless the config names it in another one."""
        raise NotImplementedError

    def schemes(self, qconfig: dict) -> list[Scheme]:
        """Every scheme of the checkpoint (mixed precision: several)."""
        return [self.scheme(qconfig)]

    def scheme_for(self, qconfig: dict, layer: str) -> Scheme:
        """The scheme of one quantized Linear, by its checkpoint name."""
        return self.scheme(qconfig)

    def dequantize(self, parts: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
        """Weight [out, in] float32 from the stored tensors, read as written."""
        raise NotImplementedError

    def check_layer(self, layer: str, parts: dict[str, Header], scheme: Scheme) -> list[str]:
        """Problems of one Linear from its tensors' headers (reading only small tensors); [] when sound."""
        raise NotImplementedError

    def linear_shape(self, parts: dict[str, Header], scheme: Scheme) -> tuple[int, int]:
        """(out, in) of one Linear."""
        raise NotImplementedError

    def part(self, name: str) -> tuple[str, str] | None:
        """('model.layers.0.mlp.down_proj', 'qweight') for one of this format's tensors; else None."""
        for suffix in self.suffixes:
            if name.endswith("." + suffix):
                return name[: -len(suffix) - 1], suffix
        return None


def _check_groups(layer: str, k: int, scheme: Scheme) -> tuple[int | None, list[str]]:
    group = k if scheme.group_size == -1 else scheme.group_size
    if k % group:
        return None, [f"{layer}: in_features {k} not divisible by group_size {group}"]
    return group, []


class GptqFormat(CheckpointFormat):
    name = GPTQ_FORMAT
    suffixes = ("qweight", "scales", "qzeros", "g_idx")
    required = ("qweight", "scales", "qzeros")

    QUANTIZE_CONFIG_FILE = "quantize_config.json"

    def write_config(self, directory: Path, config: dict, recipe: QuantRecipe, version: str,
                     plan: Plan | None = None) -> dict:
        if plan is not None:
            raise InputError(MIXED_NEEDS_COMPRESSED_TENSORS)
        qconfig = self.config(recipe, version)
        # Both: vLLM detects the format from config.json, AutoGPTQ's successors read quantize_config.json.
        write_json(directory / "config.json", {**config, "quantization_config": qconfig})
        write_json(directory / self.QUANTIZE_CONFIG_FILE, qconfig)
        return qconfig

    def config(self, recipe: QuantRecipe, version: str) -> dict:
        # vLLM reads bits, group_size, desc_act and sym; the other keys document the recipe for others.
        return {
            "quant_method": "gptq",
            "bits": recipe.bits,
            "group_size": recipe.group_size,
            # Static and group-aware act-order keep g_idx trivial, which is what desc_act=false means to every loader.
            "desc_act": False,
            "sym": recipe.sym,
            "lm_head": False,
            "true_sequential": True,
            "damp_percent": recipe.damp,
            "checkpoint_format": "gptq",
            "meta": _provenance(recipe, version),
        }

    def layer_tensors(self, qw: QuantizedWeight, recipe: QuantRecipe) -> dict[str, torch.Tensor]:
        return gptq_tensors(qw, recipe.bits)

    def scheme(self, qconfig: dict) -> Scheme:
        missing = [key for key in ("bits", "group_size", "desc_act", "sym") if key not in qconfig]
        if missing:
            raise InputError(f"quantization_config lacks {', '.join(map(repr, missing))} (vLLM requires them)")
        return Scheme(int(qconfig["bits"]), int(qconfig["group_size"]), bool(qconfig["sym"]),
                      bool(qconfig["desc_act"]))

    def dequantize(self, parts: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
        parts = dict(parts)
        k = parts["qweight"].shape[0] * 32 // scheme.bits
        parts.setdefault("g_idx", torch.arange(k, dtype=torch.int32) // (k if scheme.group_size == -1
                                                                         else scheme.group_size))
        return dequantize_gptq(parts, scheme.bits)

    def linear_shape(self, parts: dict[str, Header], scheme: Scheme) -> tuple[int, int]:
        qweight = parts["qweight"].shape
        return qweight[1], qweight[0] * 32 // scheme.bits

    def check_layer(self, layer: str, parts: dict[str, Header], scheme: Scheme) -> list[str]:
        n, k = self.linear_shape(parts, scheme)
        qweight, scales, qzeros = parts["qweight"], parts["scales"], parts["qzeros"]
        problems = []
        if qweight.dtype != "I32" or qzeros.dtype != "I32":
            problems.append(f"{layer}: qweight/qzeros must be int32")
        if scales.dtype != "F16":
            problems.append(f"{layer}: scales must be float16, found {scales.dtype}")
        group, bad = _check_groups(layer, k, scheme)
        if group is None:
            return problems + bad
        if tuple(scales.shape) != (k // group, n):
            problems.append(f"{layer}: scales shape {tuple(scales.shape)} != {(k // group, n)}")
        pack = 32 // scheme.bits if 32 % scheme.bits == 0 else None
        if pack and tuple(qzeros.shape) != (k // group, n // pack):
            problems.append(f"{layer}: qzeros shape {tuple(qzeros.shape)} != {(k // group, n // pack)}")
        if "g_idx" in parts and not torch.equal(parts["g_idx"].read().to(torch.int32),
                                                torch.arange(k, dtype=torch.int32) // group):
            problems.append(f"{layer}: g_idx is not arange(in_features) // group_size; vLLM ignores g_idx and "
                            "would serve this layer with the wrong scales")
        return problems + _finite(layer, scales)


def unquantized_linears(config: dict) -> list[str]:
    """Linears besides lm_head that the model's family keeps unquantized (its routers)."""
    family = family_of(config.get("architectures") or [])
    return family.unquantized() if family else []


class CompressedTensorsFormat(CheckpointFormat):
    name = COMPRESSED_TENSORS_FORMAT
    suffixes = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    required = ("weight_packed", "weight_scale", "weight_shape")
    GROUP = "group_0"
    FINER_GROUP = "group_1"  # mixed precision: the units kept at the finer setting

    @staticmethod
    def _library() -> Any:
        return require("compressed_tensors", "--format compressed-tensors",
                       "pip install compressed-tensors; vLLM depends on it")

    def _scheme_object(self, recipe: QuantRecipe, targets: list[str] | None = None) -> Any:
        self._library()
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        per_row = recipe.group_size == -1
        weights = QuantizationArgs(
            num_bits=recipe.bits, type="int", symmetric=recipe.sym, dynamic=False,
            strategy="channel" if per_row else "group", group_size=None if per_row else recipe.group_size,
            # Static act-order ("weight"): columns solved in activation order, groups kept contiguous, so
            # no g_idx is stored; it is the only act-order vLLM serves without reordering.
            actorder="weight" if recipe.act_order else None,
            observer=None,
        )
        return QuantizationScheme(targets=targets or ["Linear"], weights=weights)

    def write_config(self, directory: Path, config: dict, recipe: QuantRecipe, version: str,
                     plan: Plan | None = None) -> dict:
        self._library()
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig

        groups = {self.GROUP: self._scheme_object(recipe)}
        ignore = ["lm_head", *unquantized_linears(config)]
        if plan is not None and plan.finer_units:
            if plan.finer is None:  # kept in the source dtype: named one by one, as vLLM's ignore matches
                ignore += [name for unit in plan.finer_units for name in unit.linears]
            else:  # listed after the default group; vLLM takes a target naming the layer first
                groups[self.FINER_GROUP] = self._scheme_object(plan.finer, [u.target for u in plan.finer_units])
        qconfig = QuantizationConfig(
            config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ignore,
        )
        write_json(directory / "config.json", {k: v for k, v in config.items() if k != "quantization_config"})
        # The library's own writer, as llm-compressor calls it after saving a model.
        ModelCompressor(quantization_config=qconfig).update_config(str(directory))
        written = json.loads((directory / "config.json").read_text())
        written["quantization_config"]["kubequant"] = _provenance(recipe, version, plan)  # ignored by loaders
        write_json(directory / "config.json", written)
        return written["quantization_config"]

    def layer_tensors(self, qw: QuantizedWeight, recipe: QuantRecipe) -> dict[str, torch.Tensor]:
        self._library()
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        scheme = self._scheme_object(recipe)
        offset = 2 ** (recipe.bits - 1)  # compressed-tensors' int grid is signed: code - 2^(bits-1)
        scales = qw.scales.to(torch.float16)
        state = {"weight": (scales.float().repeat_interleave(qw.group_size, dim=1)
                            * (qw.codes.float() - qw.zeros.repeat_interleave(qw.group_size, dim=1))),
                 "weight_scale": scales}
        if not recipe.sym:
            state["weight_zero_point"] = (qw.zeros - offset).to(torch.int8)
        compressed = PackedQuantizationCompressor.compress(state, scheme)
        written = unpack_from_int32(compressed["weight_packed"], recipe.bits, compressed["weight_shape"])
        if not torch.equal(written.to(torch.int32) + offset, qw.codes.to(torch.int32)):
            raise RuntimeError("compressed-tensors packed other codes than the quantizer chose; not writing it")
        return {name: tensor.cpu().contiguous() for name, tensor in compressed.items()}

    def _groups(self, qconfig: dict) -> list[tuple[list[str], Scheme]]:
        """Each config group's targets and scheme, in the config's order."""
        groups = qconfig.get("config_groups") or {}
        if not groups:
            raise InputError("compressed-tensors quantization_config has no config groups")
        if qconfig.get("format") != "pack-quantized":
            raise InputError(f"compressed-tensors format {qconfig.get('format')!r}: kubequant reads int "
                             "weight-only pack-quantized checkpoints")
        out = []
        for name, group in groups.items():
            weights = group.get("weights") or {}
            if weights.get("type", "int") != "int" or "num_bits" not in weights:
                raise InputError(f"compressed-tensors config group {name}: kubequant reads int weight-only groups")
            group_size = -1 if weights.get("strategy") == "channel" else int(weights.get("group_size") or -1)
            out.append((list(group.get("targets") or []), Scheme(
                int(weights["num_bits"]), group_size, bool(weights.get("symmetric", True)),
                weights.get("actorder") in ("group", "dynamic"))))
        return out

    def scheme(self, qconfig: dict) -> Scheme:
        groups = self._groups(qconfig)
        default = [scheme for targets, scheme in groups if "Linear" in targets]
        if len(groups) == 1 or len(default) == 1:
            return groups[0][1] if len(groups) == 1 else default[0]
        raise InputError(f"compressed-tensors quantization_config has {len(groups)} config groups and "
                         f"{len(default)} of them target every Linear; kubequant reads one default group")

    def schemes(self, qconfig: dict) -> list[Scheme]:
        return [scheme for _, scheme in self._groups(qconfig)]

    def scheme_for(self, qconfig: dict, layer: str) -> Scheme:
        """vLLM's order (compressed_tensors.utils.find_matched_target): a target naming the layer, exactly
        or as a `re:` regex, in the config's order; else the group that targets every Linear. A layer of
        a fused module (q/k/v, gate/up) is named by its own Linear's name here, as the checkpoint has it:
        vLLM matches a fused module only when every part is named by the same target."""
        groups = self._groups(qconfig)
        for targets, scheme in groups:
            if any(_names(target, layer) for target in targets):
                return scheme
        return self.scheme(qconfig)

    def dequantize(self, parts: dict[str, torch.Tensor], scheme: Scheme) -> torch.Tensor:
        self._library()
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        n, k = (int(v) for v in parts["weight_shape"])
        codes = unpack_from_int32(parts["weight_packed"], scheme.bits, torch.Size([n, k])).float()
        scales = parts["weight_scale"].float()
        group = k // scales.shape[1]
        zeros = torch.zeros_like(scales)
        if "weight_zero_point" in parts:
            zeros = unpack_from_int32(parts["weight_zero_point"], scheme.bits, torch.Size(scales.shape),
                                      packed_dim=0).float()
        return (codes - zeros.repeat_interleave(group, dim=1)) * scales.repeat_interleave(group, dim=1)

    def linear_shape(self, parts: dict[str, Header], scheme: Scheme) -> tuple[int, int]:
        n, k = (int(v) for v in parts["weight_shape"].read())
        return n, k

    def check_layer(self, layer: str, parts: dict[str, Header], scheme: Scheme) -> list[str]:
        packed, scale = parts["weight_packed"], parts["weight_scale"]
        if tuple(parts["weight_shape"].shape) != (2,):
            return [f"{layer}: weight_shape must hold [out, in]"]
        n, k = self.linear_shape(parts, scheme)
        problems = []
        per_word = 32 // scheme.bits
        if packed.dtype != "I32" or tuple(packed.shape) != (n, -(-k // per_word)):
            problems.append(f"{layer}: weight_packed must be int32 {[n, -(-k // per_word)]}, found "
                            f"{packed.dtype} {packed.shape}")
        if scale.dtype not in ("F16", "BF16"):
            problems.append(f"{layer}: weight_scale must be float16 or bfloat16, found {scale.dtype}")
        group, bad = _check_groups(layer, k, scheme)
        if group is None:
            return problems + bad
        if tuple(scale.shape) != (n, k // group):
            problems.append(f"{layer}: weight_scale shape {tuple(scale.shape)} != {(n, k // group)}")
        if not scheme.sym and "weight_zero_point" not in parts:
            problems.append(f"{layer}: an asymmetric scheme needs weight_zero_point")
        return problems + _finite(layer, scale)


def _names(target: str, layer: str) -> bool:
    """Whether a compressed-tensors target names a layer: exactly, or as a `re:` regex matched from its start."""
    if target.startswith("re:"):
        return re.match(target[3:], layer) is not None
    return target == layer


def _provenance(recipe: QuantRecipe, version: str, plan: Plan | None = None) -> dict:
    out = {"quantizer": [f"kubequant:{version}"], "act_order": recipe.order,
           "scales": recipe.scale_search + (", full-range" if recipe.full_range and recipe.sym else ""),
           "refine_sweeps": recipe.refine_sweeps, "source_targets": recipe.source_targets}
    if plan is not None:
        out["mixed_precision"] = {**plan.mixed.to_dict(), "finer_units": [u.name for u in plan.finer_units]}
    return out


def _finite(layer: str, scales: Header) -> list[str]:
    return [] if torch.isfinite(scales.read().float()).all() else [f"{layer}: scales hold NaN or inf"]


def write_json(path: Path, data: dict) -> None:
    """The checkpoint's JSON files (configs, index, manifest, the partial output's records)."""
    path.write_text(json.dumps(data, indent=2) + "\n")


FORMATS: dict[str, CheckpointFormat] = {f.name: f for f in (CompressedTensorsFormat(), GptqFormat())}
QUANT_METHODS = {"gptq": GPTQ_FORMAT, "compressed-tensors": COMPRESSED_TENSORS_FORMAT}


def checkpoint_format(name: str) -> CheckpointFormat:
    if name not in FORMATS:
        raise InputError(f"--format {name}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(qconfig: dict | None) -> CheckpointFormat:
    """The format of a checkpoint from its config.json `quantization_config`."""
    method = (qconfig or {}).get("quant_method")
    if method not in QUANT_METHODS:
        raise InputError(f"quantization_config.quant_method {method!r}: not a checkpoint kubequant reads "
                         f"(one of {', '.join(QUANT_METHODS)})")
    return FORMATS[QUANT_METHODS[method]]
