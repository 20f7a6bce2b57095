"""Perplexity, one convention everywhere (the GPTQ paper's).

The evaluation text is joined with blank lines and tokenized once; the windows are non-overlapping
slices of seq_len tokens; ppl = exp(total NLL / tokens predicted), where each window predicts its
tokens 1..seq_len-1. The same windows go to PyTorch and to vLLM, so the numbers compare directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from quantizer.errors import InputError
from quantizer.textdata import read_texts, tokenize_corpus


@dataclass
class Perplexity:
    ppl: float
    nll_sum: float
    tokens_scored: int
    windows: int
    engine: str

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len]; with max_windows, that many spread evenly over the text."""
    if seq_len < 2:
        raise InputError(f"evaluation seq_len must be at least 2 (got {seq_len})")
    count = ids.numel() // seq_len
    if count < 1:
        raise InputError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "use more text or a shorter evaluation seq_len"
        )
    windows = ids[: count * seq_len].view(count, seq_len)
    if max_windows is not None and max_windows < count:
        picks = torch.linspace(0, count - 1, max_windows).round().long().unique()
        windows = windows[picks]
    return windows


def load_evaluation_windows(path, tokenizer, seq_len: int, max_windows: int | None = None, jsonl_field: str = "text"):
    return evaluation_windows(tokenize_corpus(tokenizer, read_texts(path, jsonl_field)), seq_len, max_windows)


def from_nll(nll_sum: float, tokens: int, windows: int, engine: str) -> Perplexity:
    return Perplexity(ppl=math.exp(nll_sum / tokens), nll_sum=nll_sum, tokens_scored=tokens, windows=windows, engine=engine)


@torch.no_grad()
def torch_perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, engine: str = "torch") -> Perplexity:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        total += float(
            nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
    return from_nll(total, windows.shape[0] * (windows.shape[1] - 1), windows.shape[0], engine)


def load_dequantized_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A plain Transformers model whose Linear weights are the checkpoint's dequantized GPTQ tensors,
    read exactly as stored (g_idx included): the reference vLLM must agree with."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantizer.checkpoint import GPTQ_SUFFIXES, iter_checkpoint_tensors, read_quantization_config
    from quantizer.packing import dequantize_gptq

    qconfig = read_quantization_config(model_dir)
    bits, group_size = qconfig["bits"], qconfig["group_size"]
    config_dict = json.loads((model_dir / "config.json").read_text())
    config_dict.pop("quantization_config")
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    gptq: dict[str, dict[str, torch.Tensor]] = {}
    for name, handle in iter_checkpoint_tensors(model_dir):
        suffix = next((s for s in GPTQ_SUFFIXES if name.endswith(s)), None)
        if suffix:
            gptq.setdefault(name[: -len(suffix)], {})[suffix[1:]] = handle.get_tensor(name)
        else:
            state[name] = handle.get_tensor(name).to(dtype)
    for layer, parts in gptq.items():
        k = parts["qweight"].shape[0] * 32 // bits
        parts.setdefault("g_idx", torch.arange(k, dtype=torch.int32) // (k if group_size == -1 else group_size))
        state[f"{layer}.weight"] = dequantize_gptq(parts, bits).to(dtype)
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the checkpoint: rebuild them for real.
    for module_name, module in model.named_modules():
        if "rotary" in module_name:
            parent_name, _, attr = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                setattr(parent, attr, type(module)(config=config))
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise InputError(f"{model_dir}: tensors missing from the checkpoint: {missing[:5]}")
    return model.to(device).eval()
