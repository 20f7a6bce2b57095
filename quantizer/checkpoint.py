"""The checkpoint vLLM 0.32 serves as it is, written atomically, and its verification.

Two layouts of the same codes and scales (quantizer/formats.py): compressed-tensors (the default) and
GPTQ; their contracts are in docs/development.md ("The checkpoint contract"). The checkpoint is
assembled in a hidden temporary directory next to the target and renamed into place only when it is
complete and verified, so a failure never leaves a half-written model where a server could pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantizer.contract import COMPRESSED_TENSORS_FORMAT, DEFAULT_FORMAT, MANIFEST_FILE, unservable_reasons
from quantizer.errors import InputError
from quantizer.formats import (
    MIXED_NEEDS_COMPRESSED_TENSORS,
    CheckpointFormat,
    Header,
    Scheme,
    checkpoint_format,
    format_of,
    write_json,
)
from quantizer.gptq import QuantizedWeight, QuantRecipe
from quantizer.termination import Terminated
from quantizer.termination import check as check_termination

if TYPE_CHECKING:
    from quantizer.mixed import Plan

log = logging.getLogger(__name__)

# The writer holds a shard in host memory until it is written (safetensors writes a file at once),
# so this bounds the writer's memory whatever the model's size: 1 GB, not the Hub's usual 5 GB.
MAX_SHARD_BYTES = 10**9
INDEX_FILE = "model.safetensors.index.json"
# In a partial output: who writes it. The writer touches it every HEARTBEAT_SECONDS; a partial whose
# writer is a dead process on this host, or whose heartbeat stopped STALE_AFTER_SECONDS ago (a Pod
# on another node, OOM-killed or preempted), is a leftover that the next writer of the target removes.
WRITER_FILE = ".writer.json"
# In a partial output: the layers finished so far, their shards' digests and statistics, and the key of
# the run (source, recipe, calibration, format, version): a retry with the same key resumes from it.
PROGRESS_FILE = ".progress.json"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0
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


class CheckpointError(ValueError):
    """A checkpoint that breaks the contract vLLM relies on."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class CheckpointWriter:
    """Streams tensors into safetensors shards in a temporary directory; `commit` renames it into place."""

    def __init__(
        self, output: Path, recipe: QuantRecipe, max_shard_bytes: int | None = None, overwrite: bool = False,
        format_name: str = DEFAULT_FORMAT, resume_key: str | None = None, plan: Plan | None = None,
    ):
        self.output = output
        self.recipe = recipe
        self.plan = plan  # mixed precision: each Linear's own recipe (quantizer/mixed.py)
        self.format: CheckpointFormat = checkpoint_format(format_name)
        if plan is not None and self.format.name != COMPRESSED_TENSORS_FORMAT:
            raise InputError(MIXED_NEEDS_COMPRESSED_TENSORS)
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
        self.resume_key = resume_key
        self.tmp = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
        # The finished layers of a writer that is gone, when it ran with the same key: resumed from.
        self.resumed: list[dict] = _adopt(output, resume_key, self.tmp) if resume_key else []
        self.tmp.mkdir(exist_ok=True)  # an adopted partial is already there
        write_json(self.tmp / WRITER_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                             "started": time.time()})
        remove_stale_partials(output)  # after ours is marked live
        self._stop_heartbeat = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="checkpoint-heartbeat", daemon=True)
        self._heartbeat.start()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = [(shard["file"], shard["names"]) for layer in self.resumed
                                                     for shard in layer["shards"]]
        self.quantized_shapes: dict[str, list[int]] = {
            layer["prefix"] + name: shape for layer in self.resumed for name, shape in layer["shapes"].items()}
        self.layers_written = len(self.resumed)
        self._progress: list[dict] = list(self.resumed)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is Terminated and self._progress and self.resume_key:
            self.release()  # a preempted run: its finished layers stay for the retry to resume from
        elif exc_type is not None or self.tmp.exists():
            self.abort()

    def release(self) -> None:
        """Stop writing and leave the partial output to the next writer (its writer is now gone)."""
        self._stop_heartbeat.set()
        with contextlib.suppress(FileNotFoundError):
            (self.tmp / WRITER_FILE).unlink()

    def abort(self) -> None:
        self._stop_heartbeat.set()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.tmp / WRITER_FILE)
            except OSError:  # removed under us (abort, commit): nothing to keep alive
                return

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def add_layer(self, prefix: str, quantized: dict[str, QuantizedWeight], others: dict[str, torch.Tensor]) -> None:
        """The pipeline's sink: pack each quantized Linear, copy the layer's other tensors. Between
        layers is a safe point to stop at when SIGTERM has arrived."""
        kept = "its finished layers were kept for the retry to resume from" if self._progress and self.resume_key \
            else "the partial output was removed"
        check_termination(f"after {self.layers_written} decoder layers; {kept}")
        self.layers_written += 1
        first_shard = len(self._shards)
        for name, qw in quantized.items():
            self.quantized_shapes[prefix + name] = list(qw.codes.shape)
            for suffix, tensor in self.format.layer_tensors(qw, self._recipe_of(prefix + name)).items():
                self.add(f"{prefix}{name}.{suffix}", tensor)
        for name, tensor in others.items():
            self.add(name, tensor)
        if self.resume_key is None:
            return
        # Each layer ends its shard, so that what is on disk is whole layers, each with its digest.
        self._flush()
        shards = [{"file": file, "names": names, "sha256": sha256_file(self.tmp / file)}
                  for file, names in self._shards[first_shard:]]
        self._progress.append({
            "prefix": prefix, "shards": shards,
            "shapes": {name: list(qw.codes.shape) for name, qw in quantized.items()},
            "linears": {name: {"relative_error": qw.relative_error, "damp": qw.damp} for name, qw in quantized.items()},
        })
        progress = self.tmp / f"{PROGRESS_FILE}.tmp"
        write_json(progress, {"key": self.resume_key, "layers": self._progress})
        os.replace(progress, self.tmp / PROGRESS_FILE)  # a reader sees the old record or the new one

    def stored_layer(self, index: int) -> dict[str, torch.Tensor]:
        """{linear name: dequantized weight [out, in] float32} of a resumed layer, read from its shards."""
        record = self.resumed[index]
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for shard in record["shards"]:
            with safe_open(self.tmp / shard["file"], framework="pt") as handle:
                for name in shard["names"]:
                    if name.startswith(record["prefix"]) and (part := self.format.part(name)):
                        parts.setdefault(part[0][len(record["prefix"]):], {})[part[1]] = handle.get_tensor(name)
        out = {}
        for name, tensors in parts.items():
            recipe = self._recipe_of(record["prefix"] + name)
            out[name] = self.format.dequantize(tensors, Scheme(recipe.bits, recipe.group_size, recipe.sym))
        return out

    def _recipe_of(self, linear: str) -> QuantRecipe:
        """The recipe a quantized Linear (checkpoint name) was written with."""
        own = self.plan.recipe_for(linear) if self.plan is not None else self.recipe
        if own is None:
            raise RuntimeError(f"{linear}: the plan keeps it unquantized, yet it was quantized")
        return own

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
        write_json(self.tmp / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})

        config = json.loads((source_dir / "config.json").read_text())
        self.format.write_config(self.tmp, config, self.recipe, version, self.plan)
        for name in COPIED_FILES:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, self.tmp / name)
        verify_checkpoint(self.tmp, allow_unservable=allow_unservable)
        return total_size

    def commit(self, manifest: dict) -> dict:
        """Write the manifest (with every file's checksum) and rename the checkpoint into place.
        Returns the manifest as written."""
        check_termination(f"after all {self.layers_written} decoder layers, before the checkpoint was moved into "
                          "place; the partial output was removed")
        self._stop_heartbeat.set()
        (self.tmp / WRITER_FILE).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.tmp / PROGRESS_FILE).unlink()
        manifest = dict(manifest)
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(self.tmp.iterdir())
        }
        write_json(self.tmp / MANIFEST_FILE, manifest)
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
        remove_stale_partials(self.output)  # writers that died while this one ran
        return manifest


