"""Perplexity, one convention everywhere (the GPTQ paper's).

The evaluation text is joined with blank lines and tokenized once; the windows are non-overlapping
slices of seq_len tokens; ppl = exp(total NLL / tokens predicted), where each window predicts its
tokens 1..seq_len-1. The same windows go to PyTorch and to vLLM, so the numbers compare directly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
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


@dataclass
class EvalWindows:
    """Token windows [n, seq_len] and, per window, the first position whose token is scored: 1 for
    non-overlapping windows; with a stride, later windows score only the tokens no earlier window
    scored, each seen with up to seq_len - 1 tokens of context."""

    ids: torch.Tensor
    score_from: list[int]

    @property
    def tokens_scored(self) -> int:
        return sum(self.ids.shape[1] - start for start in self.score_from)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, windows: slice) -> EvalWindows:
        """Some of the windows, each with its scored positions."""
        return EvalWindows(self.ids[windows], self.score_from[windows])


def evaluation_windows(
    ids: torch.Tensor, seq_len: int, max_windows: int | None = None, stride: int | None = None
) -> EvalWindows:
    """Windows of seq_len tokens every `stride` tokens (default seq_len: non-overlapping); with
    max_windows, that many spread evenly over the text."""
    if seq_len < 2:
        raise InputError(f"evaluation seq_len must be at least 2 (got {seq_len})")
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise InputError(f"evaluation stride {stride} must be between 1 and seq_len ({seq_len})")
    if ids.numel() < seq_len:
        raise InputError(
            f"evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "use more text or a shorter evaluation seq_len"
        )
    starts = torch.arange(0, ids.numel() - seq_len + 1, stride)
    if max_windows is not None and max_windows < starts.numel():
        starts = starts[torch.linspace(0, starts.numel() - 1, max_windows).round().long().unique()]
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    score_from = [1 if start == 0 else seq_len - stride for start in starts.tolist()]
    return EvalWindows(ids=windows, score_from=[max(1, s) for s in score_from])


def load_evaluation_windows(
    path, tokenizer, seq_len: int, max_windows: int | None = None, jsonl_field: str = "text",
    stride: int | None = None,
) -> EvalWindows:
    return evaluation_windows(tokenize_corpus(tokenizer, read_texts(path, jsonl_field)), seq_len, max_windows, stride)


def _scored(windows: int, length: int, score_from: list[int], device) -> torch.Tensor:
    """[windows, length - 1]: position j predicts token j + 1, scored from the window's score_from on."""
    positions = torch.arange(1, length, device=device)
    return positions.unsqueeze(0) >= torch.tensor(score_from, device=device).unsqueeze(1)


def window_nll(logits: torch.Tensor, ids: torch.Tensor, score_from: list[int]) -> float:
    """Summed NLL of each window's tokens from its score_from position on (logits [b, L, V])."""
    nll = nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    return float((nll * _scored(*ids.shape, score_from, ids.device)).sum())


@dataclass(frozen=True)
class WindowComparison:
    """Two models on the same windows' scored tokens (sums: divide by the tokens scored)."""

    nll_reference: float
    nll_quantized: float
    kl: float  # KL(reference || quantized) of the next-token distributions, over the whole vocabulary
    agree: int  # tokens whose most likely next token is the same in both


@dataclass(frozen=True)
class Comparison:
    """A quantized model against its source over windows: perplexities, mean KL(source || quantized)
    per token (nats, whole vocabulary), and the share of tokens whose most likely next token agrees."""

    baseline_ppl: float
    quantized_ppl: float
    kl: float
    top1: float

    @classmethod
    def of(cls, batches: list[WindowComparison], tokens: int) -> Comparison:
        return cls(baseline_ppl=math.exp(sum(b.nll_reference for b in batches) / tokens),
                   quantized_ppl=math.exp(sum(b.nll_quantized for b in batches) / tokens),
                   kl=sum(b.kl for b in batches) / tokens, top1=sum(b.agree for b in batches) / tokens)


def window_comparison(reference: torch.Tensor, quantized: torch.Tensor, ids: torch.Tensor,
                      score_from: list[int]) -> WindowComparison:
    """Both models' NLL, their KL and top-1 agreement over the positions window_nll scores (logits
    [b, L, V] of the same windows), each model's log-probabilities computed once."""
    log_p = torch.log_softmax(reference[:, :-1].float(), dim=-1)
    log_q = torch.log_softmax(quantized[:, :-1].float(), dim=-1)
    scored = _scored(*ids.shape, score_from, ids.device)
    targets = ids[:, 1:].unsqueeze(-1)

    def nll(log_probs: torch.Tensor) -> float:
        return float((-log_probs.gather(-1, targets).squeeze(-1) * scored).sum())

    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = log_p.argmax(-1) == log_q.argmax(-1)
    return WindowComparison(nll_reference=nll(log_p), nll_quantized=nll(log_q), kl=float((kl * scored).sum()),
                            agree=int((agree & scored).sum()))


def from_nll(nll_sum: float, tokens: int, windows: int, engine: str) -> Perplexity:
    return Perplexity(ppl=math.exp(nll_sum / tokens), nll_sum=nll_sum, tokens_scored=tokens, windows=windows, engine=engine)


