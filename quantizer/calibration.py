"""Calibration windows: seeded random windows of seq_len tokens from local text."""

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
