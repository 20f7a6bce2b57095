"""Calibration windows: seeded random windows of seq_len tokens from local text, or windows
tokenized beforehand (a safetensors file whose `input_ids` is [windows, tokens])."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from quantizer.errors import InputError
from quantizer.textdata import digest_tokens, read_texts, tokenize_corpus

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    windows: torch.Tensor  # [samples, seq_len] token ids
    source: str
    digest: str  # of the sampled token ids: the same digest means the same calibration
    corpus_tokens: int

    @property
    def samples(self) -> int:
        return self.windows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.windows.shape[1]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "corpus_tokens": self.corpus_tokens,
            "digest": self.digest,
        }


def clamp_seq_len(seq_len: int, max_context: int | None, what: str) -> int:
    if max_context and seq_len > max_context:
        log.warning("%s seq_len %d exceeds the model's context %d; using %d", what, seq_len, max_context, max_context)
        return max_context
    return seq_len


TOKEN_IDS_KEY = "input_ids"


def is_token_file(path: str | Path) -> bool:
    """Calibration already tokenized: no tokenizer is needed to read it."""
    return Path(path).suffix == ".safetensors"


def load_token_windows(path: Path, samples: int, seq_len: int) -> Calibration:
    """The first `samples` rows of the file's input_ids, each cut to seq_len: used as they are, so
    that every tool given the file calibrates on the same tokens."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise InputError(f"calibration {path}: not a readable safetensors file ({exc})") from None
    ids = tensors.get(TOKEN_IDS_KEY)
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        raise InputError(f"calibration {path}: needs an integer tensor {TOKEN_IDS_KEY!r} of shape [windows, tokens]; "
                         f"it holds {sorted(tensors)}")
    if ids.shape[0] < samples or ids.shape[1] < seq_len:
        raise InputError(f"calibration {path}: its {TOKEN_IDS_KEY} is {list(ids.shape)}, smaller than samples x seq_len = "
                         f"{samples} x {seq_len}; lower them or tokenize more")
    windows = ids[:samples, :seq_len].to(torch.long).contiguous()
    return Calibration(windows=windows, source=str(path), digest=digest_tokens(windows), corpus_tokens=ids.numel())


def load_calibration(
    path: str | Path,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
    jsonl_field: str = "text",
) -> Calibration:
    if samples < 1 or seq_len < 2:
        raise InputError(f"calibration needs samples >= 1 and seq_len >= 2 (got {samples} x {seq_len})")
    if is_token_file(path):
        return load_token_windows(Path(path), samples, seq_len)
    ids = tokenize_corpus(tokenizer, read_texts(path, jsonl_field))
    if ids.numel() < seq_len:
        raise InputError(
            f"calibration text {path} has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "add text or lower the calibration seq_len"
        )
    if ids.numel() < samples * seq_len:
        log.warning(
            "calibration text has %d tokens for %d x %d windows: windows will overlap; more text calibrates better",
            ids.numel(), samples, seq_len,
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return Calibration(windows=windows, source=str(path), digest=digest_tokens(windows), corpus_tokens=ids.numel())