@dataclass
class EngineScores:
    """What an engine measured of one model: perplexity on the windows and, when asked, each scored
    token's top-k next-token log-probabilities (window by window, position by position, most likely
    first), greedy completions of the prompts, throughput and task scores."""

    perplexity: Perplexity
    top: list[list[tuple[int, float]]]
    generations: list[list[int]]
    throughput: list[dict] = field(default_factory=list)  # per batch size (vLLM only)
    tasks: list = field(default_factory=list)  # TaskScore per lm-evaluation-harness task (quantizer/tasks.py)


@torch.no_grad()
def torch_perplexity(model: nn.Module, windows: EvalWindows, batch_size: int = 4, engine: str = "torch") -> Perplexity:
    return torch_scores(model, windows, batch_size=batch_size, engine=engine).perplexity


@torch.no_grad()
def torch_scores(model: nn.Module, windows: EvalWindows, *, top_k: int = 0, prompts: list[list[int]] = (),
                 max_new_tokens: int = 0, batch_size: int = 4, engine: str = "torch") -> EngineScores:
    """EngineScores in PyTorch: the reference engine, and the evaluator's on machines without vLLM."""
    device = next(model.parameters()).device
    total = 0.0
    top: list[list[tuple[int, float]]] = []
    for start in range(0, len(windows), batch_size):
        batch = windows.ids[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits
        total += window_nll(logits, batch, windows.score_from[start : start + batch_size])
        if top_k:
            values, tokens = torch.log_softmax(logits[:, :-1].float(), dim=-1).topk(top_k, dim=-1)
            for row, first in enumerate(windows.score_from[start : start + batch_size]):
                # Position j predicts token j + 1: the scored tokens first..L-1 are predicted at first-1..L-2.
                for j in range(first - 1, batch.shape[1] - 1):
                    top.append(list(zip(tokens[row, j].tolist(), values[row, j].tolist(), strict=True)))
    generations = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        for _ in range(max_new_tokens):
            next_token = model(ids, use_cache=False).logits[0, -1].argmax()
            ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
        generations.append(ids[0, len(prompt) :].tolist())
    return EngineScores(from_nll(total, windows.tokens_scored, len(windows), engine), top, generations)


def load_prompts(path: Path, tokenizer, jsonl_field: str = "text") -> list[list[int]]:
    """Generation prompts as token ids: one per non-empty line of a .txt file, one per record of a
    .jsonl file (its `jsonl_field`), with the tokenizer's special tokens (BOS) as a server adds them."""
    path = Path(path)
    if path.suffix == ".txt" and path.is_file():
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = [t for t in read_texts(path, jsonl_field) if t.strip()]
    if not texts:
        raise InputError(f"--generation-prompts {path}: no prompts found; one per line (.txt) or per record (.jsonl)")
    return [tokenizer(text)["input_ids"] for text in texts]


def load_dequantized_model(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A plain Transformers model whose Linear weights are the checkpoint's dequantized tensors, in
    either format, read exactly as stored (GPTQ's g_idx included): the reference vLLM must agree with."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantizer.checkpoint import iter_checkpoint_tensors, read_quantization_config
    from quantizer.experts import unfuse_experts
    from quantizer.families import family_of
    from quantizer.formats import format_of
    from quantizer.pipeline import find_decoder_layers

    qconfig = read_quantization_config(model_dir)
    fmt = format_of(qconfig)
    config_dict = json.loads((model_dir / "config.json").read_text())
    config_dict.pop("quantization_config")
    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Mixture-of-experts models hold one Linear per expert, as the checkpoint does (quantizer/experts.py).
    family = family_of(config.architectures or [])
    name_of = family.module_name if family else str
    if family is not None and family.experts is not None:
        _, layers = find_decoder_layers(model, config.num_hidden_layers)
        unfuse_experts(layers, family.experts)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, handle in iter_checkpoint_tensors(model_dir):
        if part := fmt.part(name):
            quantized.setdefault(part[0], {})[part[1]] = handle.get_tensor(name)
        else:
            state[name_of(name)] = handle.get_tensor(name).to(dtype)
    for layer, parts in quantized.items():  # each Linear by its own scheme (mixed precision: several)
        state[f"{name_of(layer)}.weight"] = fmt.dequantize(parts, fmt.scheme_for(qconfig, layer)).to(dtype)
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise InputError(f"{model_dir}: tensors missing from the checkpoint: {missing[:5]}")
    initialize_buffers(model, model, device)
    return model.to(device).eval()


def initialize_buffers(model, module: nn.Module, device) -> None:
    """Buffers a checkpoint does not hold (rotary frequencies, Gemma's embedding scale), still on the meta
    device, set by the model's own initialisation as Transformers sets them for a model built on the
    meta device; the module's parameters, already loaded, are kept."""
    for sub in module.modules():
        if not any(b.is_meta for b in sub.buffers(recurse=False)):
            continue
        loaded = {name: p.detach().clone() for name, p in sub.named_parameters(recurse=False)}
        sub.to_empty(device=device, recurse=False)
        model._init_weights(sub)
        with torch.no_grad():
            for name, value in loaded.items():
                getattr(sub, name).copy_(value)
