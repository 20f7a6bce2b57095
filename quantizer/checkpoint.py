"""The GPTQ checkpoint vLLM 0.32 serves as it is, written atomically, and its verification.

Layout and dtypes follow docs/development.md ("The checkpoint contract"). The checkpoint is assembled in a
hidden temporary directory next to the target and renamed into place only when it is complete and
verified, so a failure never leaves a half-written model where a server could pick it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantizer.contract import unservable_reasons
from quantizer.errors import InputError
from quantizer.gptq import QuantizedWeight, QuantRecipe
from quantizer.packing import gptq_tensors

# The writer holds a shard in host memory until it is written (safetensors writes a file at once),
# so this bounds the writer's memory whatever the model's size: 1 GB, not the Hub's usual 5 GB.
MAX_SHARD_BYTES = 10**9
INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "kubequant.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
# Files besides the weights that a server or a client needs from the source model.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)
GPTQ_SUFFIXES = (".qweight", ".scales", ".qzeros", ".g_idx")


class CheckpointError(ValueError):
    """A checkpoint that breaks the contract vLLM relies on."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def quantization_config(recipe: QuantRecipe, version: str) -> dict:
    """The dict vLLM reads from config.json; the keys it ignores document the recipe for others."""
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
        "meta": {"quantizer": [f"kubequant:{version}"], "act_order": recipe.order,
                 "scales": recipe.scale_search + (", full-range" if recipe.full_range and recipe.sym else ""),
                 "refine_sweeps": recipe.refine_sweeps},
    }