def _partials(output: Path) -> list[Path]:
    """The partial outputs of `output` on its volume, live or not."""
    if not output.parent.is_dir():
        return []
    return [p for p in output.parent.glob(f".{output.name}.partial-*") if p.is_dir()]


def _writer_gone(partial: Path, now: float) -> bool:
    """Whether a partial output's writer is gone: released (progress kept, writer file removed), a dead
    process on this host, or no heartbeat for STALE_AFTER_SECONDS. A partial with neither file is one
    whose writer has not written its file yet, or predates them: gone once it is old."""
    lock = partial / WRITER_FILE
    if not lock.exists() and (partial / PROGRESS_FILE).exists():
        return True
    try:
        writer = json.loads(lock.read_text())
        beat = lock.stat().st_mtime
    except (OSError, ValueError):
        return now - partial.stat().st_mtime > STALE_AFTER_SECONDS
    if writer.get("host") == socket.gethostname():
        try:
            os.kill(int(writer["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, TypeError, ValueError):
            pass
    return now - beat > STALE_AFTER_SECONDS


def _adopt(output: Path, key: str, target: Path) -> list[dict]:
    """Take over the partial output of a writer that is gone and ran with `key` (the one with the
    most finished layers): renamed to `target`, which makes it ours (a rename succeeds for one writer
    only), and its finished layers returned; a layer whose shards fail their digest ends the list."""
    now = time.time()
    candidates = []
    for partial in _partials(output):
        try:
            progress = json.loads((partial / PROGRESS_FILE).read_text())
            if progress.get("key") == key and _writer_gone(partial, now):
                candidates.append((len(progress["layers"]), partial, progress))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    for _, partial, progress in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            os.rename(partial, target)
        except OSError:  # another writer took it first
            continue
        with contextlib.suppress(FileNotFoundError):
            (target / WRITER_FILE).unlink()
        layers = []
        for layer in progress["layers"]:
            if not all((target / s["file"]).is_file() and sha256_file(target / s["file"]) == s["sha256"]
                       for s in layer["shards"]):
                break
            layers.append(layer)
        kept = {s["file"] for layer in layers for s in layer["shards"]}
        for file in target.iterdir():  # shards past the last whole layer are redone
            if file.name not in kept and file.name != PROGRESS_FILE:
                file.unlink()
        log.warning("resuming from %s: %d finished decoder layers", partial, len(layers))
        return layers
    return []


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove the partial outputs of `output` whose writers are gone; a live writer's is kept."""
    removed = []
    now = time.time()
    for partial in _partials(output):
        try:
            if _writer_gone(partial, now):
                shutil.rmtree(partial)
                removed.append(partial)
                log.warning("removed %s, left by a writer that is gone", partial)
        except OSError:  # another writer removed it first
            continue
    return removed


# ---------------------------------------------------------------------------------------------------
# Verification: what vLLM would load silently but serve wrongly is caught here.
# ---------------------------------------------------------------------------------------------------


def read_quantization_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise InputError(f"{model_dir}: no config.json; not a model directory")
    qconfig = json.loads(config_path.read_text()).get("quantization_config")
    if not qconfig:
        raise InputError(f"{model_dir}: config.json has no quantization_config; not a quantized checkpoint")
    try:
        format_of(qconfig)
    except InputError as exc:
        raise InputError(f"{model_dir}: {exc}") from None
    return qconfig


def iter_checkpoint_tensors(model_dir: Path):
    """(name, safe_open handle) for every tensor in the checkpoint's safetensors files."""
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle


def quantized_parts(model_dir: Path, fmt: CheckpointFormat) -> dict[str, dict[str, Header]]:
    """{linear: {part: Header}} of every quantized Linear, from the files' headers (nothing is read)."""
    parts_of: dict[str, dict[str, Header]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if part := fmt.part(name):
                    info = handle.get_slice(name)
                    parts_of.setdefault(part[0], {})[part[1]] = Header(file, name, info.get_shape(), info.get_dtype())
    return parts_of


def verify_checkpoint(model_dir: Path, allow_unservable: bool = False) -> dict:
    """Check a checkpoint against its format's vLLM 0.32 contract; raise CheckpointError listing every
    problem found. Returns a summary (format, quantized layer count, shapes)."""
    qconfig = read_quantization_config(model_dir)
    fmt = format_of(qconfig)
    try:
        schemes = fmt.schemes(qconfig)
        fmt.scheme(qconfig)  # every layer the config does not name has one
    except InputError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from None
    problems: list[str] = []
    for scheme in schemes:  # each config group's (mixed precision: several), each problem said once
        reasons = ["dynamic act-order (desc_act, or actorder group): vLLM 0.32 refuses it with groups; "
                   "write static act-order"] if scheme.desc_act else []
        if not allow_unservable:
            reasons += unservable_reasons(scheme.bits, scheme.group_size, scheme.sym)
        problems += [r for r in reasons if r not in problems]

    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        for file in sorted(set(weight_map.values())):
            if not (model_dir / file).exists():
                problems.append(f"index names {file}, which is missing")

    # Shapes and dtypes come from the files' headers; only small tensors (scales, g_idx, shapes) are
    # read, one at a time, so verifying takes the memory of one layer's scales whatever the model's size.
    parts_of = quantized_parts(model_dir, fmt)
    if not parts_of:
        problems.append(f"no quantized tensors (*.{fmt.required[0]}) found")
    shapes = {}
    for layer, parts in sorted(parts_of.items()):
        missing = set(fmt.required) - set(parts)
        if missing:
            problems.append(f"{layer}: missing {sorted(missing)}")
            continue
        scheme = fmt.scheme_for(qconfig, layer)
        layer_problems = fmt.check_layer(layer, parts, scheme)
        problems += layer_problems
        if not layer_problems:
            shapes[layer] = list(fmt.linear_shape(parts, scheme))
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    return {"format": fmt.name, "quantized_linears": len(parts_of), "shapes": shapes}


def verify_manifest(model_dir: Path) -> int:
    """Every file the manifest lists, with its size and SHA-256, and the format it names; raise
    CheckpointError listing what differs. Returns the number of files checked."""
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no {MANIFEST_FILE}; not a checkpoint kubequant wrote")
    manifest = json.loads(path.read_text())
    listed = manifest.get("files") or {}
    problems = []
    for name, expected in sorted(listed.items()):
        file = model_dir / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != expected.get("bytes") or sha256_file(file) != expected.get("sha256"):
            problems.append(f"{name} differs from the manifest (size or SHA-256)")
    unlisted = sorted(p.name for p in model_dir.iterdir() if p.name not in listed and p.name != MANIFEST_FILE)
    if unlisted:
        problems.append(f"files not in the manifest: {', '.join(unlisted)}")
    written = format_of(read_quantization_config(model_dir)).name
    if manifest.get("format", "gptq") != written:
        problems.append(f"the manifest says format {manifest.get('format')!r}, config.json holds {written!r}")
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    return len(listed)