class CheckpointWriter:
    """Streams tensors into safetensors shards in a temporary directory; `commit` renames it into place."""

    def __init__(
        self, output: Path, recipe: QuantRecipe, max_shard_bytes: int | None = None, overwrite: bool = False
    ):
        self.output = output
        self.recipe = recipe
        self.max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        self.overwrite = overwrite
        if output.exists() and not overwrite:
            raise InputError(
                f"--output {output} already exists; choose a new directory, remove it, or pass --overwrite"
            )
        # The operator's layout (kubequant/<model>/<hash> on a fresh claim) has no parents yet.
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InputError(f"--output {output}: {output.parent} is not a directory") from None
        self.tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []
        self.quantized_shapes: dict[str, list[int]] = {}

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def add_layer(self, prefix: str, quantized: dict[str, QuantizedWeight], others: dict[str, torch.Tensor]) -> None:
        """The pipeline's sink: pack each quantized Linear, copy the layer's other tensors."""
        for name, qw in quantized.items():
            self.quantized_shapes[prefix + name] = list(qw.codes.shape)
            for suffix, tensor in gptq_tensors(qw, self.recipe.bits).items():
                self.add(f"{prefix}{name}.{suffix}", tensor)
        for name, tensor in others.items():
            self.add(name, tensor)

    def _flush(self) -> None:
        if not self._pending:
            return
        file = f"shard-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._pending, self.tmp / file, metadata={"format": "pt"})
        self._shards.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self, source_dir: Path, version: str, allow_unservable: bool = False) -> int:
        """Write the last shard, the index, the configs and the copied files, and verify the result.
        Returns the weights' size in bytes. What remains is `commit`: the manifest and the rename."""
        self._flush()
        total = len(self._shards)
        weight_map = {}
        for number, (file, names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{total:05d}.safetensors"
            (self.tmp / file).rename(self.tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        total_size = sum((self.tmp / f).stat().st_size for f in set(weight_map.values()))
        _write_json(self.tmp / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})

        qconfig = quantization_config(self.recipe, version)
        config = json.loads((source_dir / "config.json").read_text())
        config["quantization_config"] = qconfig
        _write_json(self.tmp / "config.json", config)
        _write_json(self.tmp / QUANTIZE_CONFIG_FILE, qconfig)
        for name in COPIED_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, self.tmp / name)
        verify_checkpoint(self.tmp, allow_unservable=allow_unservable)
        return total_size

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (with every file's checksum) and rename the checkpoint into place.
        Returns the manifest as written."""
        manifest = dict(manifest)
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(self.tmp.iterdir())
        }
        _write_json(self.tmp / MANIFEST_FILE, manifest)
        if not self.output.exists():
            os.rename(self.tmp, self.output)
        elif self.overwrite:
            # Swap by two renames so a reader sees the old checkpoint or the new one, never a mix.
            old = self.output.parent / f".{self.output.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(self.output, old)
            os.rename(self.tmp, self.output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            raise InputError(f"--output {self.output} appeared while quantizing; the result was not moved there")
        return manifest


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Verification: what vLLM would load silently but serve wrongly is caught here.
# ---------------------------------------------------------------------------------------------------


def read_quantization_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise InputError(f"{model_dir}: no config.json; not a model directory")
    qconfig = json.loads(config_path.read_text()).get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != "gptq":
        raise InputError(f"{model_dir}: config.json has no GPTQ quantization_config; not a GPTQ checkpoint")
    return qconfig


def iter_checkpoint_tensors(model_dir: Path):
    """(name, safe_open handle) for every tensor in the checkpoint's safetensors files."""
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle


def gptq_part(name: str) -> tuple[str, str] | None:
    """('model.layers.0.mlp.down_proj', 'qweight') for a GPTQ tensor's name; None for any other tensor."""
    for suffix in GPTQ_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix[1:]
    return None


@dataclass(frozen=True)
class _Header:
    """One tensor as its file's header describes it; `read` loads it."""

    file: Path
    name: str
    shape: list[int]
    dtype: str  # safetensors' names: I32, F16, BF16, ...

    def read(self) -> torch.Tensor:
        # Opened for this tensor alone: a handle kept open keeps every page read through it resident.
        with safe_open(self.file, framework="pt") as handle:
            return handle.get_tensor(self.name)


def verify_checkpoint(model_dir: Path, allow_unservable: bool = False) -> dict:
    """Check a GPTQ checkpoint against the vLLM 0.32 contract; raise CheckpointError listing every
    problem found. Returns a summary (quantized layer count, shapes)."""
    qconfig = read_quantization_config(model_dir)
    problems: list[str] = []
    for key in ("bits", "group_size", "desc_act", "sym"):
        if key not in qconfig:
            problems.append(f"quantization_config lacks {key!r} (vLLM requires it)")
    bits, group_size = qconfig.get("bits", 4), qconfig.get("group_size", -1)
    if qconfig.get("desc_act"):
        problems.append("desc_act is true: vLLM 0.32 refuses dynamic act-order with groups; write static act-order")
    if not allow_unservable:
        problems.extend(unservable_reasons(bits, group_size, bool(qconfig.get("sym", True))))

    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        for file in sorted(set(weight_map.values())):
            if not (model_dir / file).exists():
                problems.append(f"index names {file}, which is missing")

    # Shapes and dtypes come from the files' headers; only scales and g_idx are read, one tensor at a
    # time, so verifying takes the memory of one layer's scales whatever the model's size.
    parts_of: dict[str, dict[str, _Header]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if part := gptq_part(name):
                    info = handle.get_slice(name)
                    parts_of.setdefault(part[0], {})[part[1]] = _Header(file, name, info.get_shape(), info.get_dtype())
    if not parts_of:
        problems.append("no quantized tensors (*.qweight) found")
    pack = 32 // bits if 32 % bits == 0 else None
    shapes = {}
    for layer, parts in sorted(parts_of.items()):
        missing = {"qweight", "scales", "qzeros"} - set(parts)
        if missing:
            problems.append(f"{layer}: missing {sorted(missing)}")
            continue
        qweight, scales, qzeros = parts["qweight"], parts["scales"], parts["qzeros"]
        k = qweight.shape[0] * 32 // bits
        n = qweight.shape[1]
        shapes[layer] = [n, k]
        group = k if group_size == -1 else group_size
        if qweight.dtype != "I32" or qzeros.dtype != "I32":
            problems.append(f"{layer}: qweight/qzeros must be int32")
        if scales.dtype != "F16":
            problems.append(f"{layer}: scales must be float16, found {scales.dtype}")
        if k % group:
            problems.append(f"{layer}: in_features {k} not divisible by group_size {group}")
            continue
        if tuple(scales.shape) != (k // group, n):
            problems.append(f"{layer}: scales shape {tuple(scales.shape)} != {(k // group, n)}")
        if pack and tuple(qzeros.shape) != (k // group, n // pack):
            problems.append(f"{layer}: qzeros shape {tuple(qzeros.shape)} != {(k // group, n // pack)}")
        if not torch.isfinite(scales.read().float()).all():
            problems.append(f"{layer}: scales hold NaN or inf")
        if "g_idx" in parts:
            expected = torch.arange(k, dtype=torch.int32) // group
            if not torch.equal(parts["g_idx"].read().to(torch.int32), expected):
                problems.append(
                    f"{layer}: g_idx is not arange(in_features) // group_size; vLLM ignores g_idx and would "
                    "serve this layer with the wrong scales"
                )
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    return {"quantized_linears": len(parts_of), "shapes": shapes}
